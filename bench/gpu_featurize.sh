#!/usr/bin/env bash
# Featurize throughput on a GPU by output format (after bench/gpu.sh): bash bench/gpu_featurize.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
F="python3 -m bench.featurize --backbone resnet101 --layer layer4 --image_size 448 --batch_size 128 --precision bf16 --naive_num 100"
mkdir -p .bench-tmp
export TMPDIR="$PWD/.bench-tmp"  # on disk, not a tmpfs
# the host side alone (the model replaced by ready-made grids), by format and writer threads
for args in "--format zarr --codec blosc-zstd --writer_threads 12" "--format zarr --codec none --writer_threads 8" \
            "--format wds --writer_threads 8"; do
  echo "+ --host_only $args" | tee -a "$OUT/featurize3.txt"
  timeout 60 $F --host_only --host_num 4096 --host_batch_size 128 --shard_images 64 --num_workers 4 --decode device $args 2>&1 \
    | grep -v "it/s\]" | tee -a "$OUT/featurize3.txt"
done
for args in "--num 8192 --decode device --format zarr --codec blosc-zstd --writer_threads 12 --num_workers 4" \
            "--num 8192 --decode device --format zarr --codec none --writer_threads 8 --num_workers 4" \
            "--num 8192 --decode device --format wds --writer_threads 8 --num_workers 4"; do
  echo "+ $args" | tee -a "$OUT/featurize3.txt"
  timeout 120 $F $args --host_num 0 2>&1 | grep -v "it/s\]" | tee -a "$OUT/featurize3.txt"
done
