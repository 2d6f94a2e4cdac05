"""Shared config pieces: the arg-string parser, model names, and the fields every run has.

Configs are `get_config(arg)` files run as `--config=configs/NAME.py:key=value,flag,...`
(big_vision style); every field can then be overridden with `--config.a.b=value`. Configs are
locked: an unknown key fails at once, naming the key.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Short names for pretrained checkpoints. Hub names need a network connection.
MODELS = {
    "minilm-l6": "minilm-l6",  # packaged all-MiniLM-L6-v2: 6 layers, hidden 384 (offline)
    "bert-base": "google-bert/bert-base-uncased",
    "bert-large": "google-bert/bert-large-uncased",
}

TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'task=rte,layers=3,runlocal' -> ConfigDict typed like `defaults` (a bare key is True)."""
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r} in {arg!r}; known: {', '.join(defaults)}")
        default = defaults[key]
        if not eq:
            parsed[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key}={value!r}: expected true or false")
            parsed[key] = value.lower() in ("true", "1")
        elif default is None or isinstance(default, str):
            parsed[key] = value
        else:
            try:
                parsed[key] = type(default)(value)
            except ValueError:
                raise ValueError(f"config arg {key}={value!r}: expected {type(default).__name__}") from None
    return parsed


def base_config(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fields shared by fine-tuning and distillation. Defaults follow the paper."""
    c = ml_collections.ConfigDict()
    c.task = arg.task
    c.glue_dir = config_dict.placeholder(str)  # a local GLUE folder; None: the HF hub
    c.glue_dir = arg.glue_dir or None
    c.data_source = config_dict.placeholder(str)  # local | hf | tfds; None: local iff glue_dir
    c.model = config_dict.placeholder(str)  # pretrained checkpoint: a name in MODELS, HF folder or hub id
    c.model = MODELS.get(arg.model, arg.model) if arg.model else None
    c.layers = config_dict.placeholder(int)  # keep the first k encoder layers; None: all

    c.max_seq_length = 128
    c.batch_size = 32
    c.eval_batch_size = 128
    c.num_epochs = 4.0
    c.max_steps = config_dict.placeholder(int)  # overrides num_epochs
    c.learning_rate = 2e-5
    c.warmup_fraction = 0.1
    c.weight_decay = 0.01
    c.max_grad_norm = 1.0
    c.seed = 0
    c.dtype = "auto"  # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
    c.bucket = True  # pad batches to a few length buckets instead of max_seq_length
    c.train_examples = config_dict.placeholder(int)  # a seeded random subset of the training set
    c.eval_examples = config_dict.placeholder(int)  # the first n dev examples
    c.predict_test = True  # write GLUE submission files for the test split
    c.test_examples = config_dict.placeholder(int)  # the first n test examples (smoke runs only)

    c.model_overrides = ml_collections.ConfigDict()
    c.model_overrides.remat = False
    c.model_overrides.hidden_dropout_prob = config_dict.placeholder(float)
    c.model_overrides.attention_probs_dropout_prob = config_dict.placeholder(float)

    c.eval_every_steps = 0  # 0: at the end of every epoch only
    c.checkpoint_every_steps = 500
    c.log_every_steps = 50
    c.keep_checkpoints = 2  # the latest N, plus the best by the task's main metric
    c.progress = True  # tqdm progress bars
    c.cache_dir = config_dict.placeholder(str)  # tokenised data, teacher outputs, compiled programs; None: $PKD_JAX_CACHE
    c.compilation_cache = True  # keep XLA programs in cache_dir/xla: reruns and resumes skip compiling

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1  # >1 shards params and optimizer state over this many devices
    c.distributed = ml_collections.ConfigDict()  # multi-process runs; see README "Scaling out"
    c.distributed.initialize = False  # True: jax.distributed.initialize() finds its peers (TPU pods, SLURM)
    c.distributed.coordinator_address = config_dict.placeholder(str)  # or name them: host:port, count, id
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)

    if arg.runlocal:  # seconds to a minute on CPU: a few dozen steps, a small dev slice
        c.max_seq_length = 64
        c.batch_size = 16
        c.eval_batch_size = 64
        c.max_steps = 30
        c.train_examples = 480
        c.eval_examples = 64
        c.test_examples = 64
        c.eval_every_steps = 15
        c.checkpoint_every_steps = 10
        c.log_every_steps = 5
    return c
