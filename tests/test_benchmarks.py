"""Smoke tests of the benchmarks (`python -m benchmarks`): tiny shapes, the JSON contract, consistent
figures (no timings). `benchmarks` is imported from the repository root, like `configs`."""

import contextlib
import gzip
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import __main__ as cli, common, sweep as sweep_suite, torch_peer
from configs import sweep as sweep_config
from pkd_jax import bert, checkpoints, losses, sweep

REPO = Path(__file__).resolve().parents[1]

TINY = ["--model=bert-tiny", "--teacher-layers=4", "--student-layers=2", "--batch-size=8",
        "--seq-len=32", "--repeats=2", "--warmup=1"]
STEP_KEYS = ("name", "step_s_median", "examples_per_s", "tflops_per_s", "mfu", "flops_per_example",
             "batch_size", "seq_len", "dtype", "device", "versions", "date")


@pytest.fixture(scope="module")
def run_all(glue_dir):
    """Every suite once, as `python -m benchmarks all ... --json` would: (stdout, results)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = cli.main(["all", *TINY, "--layers=2,1", "--max-examples=512",
                            f"--glue-dir={glue_dir}", "--json"])
    return out.getvalue(), results


def _lines(results, suite):
    return [line for line in results if line["suite"] == suite]


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_stdout_is_one_json_object_per_result(run_all):
    stdout, results = run_all
    parsed = [json.loads(line) for line in stdout.splitlines()]
    assert parsed == json.loads(json.dumps(results))
    assert {line["suite"] for line in parsed} == {"efficiency", "train", "torch", "input"}


def test_step_lines_follow_the_contract(run_all):
    _, results = run_all
    steps = [line for line in results if line["suite"] != "input"]
    for line in steps:
        for key in STEP_KEYS:
            assert key in line, (line["name"], key)
        for key in ("step_s_median", "examples_per_s", "tflops_per_s", "mfu", "peak_tflops"):
            assert _positive(line[key]), (line["name"], key, line[key])
        assert line["step_s_min"] <= line["step_s_median"] <= line["step_s_max"]
        assert line["examples_per_s"] == pytest.approx(line["batch_size"] / line["step_s_median"])
        flops = line["flops_per_example"] * line["batch_size"] / line["step_s_median"]
        assert line["tflops_per_s"] == pytest.approx(flops / 1e12)
        assert line["mfu"] == pytest.approx(line["tflops_per_s"] / line["peak_tflops"])
        assert line["device"]["platform"] == "cpu" and line["device"]["count"] == 4
        assert {"jax", "jaxlib", "flax"} <= set(line["versions"])
        if line["framework"] == "torch":
            assert {"torch", "transformers"} <= set(line["versions"])
        if line["framework"] == "jax":
            assert _positive(line["compile_s"])


def test_train_suite_times_three_steps_and_the_peer(run_all):
    _, results = run_all
    train_lines = {line["name"]: line for line in _lines(results, "train")}
    assert set(train_lines) == {"finetune", "pkd_online", "pkd_cached"}
    online, cached = train_lines["pkd_online"], train_lines["pkd_cached"]
    assert (online["teacher_layers"], online["student_layers"]) == (4, 2)
    # The online step adds the teacher's forward pass to the same student's 3 passes.
    config = common.RANDOM_SIZES["bert-tiny"]
    assert online["flops_per_example"] - cached["flops_per_example"] == pytest.approx(
        common.forward_flops(config, 4, 32))
    assert cached["flops_per_example"] == train_lines["finetune"]["flops_per_example"]
    assert cached["vs_online_step_time"] == pytest.approx(
        cached["step_s_median"] / online["step_s_median"])
    (target,) = cached["targets"]
    assert target["op"] == "<=" and target["target"] == 0.65 and isinstance(target["ok"], bool)

    peers = {line["name"]: line for line in _lines(results, "torch")}
    assert set(peers) == {"torch_pkd_online_eager", "torch_pkd_cached_eager"}  # no CUDA
    for peer in peers.values():
        jax_line = train_lines[peer["jax_name"]]
        assert peer["jax_over_torch"] == pytest.approx(
            jax_line["examples_per_s"] / peer["examples_per_s"])
        assert peer["flops_per_example"] == jax_line["flops_per_example"]
    (target,) = peers["torch_pkd_online_eager"]["targets"]
    assert (target["op"], target["target"], target["aim"]) == (">=", 1.0, 1.3)
    # Every line states its students' attention dropout: here the model's own.
    assert {line["attention_probs_dropout_prob"] for line in [*train_lines.values(), *peers.values()]} == {
        config.attention_probs_dropout_prob} == {0.1}


def test_efficiency_table(run_all):
    _, results = run_all
    lines = _lines(results, "efficiency")
    assert [line["layers"] for line in lines] == [2, 1]
    assert [line["name"] for line in lines] == ["inference_bert_2", "inference_bert_1"]
    deep, shallow = lines
    assert deep["speedup"] == 1.0
    assert shallow["speedup"] == pytest.approx(deep["step_s_median"] / shallow["step_s_median"])
    assert deep["params_total"] > shallow["params_total"] > shallow["params_no_embeddings"] > 0
    # Embeddings are the same tables in both: the difference is one encoder layer.
    assert (deep["params_total"] - shallow["params_total"]
            == deep["params_no_embeddings"] - shallow["params_no_embeddings"])
    assert deep["batch_size"] == 8 and deep["flops_per_example"] == common.forward_flops(
        common.RANDOM_SIZES["bert-tiny"], 2, 32)


def test_input_suite_compares_with_the_fastest_step(run_all):
    _, results = run_all
    lines = {line["name"]: line for line in _lines(results, "input")}
    assert set(lines) == {"tokenize", "tokenize_cached", "host_batches", "host_batches_to_device"}
    fastest = max(_lines(results, "train"), key=lambda line: line["examples_per_s"])
    for line in lines.values():
        assert line["step_name"] == fastest["name"]
        assert _positive(line["examples_per_s"]) and _positive(line["seconds_median"])
        assert line["examples_per_s"] == pytest.approx(line["examples"] / line["seconds_median"])
        assert line["headroom"] == pytest.approx(line["examples_per_s"] / fastest["examples_per_s"])
    assert lines["tokenize"]["examples"] == 512
    assert lines["host_batches"]["batch_size"] == 8
    assert lines["host_batches"]["targets"][0]["metric"] == "headroom"


def test_forward_flops_of_bert_base():
    # 11 full layers: 11·(2·128·(4·768² + 2·768·3072) + 4·128²·768); the top layer's keys and
    # values over 128 rows, its query, output and FFN on the [CLS] row: 2·128·2·768²
    # + 2·(2·768² + 2·768·3072) + 4·128·768; pooler and classifier: 2·768² + 2·768·2.
    config = common.RANDOM_SIZES["bert-base"]
    assert common.forward_flops(config, 12, 128) == 20_800_343_040
    assert common.train_flops(config, 6, 12, 128) == (
        3 * common.forward_flops(config, 6, 128) + common.forward_flops(config, 12, 128))
    assert common.train_flops(config, 6, None, 128) == 3 * common.forward_flops(config, 6, 128)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-40GB", 312.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0), ("TPU v6 lite", 918.0), ("cpu", None),
])
def test_peak_table(kind, peak):
    assert common.table_peak(kind) == peak


class _FakeDevice:
    def __init__(self, kind):
        self.device_kind, self.platform = kind, "tpu"


@pytest.mark.parametrize("kind, devices, mesh_peak", [
    ("TPU v3", 8, 8 * 61.5),  # a v3-8: 4 chips, 8 JAX devices (one per core), 123 TFLOP/s per chip
    ("TPU v4", 4, 4 * 275.0),  # a v4-8: 4 chips, megacore: one device per chip
    ("NVIDIA H200", 8, 8 * 989.0),
])
def test_mfu_peak_is_the_whole_meshs(kind, devices, mesh_peak, monkeypatch):
    """A step runs on every device of the mesh, so MFU divides by all their peaks; with the
    backend mocked as an accelerator of `devices` devices."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(kind)] * devices)
    monkeypatch.setattr(jax, "device_count", lambda *a: devices)
    peak = common.device_peak("bfloat16", None)
    assert (peak.tflops, peak.devices, peak.source) == (pytest.approx(mesh_peak), devices, "table")
    assert common.device_peak("bfloat16", 100.0).tflops == 100.0  # --peak-tflops: the mesh's, as given


