#!/usr/bin/env bash
# Every GPU row of bench/RESULTS.md that is missing or stale, in prepared runs on one lent GPU
# (H100/H200 or any CUDA machine); the steps' limits add up to ~11.5 minutes, so as two calls:
#   STEPS="1 3 5" bash bench/gpu.sh  # not measured yet: streaming, resident batches ahead, bench.train (<= 8 min)
#   STEPS="2 4" bash bench/gpu.sh    # the rest (<= 3.5 min); one log per RESULTS row group in $OUT
# Python packages the machine lacks can sit as wheels in .whl/ (zarr, numcodecs, webdataset, ...);
# an nginx the machine lacks in .nginx/ (the binary and its libraries, `.nginx/nginx` a wrapper).
# Each step has its own time limit, so one that hangs cannot take the others' time.
set -u
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L | tee "$OUT/device.txt"
mkdir -p .bench-tmp  # on disk, not a tmpfs (what featurize's writers are held to)
export TMPDIR="$PWD/.bench-tmp" TORCHINDUCTOR_CACHE_DIR="$PWD/.bench-tmp/inductor"
[ -x .nginx/nginx ] && export PATH="$PWD/.nginx:$PATH"
STEPS=${STEPS:-1 2 3 4 5}
want() { [[ " $STEPS " == *" $1 "* ]]; }
run() { local log=$1 limit=$2; shift 2; echo "+ $*" | tee -a "$OUT/$log"
        timeout "$limit" "$@" 2>&1 | grep -v "it/s\]\|Warning\|np.save\|warn" | tail -40 | tee -a "$OUT/$log"; }
# 1. HTTP streaming against local reads with this host's cores (nginx when .nginx/ or the host has it),
#    grid shards of featurize's size, the receiving thread on and off in the same rounds, then the
#    receive buffer (CPU only): RESULTS "Streaming over HTTP" (stream.txt, stream-rcv.txt)
want 1 && run stream.txt 90 python3 -m bench.stream --images 1024 --rounds 7
want 1 && run stream-rcv.txt 90 python3 -m bench.stream --images 1024 --rounds 7 --other receive_buffer
F="python3 -m bench.featurize --backbone resnet101 --layer layer4 --image_size 448 --batch_size 128 --precision bf16"
# 2. featurize, with batches prepared ahead in a thread (decode_ahead 2) and, alternating in the
#    same run, on the main thread (decode_ahead 0): RESULTS "Batches prepared ahead" (featurize6.txt)
want 2 && run featurize6.txt 130 $F --compile --decode device --num_workers "$W" --naive_num 30 --host_num 0 \
    --format zarr --codec none --writer_threads 8 --num 3072
# 3. training end to end from the store and resident, COCO dims, bf16: RESULTS "Training end to end" (train_e2e.txt)
want 3 && run train_e2e.txt 150 python3 -m bench.train_e2e --coco --precision bf16 --batch_images 128 --steps 8 --rounds 2 --num_workers 6
# 4. beam-3 decoding of 5,000 COCO-size images, batched vs one at a time (decode.txt)
want 4 && run decode.txt 70 python3 -m bench.decode --coco --images 5000 --batch 1000 --one_by_one 100 --beam_size 3 --max_length 16
# 5. the training step against the per-step pattern (train.txt, current code)
want 5 && run train.txt 150 python3 -m bench.train --coco --batch_images 256 --steps 8 --precision bf16 --num_workers 6
