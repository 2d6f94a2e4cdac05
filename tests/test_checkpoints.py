"""HF folders <-> NNX models: round trips through transformers, student init, clear errors."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from pkd_jax import checkpoints
from pkd_jax.checkpoints import CheckpointError


def _logits(model, enc):
    return np.asarray(model(*(jnp.asarray(enc[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))).logits)


def _torch_logits(model, enc):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)).long() for k, v in enc.items()}).logits.numpy()


@pytest.fixture(scope="module")
def enc(tokenizer):
    e = tokenizer(["one fine day", "a much longer first sentence goes here"], ["and a second", "b"],
                  padding=True, return_tensors="np")
    return {k: e[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def _copy(folder, tmp_path, name="model"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def test_export_loads_in_transformers_with_identical_logits(minilm_dir, enc, tmp_path):
    model = checkpoints.load_pretrained(minilm_dir, num_labels=3, seed=7)
    out = checkpoints.save_pretrained(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 3
    # The file means to transformers what its own BertConfig of the same fields writes.
    assert (transformers.BertConfig.from_pretrained(str(out)).to_dict()
            == transformers.BertConfig(**model.config.to_hf_dict()).to_dict())
    hf, info = transformers.BertForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    np.testing.assert_allclose(_torch_logits(hf.eval(), enc), _logits(model, enc), atol=1e-5)
    # Tokenizer files travel with the export and tokenise identically.
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("Hello there!")["input_ids"] == checkpoints.load_tokenizer(minilm_dir)("Hello there!")["input_ids"]
    # Our own loader reads the export back with its head.
    again = checkpoints.load_pretrained(out)
    assert again.config.num_labels == 3
    np.testing.assert_array_equal(_logits(again, enc), _logits(model, enc))


def test_unusual_shape_round_trips_through_transformers(tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=500, hidden_size=96, num_hidden_layers=5, num_attention_heads=4,
        intermediate_size=200, max_position_embeddings=64, type_vocab_size=3, num_labels=4,
        layer_norm_eps=1e-7, id2label={0: "w", 1: "x", 2: "y", 3: "z"}, label2id={"w": 0, "x": 1, "y": 2, "z": 3},
    )
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    enc = {
        "input_ids": rng.integers(1, 500, (3, 17)),
        "token_type_ids": rng.integers(0, 3, (3, 17)),
        "attention_mask": (np.arange(17)[None] < np.array([[17], [9], [4]])).astype(np.int64),
    }
    want = _torch_logits(hf, enc)
    model = checkpoints.load_pretrained(tmp_path / "hf")
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_labels) == (5, 96, 4)
    assert model.config.label_names == ("w", "x", "y", "z") and model.config.layer_norm_eps == 1e-7
    np.testing.assert_allclose(_logits(model, enc), want, atol=1e-5)
    checkpoints.save_pretrained(model, tmp_path / "ours")
    back = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "ours")).eval()
    assert back.config.id2label == {0: "w", 1: "x", 2: "y", 3: "z"}
    np.testing.assert_allclose(_torch_logits(back, enc), want, atol=1e-5)


def test_student_keeps_exactly_the_first_layers(minilm_dir):
    tensors = load_file(minilm_dir / "model.safetensors")
    student = checkpoints.load_pretrained(minilm_dir, num_layers=3)
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    ours = checkpoints.state_dict(student)
    for name, value in tensors.items():
        key = "bert." + name
        layer = name.split(".")[2] if name.startswith("encoder.layer.") else None
        if key in ours:
            np.testing.assert_array_equal(ours[key], value, err_msg=name)
            assert layer is None or int(layer) < 3
        else:
            assert (layer is not None and int(layer) >= 3) or name.endswith("position_ids"), name
    assert {"classifier.weight", "classifier.bias"} <= set(ours)
    with pytest.raises(CheckpointError, match="num_layers=7"):
        checkpoints.load_pretrained(minilm_dir, num_layers=7)


def test_fresh_classifier_depends_on_seed(minilm_dir):
    a = checkpoints.load_pretrained(minilm_dir, num_layers=1, seed=0)
    b = checkpoints.load_pretrained(minilm_dir, num_layers=1, seed=1)
    assert not np.array_equal(a.classifier.kernel[...], b.classifier.kernel[...])
    np.testing.assert_array_equal(a.bert.pooler.dense.kernel[...], b.bert.pooler.dense.kernel[...])


def test_models_of_one_config_share_no_state(minilm_dir):
    """load_pretrained caches the abstract model per config: each call still builds its own
    variables, so training or editing one model leaves the next one loaded untouched."""
    a = checkpoints.load_pretrained(minilm_dir, num_layers=1, label_names=["negative", "positive"])
    kernel = np.asarray(a.bert.pooler.dense.kernel[...])
    a.bert.pooler.dense.kernel.set_value(jnp.zeros_like(kernel))
    b = checkpoints.load_pretrained(minilm_dir, num_layers=1, label_names=("negative", "positive"))
    assert b.bert.pooler.dense.kernel is not a.bert.pooler.dense.kernel
    np.testing.assert_array_equal(b.bert.pooler.dense.kernel[...], kernel)
    assert a.config == b.config and b.config.label_names == ("negative", "positive")  # a list is a tuple


@pytest.mark.parametrize("num_labels,num_layers,seed", [(2, 3, 0), (1, 2, 4), (3, 6, 1)])
def test_fresh_classifier_is_the_one_a_random_model_of_that_seed_draws(minilm_dir, num_labels, num_layers, seed):
    """load_pretrained builds shapes only and draws just the head: the same values, bit for bit, as
    the head of a model built with nnx.Rngs(seed), so seeds mean what they meant (paired studies)."""
    from flax import nnx

    from pkd_jax.bert import BertForSequenceClassification

    config = checkpoints.load_config(minilm_dir, num_labels=num_labels, num_layers=num_layers)
    drawn = BertForSequenceClassification(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(seed)).classifier
    loaded = checkpoints.load_pretrained(minilm_dir, num_labels, num_layers, dtype=jnp.bfloat16, seed=seed)
    np.testing.assert_array_equal(loaded.classifier.kernel[...], drawn.kernel[...])
    np.testing.assert_array_equal(loaded.classifier.bias[...], drawn.bias[...])
    assert loaded.classifier.kernel[...].dtype == jnp.float32 and loaded.classifier.dtype == jnp.float32
    assert all(isinstance(v[...], jax.Array) for _, v in nnx.to_flat_state(nnx.state(loaded)))  # no shapes left


def _rewrite(folder, edit):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def test_missing_and_unexpected_keys_are_named(minilm_dir, tmp_path):
    missing = _copy(minilm_dir, tmp_path, "missing")
    _rewrite(missing, lambda t: t.pop("encoder.layer.1.output.dense.bias"))
    with pytest.raises(CheckpointError, match=r"missing weights: bert\.encoder\.layer\.1\.output\.dense\.bias"):
        checkpoints.load_pretrained(missing)
    # ... but not when that layer is cut off anyway.
    assert checkpoints.load_pretrained(missing, num_layers=1).config.num_hidden_layers == 1

    extra = _copy(minilm_dir, tmp_path, "extra")
    _rewrite(extra, lambda t: t.update({"encoder.layer.0.attention.self.rotary.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected weights.*encoder\.layer\.0\.attention\.self\.rotary\.weight"):
        checkpoints.load_pretrained(extra)


def test_legacy_gamma_beta_names_and_pretraining_heads(minilm_dir, enc, tmp_path):
    def legacy(t):
        for k in [k for k in t if "LayerNorm" in k]:
            t["bert." + k.replace("weight", "gamma").replace("bias", "beta")] = t.pop(k)
        for k in [k for k in t if not k.startswith("bert.")]:
            t["bert." + k] = t.pop(k)
        t["cls.predictions.bias"] = np.zeros(30522, np.float32)  # BertForPreTraining head: ignored

    old = _copy(minilm_dir, tmp_path)
    _rewrite(old, legacy)
    np.testing.assert_array_equal(
        _logits(checkpoints.load_pretrained(old, seed=2), enc),
        _logits(checkpoints.load_pretrained(minilm_dir, seed=2), enc),
    )


def test_head_size_mismatch_is_explained(minilm_dir, tmp_path):
    checkpoints.save_pretrained(checkpoints.load_pretrained(minilm_dir, num_labels=3, num_layers=1), tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"classifier\.bias has shape \(3,\); the model expects \(2,\).*num_labels"):
        checkpoints.load_pretrained(tmp_path / "m", num_labels=2)


def test_bad_folders_give_clear_errors(minilm_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoints.load_pretrained(tmp_path / "empty")

    gpt = _copy(minilm_dir, tmp_path, "gpt")
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        checkpoints.load_pretrained(gpt)

    corrupt = _copy(minilm_dir, tmp_path, "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        checkpoints.load_pretrained(corrupt)

    noweights = _copy(minilm_dir, tmp_path, "noweights")
    (noweights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        checkpoints.load_pretrained(noweights)

    with pytest.raises(CheckpointError, match="is a file"):
        checkpoints.load_pretrained(minilm_dir / "config.json")


def test_pytorch_bin_only_through_weights_only_torch(minilm_dir, enc, tmp_path, monkeypatch):
    folder = _copy(minilm_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "pytorch_model.bin")
    np.testing.assert_array_equal(
        _logits(checkpoints.load_pretrained(folder, seed=4), enc),
        _logits(checkpoints.load_pretrained(minilm_dir, seed=4), enc),
    )
    # A pickle carrying arbitrary objects is refused by the restricted unpickler.
    torch.save({"x": object()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        checkpoints.load_pretrained(folder)
    # Without torch, a pickle is never opened: the message says how to convert.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="convert it once"):
        checkpoints.load_pretrained(folder)


def test_sharded_safetensors_index(minilm_dir, enc, tmp_path):
    folder = _copy(minilm_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard)
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(
        _logits(checkpoints.load_pretrained(folder, seed=5), enc),
        _logits(checkpoints.load_pretrained(minilm_dir, seed=5), enc),
    )


def test_unknown_name_offline_says_what_to_do(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not a local folder, not a known name.*Offline, download"):
        checkpoints.load_pretrained("google-bert/bert-base-uncased")


def test_save_replaces_an_existing_export_whole(minilm_dir, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("from an older export")
    checkpoints.save_pretrained(checkpoints.load_pretrained(minilm_dir, num_layers=1), target)
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left behind


def test_a_tokenizer_of_another_class_loads_through_auto_tokenizer(minilm_dir, tmp_path):
    folder = _copy(minilm_dir, tmp_path)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert type(checkpoints.load_tokenizer(folder)) is transformers.BertTokenizerFast  # BERT's own: direct
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "DistilBertTokenizer"}))
    assert type(checkpoints.load_tokenizer(folder)).__name__ == "DistilBertTokenizer"


def test_loading_tokenising_exporting_and_logging_never_import_torch(minilm_dir, tmp_path):
    """Users with torch installed (every GPU machine with PyTorch) would pay its import in each
    run: transformers' configuration module and tensorboardX import it when it is there."""
    code = f"""
import sys
from pathlib import Path
from pkd_jax import checkpoints, loop
tokenizer = checkpoints.load_tokenizer({str(minilm_dir)!r})
assert tokenizer("a test")["input_ids"][0] == tokenizer.cls_token_id
model = checkpoints.load_pretrained({str(minilm_dir)!r}, num_labels=2, num_layers=1)
checkpoints.save_pretrained(model, Path({str(tmp_path)!r}) / "export", tokenizer)
log = loop.MetricsLog(Path({str(tmp_path)!r}), start=0, total=1, enabled=True, progress=False, desc="test")
log.write(1, "train", {{"loss": 0.5}})
log.close()
assert "torch" not in sys.modules, "torch was imported"
import torch  # and it still can be
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
