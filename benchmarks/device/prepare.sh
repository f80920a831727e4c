#!/usr/bin/env bash
# Here, before a call of the GPU machine (benchmarks/device/README.md): fills the
# git-ignored .device_carry/ with the wheels the machine's image lacks (Python 3.12,
# manylinux x86-64) and the CIFAR-10 (JPEG) files it trains on, then checks that the
# working tree and .device_carry/ fit the 64 MiB a call may send. Idempotent: what is
# there already is kept. Environment: PYTHON (default .venv/bin/python), DATA (default
# $OOD_JAX_DATA_DIR, else ../shared/data); arguments go to benchmarks.device.carry
# (--train_limit N: training images carried, default 10000).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-${OOD_JAX_DATA_DIR:-../shared/data}}
CARRY=.device_carry
# Missing from the image (KINDS.md's package list): the config library and the
# TensorBoard writer the runs use.
EXTRA=(ml-collections==1.1.0 tensorboardX==2.6.5)
# In the image at versions of its own: this repo's tested ones (requirements.txt),
# tried first by run.py's probe.
PINS=(flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8)

download() {  # download DIR NAME==VERSION...: each wheel once, other versions removed
  local dir=$1 spec name version stem
  shift
  mkdir -p "$dir"
  for spec in "$@"; do
    name=${spec%%==*}
    version=${spec##*==}
    stem=${name//-/_}
    find "$dir" -maxdepth 1 -iname "${stem}-*.whl" ! -iname "${stem}-${version}-*.whl" -delete
    if [ -z "$(find "$dir" -maxdepth 1 -iname "${stem}-${version}-*.whl")" ]; then
      "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$dir" "$spec"
    fi
  done
}

download "$CARRY/wheels/extra" "${EXTRA[@]}"
download "$CARRY/wheels/pins" "${PINS[@]}"
ls -l "$CARRY"/wheels/*/
"$PYTHON" -m benchmarks.device.carry --src "$DATA" --dest "$CARRY/data" --carry "$CARRY" "$@"
