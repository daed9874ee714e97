#!/usr/bin/env bash
# GPU check of the SDN sweep, in one go (< 10 min on an H100/H200):
#   1. the Triton/CUDA-graph tests (fused kernels vs the cell-by-cell reference, on the GPU),
#   2. the sweep + training-step benchmark on the GPU (same table as the CPU one in README.md).
# Runs with the machine's own python3 (torch + triton, no venv); writes logs to $OUT (default
# benchmarks/out). Usage, from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/gpu_info.txt"

# 1. correctness on the GPU (and the interpreter tests, which run on CPU in a subprocess)
# -c /dev/null: the project's pytest config names Qt/pydantic plugins and warnings that the GPU image lacks
timeout 240 "$PY" -m pytest -q -c /dev/null --rootdir . -p no:cacheprovider \
    tests/models/test_sweep_triton.py tests/models/test_sweep_fast.py tests/models/test_sweep_reference.py \
    2>&1 | tee "$OUT/gpu_tests.txt" || status=1

# 2. benchmark: sweeps at 24/48/96 and the training steps (nuclei preset, B=20)
timeout 300 "$PY" benchmarks/bench_sdn.py --device cuda --repeats 10 --repeats-96 5 --step-repeats 5 \
    --impls loop fast triton triton_bf16 --step-impls auto loop --json "$OUT/bench_gpu.json" \
    2>&1 | tee "$OUT/bench_gpu.md" || status=1
exit $status
