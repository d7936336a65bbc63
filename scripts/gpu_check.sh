#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, as the one prepared device call (README: The GPU check):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# (arguments go to benchmarks.gpu_check: `--parts pretrain vqgan audio`, then `--parts sampler image_spans kernels`,
# split it over two calls). The wheels are CPython 3.12's, so this script runs on a 3.12 machine only; here the same
# check's smoke test is `python -m benchmarks.gpu_check --reduced --device cpu` (CI runs it).
# Installs the carried wheels (scripts/gpu_kit.sh made them) beside the image's packages, prints the versions, and
# runs the GPU check; the report and the log come back in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import sys, torch, transformers, deepspeed
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
print("transformers", transformers.__version__, "deepspeed", deepspeed.__version__)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/versions.txt"
timeout 560 python3 -m benchmarks.gpu_check --out "$OUT/gpu_report.json" "$@" 2>&1 | tee "$OUT/gpu_check.log"
