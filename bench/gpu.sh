#!/usr/bin/env bash
# Run Shardline's CUDA checks on a Linux GPU machine with no network, from carried wheels.
#
#   bench/gpu.sh stash DIR   # copy DIR's files (part of the split mlx-cuda wheel, deps) to /root/parts
#   bench/gpu.sh test DIR    # add DIR's files, install, detect, parity tests on the GPU
#   bench/gpu.sh bench [DIR] # the --gpu serving benchmark (installs first if `test` did not)
#   bench/gpu.sh hotpath DIR [ARGS]  # bench_hotpath.py --gpu ARGS (the 8B shape; DIR may be -;
#                                    # --also SHARDLINE_FUSE=0: a cluster of each size without;
#                                    # --reuse-shards: clusters start from the workers' cache)
#   bench/gpu.sh profile DIR [ARGS]  # bench_profile.py --gpu ARGS
#   bench/gpu.sh speculation DIR [ARGS]  # bench_speculation.py --gpu ARGS
#   bench/gpu.sh knobs DIR [ARGS]    # bench_knobs.py --gpu ARGS (MLX's CUDA launch settings)
#   bench/gpu.sh qmm DIR [ARGS]      # bench_qmm.py ARGS (products by rows; --rows: the kernel)
#   bench/gpu.sh host DIR [ARGS]     # bench_host.py --gpu ARGS (one worker's step, in-process)
#   bench/gpu.sh neighbours DIR [ARGS]  # bench_neighbours.py --gpu ARGS (mlx-lm beside idle ones)
#   bench/gpu.sh lazy DIR [ARGS]     # bench_lazy_recv.py ARGS (a stage launched on a lazy receive)
#   bench/gpu.sh gpu_wait DIR [ARGS] # bench_gpu_wait.py --gpu ARGS (a slice's launch, wait and
#                                    # output read, by mode: launched ahead, polled, pinned...)
#   bench/gpu.sh pingpong DIR [ARGS] # bench_pingpong.py --gpu ARGS (a hop between two processes:
#                                    # socket, wake-up, the GPU moving between them)
#   bench/gpu.sh prebuild DIR [ARGS] # prebuild.py ARGS: both 8B models, before the benches
#
# A fresh machine builds the 8B-shaped model before the first hotpath, profile or speculation
# run (kept in /root/cache for later calls). Here it builds on the GPU (SHARDLINE_BUILD_DEVICE=gpu,
# coordinator/demo.py): other bytes than a CPU build, and far faster (on the box's CPU, 181 s for
# the plain model and 169 s for the speculation target and its draft on an H100 box). Leave room
# for it in BENCH_TIMEOUT, or run `prebuild` first (both models, one after the other;
# --side-by-side builds them at once). SHARDLINE_BUILD_DEVICE=cpu builds on the CPU.
#
# MLX settings in the environment (MLX_MAX_OPS_PER_BUFFER=50 bench/gpu.sh hotpath ...) reach
# mlx-lm and every worker alike.
#
# The mlx-cuda-13 wheel (~90 MB) is split with `split -b 46000000` so each half fits one carry.
# Results (detect.txt, tests.txt, RESULTS-gpu.md, serving-gpu.png) go to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
parts=/root/parts
mkdir -p "$parts"
[ -n "${2:-}" ] && [ "$2" != - ] && find "$2" -type f -exec cp {} "$parts/" \;
[ "$1" = stash ] && { ls -la "$parts"; exit 0; }

out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONPATH=/root/site:$PWD SHARDLINE_CACHE_DIR=/root/cache PATH=/root/site/bin:$PATH
export SHARDLINE_BUILD_DEVICE=${SHARDLINE_BUILD_DEVICE:-gpu}
install() {
    cat "$parts"/part.* > "$parts/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl"
    python3 -m pip install -q --no-deps --target /root/site "$parts"/*.whl
}
if [ "$1" = hotpath ] || [ "$1" = profile ] || [ "$1" = speculation ] || [ "$1" = knobs ] \
    || [ "$1" = qmm ] || [ "$1" = host ] || [ "$1" = neighbours ] || [ "$1" = lazy ] \
    || [ "$1" = gpu_wait ] || [ "$1" = pingpong ]; then
    [ -d /root/site/mlx ] || install
    mode=$1
    shift 2
    script=bench/bench_$mode.py
    [ "$mode" = lazy ] && script=bench/bench_lazy_recv.py
    timeout "${BENCH_TIMEOUT:-560}" python3 "$script" --gpu "$@" 2>&1 | grep -v fork_posix \
        | tee -a "$out/$mode.txt" | tail -40 || true
    exit 0
fi
if [ "$1" = prebuild ]; then
    [ -d /root/site/mlx ] || install
    shift 2
    timeout "${BENCH_TIMEOUT:-560}" python3 bench/prebuild.py "$@" 2>&1 | grep -v fork_posix \
        | tee -a "$out/prebuild.txt" | tail -5 || true
    exit 0
fi
if [ "$1" = bench ]; then
    [ -d /root/site/mlx ] || install
    timeout "${BENCH_TIMEOUT:-560}" python3 bench/bench_serving.py --gpu 2>&1 \
        | grep -v fork_posix | tail -30 || true
    cp bench/RESULTS-gpu.md bench/serving-gpu.png "$out/" 2>/dev/null || true
    exit 0
fi
install
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$out/detect.txt"
python3 - <<'EOF' | tee -a "$out/detect.txt"
import mlx.core as mx
from worker.backend import detect
print("mlx", mx.__version__, "default device", mx.default_device())
print(detect())
EOF
timeout "${TEST_TIMEOUT:-500}" python3 -m pytest -q -p no:cacheprovider -rA --durations=5 \
    tests/test_pipeline_parity.py tests/test_batched_decode.py tests/test_concurrency.py \
    tests/test_cuda_rows.py tests/test_fused.py tests/test_attention.py \
    2>&1 | grep -v fork_posix | tail -120 > "$out/tests.txt" || true
grep -E "passed|failed|PASSED|FAILED" "$out/tests.txt" | tail -5