def test_cli_defaults_and_validation():
    args = cli.parse_args([])
    assert (args.suite, args.teacher, args.dtype, args.seq_len) == ("all", "both", "auto", 128)
    assert args.glue_dir.parts[-2:] == ("shared", "glue")
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--batch-size=0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["nonsense"])


def test_torch_peer_loss_equals_jax_pkd_loss():
    """The peer optimises the same objective: identical weights give the same loss."""
    import torch

    spec = common.resolve_model("bert-tiny", 4)
    layer_map = common.pkd_layer_map(4, 2)
    batch = common.synthetic_batch(spec.config, 8, 16, cached_layers=len(layer_map))
    jax_models = [common.build_model(spec, n, "float32", pretrained=False, seed=n) for n in (4, 2)]
    teacher, student = torch_peer._torch_models(spec, 4, 2, torch.device("cpu"))
    for jax_model, torch_model in zip(jax_models, (teacher, student)):
        state = {k: torch.tensor(v) for k, v in checkpoints.state_dict(jax_model).items()}
        result = torch_model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys
        assert all(k.endswith("_ids") for k in result.missing_keys)  # buffers, not weights
    student.eval()  # no dropout, to compare
    step = torch_peer.make_torch_pkd_step(teacher, student, batch, layer_map, cached=False,
                                          compile_=False, bf16=False)
    torch_loss = float(step())

    t_out, s_out = (bert.apply(*nnx.split(m, nnx.Param), batch) for m in jax_models)
    index = np.asarray(layer_map) - 1
    jax_loss, _ = losses.pkd_loss(s_out.logits, t_out.logits, batch["labels"], s_out.cls[:1],
                                  t_out.cls[index], alpha=common.ALPHA, beta=common.BETA,
                                  temperature=common.TEMPERATURE)
    assert torch_loss == pytest.approx(float(jax_loss), rel=1e-4)


