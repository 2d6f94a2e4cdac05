"""THE training loop, shared by single runs (`train.py`) and sweep chunks (`sweep/`).

`train(trainee, state, ...)` runs steps start+1..total and owns everything that must behave the
same whatever is being trained:

* the schedule (`Schedule`): evaluate at the end of each epoch, every `eval_every_steps` and at
  the last step (an evaluation also checkpoints); otherwise checkpoint every
  `checkpoint_every_steps`; otherwise bring the train metrics to the host every `log_every_steps`;
* checkpoints (orbax, through `checkpoints.TrainCheckpointer`) of the state and the run's `meta`;
* preemption: SIGTERM saves a checkpoint between two steps and raises `Preempted`;
* the final evaluation when the last one did not happen (a run preempted during it);
* the metrics log (`MetricsLog`: metrics.jsonl, TensorBoard, the progress bar) and the timing of
  training apart from evaluation and saving.

What differs, the `Trainee` supplies: its step, what it does with fetched train metrics (log them,
and stop on NaN or mark a student failed) and its evaluation (log, track the best, export).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import jax

from pkd_jax import data, fsutil

log = logging.getLogger(__name__)

Metrics = dict[str, jax.Array]


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved; the same command resumes the run."""


class Trainee(Protocol):
    """What the loop trains: one student (a single run) or a chunk of stacked students."""

    def train_step(self, state, batch) -> tuple[Any, Metrics]:
        """One optimizer update on a batch already on the devices."""

    def record_train(self, host: list[tuple[int, dict]], step: int, seconds: float, steps: int) -> None:
        """Train metrics of the steps since the last fetch, on the host: [(step, metrics)], the
        wall time those `steps` steps took. Logs them; raises (or marks failures) on NaN."""

    def evaluate(self, state, step: int) -> float | None:
        """Dev evaluation after `step`; returns the checkpoint's score (None: unranked)."""

    def done(self) -> bool:
        """Nothing left to train (e.g. every student of a chunk failed)."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total: int
    eval_every: int = 0  # 0: at the end of every epoch only
    checkpoint_every: int = 0
    log_every: int = 50

    @classmethod
    def from_config(cls, config, steps_per_epoch: int, total: int) -> "Schedule":
        return cls(steps_per_epoch, total, config.eval_every_steps, config.checkpoint_every_steps,
                   config.log_every_steps)

    def action(self, step: int) -> str | None:
        """"evaluate", "save", "log" or None: what follows `step`."""
        if step % self.steps_per_epoch == 0 or step == self.total or (
                self.eval_every and step % self.eval_every == 0):
            return "evaluate"
        if self.checkpoint_every and step % self.checkpoint_every == 0:
            return "save"
        if step % self.log_every == 0:
            return "log"
        return None


def train(trainee: Trainee, state, *, start: int, schedule: Schedule, batches: Iterator,
          ckpt, meta: dict, log: "MetricsLog", what: str = "a checkpoint"):
    """Train from step `start` to `schedule.total`; returns the final state.

    batches: the batches of steps start+1, start+2, ... on the devices (prefetched here).
    meta: saved with every checkpoint and restored with it; the loop keeps "train_seconds" and
    "last_eval" there, the trainee what it tracks. what: names the checkpoint in messages.
    """
    stop = _SigtermFlag()
    window = _MetricsWindow(start)
    meta.setdefault("train_seconds", 0.0)
    meta.setdefault("last_eval", None)
    trained = start

    def fetch(step: int) -> None:
        fetched = window.fetch(step)
        if fetched is not None:
            host, seconds, steps = fetched
            trainee.record_train(host, step, seconds, steps)  # may refuse (NaN) before anything is saved
            meta["train_seconds"] += seconds

    def save(step: int, score: float | None = None) -> None:
        fetch(step)
        ckpt.save(step, state, meta, score)

    def evaluate(step: int) -> None:
        fetch(step)
        score = trainee.evaluate(state, step)
        meta["last_eval"] = step
        save(step, score)
        window.restart(step)  # evaluation time is not training time

    try:
        with data.prefetch(batches, size=2) as stream:
            for step in range(start + 1, schedule.total + 1):
                if trainee.done():
                    break
                if stop.requested:
                    save(trained)
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved {what} at step {trained}; run the same command to resume")
                state, m = trainee.train_step(state, next(stream))
                trained = step
                window.add(step, m)
                log.advance()
                action = schedule.action(step)
                if action == "evaluate":
                    evaluate(step)
                elif action == "save":
                    save(step)
                    window.restart(step)  # saving time is not training time
                elif action == "log":
                    fetch(step)
        if not trainee.done() and meta["last_eval"] != trained:  # e.g. preempted during the last eval
            evaluate(trained)
        fetch(trained)
        ckpt.wait()
    finally:
        stop.restore()
        log.close()
    return state


def resume(ckpt, state, meta: dict):
    """The workdir's newest restorable checkpoint of `state` (its saved record merged into `meta`),
    or `state` itself when there is none: where a single or multi-task run starts."""
    restored = ckpt.restore_latest(state)
    if restored is None:
        return state
    _, state, saved = restored
    meta.update(saved)
    log.info("resumed from step %d", int(state.step))
    return state


class _SigtermFlag:
    """Turns SIGTERM (a preempted VM) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _MetricsWindow:
    """Device metrics of the steps since the last fetch, and the wall time those steps took.

    A step only appends its metrics (no host sync); `fetch` brings them to the host at log,
    evaluation and checkpoint times; `restart` keeps evaluation and saving out of training time.
    """

    def __init__(self, step: int):
        self.pending: list[tuple[int, Metrics]] = []
        self.restart(step)

    def add(self, step: int, metrics: Metrics) -> None:
        self.pending.append((step, metrics))

    def restart(self, step: int) -> None:
        self.t0, self.start = time.perf_counter(), step

    def fetch(self, step: int):
        """([(step, host metrics)], seconds, steps) since the last fetch; None when nothing is new."""
        if not self.pending:
            return None
        host = jax.device_get(self.pending)  # one transfer of all of them, not one per step
        elapsed, steps = time.perf_counter() - self.t0, step - self.start
        self.pending = []
        self.restart(step)
        return host, elapsed, steps


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch. Its writer module imports torch
    wherever torch is installed, only to accept torch tensors (we log floats); that import took
    1.2-2.4 s on this project's CPU machine."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]  # torch stays importable for the rest of the process
    return SummaryWriter


