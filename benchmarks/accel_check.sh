#!/usr/bin/env bash
# The accelerator check (docs/attention.md, "Accelerator check"): on a GPU or TPU host, from the
# repository root,
#   bash benchmarks/accel_check.sh [SEQ_LEN] [BATCH]
# 1. runs the attention and MoE back-end equality tests on the device (float32 matmuls at full
#    precision: TF32 would not meet their 2e-5 tolerances);
# 2. prints tokens/s, MFU and peak memory of the expert-training step of a ~1B FlexOlmo at
#    sequence length SEQ_LEN (4096) with each attention implementation the platform runs, one
#    process per implementation so each peak is its own (benchmarks/bench_accel.py).
set -euo pipefail
seq_len="${1:-4096}"
batch="${2:-4}"
platform="$(JAX_PLATFORMS= python -c 'import jax; print(jax.default_backend())')"
if [[ "${platform}" == "cpu" ]]; then
  echo "accel_check: no GPU or TPU visible to JAX; on CPU run" \
       "python -m benchmarks.bench_accel --size=tiny --seq_len=128 --batch=2" >&2
  exit 1
fi
echo "== equality tests on ${platform}"
# conftest.py defaults JAX_PLATFORMS to cpu; an empty value lets JAX pick the accelerator.
status=0
JAX_PLATFORMS= JAX_DEFAULT_MATMUL_PRECISION=highest \
  python -m pytest -q tests/test_attention.py tests/test_moe.py -p no:cacheprovider || status=1
echo "== expert step, ~1B FlexOlmo, seq ${seq_len}, batch ${batch}"
case "${platform}" in
  gpu) impls="xla chunked cudnn" ;;
  tpu) impls="xla chunked splash" ;;
esac
for impl in ${impls}; do
  JAX_PLATFORMS= python -m benchmarks.bench_accel --size=1b --seq_len="${seq_len}" \
    --batch="${batch}" --impls="${impl}" || status=1
done
exit "${status}"
