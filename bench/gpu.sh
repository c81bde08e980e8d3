#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one prepared run (a lent H100/H200 or any CUDA machine):
#   bash bench/gpu.sh            # writes its logs to $OUT (default /tmp/bench-gpu)
# Python packages the machine lacks can sit as wheels in .whl/ (zarr, numcodecs, webdataset, ...).
set -u
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L | tee "$OUT/device.txt"
run() { local log=$1; shift; echo "+ $*" | tee -a "$OUT/$log"; timeout 150 "$@" 2>&1 | grep -v "it/s\]" | tee -a "$OUT/$log"; }
mkdir -p .bench-tmp  # featurize and store benchmarks write to disk, not a tmpfs
run featurize.txt env TMPDIR="$PWD/.bench-tmp" python3 -m bench.featurize --backbone resnet101 --layer layer4 --image_size 448 \
    --num 8192 --naive_num 100 --batch_size 128 --num_workers "$W" --precision bf16 --decode device --host_num 4096 --host_batch_size 128
run train.txt python3 -m bench.train --coco --batch_images 52 --steps 20 --precision bf16 --num_workers "$W"
run decode.txt python3 -m bench.decode --coco --images 5000 --batch 1000 --one_by_one 100
run featurize.txt env TMPDIR="$PWD/.bench-tmp" python3 -m bench.featurize --backbone resnet101 --layer layer4 --image_size 448 \
    --num 4096 --naive_num 50 --batch_size 128 --num_workers "$W" --precision bf16 --decode workers --host_num 0
run train.txt python3 -m bench.train --coco --batch_images 256 --steps 8 --precision bf16 --num_workers "$W"
# The feature store's read scaling with the host's cores (CPU only; on disk, not a tmpfs).
run store.txt env TMPDIR="$PWD/.bench-tmp" python3 -m bench.store --threads "$(nproc)" --zeros 0.37 --codecs blosc-zstd,none,wds
