"""The loop's schedule and metrics log (the loop itself runs in every end-to-end test: single runs
in test_reliability/test_pipeline, sweep chunks in test_sweep)."""

import json

import pytest

from pkd_jax import loop


def test_schedule_evaluates_at_epochs_intervals_and_the_end_then_saves_then_logs():
    s = loop.Schedule(steps_per_epoch=10, total=25, eval_every=4, checkpoint_every=3, log_every=2)
    actions = {step: s.action(step) for step in range(1, 26)}
    assert [k for k, v in actions.items() if v == "evaluate"] == [4, 8, 10, 12, 16, 20, 24, 25]
    assert [k for k, v in actions.items() if v == "save"] == [3, 6, 9, 15, 18, 21]
    assert [k for k, v in actions.items() if v == "log"] == [2, 14, 22]
    assert loop.Schedule(10, 25).action(7) is None  # no interval set: epochs and the end only


def test_metrics_log_drops_what_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    lines = [{"chunk": 0, "student": 0, "step": 4, "split": "dev"},
             {"chunk": 1, "student": 1, "step": 2, "split": "train"},
             {"chunk": 1, "student": 1, "step": 3, "split": "train"}]
    text = "".join(json.dumps(l) + "\n" for l in lines) + '{"chunk": 1, "stu'  # cut short by the kill
    (tmp_path / "metrics.jsonl").write_text(text)
    log = loop.MetricsLog(tmp_path, start=2, total=4, enabled=True, progress=False, desc="t", tags={"chunk": 1})
    log.write(3, "train", {"loss": 0.5}, stream="student_001", student=1)
    log.close()
    kept = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [*lines[:2], {"chunk": 1, "student": 1, "step": 3, "split": "train", "loss": 0.5}]
    assert (tmp_path / "tensorboard" / "student_001").is_dir()


def test_metrics_log_of_other_processes_writes_nothing(tmp_path):
    log = loop.MetricsLog(tmp_path, start=0, total=4, enabled=False, progress=False, desc="t")
    log.write(1, "train", {"loss": 1.0})
    log.note("x")
    log.close()
    assert list(tmp_path.iterdir()) == []


def _finetune_config(glue_dir, teacher_dir):
    from configs import finetune

    return finetune.get_config(f"task=rte,model=minilm-l6,layers=2,glue_dir={glue_dir},runlocal")


def _cached_pkd_config(glue_dir, teacher_dir):
    from configs import pkd

    c = pkd.get_config(f"task=sst2,teacher={teacher_dir},model=minilm-l6,layers=2,glue_dir={glue_dir},runlocal")
    c.teacher_mode, c.train_examples, c.eval_examples = "cached", 96, 32
    c.max_seq_length, c.bucket = 32, False  # the finetune case checks the length buckets
    return c


@pytest.mark.parametrize("make_config", [_finetune_config, _cached_pkd_config], ids=["finetune", "cached_pkd"])
def test_nothing_compiles_inside_the_loop(make_config, glue_dir, sst2_teacher_dir, tmp_path, monkeypatch):
    """Every batch shape of the train step and of evaluation is compiled before the loop starts:
    compile time never counts as training time, and the accelerator never waits for XLA mid-run.
    A cached-teacher run compiles on a thread during the teacher's pass, for zeros in the outputs'
    shapes; its loop then gets the real outputs."""
    import logging

    import jax
    import numpy as np

    from pkd_jax import train

    c = make_config(glue_dir, sst2_teacher_dir)
    c.progress, c.predict_test, c.max_steps, c.eval_every_steps = False, False, 12, 6
    compiled, in_loop, teacher_logits = [], [], []

    class Compiles(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling jit("):
                (in_loop if inside else compiled).append(message.split(" with ")[0])

    inside = False
    real_train = loop.train

    def marked(*args, batches, **kwargs):
        nonlocal inside

        def seen():
            for batch in batches:
                teacher_logits.append(np.asarray(batch.get("teacher_logits", np.ones(1))))
                yield batch

        inside = True
        try:
            return real_train(*args, batches=seen(), **kwargs)
        finally:
            inside = False

    monkeypatch.setattr(loop, "train", marked)
    handler = Compiles()
    logging.getLogger("jax._src.interpreters.pxla").addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        results = train.train_and_evaluate(c, tmp_path)
    finally:
        jax.config.update("jax_log_compiles", False)
        logging.getLogger("jax._src.interpreters.pxla").removeHandler(handler)
    ours = ("Compiling jit(step)", "Compiling jit(logits_fn)")
    assert {m for m in compiled if m in ours} == set(ours)  # compiled, before the loop
    assert not [m for m in in_loop if m in ours], in_loop
    assert len(teacher_logits) >= 12 and all(np.abs(x).max() > 0 for x in teacher_logits)  # no placeholder
    timing = results["timing"]
    assert 0 < timing["compile_seconds"] <= timing["teacher_and_compile_seconds"] + 1e-3, timing
