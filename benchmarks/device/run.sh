#!/usr/bin/env bash
# The GPU machine's one command (benchmarks/device/README.md): installs the carried wheels
# into $SITE (extra: packages the image lacks; pins: this repo's tested flax, optax and
# orbax-checkpoint), then runs benchmarks/device/run.py with the arguments given.
# $OUT: what comes back (summary.md, run.log, results.tar.gz, weights/).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
CARRY=${CARRY:-.device_carry}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for f in cifar10_train.npz cifar10_test.npz; do
  if [ ! -f "$CARRY/data/$f" ]; then
    echo "error: $CARRY/data/$f is missing: run benchmarks/device/prepare.sh here and carry $CARRY" >&2
    exit 2
  fi
done
for group in extra pins; do
  wheels=("$CARRY/wheels/$group"/*.whl)
  if [ -e "${wheels[0]}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE/$group" "${wheels[@]}"
  fi
done
export OOD_JAX_DATA_DIR="$PWD/$CARRY/data" PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.device.run --site "$SITE" --out "$OUT" "$@"
