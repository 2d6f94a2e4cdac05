"""GLUE data: the task registry, reading splits, tokenising, batching, submission files.

The pipeline is ``load_split`` (``glue.py``: a ``datasets.Dataset`` with columns ``idx``,
``text_a``, ``text_b``, ``label``, from a local GLUE folder, the HuggingFace hub or TFDS) ->
``tokenize`` (``tokenization.py``: numpy arrays, cached on disk) -> ``train_batches`` /
``eval_batches`` (``batches.py``: host batches of numpy arrays) -> ``prefetch`` (placement on
devices in a background thread). ``tasks.py`` holds the registry every step consults.

Conventions: labels follow the HuggingFace ``glue`` ids (see ``TASKS``); STS-B labels are float
scores; unlabeled (test) rows have label -1.

This package is the only part of pkd_jax that imports ``datasets``, ``tensorflow_datasets`` and
``tokenizers``.
"""

from pkd_jax.data.batches import (MODEL_INPUTS, Prefetcher, bucket_sizes, eval_batches, eval_lengths,
                                  step_lengths, prefetch, steps_per_epoch, train_batches)
from pkd_jax.data.glue import (GlueFormatError, check_trainable, from_hf_glue, from_tfds_glue,
                               glue_file, load_split, write_glue_predictions)
from pkd_jax.data.tasks import TASKS, TaskSpec, check_split, dev_split, get_task
from pkd_jax.data.tokenization import Tokenized, cache_root, default_cache_dir, tokenize

__all__ = [
    "MODEL_INPUTS", "Prefetcher", "bucket_sizes", "eval_batches", "eval_lengths",
    "step_lengths", "prefetch", "steps_per_epoch",
    "train_batches", "GlueFormatError", "check_trainable", "from_hf_glue", "from_tfds_glue",
    "glue_file", "load_split", "write_glue_predictions", "TASKS", "TaskSpec", "check_split", "dev_split", "get_task",
    "Tokenized", "cache_root", "default_cache_dir", "tokenize",
]
