#!/usr/bin/env bash
# Featurize throughput on a GPU by output format (after bench/gpu.sh): bash bench/gpu_featurize.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
F="python3 -m bench.featurize --backbone resnet101 --layer layer4 --image_size 448 --batch_size 128 --precision bf16 --naive_num 100"
for args in "--num 8192 --decode device --format zarr --codec zstd --writer_threads 12 --num_workers 4" \
            "--num 8192 --decode device --format zarr --codec none --writer_threads 8 --num_workers 4" \
            "--num 8192 --decode device --format wds --writer_threads 8 --num_workers 4"; do
  echo "+ $args" | tee -a "$OUT/featurize3.txt"
  timeout 120 $F $args 2>&1 | grep -v "it/s\]" | tee -a "$OUT/featurize3.txt"
done
