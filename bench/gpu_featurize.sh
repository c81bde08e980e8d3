#!/usr/bin/env bash
# Featurize throughput on a GPU, by output format (after bench/gpu.sh): bash bench/gpu_featurize.sh
# ResNet-101 to layer4 at 448 px, bf16, compiled (--compile), JPEGs decoded by nvjpeg; logs in $OUT.
set -u
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L | tee "$OUT/device.txt"
mkdir -p .bench-tmp
export TMPDIR="$PWD/.bench-tmp" TORCHINDUCTOR_CACHE_DIR="$PWD/.bench-tmp/inductor"  # on disk, not a tmpfs
F="python3 -m bench.featurize --backbone resnet101 --layer layer4 --image_size 448 --batch_size 128 --precision bf16"
log() { echo "+ $*" | tee -a "$OUT/featurize5.txt"; }
# end to end, the fastest format first (this run also compiles the model once for the later ones)
for args in "--format wds --writer_threads 8 --num 8192" "--format zarr --codec none --writer_threads 8 --num 8192" \
            "--format zarr --codec blosc-zstd --writer_threads 12 --num 4096"; do
  for c in --compile ""; do  # eager if compiling fails here
    log "$c --decode device --num_workers 6 --naive_num 100 --host_num 0 $args"
    timeout 240 $F $c --decode device --num_workers 6 --naive_num 100 --host_num 0 $args > "$OUT/last.txt" 2>&1
    rc=$?
    grep -v "it/s\]\|Warning\|np.save\|warn" "$OUT/last.txt" | tail -40 | tee -a "$OUT/featurize5.txt"
    [ $rc = 0 ] && break
  done
  # the host side alone (the model replaced by ready-made grids)
  case "$args" in *blosc*) continue;; esac
  log "--host_only --host_num 4096 --host_batch_size 128 --shard_images 64 --num_workers 6 --decode device $args"
  timeout 60 $F --host_only --host_num 4096 --host_batch_size 128 --shard_images 64 --num_workers 6 --decode device $args 2>&1 \
    | grep -v "it/s\]" | tee -a "$OUT/featurize5.txt"
done
# the same without --compile: the eager model's end-to-end rate
log "--decode device --num_workers 6 --naive_num 20 --host_num 0 --format wds --writer_threads 8 --num 8192"
timeout 120 $F --decode device --num_workers 6 --naive_num 20 --host_num 0 --format wds --writer_threads 8 --num 8192 2>&1 \
  | grep -v "it/s\]\|Warning\|np.save\|warn" | tee -a "$OUT/featurize5.txt"
# the store in RAM (/dev/shm): what the software does when the disk is not the limit
log "TMPDIR=/dev/shm --compile --decode device --num_workers 6 --naive_num 50 --host_num 4096 --host_batch_size 128 --format zarr --codec none --writer_threads 16 --num 8192"
mkdir -p /dev/shm/bench && TMPDIR=/dev/shm/bench timeout 150 $F --compile --decode device --num_workers 6 --naive_num 50 --host_num 4096 \
  --host_batch_size 128 --format zarr --codec none --writer_threads 16 --num 8192 2>&1 \
  | grep -v "it/s\]\|Warning\|np.save\|warn" | tee -a "$OUT/featurize5.txt"
[ "${STORE:-0}" = 1 ] || exit 0
# the feature store's read speed with this host's cores (CPU only; on disk, not a tmpfs)
echo "+ bench.store --num 1024 --threads $(nproc)" | tee -a "$OUT/store2.txt"
timeout 75 python3 -m bench.store --num 1024 --threads "$(nproc)" --zeros 0.37 --codecs blosc-zstd,none,wds 2>&1 | tee -a "$OUT/store2.txt"
