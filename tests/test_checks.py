"""pkd_jax/checks.py: every config range, the parts of a run fitting together, a reused workdir, and
run.py's exit status and console. Bad input stops before any compute, naming the key, file or value
and the fix."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import finetune, pkd, sweep as sweep_config
from pkd_jax import bert, checkpoints, checks, data, setup
from pkd_jax.errors import CheckpointError, ConfigError, DataError, PkdError

REPO = Path(__file__).resolve().parents[1]


def _finetune(glue_dir, **fields):
    c = finetune.get_config(f"task=rte,model=minilm-l6,layers=2,glue_dir={glue_dir},runlocal")
    c.progress, c.predict_test = False, False
    for key, value in fields.items():
        c[key] = value
    return c


def _distill(glue_dir, teacher, **fields):
    c = pkd.get_config(f"task=rte,teacher={teacher},model=minilm-l6,layers=2,glue_dir={glue_dir},runlocal")
    c.progress, c.predict_test = False, False
    for key, value in fields.items():
        c[key] = value
    return c


# ---- Config values ---------------------------------------------------------------------------

# For each range: a value just outside it, and the nearest value inside.
OUTSIDE_INSIDE = {
    "batch_size": (0, 1), "max_seq_length": (1, 2), "seed": (-1, 0), "eval_every_steps": (-1, 0),
    "checkpoint_every_steps": (-1, 0), "max_steps": (0, 1), "layers": (0, 1), "num_epochs": (0.0, 1e-3),
    "learning_rate": (0.0, 1e-6), "warmup_fraction": (1.0, 0.99), "weight_decay": (-0.01, 0.0),
    "max_grad_norm": (0.0, 1e-3), "model_overrides.hidden_dropout_prob": (1.0, 0.9),
    "model_overrides.attention_probs_dropout_prob": (-0.1, 0.0), "mesh.fsdp": (0, 1),
    "alpha": (1.01, 1.0), "beta": (-1.0, 0.0), "temperature": (0.0, 0.1), "hidden_mse": (-1.0, 0.0),
    "attention_kl": (-0.5, 0.0),
}


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


def test_every_range_is_checked(glue_dir):
    assert set(OUTSIDE_INSIDE) <= set(checks.RANGES)
    for key, (outside, inside) in OUTSIDE_INSIDE.items():
        c = _distill(glue_dir, "t")
        _set(c, key, inside)
        checks.check_config(c)
        _set(c, key, outside)
        _, expected = checks.RANGES[key]
        with pytest.raises(ConfigError) as e:
            checks.check_config(c)
        assert str(e.value) == f"config.{key}={outside!r}: expected {expected}", key
    c = _distill(glue_dir, "t")
    c.learning_rate = math.nan  # a NaN passes every comparison; it must still be refused
    with pytest.raises(ConfigError, match=r"config\.learning_rate=nan: expected a number in \(0, 1\]"):
        checks.check_config(c)


def test_shipped_configs_pass():
    for c in (finetune.get_config("task=rte"), finetune.get_config("runlocal"),
              pkd.get_config("task=sst2,teacher=t,layers=3"), pkd.get_config("teacher=t,runlocal")):
        checks.check_config(c)
    grid = sweep_config.get_config("task=rte,teacher=t,model=minilm-l6")
    from pkd_jax import sweep

    checks.check_config(sweep.point_config(grid, sweep.grid(grid)[0]))


def _gpu(capability):
    return SimpleNamespace(platform="gpu", compute_capability=capability, device_kind=f"GPU sm_{capability}")


@pytest.mark.parametrize("capability, auto", [("7.5", jnp.float32), ("8.0", jnp.bfloat16), ("9.0", jnp.bfloat16)])
def test_bfloat16_only_where_the_gpu_has_it(monkeypatch, capability, auto):
    monkeypatch.setattr(jax, "devices", lambda *a: [_gpu(capability)])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert checks.compute_dtype("auto") == auto
    assert checks.compute_dtype("float32") == jnp.float32
    if auto == jnp.float32:
        with pytest.raises(ConfigError, match=r"config\.dtype='bfloat16': expected float32 or auto on this GPU "
                                              r"\(GPU sm_7\.5, compute capability 7\.5\)"):
            checks.compute_dtype("bfloat16")
    else:
        assert checks.compute_dtype("bfloat16") == jnp.bfloat16


# ---- The parts of a run ----------------------------------------------------------------------

def _teacher(path: Path, tokenizer, labels=("entailment", "not_entailment"), layers=4, head=True):
    cfg = bert.BertConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=256,
                          num_labels=len(labels), label_names=labels)
    checkpoints.save_pretrained(bert.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)), path, tokenizer)
    if not head:  # an encoder without a classifier: not fine-tuned
        from safetensors.numpy import load_file, save_file

        weights = load_file(path / "model.safetensors")
        save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, path / "model.safetensors")
    return path


def test_teacher_must_fit_the_task(glue_dir, tokenizer, tmp_path):
    ok = _teacher(tmp_path / "ok", tokenizer)
    checks.check_teacher(_distill(glue_dir, ok), str(ok), data.get_task("rte"))
    generic = _teacher(tmp_path / "generic", tokenizer, labels=("LABEL_0", "LABEL_1"))  # HF's default names
    checks.check_teacher(_distill(glue_dir, generic), str(generic), data.get_task("rte"))
    upper = _teacher(tmp_path / "upper", tokenizer, labels=("NEGATIVE", "POSITIVE"))  # as hub SST-2 models name them
    checks.check_teacher(_distill(glue_dir, upper, task="sst2"), str(upper), data.get_task("sst2"))

    swapped = _teacher(tmp_path / "swapped", tokenizer, labels=("not_entailment", "entailment"))
    with pytest.raises(CheckpointError, match=r"swapped/config\.json: the teacher's id2label \['not_entailment', "
                                              r"'entailment'\] is not rte's \['entailment', 'not_entailment'\]"):
        setup.prepare(_distill(glue_dir, swapped))
    three = _teacher(tmp_path / "three", tokenizer, labels=("entailment", "neutral", "contradiction"))
    with pytest.raises(CheckpointError, match="the teacher has 3 output.s., task rte needs 2: give a teacher fine-tuned on rte"):
        setup.prepare(_distill(glue_dir, three))
    headless = _teacher(tmp_path / "headless", tokenizer, head=False)
    with pytest.raises(CheckpointError, match="headless: no classifier weights, so not a fine-tuned teacher"):
        setup.prepare(_distill(glue_dir, headless))

    run = tmp_path / "mrpc_run"  # a run's workdir records the task it was fine-tuned on
    shutil.copytree(ok, run / "model")
    (run / "config.json").write_text(json.dumps({"task": "mrpc", "model": "minilm-l6"}))
    with pytest.raises(CheckpointError, match=r"mrpc_run/config\.json: the teacher was fine-tuned on task 'mrpc', "
                                              r"this run is 'rte'"):
        setup.prepare(_distill(glue_dir, run))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(ok, no_tokenizer)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / f).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no_tokenizer: no tokenizer files"):
        setup.prepare(_distill(glue_dir, no_tokenizer))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(ok, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no_weights: no model.safetensors"):
        setup.prepare(_distill(glue_dir, no_weights))


def test_shapes_that_cannot_work_are_named(glue_dir, tokenizer, tmp_path):
    teacher = _teacher(tmp_path / "t", tokenizer)  # 4 layers
    with pytest.raises(ConfigError, match=r"config\.strategy='skip' with config\.layers=3: strategy 'skip' needs the "
                                          r"teacher depth to be a multiple"):
        setup.prepare(_distill(glue_dir, teacher, layers=3))
    with pytest.raises(ConfigError, match=r"config\.strategy='last' with config\.layers=4: the student must be "
                                          "shallower than the teacher"):
        setup.prepare(_distill(glue_dir, teacher, layers=4, strategy="last"))
    with pytest.raises(ConfigError, match=r"config\.layers=7: expected at most 6, the layers of minilm-l6"):
        setup.prepare(_finetune(glue_dir, layers=7))
    with pytest.raises(ConfigError, match=r"config\.max_seq_length=513: expected at most 512, the position table"):
        setup.prepare(_finetune(glue_dir, max_seq_length=513))
    with pytest.raises(ConfigError, match=r"config\.eval_every_steps=31: expected at most the run's 30 steps"):
        setup.prepare(_finetune(glue_dir, eval_every_steps=31))
    with pytest.raises(ConfigError, match=r"config\.batch_size=488: expected at most the 480 training examples"):
        setup.prepare(_finetune(glue_dir, batch_size=488, max_steps=None))


def test_a_malformed_test_file_stops_the_run_before_training(glue_dir, tmp_path):
    bad = tmp_path / "glue"
    shutil.copytree(glue_dir / "RTE", bad / "RTE")
    lines = (bad / "RTE" / "test.tsv").read_text().split("\n")
    lines[3] = lines[3].replace("\t", " ", 1)  # line 4 loses a column
    (bad / "RTE" / "test.tsv").write_text("\n".join(lines))
    with pytest.raises(DataError, match=f"{bad / 'RTE' / 'test.tsv'}:4: expected 3 tab-separated columns, found 2"):
        setup.prepare(_finetune(bad, predict_test=True))
    setup.prepare(_finetune(bad, predict_test=False))  # not asked for: not read


# ---- A workdir that holds a run --------------------------------------------------------------

def test_a_workdir_of_another_config_is_refused_naming_the_keys(glue_dir, tmp_path):
    saved = _finetune(glue_dir)
    (tmp_path / "config.json").write_text(saved.to_json_best_effort(indent=1))
    watched = _finetune(glue_dir, progress=True, log_every_steps=1)
    watched.glue_dir = "/moved/glue"  # how a run is watched, or where its data sits, may change on resume
    checks.check_workdir(watched, tmp_path)
    other = _finetune(glue_dir, task="mrpc", learning_rate=1e-4)
    with pytest.raises(ConfigError) as e:
        checks.check_workdir(other, tmp_path)
    assert str(e.value).startswith(f"{tmp_path} holds a run with another config (learning_rate: 0.0001 here, 2e-05 "
                                   "there; task: 'mrpc' here, 'rte' there). Run the same config to resume it")
    assert "--restart" in str(e.value)
    checks.check_workdir(other, tmp_path / "empty")  # nothing there yet

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "replaced-20260101-000000").mkdir()
    aside = checks.replace_run(tmp_path)
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["replaced-20260101-000000", aside.name])
    checks.check_workdir(other, tmp_path)


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # let JAX probe backends, as users' runs do
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)


def test_cli_user_errors_are_one_line_and_exit_2_and_restart_starts_over(glue_dir, tmp_path):
    arg = f"--config=configs/finetune.py:task=rte,model=minilm-l6,layers=1,glue_dir={glue_dir},runlocal"
    tiny = ["--config.max_steps=2", "--config.eval_every_steps=2", "--config.train_examples=32",
            "--config.eval_examples=16", "--config.predict_test=False", "--config.progress=False"]
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text(_finetune(glue_dir, learning_rate=1e-3).to_json_best_effort())
    (workdir / "marker").write_text("the earlier run")

    refused = _cli(arg, f"--workdir={workdir}", *tiny)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()], refused.stderr  # one line
    assert refused.stderr.startswith(f"error: {workdir} holds a run with another config (") and \
        "learning_rate: 2e-05 here, 0.001 there" in refused.stderr
    assert (workdir / "marker").exists()

    done = _cli(arg, f"--workdir={workdir}", "--restart", *tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    aside = [p for p in workdir.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "marker").read_text() == "the earlier run"
    assert (workdir / "results.json").exists()
    # A healthy run's console: what the user must know, not the config or library noise.
    assert "Unable to initialize backend" not in done.stderr and "learning_rate:" not in done.stdout
    assert done.stdout.splitlines()[0] == f"finetune rte in {workdir} (the whole config: {workdir}/config.json)"

    bad_value = _cli(arg, f"--workdir={tmp_path / 'v'}", "--config.warmup_fraction=1.5")
    assert bad_value.returncode == 2 and "Traceback" not in bad_value.stderr
    assert bad_value.stderr.strip() == "error: config.warmup_fraction=1.5: expected a number in [0, 1)"
    bad_flag = _cli(arg, f"--workdir={tmp_path / 'v'}", "--config.batch_size=abc")
    assert bad_flag.returncode == 2 and len(bad_flag.stderr.strip().splitlines()) == 1, bad_flag.stderr


def test_library_errors_form_one_hierarchy():
    from pkd_jax.advise import AdviceError
    from pkd_jax.data import GlueFormatError

    for kind in (ConfigError, DataError, CheckpointError, GlueFormatError, AdviceError):
        assert issubclass(kind, PkdError) and issubclass(kind, ValueError)
    assert checkpoints.CheckpointError is CheckpointError


def test_a_training_subset_of_one_class_is_refused(glue_dir, tmp_path):
    one_class = tmp_path / "glue"
    shutil.copytree(glue_dir / "RTE", one_class / "RTE")
    lines = (one_class / "RTE" / "train.tsv").read_text().split("\n")
    kept = [lines[0]] + [l for l in lines[1:] if l.endswith("\tentailment")]
    (one_class / "RTE" / "train.tsv").write_text("\n".join(kept) + "\n")
    with pytest.raises(DataError, match=r"rte/train \(480 examples used\): all 480 examples have label 'entailment'"):
        setup.prepare(_finetune(one_class))
