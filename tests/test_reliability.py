"""Bad input, NaN, corrupt checkpoints, a full disk, SIGTERM and SIGKILL: clear errors, nothing lost.

Runs, in this process and in subprocesses (`run.py`, as users start it), use one device. Each group is
compared with an uninterrupted run of its own kind.
"""

import json
import logging
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from configs import finetune, pkd
from pkd_jax import bert, checkpoints, data, fsutil, setup, steps, train
from pkd_jax.checkpoints import CheckpointError

REPO = Path(__file__).resolve().parents[1]
ARGS = "task=rte,model=minilm-l6,layers=2,glue_dir={glue},runlocal"  # 30 steps; ckpt 10, 20; eval 15, 30


def _config(glue_dir, **fields):
    c = finetune.get_config(ARGS.format(glue=glue_dir))
    # One batch shape, one compilation per step program: resuming a bucketed run is the subprocess
    # test's (_cmd keeps the buckets).
    c.progress, c.predict_test, c.bucket = False, False, False
    for k, v in fields.items():
        c[k] = v
    return c


def _same_results(a: dict, b: dict):
    assert a["best"] == b["best"] and a["last"] == b["last"]


def _same_export(a: Path, b: Path):
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


@pytest.fixture(scope="module", autouse=True)
def _on_one_device(one_device):
    with one_device():
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, glue_dir):
    """An uninterrupted in-process run."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, train.train_and_evaluate(_config(glue_dir), workdir)


# ---- Bad input --------------------------------------------------------------------------------


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("override, named", [
    ("--config.nonexistent=1", "nonexistent"),
    ("--config.batch_size=abc", "batch_size"),
    ("--config.dtype=float64", "config.dtype='float64'"),
])
def test_cli_rejects_bad_config_naming_the_key(override, named, glue_dir, tmp_path):
    proc = _cli(f"--config=configs/finetune.py:{ARGS.format(glue=glue_dir)}", f"--workdir={tmp_path}", override)
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_config_values_are_checked_before_any_work(glue_dir):
    c = pkd.get_config(f"task=rte,teacher=x,model=minilm-l6,glue_dir={glue_dir},runlocal")
    c.strategy = "jump"
    with pytest.raises(ValueError, match=r"config\.strategy='jump'"):
        setup.check_config(c)
    with pytest.raises(ValueError, match="unknown config arg 'lr'"):
        finetune.get_config("task=rte,lr=3")


def test_malformed_tsv_row_stops_the_run_naming_file_and_line(glue_dir, tmp_path):
    bad = tmp_path / "glue"
    shutil.copytree(glue_dir / "RTE", bad / "RTE")
    lines = (bad / "RTE" / "train.tsv").read_text().split("\n")
    lines[6] = "\t".join(lines[6].split("\t")[:-1])  # line 7 loses its label column
    (bad / "RTE" / "train.tsv").write_text("\n".join(lines))
    proc = _cli(f"--config=configs/finetune.py:{ARGS.format(glue=bad)}", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode != 0
    assert f"{bad / 'RTE' / 'train.tsv'}:7: expected 4 tab-separated columns, found 3" in proc.stderr


def test_a_second_run_on_a_workdir_in_use_is_refused_until_its_writer_ends(glue_dir, tmp_path):
    """Two runs writing one workdir would interleave checkpoints and logs: while another process
    holds it, run.py stops at once (exit 2, one line naming the workdir) and writes nothing there;
    the holder's death, even by SIGKILL, frees it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pkd_jax import fsutil; "
                               "fsutil.hold_workdir(sys.argv[1]); print('held', flush=True); time.sleep(600)",
                               str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run(_cmd(glue_dir, tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"error: {tmp_path}: another process is training in this workdir" in proc.stderr
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(fsutil.WorkdirInUse):
            fsutil.hold_workdir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    fsutil.hold_workdir(tmp_path)  # the kernel dropped the killed holder's lock
    fsutil.release_workdir(tmp_path)


def test_over_long_inputs_are_truncated_and_counted(reference, glue_dir, tokenizer):
    _, results = reference
    ds = data.load_split("rte", "train", glue_dir)
    rows = np.sort(np.random.default_rng(0).choice(len(ds), 480, replace=False))  # runlocal's subset
    sub = ds.select(rows)
    lengths = [len(tokenizer(a, b)["input_ids"]) for a, b in zip(sub["text_a"], sub["text_b"])]
    assert results["truncated"]["train"] == sum(n > 64 for n in lengths) > 0


def _teacher_folder(path: Path, tokenizer, hidden=384):
    cfg = bert.BertConfig(hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=2 * hidden, label_names=("entailment", "not_entailment"))
    checkpoints.save_pretrained(bert.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)), path, tokenizer)
    return path


