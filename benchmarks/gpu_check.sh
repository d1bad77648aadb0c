#!/usr/bin/env bash
# The device check: one GPU session's worth, under 5 minutes on one H200.
#
#     bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT
#                                             # (or ./gpu-results): gpu.json, gpu_check.log
#
# 1. The CUDA tests of CI (tests/backends/test_cupy.py), here on the real GPU: every kernel
#    and op against the NumPy backend, all ten builders in float32 and float16 on seeded
#    weights with random batch norm, graph replay against eager passes, two threads.
# 2. benchmarks/bench_gpu.py: float32 / TF32 / float16 against the NumPy backend with the
#    errors measured and printed, CUDA graphs confirmed captured; then numres-cupy beside torch
#    eager (cuDNN; NCHW and channels_last; fp32 and fp16) at batch 1, 8, 64, 256 for
#    resnet18, resnet50 and resnext50_32x4d: img/s and peak device memory, one JSON.
#
# Needs numpy, cupy and the nvidia-cublas wheel (cuBLASLt); torch and pytest are optional
# (without torch the benchmark has numres columns only; without pytest step 1 is skipped).
# Exit status: 0 when every test and check passed.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NUMRES_HOME="$OUT/home"      # never touch a real cache
export PYTHONUNBUFFERED=1
(
  status=0
  echo "== machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import numpy, cupy; print('numpy', numpy.__version__, 'cupy', cupy.__version__)"
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" || true
  if python3 -c "import pytest" 2>/dev/null; then
    echo "== the CUDA tests of CI, on the GPU"
    timeout 130 python3 -m pytest -q -p no:cacheprovider -m "not slow" \
      tests/backends/test_cupy.py || status=1
  else
    echo "== pytest is not installed: the CUDA tests are skipped"
  fi
  echo "== checks (errors measured) and benchmark"
  if python3 -c "import cupy, numres.backends.cupy.backend" 2>&1; then
    # the budget counts from the script's start; gpu.json is rewritten after every row
    timeout 160 python3 benchmarks/bench_gpu.py --rounds 3 --budget-s 120 \
      --json "$OUT/gpu.json" || status=1
  else
    echo "== numres's CUDA backend does not import here (see above): no checks, no benchmark"
    status=1
  fi
  exit $status
) 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
