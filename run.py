r"""Fine-tune or distil a BERT on a GLUE task: the one entry point.

  python run.py --config=configs/finetune.py:task=rte,model=minilm-l6,glue_dir=../shared/glue --workdir=runs/rte/teacher
  python run.py --config=configs/pkd.py:task=rte,teacher=runs/rte/teacher,layers=3,strategy=skip,glue_dir=../shared/glue \
      --workdir=runs/rte/pkd3
  python run.py --config=configs/sweep.py:task=rte,teacher=runs/rte/teacher,layers=3,strategy=skip,glue_dir=../shared/glue \
      --workdir=runs/rte/sweep-skip3

Any config field can be overridden (--config.seed=1). Running the same command again resumes
from the workdir's last checkpoint. See each config's docstring for more.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from pkd_jax import loop, report, sweep, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py:args", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs, results and the model go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    logging.getLogger("pkd_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    print(f"config:\n{config}", flush=True)
    try:
        if config.kind == "sweep":
            results = sweep.train_grid(config, _WORKDIR.value, on_progress=report.write_sweep_report)
        else:
            results = train.train_and_evaluate(config, _WORKDIR.value)
    except loop.Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM: "terminated", not finished
    best = results["best"]
    point = sweep.describe(best) if config.kind == "sweep" else ""
    print(f"best dev {results['metric']} = {best['metrics']['score']:.4f} at step {best['step']}{point}; "
          f"model in {_WORKDIR.value}/{'best_model' if point else 'model'}", flush=True)


def parse_flags(argv):
    """absl's parser, but an unknown --config.KEY gets a one-line error instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except AttributeError as e:  # ml_collections: the key does not exist in the (locked) config
        key = str(e).strip("\"'")
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        files = [a.split("=", 1)[1].split(":")[0] for a in argv[1:] if a.startswith("--config=")]
        print(f"FATAL Flags parsing error: {' '.join(bad) or key}: {key!r} is not a config key; the "
              f"fields are listed in {' and '.join(files + ['configs/common.py'])}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
