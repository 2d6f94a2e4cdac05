r"""Fine-tune or distil a BERT on a GLUE task: the one entry point.

  python run.py --config=configs/finetune.py:task=rte,model=minilm-l6,glue_dir=../shared/glue --workdir=runs/rte/teacher
  python run.py --config=configs/pkd.py:task=rte,teacher=runs/rte/teacher,layers=3,strategy=skip,glue_dir=../shared/glue \
      --workdir=runs/rte/pkd3
  python run.py --config=configs/sweep.py:task=rte,teacher=runs/rte/teacher,layers=3,strategy=skip,glue_dir=../shared/glue \
      --workdir=runs/rte/sweep-skip3
  python run.py --config=configs/multitask.py:tasks=sst2+stsb,teachers=runs/sst2/teacher+runs/stsb/teacher,layers=3,glue_dir=../shared/glue \
      --workdir=runs/mt/sst2-stsb

Any config field can be overridden (--config.seed=1). Running the same command again resumes
from the workdir's last checkpoint; another config in a workdir that holds a run is refused
(naming the differing keys) unless --restart moves that run aside. See each config's docstring.

Exit status: 0 finished; 2 a problem with the input (config, data, model files), named in one line
on stderr with its fix; 143 preempted by SIGTERM (run the same command to resume); 1 a bug.
"""

import logging
import os
import sys

# transformers announces at import that PyTorch is missing; pkd-jax never needs it at run time.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pkd_jax import loop, multitask, report, sweep, train  # noqa: E402
from pkd_jax.errors import PkdError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py:args", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs, results and the model go.")
_RESTART = flags.DEFINE_bool("restart", False, "Start over in a workdir that holds a run of another config "
                             "(that run moves to WORKDIR/replaced-<time>/); without it such a workdir is refused.")
flags.mark_flags_as_required(["config", "workdir"])

USER_ERROR = 2  # bad config, data or model files: one line on stderr; a bug keeps its traceback (1)


def _fatal(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(USER_ERROR)


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU here" on every CPU run
    logging.getLogger("pkd_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    task = config.get("task") or "+".join(config.tasks)
    print(f"{config.kind} {task} in {_WORKDIR.value} (the whole config: {_WORKDIR.value}/config.json)", flush=True)
    try:
        if config.kind == "sweep":
            results = sweep.train_grid(config, _WORKDIR.value, on_progress=report.write_sweep_report,
                                       restart=_RESTART.value)
        elif config.kind == "multitask":
            results = multitask.train_multitask(config, _WORKDIR.value, restart=_RESTART.value)
        else:
            results = train.train_and_evaluate(config, _WORKDIR.value, restart=_RESTART.value)
    except loop.Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM: "terminated", not finished
    except (PkdError, FloatingPointError) as e:  # FloatingPointError: the loss diverged (message says what to do)
        _fatal(e)
    best = results["best"]
    point = sweep.describe(best) if config.kind == "sweep" else ""
    model = {"sweep": "best_model", "multitask": "model/<task>"}.get(config.kind, "model")
    print(f"best dev {results['metric']} = {best['metrics']['score']:.4f} at step {best['step']}{point}; "
          f"model in {_WORKDIR.value}/{model}", flush=True)


def parse_flags(argv):
    """absl's parser, but a bad flag or config key is one line naming it, and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: no such key in the (locked) config, or no such
        # nested config on its path (--config.per_task.rte.alpha when rte is not one of the tasks)
        key = str(e).strip("\"'")
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        files = [a.split("=", 1)[1].split(":")[0] for a in argv[1:] if a.startswith("--config=")]
        _fatal(f"Flags parsing error: {' '.join(bad) or key}: {key!r} is not a config key; the fields are "
               f"listed in {' and '.join(files + ['configs/common.py'])}")
    except flags.Error as e:
        _fatal(f"Flags parsing error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
