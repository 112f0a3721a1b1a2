#!/usr/bin/env bash
# Downloads into ./.whl (git-ignored) the wheels the GPU measurement machine's Python 3.12 image
# lacks (it has jax, flax, optax, orbax-checkpoint, transformers, torch and numpy). Extra package
# names may be given as arguments. On that machine, install them with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl ml-collections grain array-record tensorflow-datasets tensorboardX immutabledict dm-tree \
  simple-parsing docstring-parser tensorflow-metadata importlib-resources toml termcolor portpicker \
  googleapis-common-protos "$@"
python3 -m pip wheel -q --no-deps -w .whl promise  # source-only on PyPI: build its pure wheel
ls .whl
