#!/usr/bin/env bash
# Download, here, the wheels a GPU machine lacks for training and for the engine's benchmarks (its
# image has torch, timm, OpenCV, scikit-image, SciPy, Pillow, tifffile, PyYAML, safetensors and tqdm,
# but no segmentation-models-pytorch, pydantic (which needs a newer typing_extensions than it may
# hold), pydantic-settings, OpenSlide or shapely):
# CPython 3.12 manylinux builds of the versions requirements.txt pins, into .whl/ (git-ignored),
# about 8 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
packages=(segmentation_models_pytorch pydantic pydantic_core annotated-types typing-inspection typing_extensions
          pydantic-settings python-dotenv openslide-python openslide-bin shapely)
mkdir -p .whl
for name in "${packages[@]}"; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" requirements.txt) || { echo "requirements.txt pins no $name" >&2; exit 1; }
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    -d .whl "$pin"
done
ls -l .whl
