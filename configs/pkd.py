r"""Distil a BERT_k student from a fine-tuned teacher with Patient Knowledge Distillation.

  python run.py --config=configs/pkd.py:task=rte,teacher=runs/rte/teacher,layers=3,strategy=skip,glue_dir=../shared/glue \
      --workdir=runs/rte/pkd-skip3

  # Vanilla KD (no patient term) and PKD-Last, by overriding fields:
  python run.py --config=configs/pkd.py:task=rte,teacher=runs/rte/teacher,layers=3,glue_dir=../shared/glue \
      --workdir=runs/rte/kd3 --config.beta=0
  python run.py --config=configs/pkd.py:task=rte,teacher=runs/rte/teacher,layers=3,strategy=last,glue_dir=../shared/glue \
      --workdir=runs/rte/pkd-last3 --config.alpha=0.7 --config.temperature=20 --config.beta=500

The teacher is a finished run's workdir (its `model/` export is read, and the student starts from
the first k layers of the same pretrained checkpoint that teacher was fine-tuned from) or any HF
folder / hub id (then name the student's pretrained checkpoint with model=...).

Loss: (1 - alpha) * CE + alpha * KD(T) + beta * patient. mode=compat (default) uses the original
code's scaling, which the paper's grid (T in 5,10,20; alpha in .2,.5,.7; beta in 10..1000) was
tuned with; mode=paper is the paper's equations literally (shrink beta by hidden_size x (k-1)).
"""

from ml_collections import config_dict

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, task="rte", teacher="", model="", layers=3, strategy="skip",
                           glue_dir="", runlocal=False)
    c = common.base_config(arg)
    c.kind = "distill"
    c.teacher = config_dict.placeholder(str)  # a finished run's workdir, an HF folder or hub id
    c.teacher = arg.teacher or None
    c.layers = arg.layers
    c.strategy = arg.strategy  # skip | last | comma-separated teacher layers, e.g. "2,4"
    c.alpha = 0.5
    c.beta = 100.0  # 0: vanilla KD
    c.temperature = 10.0
    c.normalize = True  # L2-normalise the patient features before the patient distance
    c.mode = "compat"  # compat | paper
    c.distance = "mse"  # mse | cosine | cka | another registered distance | "package.module:function"
    # What the patient loss compares per mapped layer: the [CLS] vector (the paper's), or the mean
    # over the real tokens (for teachers trained with mean pooling: sentence-transformers, E5, BGE).
    c.patient_features = "cls"
    # Weights of intermediate terms over every token (0 = off; both need the teacher online):
    c.hidden_mse = 0.0  # TinyBERT's MSE between mapped layers' hidden states
    c.attention_kl = 0.0  # MiniLM's KL between mapped layers' attention distributions
    # A teacher of another hidden size (e.g. BERT-large -> a BERT-base-wide student): learn a linear
    # map of the student's [CLS] vectors to the teacher's size, trained with the student.
    c.projection = False
    # cached: teacher outputs computed once and memory-mapped; online: the teacher runs in every
    # step (needed for dropout-augmented views and the per-token terms); auto: cached unless
    # teacher_dropout, hidden_mse or attention_kl asks for online.
    c.teacher_mode = "auto"
    c.teacher_dropout = False
    c.learning_rate = 5e-5
    return c
