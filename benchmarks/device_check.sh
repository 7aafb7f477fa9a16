#!/usr/bin/env bash
# One call on a lent GPU machine: versions, the quick benchmark, and the core
# tests (float32 matmuls at full precision: JAX's GPU default would use TF32).
# Usage (on the device machine, from the repository root):
#   [BENCH_TIMEOUT=s] [TEST_TIMEOUT=s] [SKIP_TESTS=1] bash benchmarks/device_check.sh OUTDIR
set -u
out=${1:-bench-out-gpu}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The versions also go into OUTDIR, which comes back whole (the call's printed
# output may be cut to its tail).
{ nvidia-smi -L
  python3 -c "import jax, torch, flax, optax, chex, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, torch.cuda.is_available(), 'flax', flax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee "$out/versions.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/run.py --quick --out "$out" \
  > "$out/bench.log" 2>&1
echo "benchmark exit $?"
if [ -z "${SKIP_TESTS:-}" ]; then
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-240}" python3 -m pytest \
    -q -x -n 8 -p no:cacheprovider tests/test_truncated_loss.py tests/test_trainer.py \
    > "$out/tests.log" 2>&1
  echo "tests exit $?"
  tail -5 "$out/tests.log"
fi
cat "$out/results.md" 2>/dev/null || tail -40 "$out/bench.log"
