#!/usr/bin/env bash
# The accelerator check on this project's lent device machine (docs/benchmarks.md), which has no
# network and lacks some packages. Two steps:
#
#   bash scripts/device_check.sh prepare   # here: wheels for Python 3.12, SST-2 and the tokenizer
#                                          # into .device/ (ignored; carry it: `run`'s carry=[".device"])
#   bash scripts/device_check.sh run       # there: installs them, runs make accel-check into $OUT
#
# `run` prints the versions it found (pyarrow included: datasets needs >= 24) before the check, so
# a missing package shows in the first seconds of the window, not after minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.device
case "${1:-}" in
  prepare)
    rm -rf "$DEV" && mkdir -p "$DEV/wheels" "$DEV/glue/SST-2" "$DEV/tokenizer"
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d "$DEV/wheels" \
        ml-collections tensorboardX protobuf datasets dill multiprocess xxhash pytest iniconfig pluggy
    cp ../shared/glue/SST-2/train.tsv ../shared/glue/SST-2/dev.tsv "$DEV/glue/SST-2/"
    .venv/bin/python -c "from pkd_jax import checkpoints; checkpoints.load_tokenizer('minilm-l6').save_pretrained('$DEV/tokenizer')"
    du -sh "$DEV"
    ;;
  run)
    OUT="${OUT:?set OUT, the folder whose files come back}"
    # pkd_jax, benchmarks and configs run from the checkout (no build: no network for setuptools).
    python3 -m pip install -q --no-deps "$DEV"/wheels/*.whl
    python3 -c "import jax, flax, optax, orbax.checkpoint, torch, transformers, datasets, pyarrow, ml_collections; \
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" \
        | tee "$OUT/versions.txt"
    python3 -m benchmarks.accel_check --glue-dir="$DEV/glue" --tokenizer="$DEV/tokenizer" \
        --out="$OUT/accel_check" ${ACCEL_ARGS:-} 2>&1 | tee "$OUT/accel_check.log"
    ;;
  *) echo "usage: bash scripts/device_check.sh prepare|run" >&2; exit 2 ;;
esac