class MetricsLog:
    """metrics.jsonl, TensorBoard events and a progress bar; a no-op unless `enabled` (process 0).

    A line is {**tags, **fields, "step", "split", **values}. Resuming at step `start`, lines a
    killed run wrote after that point (ordered by the tags' values, then the step), and a line
    cut short by the kill, are dropped. `stream` names a TensorBoard run (a subfolder), so several
    students overlay in one TensorBoard.
    """

    def __init__(self, workdir: Path, *, start: int, total: int, enabled: bool, progress: bool,
                 desc: str, tags: dict[str, int] | None = None):
        self.enabled, self.tags, self.start = enabled, dict(tags or {}), start
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.workdir = Path(workdir)
        path = self.workdir / "metrics.jsonl"
        if path.exists():
            resume_at = (*self.tags.values(), start)
            kept = [l for l in path.read_text().splitlines() if self._position(l) <= resume_at]
            fsutil.write_text(path, "".join(l + "\n" for l in kept))
        self.jsonl = path.open("a")
        self.writers: dict[str | None, Any] = {}
        self.summary_writer = _summary_writer()  # imported here, before the loop's clock starts
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not progress,
                        desc=desc)

    def _position(self, line: str) -> tuple:
        try:
            record = json.loads(line)
            return (*(record[k] for k in self.tags), record["step"])
        except (ValueError, KeyError, TypeError):
            return (math.inf,) * (len(self.tags) + 1)  # a line cut short by a kill: dropped

    def _writer(self, stream: str | None):
        if stream not in self.writers:
            folder = self.workdir / "tensorboard"
            # A resumed run: TensorBoard drops the killed run's events from `start` on, as metrics.jsonl does.
            self.writers[stream] = self.summary_writer(str(folder / stream if stream else folder),
                                                       purge_step=self.start or None)
        return self.writers[stream]

    def write(self, step: int, split: str, values: dict[str, float], *, stream: str | None = None,
              **fields) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({**self.tags, **fields, "step": step, "split": split, **values}) + "\n")
        self.jsonl.flush()
        writer = self._writer(stream)
        for k, v in values.items():
            writer.add_scalar(f"{split}/{k}", v, step)

    def postfix(self, text: str) -> None:
        """The progress bar's status (loss, throughput)."""
        if self.enabled:
            self.bar.set_postfix_str(text)

    def note(self, text: str) -> None:
        """A line printed above the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            for writer in self.writers.values():
                writer.close()
            self.jsonl.close()
