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
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d "$DEV/wheels" "datasets<5"
    cp ../shared/glue/SST-2/train.tsv ../shared/glue/SST-2/dev.tsv "$DEV/glue/SST-2/"
    .venv/bin/python -c "from pkd_jax import checkpoints; checkpoints.load_tokenizer('minilm-l6').save_pretrained('$DEV/tokenizer')"
    du -sh "$DEV"
    ;;
  run)
    OUT="${OUT:?set OUT, the folder whose files come back}"
    export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    # Only the packages the machine lacks (its own protobuf, pytest... stay), and the datasets
    # release its pyarrow admits (5.x needs pyarrow >= 24, 4.8 needs >= 21).
    arrow=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])")
    wheels=()
    for w in "$DEV"/wheels/*.whl; do
      name=$(basename "$w" | cut -d- -f1)
      case "$name" in datasets) continue ;; esac
      python3 -m pip show -q "$name" >/dev/null 2>&1 || wheels+=("$w")
    done
    if [ "$arrow" -ge 24 ]; then wheels+=("$DEV"/wheels/datasets-5*.whl); else wheels+=("$DEV"/wheels/datasets-4*.whl); fi
    echo "installing: ${wheels[*]##*/}"
    python3 -m pip install -q --no-index --no-deps "${wheels[@]}"
    # pkd_jax, benchmarks and configs run from the checkout (no build: no network for setuptools).
    python3 -c "import jax, flax, optax, orbax.checkpoint, torch, transformers, datasets, pyarrow, ml_collections; \
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, \
'orbax', orbax.checkpoint.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, \
'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" | tee "$OUT/versions.txt"
    # Results go to a local folder (the loop's models are far over what comes back), and a time
    # limit leaves the window time to pack what finished: logs, JSON, the table (files < 1 MB).
    res=/tmp/accel_check && rm -rf "$res"
    status=0
    timeout "${ACCEL_TIMEOUT:-430}" python3 -m benchmarks.accel_check --glue-dir="$DEV/glue" \
        --tokenizer="$DEV/tokenizer" --out="$res" ${ACCEL_ARGS:-} 2>&1 | tee "$OUT/accel_check.log" || status=$?
    (cd "$res" && find . -type f -size -1024k ! -path './loop/cache/*' ! -path '*/checkpoints/*' \
        ! -name tokenizer.json -print0 |
        tar -czf "$OUT/accel_check.tgz" --null -T -) || true
    exit $status
    ;;
  *) echo "usage: bash scripts/device_check.sh prepare|run" >&2; exit 2 ;;
esac
