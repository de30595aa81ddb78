#!/usr/bin/env bash
# The whole check for one lent NVIDIA GPU (H100 / H200), prepared to run once, most important first:
#   0. the device, the package versions and the bf16 matmul rate JAX reaches;
#   1. the GPU-only tests (tests/test_gpu.py: cuDNN attention against the reference and XLA, the golden
#      model's logits on the GPU) and the golden parity tests;
#   2. the VAR-d16 train step, 256 px, bf16, 64 images (benchmarks/train.py: compile s, step s, img/s, MFU
#      against the bf16 dense peak PEAK_TFLOPS, memory), cuDNN attention ('auto' on a GPU);
#   3. d16 sampling latency, batch 64, cfg 1.5 (top-k 900, top-p 0.96: the config's), decode included
#      (benchmarks/sample.py);
#   4. the train step again with XLA's attention, for the cuDNN-vs-XLA difference.
# Each step has its own time limit, so one that hangs leaves time for the rest; the log goes to $OUT/gpu_check.log.
#
# The device image has JAX, flax, optax and orbax but no ml_collections (nor TensorFlow, which nothing here
# needs): bring it as a wheel in .whl/ (docs/benchmarks.md, "On a lent GPU"), which this script installs first.
# CONFIG / BATCH / ITERS / MATMUL_N / PY override the sizes for a dry run elsewhere, e.g.
#   CONFIG=configs/bench.py BATCH=8 ITERS=2 MATMUL_N=1024 PY=venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/var_d16.py}
BATCH=${BATCH:-64}
ITERS=${ITERS:-10}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}   # H100 / H200 SXM dense bf16
LOG=${OUT:-/tmp}/gpu_check.log
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
PY=${PY:-python3}                 # the image's python3 holds JAX

if compgen -G '.whl/*.whl' > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi

step() {  # step LIMIT_S TITLE COMMAND...: runs COMMAND under `timeout`, logs it, goes on whatever happens
    local limit=$1 title=$2; shift 2
    local cmd="$*"
    echo "=== $title ($(date -u +%H:%M:%S), limit ${limit}s): ${cmd%%$'\n'*}" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -E 'absl::InitializeLog|^W0000|^I0000' | tee -a "$LOG"
    echo "=== $title: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

: > "$LOG"
step 30 device sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
    $PY -c 'import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())'"
# The bf16 matmul rate JAX reaches here (N^3, the median of 10), the yardstick beside the datasheet peak for MFU.
step 60 'bf16 matmul rate' env N="${MATMUL_N:-8192}" $PY -c '
import os, statistics, time, jax, jax.numpy as jnp
n = int(os.environ["N"])
a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
f = jax.jit(lambda a: a @ a)
f(a).block_until_ready()
ts = []
for _ in range(10):
    t = time.perf_counter(); f(a).block_until_ready(); ts.append(time.perf_counter() - t)
print(f"bf16 {n}^3 matmul: {2 * n ** 3 / statistics.median(ts) / 1e12:.1f} TFLOP/s")'
step 240 tests $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_parity.py
model=(--config="$CONFIG" --config.transformer.batch_size="$BATCH")
step 240 'train step, cuDNN attention' $PY benchmarks/train.py "${model[@]}" --peak_tflops "$PEAK_TFLOPS" \
    --iters "$ITERS"
step 180 'sampling latency' $PY benchmarks/sample.py --config="$CONFIG" --config.sample.batch_size="$BATCH" \
    --config.sample.cfg=1.5 --iters "$ITERS"
step 200 'train step, XLA attention' $PY benchmarks/train.py "${model[@]}" --config.var.attention=xla \
    --peak_tflops "$PEAK_TFLOPS" --iters "$ITERS"
