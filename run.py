r"""Fine-tune or distil a BERT on a GLUE task: the one entry point.

  python run.py --config=configs/finetune.py:task=rte,model=minilm-l6,glue_dir=../shared/glue --workdir=runs/rte/teacher
  python run.py --config=configs/pkd.py:task=rte,teacher=runs/rte/teacher,layers=3,strategy=skip,glue_dir=../shared/glue \
      --workdir=runs/rte/pkd3

Any config field can be overridden (--config.seed=1). Running the same command again resumes
from the workdir's last checkpoint. See each config's docstring for more.
"""

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from pkd_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py:args", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs, results and the model go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    logging.getLogger("pkd_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    print(f"config:\n{config}", flush=True)
    print(f"devices: {jax.devices()}", flush=True)
    try:
        results = train.train_and_evaluate(config, _WORKDIR.value)
    except train.Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM: "terminated", not finished
    best = results["best"]
    print(f"best dev {results['metric']} = {best['metrics']['score']:.4f} at step {best['step']}; "
          f"model in {_WORKDIR.value}/model", flush=True)


if __name__ == "__main__":
    app.run(main)