def test_student_attention_dropout_reaches_both_frameworks_students():
    """--student-attention-dropout=0: the JAX and torch students (not the teachers) drop no attention."""
    import torch

    args = cli.parse_args(["train", "--student-attention-dropout=0"])
    assert common.student_overrides(args) == {"attention_probs_dropout_prob": 0.0}
    assert common.student_overrides(cli.parse_args(["train"])) == {}
    assert common.student_attention_dropout(common.resolve_model("bert-tiny", 4), args) == 0.0  # on the lines
    for name in ("bert-tiny", "minilm-l6"):  # a random size, and a packaged checkpoint
        spec = common.resolve_model(name, 4)
        model = common.build_model(spec, 2, "float32", pretrained=True, **common.student_overrides(args))
        teacher, student = torch_peer._torch_models(spec, 4, 2, torch.device("cpu"), **common.student_overrides(args))
        assert model.config.attention_probs_dropout_prob == student.config.attention_probs_dropout_prob == 0.0
        assert teacher.config.attention_probs_dropout_prob == spec.config.attention_probs_dropout_prob == 0.1
        assert student.config.hidden_dropout_prob == model.config.hidden_dropout_prob == 0.1  # the rest kept
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit):
            cli.parse_args(["train", f"--student-attention-dropout={bad}"])


