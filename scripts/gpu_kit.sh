#!/usr/bin/env bash
# Run HERE (a machine with pip access and the project's venv active), before a GPU session's one device call.
#
# The lent GPU machine (README: The GPU check) has Python 3.12 with CUDA torch, transformers and most scientific packages,
# no package index, and takes at most 64 MiB of working tree per call. This puts the wheels omnitok needs there and
# the image lacks into .whl/ (ignored by git): the versions installed here, which the tests pass with, built for
# CPython 3.12 on manylinux x86-64. DeepSpeed publishes only a source archive: its wheel is built here (pure Python;
# its CUDA ops compile on first use there). Ray's wheel (about 80 MB) does not fit: the check's tokenize_ray part
# records an error there and the others run. transformers' own requirements come too (huggingface-hub and what it
# needs): the image's huggingface-hub 1.33 stopped transformers 5.25 from importing.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand
soundfile cffi pycparser soxr pystoi fastapi starlette annotated-doc opentelemetry-api uvicorn vector-quantize-pytorch
einx frozendict loguru torch-einops-utils kaldi-native-fbank transformers regex huggingface-hub tokenizers
safetensors hf-xet httpx2 httpcore2 h11 anyio idna certifi truststore shellingham typer click rich markdown-it-py mdurl
pygments kernels tomlkit"
rm -rf .whl && mkdir -p .whl
specs=()
for name in $PKGS; do
  v=$(python -c "from importlib.metadata import version; print(version('$name'))" 2>/dev/null || true)
  specs+=("$name${v:+==$v}")
done
binary=()
for s in "${specs[@]}"; do [[ $s == deepspeed* ]] || binary+=("$s"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl "${binary[@]}"
ds=$(printf '%s\n' "${specs[@]}" | grep '^deepspeed')
python -m pip download -q --no-deps --no-binary=:all: -d .whl/src "$ds"
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl .whl/src/deepspeed-*.tar.gz
rm -rf .whl/src
ls -1 .whl
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (the device takes 64 MiB with the tree)"
