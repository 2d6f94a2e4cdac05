r"""Fine-tune a BERT on a GLUE task: the teacher, or the FT-baseline student with layers=k.

  python run.py --config=configs/finetune.py:task=rte,model=minilm-l6,glue_dir=../shared/glue \
      --workdir=runs/rte/teacher

  # The FT baseline of the paper: a 3-layer student fine-tuned without distillation.
  python run.py --config=configs/finetune.py:task=rte,model=minilm-l6,layers=3,glue_dir=../shared/glue \
      --workdir=runs/rte/ft3

  # Online (hub GLUE, BERT-base), any field overridable:
  python run.py --config=configs/finetune.py:task=sst2,model=bert-base --workdir=runs/sst2/teacher \
      --config.learning_rate=3e-5 --config.batch_size=32

Args: task, model (minilm-l6 | bert-base | bert-large | HF folder | hub id), layers, glue_dir,
runlocal (a seconds-long CPU run).
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, task="rte", model="minilm-l6", layers=0, glue_dir="", runlocal=False)
    c = common.base_config(arg)
    c.kind = "finetune"
    c.layers = arg.layers or None
    return c