def test_python_m_entry_point(tmp_path):
    """The documented command line, in a fresh process (one CPU device, a 1-layer student)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PKD_JAX_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "efficiency", "--model=bert-tiny", "--layers=1",
         "--batch-size=8", "--seq-len=16", "--repeats=1", "--warmup=0", "--peak-tflops=2",
         "--json"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=True)
    (line,) = [json.loads(x) for x in proc.stdout.splitlines()]
    assert line["name"] == "inference_bert_1" and _positive(line["examples_per_s"])
    assert (line["peak_tflops"], line["peak_source"]) == (2.0, "flag")
    assert line["device"]["count"] == 1 and jax.device_count() == 4


def test_sweep_suite_compares_vmapped_with_sequential_students():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = cli.main(["sweep", *TINY, "--students=2", "--json"])
    assert [json.loads(line) for line in out.getvalue().splitlines()] == json.loads(json.dumps(results))
    lines = {line["name"]: line for line in results}
    assert set(lines) == {"sequential", "vmapped"}
    sequential, vmapped = lines["sequential"], lines["vmapped"]
    for line in (sequential, vmapped):
        assert line["suite"] == "sweep" and line["students"] == 2 and line["batch_size"] == 8
        assert (line["teacher_layers"], line["student_layers"]) == (4, 2)
        assert line["students_examples_per_s"] == pytest.approx(2 * 8 / line["step_s_median"])
        # Both time two students' steps on the same batch: the same FLOPs per example.
        assert line["flops_per_example"] == 2 * common.train_flops(common.RANDOM_SIZES["bert-tiny"], 2, None, 32)
        assert _positive(line["compile_s"]) and _positive(line["mfu"])
    assert vmapped["speedup"] == pytest.approx(sequential["step_s_median"] / vmapped["step_s_median"])
    assert "targets" not in vmapped  # the 2x target is for accelerators
    assert vmapped["auto_students_per_chunk"] == 1  # on a CPU the sweep trains one student at a time


def test_profile_traces_each_timed_step(tmp_path):
    """--profile DIR: a jax.profiler trace per step, holding the XLA ops of that step."""
    with contextlib.redirect_stdout(io.StringIO()):
        results = cli.main(["train", *TINY, "--teacher=cached", "--profile", str(tmp_path), "--json"])
    assert {line["framework"] for line in results} == {"jax", "torch"}
    jax_lines = [line for line in results if line["framework"] == "jax"]
    assert [line["name"] for line in jax_lines] == ["finetune", "pkd_cached"]
    for line in jax_lines:
        trace_dir = tmp_path / f"train-{line['name']}"
        assert line["trace_dir"] == str(trace_dir)
        assert list(trace_dir.glob("plugins/profile/*/*.xplane.pb"))
        (perfetto,) = trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz")
        events = json.loads(gzip.decompress(perfetto.read_bytes()))
        events = events["traceEvents"] if isinstance(events, dict) else events
        names = {e.get("name", "") for e in events}
        assert any("fusion" in n or n.startswith("dot") for n in names)  # the step's XLA ops
        ops = line["ops"]  # their summary, from the same trace
        assert ops["where"] == "host threads" and ops["op_ms_per_call"] > 0 and 0 < ops["matmul_share"] < 1
        assert {o["op"] for o in ops["top"]} <= names and sum(o["share"] for o in ops["top"]) <= 1 + 1e-9
    assert all("trace_dir" not in line for line in results if line["framework"] != "jax")


def test_op_summary_reads_the_busiest_device_line(tmp_path):
    """On a device, the ops of the line that holds them (not the host's Python or a stream's
    kernels), per call, with the shares of matmul-like and attention-like names."""
    def op(name, dur, pid=1, tid=10):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur, "name": name}

    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
              op("cublas-gemm.3", 600.0), op("fusion.12", 300.0), op("custom-call.7_cudnn", 0.0),
              op("cudnn-fmha.2", 100.0), op("fusion.12", 200.0),
              op("sm90_xmma_gemm_bf16", 999.0, tid=11),  # a stream's kernel: not an HLO name
              op("dot.1", 50.0, tid=12),  # a quieter device line
              op("$train_steps.py:60 once", 5000.0, pid=2), op("dot.9", 4000.0, pid=2)]  # the host
    path = tmp_path / "perfetto_trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    ops = common.op_summary(path, calls=2, top=2)
    assert ops["where"] == "device" and ops["op_ms_per_call"] == pytest.approx(0.6)
    assert ops["matmul_share"] == pytest.approx(0.5) and ops["attention_share"] == pytest.approx(100 / 1200)
    assert ops["top"] == [{"op": "cublas-gemm.3", "ms_per_call": pytest.approx(0.3), "share": pytest.approx(0.5)},
                          {"op": "fusion.12", "ms_per_call": pytest.approx(0.25), "share": pytest.approx(500 / 1200)}]


def test_sweep_suite_points_are_the_grid_of_configs_sweep():
    """The students cycle through the grid of configs/sweep.py: every point once, all different."""
    grid = sweep.grid(sweep_config.get_config())
    assert len(grid) == 36  # the paper's T x alpha x beta
    points = sweep_suite.sweep_points(len(grid))
    assert [p.hparams for p in points] == [p.hparams for p in grid]
    assert [p.student for p in points] == list(range(len(grid)))
    assert {p.learning_rate for p in points} == set(sweep_suite.LEARNING_RATES)
    assert sweep_suite.sweep_points(2) == points[:2]
    more = sweep_suite.sweep_points(3 * len(grid))
    assert len({(p.learning_rate, p.temperature, p.alpha, p.beta) for p in more}) == 3 * len(grid)