def _distill_config(glue_dir, teacher, **fields):
    c = pkd.get_config(f"task=rte,teacher={teacher},model=minilm-l6,layers=2,glue_dir={glue_dir},runlocal")
    c.progress, c.predict_test, c.max_steps, c.eval_every_steps, c.bucket = False, False, 4, 0, False
    for k, v in fields.items():
        c[k] = v
    return c


def test_teacher_problems_are_named(glue_dir, tokenizer, minilm_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        setup.prepare(_distill_config(glue_dir, tmp_path / "missing"))
    other = tmp_path / "other_vocab"
    shutil.copytree(minilm_dir, other)
    (other / "tokenizer.json").unlink()
    vocab = (other / "vocab.txt").read_text().split("\n")
    vocab[2000], vocab[2001] = vocab[2001], vocab[2000]
    (other / "vocab.txt").write_text("\n".join(vocab))
    from transformers import AutoTokenizer
    _teacher_folder(tmp_path / "t_vocab", AutoTokenizer.from_pretrained(str(other)))
    with pytest.raises(ValueError, match="different vocabularies"):
        setup.prepare(_distill_config(glue_dir, tmp_path / "t_vocab"))


def test_hidden_size_mismatch_needs_the_projection(glue_dir, tokenizer, tmp_path):
    teacher = _teacher_folder(tmp_path / "t96", tokenizer, hidden=96)
    with pytest.raises(ValueError, match=r"hidden size 96 != student hidden size 384.*projection=True"):
        setup.prepare(_distill_config(glue_dir, teacher))
    results = train.train_and_evaluate(_distill_config(glue_dir, teacher, projection=True), tmp_path / "w")
    assert results["total_steps"] == 4
    logged = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(l["pt"]) and l["pt"] > 0 for l in logged if l["split"] == "train")
    # Mean features and the hidden-state term go through the same projection (teacher online);
    # CKA compares the two widths without one, unless hidden_mse needs it.
    mean = _distill_config(glue_dir, teacher, projection=True, patient_features="mean", hidden_mse=1.0)
    train.train_and_evaluate(mean, tmp_path / "mean")
    logged = [json.loads(l) for l in (tmp_path / "mean" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(l["hidden_mse"]) and l["hidden_mse"] > 0 for l in logged if l["split"] == "train")
    setup.prepare(_distill_config(glue_dir, teacher, distance="cka"))  # no projection needed
    with pytest.raises(ValueError, match="hidden_mse compare vectors of equal size"):
        setup.prepare(_distill_config(glue_dir, teacher, distance="cka", hidden_mse=1.0))


# ---- NaN, corrupt checkpoints, full disk ---------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(glue_dir, tmp_path, monkeypatch):
    real = steps.make_finetune_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state, batch):  # from step 12 on, the update blows up
            new, m = step(state, batch)
            bad = state.step >= 11
            params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
            return new.replace(params=params), dict(m, loss=jnp.where(bad, jnp.nan, m["loss"]))
        return wrapped

    monkeypatch.setattr(steps, "make_finetune_step", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 12 \(batch of training examples idx \[\d+"):
        train.train_and_evaluate(_config(glue_dir), tmp_path)
    ckpt = checkpoints.TrainCheckpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [10]
    step, state, _ = ckpt.restore_latest(steps.create_train_state(
        checkpoints.load_pretrained("minilm-l6", num_labels=2, num_layers=2), _optimizer(), 0)[1])
    assert step == 10 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def _optimizer():
    from pkd_jax import optim

    return optim.make_optimizer(learning_rate=2e-5, total_steps=30, warmup_steps=3)


def _metric_lines(workdir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock field."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k != "examples_per_s"} for l in lines]


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory, glue_dir):
    """A run of its own stopped by a full disk: from step 20's save on, no file may grow past 1 MB
    (EFBIG, as ENOSPC would). Returns its workdir and the error's message."""
    workdir = tmp_path_factory.mktemp("full_disk")
    real_save = checkpoints.TrainCheckpointer.save
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process

    def save(self, step, *args, **kwargs):
        if step >= 20:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        return real_save(self, step, *args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as mp, pytest.raises(CheckpointError) as failed:
            mp.setattr(checkpoints.TrainCheckpointer, "save", save)
            train.train_and_evaluate(_config(glue_dir), workdir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    return workdir, str(failed.value)


def test_corrupt_latest_checkpoint_falls_back_to_an_older_one(full_disk_run, reference, glue_dir, tmp_path, caplog):
    """The full-disk run's latest complete checkpoint (15) has its arrays truncated: the same
    command reports it, resumes from the one before (10) and ends exactly like the uninterrupted
    reference run."""
    ref_dir, ref = reference
    shutil.copytree(full_disk_run[0], tmp_path, dirs_exist_ok=True)
    assert checkpoints.TrainCheckpointer(tmp_path / "checkpoints").all_steps() == [10, 15]
    truncated = 0
    for f in (tmp_path / "checkpoints" / "15" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])  # truncated array data
            truncated += 1
    assert truncated

    caplog.set_level(logging.INFO, logger="pkd_jax")
    results = train.train_and_evaluate(_config(glue_dir), tmp_path)
    assert "checkpoint at step 15 could not be restored" in caplog.text
    assert "resumed from step 10" in caplog.text and "resumed from step 15" not in caplog.text
    _same_results(results, ref)
    _same_export(tmp_path, ref_dir)
    assert _metric_lines(tmp_path) == _metric_lines(ref_dir)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(full_disk_run, reference, glue_dir, tmp_path):
    """The full disk stops the run with a clear error; the complete checkpoints (10, 15) stay
    restorable and the rerun resumes from 15 and ends like the reference."""
    ref_dir, ref = reference
    workdir, error = full_disk_run
    assert "saving a checkpoint failed" in error or "writing the model failed" in error, error
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    assert checkpoints.TrainCheckpointer(tmp_path / "checkpoints").all_steps() == [10, 15]
    assert not (tmp_path / "results.json").exists()
    _same_results(train.train_and_evaluate(_config(glue_dir), tmp_path), ref)
    _same_export(tmp_path, ref_dir)
    assert _metric_lines(tmp_path) == _metric_lines(ref_dir)


# ---- Preemption (subprocesses, like a scheduler) ----------------------------------------------------


def _cmd(glue_dir, workdir):
    return [sys.executable, "run.py", f"--config=configs/finetune.py:{ARGS.format(glue=glue_dir)}",
            f"--workdir={workdir}", "--config.progress=False", "--config.predict_test=False",
            "--config.checkpoint_every_steps=3"]


@pytest.fixture(scope="module")
def subprocess_reference(tmp_path_factory, glue_dir):
    workdir = tmp_path_factory.mktemp("subprocess_reference")
    subprocess.run(_cmd(glue_dir, workdir), cwd=REPO, check=True, capture_output=True, timeout=600)
    return workdir


_TMP = ".orbax-checkpoint-tmp"  # orbax writes step N into N.orbax-checkpoint-tmp, then renames it N


def _saved_steps(workdir: Path) -> list[int]:
    """Complete checkpoints."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())


def _saving(workdir: Path) -> list[Path]:
    """Checkpoints being written (or left half-written by a kill)."""
    return [p for p in (workdir / "checkpoints").glob(f"*{_TMP}") if p.name.split(".")[0].isdigit()]


def _logged_steps(workdir: Path) -> list[int]:
    """The steps of metrics.jsonl's complete lines."""
    path, steps = workdir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def _progress(workdir: Path) -> tuple[int, int]:
    """(latest complete checkpoint, latest logged step)."""
    return max(_saved_steps(workdir), default=0), max(_logged_steps(workdir), default=0)


def _launch(glue_dir, workdir):
    return subprocess.Popen(_cmd(glue_dir, workdir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait(proc, condition, what: str, deadline=300):
    """Poll `condition` (every 5 ms, to catch a checkpoint mid-save) while `proc` runs; its value."""
    end = time.time() + deadline
    while not (found := condition()):
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.time() < end, f"no {what} within {deadline} s"
        time.sleep(0.005)
    return found


def _stop(proc, sig) -> str:
    proc.send_signal(sig)
    return proc.communicate(timeout=300)[1]


def _assert_interrupted(workdir: Path, before: tuple[int, int]) -> tuple[int, int]:
    """The run stopped mid-way, further than the previous interruption got."""
    now = _progress(workdir)
    assert now[0] >= before[0] and now[1] > before[1], (before, now)
    assert now[0] < 30 and not (workdir / "results.json").exists(), now
    return now


def test_preempted_then_killed_at_random_moments_resumes_bitwise_identically(subprocess_reference, glue_dir,
                                                                             tmp_path):
    """SIGTERM once (a checkpoint, a message, exit 143); SIGKILL while orbax writes a checkpoint
    (its temporary folder is left behind), the metric log's last line then cut mid-line; SIGKILL at
    a random moment later on; then the same command to the end. Every interruption lands mid-run,
    further than the one before; results, export and metric log equal the uninterrupted run's."""
    proc = _launch(glue_dir, tmp_path)
    _wait(proc, lambda: _saved_steps(tmp_path), "checkpoint")
    stderr = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 143, stderr[-2000:]
    saved = int(stderr.split("saved a checkpoint at step ")[1].split(";")[0])
    assert saved == max(checkpoints.TrainCheckpointer(tmp_path / "checkpoints").all_steps())
    progress = _assert_interrupted(tmp_path, (0, 0))

    for _ in range(3):  # SIGKILL mid-save; again if the save completed before the signal landed
        proc = _launch(glue_dir, tmp_path)
        stale = _saving(tmp_path)  # the new process removes a previous attempt's leftovers first
        _wait(proc, lambda: not any(p.exists() for p in stale), "cleanup of half-written checkpoints")
        after = max(_saved_steps(tmp_path))
        tmp = _wait(proc, lambda: [p for p in _saving(tmp_path) if int(p.name.split(".")[0]) > after], "save")[0]
        stderr = _stop(proc, signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
        if tmp.exists():
            break
    else:
        pytest.fail("three saves completed before SIGKILL landed")
    step = int(tmp.name.split(".")[0])
    assert not (tmp_path / "checkpoints" / str(step)).exists() and max(_saved_steps(tmp_path)) < step
    progress = _assert_interrupted(tmp_path, progress)

    # A line cut short, written after the latest complete checkpoint: the resume must rewrite it.
    text = (tmp_path / "metrics.jsonl").read_text()
    last = text.splitlines()[-1]
    assert json.loads(last)["step"] > progress[0]
    (tmp_path / "metrics.jsonl").write_text(text[:len(text) - 1 - len(last) // 2])

    proc = _launch(glue_dir, tmp_path)
    _wait(proc, lambda: max(_logged_steps(tmp_path), default=0) > progress[1], "new metrics")
    time.sleep(random.Random(0).uniform(0.0, 2.0))
    stderr = _stop(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    _assert_interrupted(tmp_path, progress)

    subprocess.run(_cmd(glue_dir, tmp_path), cwd=REPO, check=True, capture_output=True, timeout=600)
    assert not _saving(tmp_path)  # half-written checkpoints are cleaned up
    _same_results(json.loads((tmp_path / "results.json").read_text()),
                  json.loads((subprocess_reference / "results.json").read_text()))
    _same_export(tmp_path, subprocess_reference)
    assert _metric_lines(tmp_path) == _metric_lines(subprocess_reference)
