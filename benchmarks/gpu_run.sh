#!/usr/bin/env bash
# The device day in one call (budgeted at 8 minutes on one H100 or H200; not yet timed on one), from the
# repository root on the lent machine, which has torch, Triton, transformers, peft, pytest-benchmark and
# tqdm and reaches no index:
#   bash benchmarks/gpu_run.sh              # wheels carried in wheels/ are installed first (liger-kernel:
#                                           #   pip download liger-kernel==0.8.5 --no-deps -d wheels)
#   bash benchmarks/gpu_run.sh --dry-run    # the same checks on the CPU (the Triton interpreter, tiny shapes)
# Steps: the kernels against the float64 reference, the fused LM head's peak memory and a short training
# run with the kernels inside (benchmarks/gpu_check.py); the suite's CUDA-capable tests; the timings of the
# fused ops beside eager, torch.compile and Liger at the anchor shapes. With OUT set, writes
# $OUT/gpu_check.json and $OUT/kernels_bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--dry-run" ]; then
    export TRITON_INTERPRET=1
    exec python benchmarks/gpu_check.py --dry-run
fi
python -m pip install --quiet --no-deps --no-build-isolation -e . || python -m pip install --quiet --no-deps -e .
if ls wheels/*.whl >/dev/null 2>&1; then python -m pip install --quiet --no-deps wheels/*.whl; fi
unset TRITON_INTERPRET
status=0
python benchmarks/gpu_check.py || status=$?
python -m pytest -q tests/test_kernels.py tests/test_linear_logprobs.py -p no:cacheprovider || status=$?
python -m pytest -q benchmarks/test_kernels_bench.py benchmarks/test_linear_bench.py -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds ${OUT:+--benchmark-json="$OUT/kernels_bench.json"} || status=$?
exit "$status"
