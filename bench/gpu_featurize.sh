#!/usr/bin/env bash
# Featurize throughput on a GPU, by output format (after bench/gpu.sh): bash bench/gpu_featurize.sh
# ResNet-101 to layer4 at 448 px, bf16, compiled (--compile), JPEGs decoded by nvjpeg; logs in $OUT.
# Every pipeline line is timed with batches prepared ahead in a thread (--decode_ahead 2, the
# default) and, alternating in the same run, on the main thread (decode_ahead 0).
set -u
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L | tee "$OUT/device.txt"
mkdir -p .bench-tmp
export TMPDIR="$PWD/.bench-tmp" TORCHINDUCTOR_CACHE_DIR="$PWD/.bench-tmp/inductor"  # on disk, not a tmpfs
F="python3 -m bench.featurize --backbone resnet101 --layer layer4 --image_size 448 --batch_size 128 --precision bf16"
LOG="$OUT/featurize5.txt"  # the log RESULTS.md cites for these rows (the /dev/shm run: featurize5-shm.txt)
log() { echo "+ $*" | tee -a "$LOG"; }
clean() { grep -v "it/s\]\|Warning\|np.save\|warn" | tail -40 | tee -a "$LOG"; }
# 0. the disk's own write speed, fsync included (what featurize's writers are held to)
for i in 1 2; do dd if=/dev/zero of=.bench-tmp/dd bs=64M count=64 conv=fsync 2>&1 | tail -1 | tee -a "$LOG"; rm -f .bench-tmp/dd; done
# 1. the store in RAM (/dev/shm): what the software does when the disk is not the limit (compiles once)
A="--compile --decode device --num_workers 6 --naive_num 50 --host_num 4096 --host_batch_size 128 --format zarr --codec none --writer_threads 16 --num 8192"
log "TMPDIR=/dev/shm $A"
mkdir -p /dev/shm/bench && TMPDIR=/dev/shm/bench timeout 200 $F $A 2>&1 | clean | tee -a "$OUT/featurize5-shm.txt"
# 2. on disk, by format
for args in "--format zarr --codec none --writer_threads 8 --num 8192" "--format wds --writer_threads 8 --num 8192" \
            "--format zarr --codec blosc-zstd --writer_threads 12 --num 4096"; do
  log "--compile --decode device --num_workers 6 --naive_num 30 --host_num 0 $args"
  timeout 150 $F --compile --decode device --num_workers 6 --naive_num 30 --host_num 0 $args 2>&1 | clean
done
# 3. CPU only: the store's GIL time per image and its read speed with this host's cores
echo "+ bench.gil" | tee -a "$OUT/store2.txt"
timeout 60 python3 -m bench.gil 2>&1 | tee -a "$OUT/store2.txt"
echo "+ bench.store --num 1024 --threads $(nproc)" | tee -a "$OUT/store2.txt"
timeout 75 python3 -m bench.store --num 1024 --threads "$(nproc)" --zeros 0.37 --codecs blosc-zstd,none,wds 2>&1 | tee -a "$OUT/store2.txt"
