#!/usr/bin/env bash
# Every GPU row of bench/RESULTS.md that is missing or stale, in one prepared run of at most
# ~8 minutes on one lent GPU (H100/H200 or any CUDA machine):
#   bash bench/gpu.sh            # one log per RESULTS row group in $OUT (default /tmp/bench-gpu)
# Python packages the machine lacks can sit as wheels in .whl/ (zarr, numcodecs, webdataset, ...).
# Each step has its own time limit, so one that hangs cannot take the others' time.
set -u
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L | tee "$OUT/device.txt"
mkdir -p .bench-tmp  # on disk, not a tmpfs (what featurize's writers are held to)
export TMPDIR="$PWD/.bench-tmp" TORCHINDUCTOR_CACHE_DIR="$PWD/.bench-tmp/inductor"
run() { local log=$1 limit=$2; shift 2; echo "+ $*" | tee -a "$OUT/$log"
        timeout "$limit" "$@" 2>&1 | grep -v "it/s\]\|Warning\|np.save\|warn" | tail -40 | tee -a "$OUT/$log"; }
F="python3 -m bench.featurize --backbone resnet101 --layer layer4 --image_size 448 --batch_size 128 --precision bf16"
# 1. featurize, with batches prepared ahead in a thread (decode_ahead 2) and, alternating in the
#    same run, on the main thread (decode_ahead 0): RESULTS "Batches prepared ahead" (featurize6.txt)
run featurize6.txt 150 $F --compile --decode device --num_workers "$W" --naive_num 30 --host_num 0 \
    --format zarr --codec none --writer_threads 8 --num 4096
# 2. training end to end from the store and resident, COCO dims, bf16: RESULTS "Training end to end" (train_e2e.txt)
run train_e2e.txt 120 python3 -m bench.train_e2e --coco --precision bf16 --batch_images 256 --steps 12 --num_workers "$W"
# 3. the training step against the per-step pattern (train.txt, current code)
run train.txt 90 python3 -m bench.train --coco --batch_images 256 --steps 8 --precision bf16 --num_workers "$W"
# 4. beam-3 decoding of 5,000 COCO-size images, batched vs one at a time (decode.txt)
run decode.txt 90 python3 -m bench.decode --coco --images 5000 --batch 1000 --one_by_one 100 --beam_size 3 --max_length 16
# 5. the store's reads with this host's cores (CPU only; store2.txt)
run store2.txt 60 python3 -m bench.store --num 1024 --threads "$(nproc)" --zeros 0.37 --codecs blosc-zstd,none,wds
