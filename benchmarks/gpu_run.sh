#!/usr/bin/env bash
# One GPU session, one call: build, check the kernels on CUDA against the references, then time them
# beside the peers. Run from the repository root on the lent machine (device tool), e.g.
#   bash benchmarks/gpu_run.sh            (pip wheels for liger-kernel may be carried in wheels/)
# Writes $OUT/kernels_bench.json (pytest-benchmark) when OUT is set.
set -euo pipefail
python -m pip install --quiet --no-deps --no-build-isolation -e . || python -m pip install --quiet --no-deps -e .
if ls wheels/*.whl >/dev/null 2>&1; then python -m pip install --quiet --no-deps wheels/*.whl; fi
python - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
PY
unset TRITON_INTERPRET
python -m pytest -q -x tests/test_kernels.py tests/test_linear_logprobs.py -p no:cacheprovider
python -m pytest -q benchmarks/test_kernels_bench.py benchmarks/test_linear_bench.py -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds \
    ${OUT:+--benchmark-json="$OUT/kernels_bench.json"}
