"""The parts of a run built from a (checked) config: mesh, data, teacher, student recipe.

`prepare(config)` checks the config, joins the other processes, builds the mesh, loads the
teacher, the tokenizer and the tokenised splits, and returns a `Setup`, from which a single run
(`train.py`) or a sweep (`sweep/`) builds its students, optimizer, step and batches.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pkd_jax import bert, checkpoints, checks, data, fsutil, optim, partitioning, steps, targets
from pkd_jax.checks import check_config, compute_dtype
from pkd_jax.errors import ConfigError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Teacher and student
# --------------------------------------------------------------------------------------------


def _teacher_source(config) -> tuple[str, str]:
    """(teacher model folder or name, the student's pretrained checkpoint)."""
    run = Path(config.teacher)
    if (run / "model" / "config.json").exists():  # a finished run's workdir
        pretrained = config.model
        if pretrained is None and (run / "config.json").exists():
            pretrained = json.loads((run / "config.json").read_text()).get("model")
        if pretrained is None:
            raise ConfigError(f"config.model=None: expected the pretrained checkpoint to initialise the student "
                              f"from ({run / 'config.json'} does not say which one the teacher started from)")
        return str(run / "model"), pretrained
    if config.model is None:
        raise ConfigError("config.model=None: expected the pretrained checkpoint to initialise the student from "
                          "(the teacher is not a run workdir that records it)")
    return config.teacher, config.model


class TeacherFeed(NamedTuple):
    """How the teacher reaches a distillation step: its graphdef and placed params (online), or
    `add_to_batch`, which fills a host batch with cached outputs. Fine-tuning: all None."""

    graphdef: Any = None
    params: Any = None
    add_to_batch: Callable[[dict], dict] | None = None


class TeacherPass(NamedTuple):
    """`Setup.teacher_pass`: `early`, a feed with the final one's teacher and batch shapes (a cached
    run's holds zeros in place of the outputs: `teacher_cache.placeholder`), to compile for; and
    `finish`, which runs the teacher's pass and returns the final feed."""

    early: TeacherFeed
    finish: Callable[[], TeacherFeed]


@contextlib.contextmanager
def alongside(fn: Callable, *args):
    """Run `fn(*args)` on a thread while the body runs (a run compiles during the teacher's pass);
    wait for it at the end and raise its error. An error in the body (Ctrl-C included) is raised
    once `fn` has returned: a compilation cannot be cut short."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="alongside") as pool:
        future = pool.submit(fn, *args)
        yield
        future.result()


@dataclasses.dataclass
class Setup:
    """Everything a run needs before its first step: mesh, data, teacher, student recipe.

    Built by `prepare(config)`; shared by `train.train_and_evaluate`, the vmapped sweep and each
    task of a multi-task run.
    """

    config: Any
    mesh: Any
    fsdp: bool
    dtype: Any
    task: data.TaskSpec
    cache_dir: Path
    pretrained: str  # the checkpoint students (and fine-tuned models) start from
    tokenizer: Any
    train_tok: data.Tokenized
    dev_tok: data.Tokenized
    steps_per_epoch: int
    total_steps: int
    teacher: Any = None  # the loaded teacher model (distillation only)
    teacher_path: str | None = None
    layer_map: tuple[int, ...] | None = None
    test_toks: dict[str, data.Tokenized] = dataclasses.field(default_factory=dict)  # predict_test's splits

    @property
    def distill(self) -> bool:
        return self.teacher is not None

    @property
    def online(self) -> bool:
        c = self.config
        needs = c.teacher_dropout or c.hidden_mse > 0 or c.attention_kl > 0
        return self.distill and (c.teacher_mode == "online" or (c.teacher_mode == "auto" and needs))

    @property
    def warmup_steps(self) -> int:
        return int(self.config.warmup_fraction * self.total_steps)

    def new_student(self, seed: int) -> bert.BertForSequenceClassification:
        """The model to train: the first `layers` layers of `pretrained`, a head seeded by `seed`."""
        c = self.config
        overrides = {k: v for k, v in c.model_overrides.items() if v is not None}
        label_names = None if self.task.is_regression else self.task.label_names
        return checkpoints.load_pretrained(self.pretrained, num_labels=self.task.num_labels, num_layers=c.layers,
                                           dtype=self.dtype, seed=seed, label_names=label_names, **overrides)

    def optimizer(self) -> optax.GradientTransformation:
        c = self.config
        return optim.make_optimizer(learning_rate=c.learning_rate, total_steps=self.total_steps,
                                    warmup_steps=self.warmup_steps, weight_decay=c.weight_decay,
                                    max_grad_norm=c.max_grad_norm)

    def loss_weights(self) -> dict[str, float]:
        """alpha, beta and temperature of the config (fine-tuning: 0, 0, 1)."""
        c = self.config
        return {"alpha": c.get("alpha", 0.0), "beta": c.get("beta", 0.0), "temperature": c.get("temperature", 1.0)}

    @property
    def weighs_patient(self) -> bool:
        """Whether a run of this config weights the patient loss (beta > 0; a sweep: any of its betas)."""
        c = self.config
        return max(c.get("betas", (c.get("beta", 0.0),))) > 0

    @property
    def projection_to(self) -> int | None:
        """The teacher's hidden size when the student's differs and config.projection asks for a
        learned map (without it, only width-free distances such as cka may compare them)."""
        if not self.distill or not self.config.projection:
            return None
        student = checkpoints.load_config(self.pretrained, num_layers=self.config.layers)
        t = self.teacher.config.hidden_size
        return t if student.hidden_size != t else None

    def teacher_feed(self, lead: bool = True) -> TeacherFeed:
        """The teacher for the step: placed params (online), or its cached outputs after one pass
        over the training set (or their reuse)."""
        return self.teacher_pass(lead).finish()

    def teacher_pass(self, lead: bool = True) -> TeacherPass:
        """The teacher's feed in two phases: `early` at once (the teacher placed on the mesh), then
        `finish()`, which runs the teacher's pass: the cached outputs, or the online teacher's
        sample for the constant-features warning. A run compiles its step for `early` on a thread
        (`alongside`) while the pass runs: on a GPU each program takes tens of seconds, mostly on
        the host."""
        if not self.distill:
            return TeacherPass(TeacherFeed(), TeacherFeed)
        t_graphdef, t_params = nnx.split(self.teacher, nnx.Param)
        t_params = partitioning.place_state(t_params, self.mesh, self.fsdp)
        kind, index = self.config.patient_features, np.asarray(self.layer_map, int) - 1
        if self.online:
            # Plain arrays, as the student's state: a step call flattens them on the host every step.
            feed = TeacherFeed(t_graphdef, nnx.to_pure_dict(t_params))

            def sample() -> TeacherFeed:
                if self.weighs_patient:  # KD (beta = 0) ignores the patient features
                    features = targets.layer_features(t_graphdef, t_params, self.train_tok, self.mesh,
                                                      batch_size=256, bucket=False)[kind]
                    targets.warn_if_constant(features[index], self.layer_map, kind, log)
                return feed

            return TeacherPass(feed, sample)
        from pkd_jax import teacher_cache

        t = self.teacher.config

        def build() -> TeacherFeed:
            cache = teacher_cache.build_or_load(
                t_graphdef, t_params, self.train_tok, self.layer_map, mesh=self.mesh,
                batch_size=self.config.eval_batch_size, cache_dir=self.cache_dir / "teacher",
                dtype_name=jnp.dtype(self.dtype).name, architecture=repr(t),
                features=self.config.patient_features, progress=self.config.progress and lead)
            log.info("teacher outputs %s: %s", "reused" if cache.reused else "computed", cache.path)
            if self.weighs_patient:  # FT and KD runs of a study ignore the patient features
                targets.warn_if_constant(np.swapaxes(cache.features[:256], 0, 1), self.layer_map, kind, log)
            return TeacherFeed(add_to_batch=cache.add_to)

        zeros = teacher_cache.placeholder(t.num_labels, len(self.layer_map), t.hidden_size)
        return TeacherPass(TeacherFeed(add_to_batch=zeros), build)

    def make_step(self, graphdef, tx, teacher_graphdef=None):
        """The pure step: (state, batch) for fine-tuning, (state, teacher_params, batch) to distil."""
        c = self.config
        if not self.distill:
            return steps.make_finetune_step(graphdef, tx, regression=self.task.is_regression)
        return steps.make_distill_step(graphdef, tx, layer_map=self.layer_map, teacher_graphdef=teacher_graphdef,
                                       teacher_dropout=c.teacher_dropout, normalize=c.normalize, mode=c.mode,
                                       regression=self.task.is_regression, distance=c.distance,
                                       features=c.patient_features, hidden_weight=c.hidden_mse,
                                       attention_weight=c.attention_kl)

    def train_batches(self, start: int, feed: TeacherFeed, *, seed: int | None = None,
                      to_devices: Callable[[dict], dict] | None = None):
        """Training batches on the devices from step `start` on (with teacher outputs when cached).

        seed: the data order's seed (default config.seed); to_devices: placement of a host batch
        (default: split over the mesh).
        """
        c = self.config
        to_devices = to_devices or (lambda b: partitioning.shard_batch(b, self.mesh))
        seed = c.seed if seed is None else seed
        for b in data.train_batches(self.train_tok, c.batch_size, seed, start_step=start, bucket=c.bucket):
            b = feed.add_to_batch(b) if feed.add_to_batch else b
            yield to_devices({k: b[k] for k in steps.TRAIN_INPUTS if k in b})

    def example_batches(self, start: int, feed: TeacherFeed, *, seed: int | None = None,
                        to_devices: Callable[[dict], dict] | None = None, stop: int | None = None) -> list[dict]:
        """One training batch (on the devices) of each padded length that the steps from `start`
        to `stop` (default: the end) will have: what to compile the step for before the loop."""
        c = self.config
        seed = c.seed if seed is None else seed
        stop = self.total_steps if stop is None else stop
        lengths = data.step_lengths(self.train_tok, c.batch_size, seed, start, stop, bucket=c.bucket)
        firsts = [start + int(np.argmax(lengths == n)) for n in np.unique(lengths)]
        return [next(self.train_batches(step, feed, seed=seed, to_devices=to_devices)) for step in firsts]

    def batch_idx(self, step: int, seed: int | None = None) -> list[int]:
        """The dataset idx of the examples in the batch of `step` (the order is a function of the step)."""
        c = self.config
        batch = next(data.train_batches(self.train_tok, c.batch_size, c.seed if seed is None else seed,
                                        start_step=step, bucket=c.bucket))
        return self.train_tok.idx[batch["index"]].tolist()


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def _tokenized_split(config, tokenizer, split: str, cache_dir: Path, limit: int | None = None,
                     subsample: int | None = None) -> data.Tokenized:
    ds = data.load_split(config.task, split, glue_dir=config.glue_dir, source=config.data_source)
    if subsample is not None and subsample < len(ds):
        # A fixed data seed: teacher and students (whatever their own seed) see the same subset.
        rows = np.sort(np.random.default_rng(0).choice(len(ds), subsample, replace=False))
        ds = ds.select(rows)
    elif limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    if not split.startswith("test"):  # what trains and selects the model must have labels that vary
        data.check_trainable(ds, config.task, f"{config.task}/{split} ({len(ds)} examples used)")
    tok = data.tokenize(ds, tokenizer, config.max_seq_length, cache_dir=cache_dir / "tokenized")
    if tok.num_truncated:
        log.warning("%s/%s: %d of %d examples truncated to %d tokens", config.task, split,
                    tok.num_truncated, len(tok), config.max_seq_length)
    return tok


def prepare(config) -> Setup:
    """Join the processes, check the config, build the mesh, load the teacher and the data."""
    # First: the checks ask the backend for its devices (dtype=auto), and JAX refuses to join
    # other processes once the backend is up. A single process joins nothing.
    partitioning.initialize_distributed(**config.distributed)
    check_config(config)
    cache_dir = Path(config.cache_dir) if config.cache_dir else data.cache_root()
    if config.compilation_cache:  # a resumed run, or the next student, skips recompiling
        jax.config.update("jax_compilation_cache_dir", str(cache_dir / "xla"))
    mesh = partitioning.make_mesh(config.mesh.fsdp)
    log.info("process %d of %d; %d devices (%s); mesh %s", jax.process_index(), jax.process_count(),
             jax.device_count(), jax.devices()[0].device_kind, dict(mesh.shape))
    for key in ("batch_size", "eval_batch_size"):
        try:
            partitioning.check_batch_size(config[key], mesh)
        except ValueError as e:
            raise ConfigError(f"config.{key}={config[key]}: {e}") from None
    dtype = compute_dtype(config.dtype)
    task = data.get_task(config.task)

    teacher = teacher_path = layer_map = None
    pretrained = config.model
    if config.kind == "distill":
        teacher_path, pretrained = _teacher_source(config)
        checks.check_teacher(config, teacher_path, task)
        teacher = checkpoints.load_pretrained(teacher_path, num_labels=task.num_labels, dtype=dtype)
        checks.check_model(config, teacher.config, f"the teacher {teacher_path}")
    checks.check_student_depth(config, pretrained)
    student = checkpoints.load_config(pretrained, num_layers=config.layers)
    checks.check_model(config, student, pretrained)
    tokenizer = checkpoints.load_tokenizer(pretrained)
    if teacher is not None:
        layer_map = checks.check_pair(config, teacher.config, student, checkpoints.load_tokenizer(teacher_path),
                                      tokenizer)

    train_tok = _tokenized_split(config, tokenizer, "train", cache_dir, subsample=config.train_examples)
    dev_tok = _tokenized_split(config, tokenizer, data.dev_split(config.task), cache_dir, limit=config.eval_examples)
    # Test files are read now, not after training: a malformed one stops the run before any compute.
    test_toks = {split: _tokenized_split(config, tokenizer, split, cache_dir, limit=config.test_examples)
                 for split in task.splits if split.startswith("test") and config.predict_test}
    steps_per_epoch = data.steps_per_epoch(len(train_tok), config.batch_size)
    total = config.max_steps or int(np.ceil(config.num_epochs * max(steps_per_epoch, 1)))
    checks.check_schedule(config, len(train_tok), steps_per_epoch, total)
    return Setup(config=config, mesh=mesh, fsdp=config.mesh.fsdp > 1, dtype=dtype, task=task,
                 cache_dir=cache_dir, pretrained=pretrained, tokenizer=tokenizer, train_tok=train_tok,
                 dev_tok=dev_tok, steps_per_epoch=steps_per_epoch, total_steps=total, teacher=teacher,
                 teacher_path=teacher_path, layer_map=layer_map, test_toks=test_toks)


def open_workdir(config, workdir: Path, lead: bool, restart: bool) -> None:
    """Process 0 takes the workdir (one writer: fsutil.hold_workdir; the run releases it when it
    ends), --restart moves an earlier run aside, and process 0 writes the run's config.json."""
    if lead:
        fsutil.hold_workdir(workdir)
    try:
        if restart:
            start_over(workdir, lead)
        if lead:
            fsutil.write_text(workdir / "config.json", config.to_json_best_effort(indent=1) + "\n")
    except BaseException:
        fsutil.release_workdir(workdir)
        raise


def start_over(workdir: Path, lead: bool) -> None:
    """--restart: process 0 moves the workdir's earlier run aside; every process waits for it."""
    from jax.experimental import multihost_utils

    if lead and (aside := checks.replace_run(workdir)):
        log.warning("--restart: the earlier run in %s moved to %s", workdir, aside)
    multihost_utils.sync_global_devices("workdir replaced")
