"""Teacher-output cache: real MiniLM teacher on real RTE dev rows, 4 fake devices.

Values match a direct forward, batches get their own rows, entries are reused without running
the teacher, any change of an input rebuilds, partial entries are never trusted, no pickles.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pkd_jax import bert, checkpoints, data, partitioning, steps, teacher_cache
from pkd_jax.data import tokenization

N = 40  # RTE dev rows: 3 batches of 16, the last one padded with weight-0 rows
BATCH = 16  # divisible by the 4 devices
LAYER_MAP = (2, 4)  # losses.layer_map(6, 3, "skip")
# float16 storage: round-to-nearest error <= 2^-11 relative, plus 1e-5 of float32 forward noise
# (bucketed, sharded batches vs one unpadded-length batch).
CLS_RTOL, CLS_ATOL = 2.0**-11, 1e-5


@pytest.fixture(scope="module")
def teacher(minilm_dir):
    return nnx.split(checkpoints.load_pretrained(minilm_dir, num_labels=2), nnx.Param)


@pytest.fixture(scope="module")
def rte(glue_dir):
    return data.load_split("rte", "validation", glue_dir).select(range(N))


@pytest.fixture(scope="module")
def tok(rte, tokenizer):
    return data.tokenize(rte, tokenizer, 64)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 4
    return partitioning.make_mesh()


@pytest.fixture(scope="module")
def direct(teacher, tok):
    """Logits [N, C] and mapped [CLS] [N, M, H] of one plain, unsharded forward of all rows."""
    graphdef, params = teacher
    mask = np.arange(tok.max_seq_length) < tok.lengths[:, None]
    batch = {"input_ids": tok.input_ids, "token_type_ids": tok.token_type_ids,
             "attention_mask": mask.astype(np.int32)}
    out = jax.jit(lambda p, b: bert.apply(graphdef, p, b))(params, batch)
    return np.asarray(out.logits), np.asarray(out.cls[np.array(LAYER_MAP) - 1]).transpose(1, 0, 2)


@pytest.fixture(scope="module")
def built(teacher, tok, mesh, tmp_path_factory):
    """One entry built in a module-wide cache folder (each test copies what it damages)."""
    return _build(teacher, tok, mesh, tmp_path_factory.mktemp("teacher"))


def _build(teacher, tok, mesh, cache_dir, layer_map=LAYER_MAP, **kw):
    return teacher_cache.build_or_load(*teacher, tok, layer_map, mesh=mesh, batch_size=BATCH,
                                       cache_dir=cache_dir, progress=False, **kw)


def _assert_cls_close(stored, exact):
    np.testing.assert_allclose(np.asarray(stored, np.float32), exact, rtol=CLS_RTOL, atol=CLS_ATOL)


def test_values_match_direct_forward(built, direct):
    logits, cls = direct
    assert not built.reused
    assert built.logits.dtype == np.float32 and built.logits.shape == (N, 2)
    assert built.features.dtype == np.float16 and built.features.shape == (N, len(LAYER_MAP), 384)
    assert isinstance(built.logits, np.memmap) and isinstance(built.features, np.memmap)
    np.testing.assert_allclose(built.logits, logits, atol=1e-5, rtol=0)
    _assert_cls_close(built.features, cls)
    assert not np.array_equal(cls[:, 0], cls[:, 1])  # two different layers, in map order


def test_entry_files_and_manifest(built):
    assert sorted(os.listdir(built.path)) == ["features.npy", "logits.npy", "manifest.json"]
    assert built.path.name == f"{built.fingerprint}-float16"
    manifest = json.loads((built.path / "manifest.json").read_text())
    assert manifest["fingerprint"] == built.fingerprint
    assert manifest["format"] == teacher_cache.FORMAT_VERSION
    assert (manifest["num_examples"], manifest["num_labels"], manifest["num_layers"],
            manifest["hidden_size"]) == (N, 2, 2, 384)
    assert manifest["layer_map"] == list(LAYER_MAP)
    assert manifest["arrays"] == {"logits": ["float32", [N, 2]], "features": ["float16", [N, 2, 384]]}
    assert manifest["created"]
    assert not [p for p in built.path.parent.iterdir() if p.name.startswith(".")]  # cleaned up


def test_add_to_gathers_rows_of_shuffled_batch(built, tok, direct):
    batch = next(data.train_batches(tok, BATCH, seed=3))
    assert not np.array_equal(batch["index"], np.sort(batch["index"]))  # really shuffled
    out = built.add_to(batch)
    assert set(out) == set(batch) | {"teacher_logits", "teacher_features"}
    assert "teacher_logits" not in batch  # a new dict, the input is untouched
    for key in batch:
        assert out[key] is batch[key]
    assert out["teacher_logits"].dtype == np.float32 and out["teacher_logits"].shape == (BATCH, 2)
    assert out["teacher_features"].dtype == np.float16 and out["teacher_features"].shape == (BATCH, 2, 384)
    assert type(out["teacher_features"]) is np.ndarray  # a copy, not a view of the memory map
    np.testing.assert_allclose(out["teacher_logits"], direct[0][batch["index"]], atol=1e-5)
    _assert_cls_close(out["teacher_features"], direct[1][batch["index"]])


def test_placeholder_has_the_shapes_and_dtypes_of_the_cached_rows(built, tok):
    """What a run compiles its cached step for, during the teacher's pass (Setup.teacher_pass)."""
    batch = next(data.train_batches(tok, BATCH, seed=3))
    real, zeros = built.add_to(batch), teacher_cache.placeholder(2, len(LAYER_MAP), 384)(batch)
    assert {k: (v.shape, v.dtype) for k, v in zeros.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
    assert not zeros["teacher_logits"].any() and not zeros["teacher_features"].any()


def test_second_call_reuses_without_running_the_teacher(built, teacher, tok, mesh, monkeypatch):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although a valid entry exists")

    monkeypatch.setattr(teacher_cache, "_teacher_outputs", no_teacher)
    monkeypatch.setattr(data, "eval_batches", no_teacher)
    monkeypatch.setattr(data, "eval_lengths", no_teacher)
    # A graphdef that cannot run a forward at all: only the params' values form the key.
    again = teacher_cache.build_or_load(None, teacher[1], tok, LAYER_MAP, mesh=mesh,
                                        batch_size=BATCH, cache_dir=built.path.parent,
                                        progress=False)
    assert again.reused and again.path == built.path and again.fingerprint == built.fingerprint
    np.testing.assert_array_equal(again.logits, built.logits)
    np.testing.assert_array_equal(again.features, built.features)
    assert again.features.mode == "r"  # read-only memory map


def test_load_never_unpickles(built, teacher, tok, mesh, monkeypatch):
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    assert _build(teacher, tok, mesh, built.path.parent).reused
    assert calls and all(c.get("allow_pickle") is False and c.get("mmap_mode") == "r"
                         for c in calls)
    for name in ("logits.npy", "features.npy"):
        assert not real_load(built.path / name, allow_pickle=False).dtype.hasobject


def _perturbed(params):
    """The params with one kernel weight moved by 1e-3."""
    done = []

    def bump(path, x):
        if done or "kernel" not in jax.tree_util.keystr(path):
            return x
        done.append(path)
        return x.at[0, 0].add(1e-3)

    return jax.tree.map_with_path(bump, params)


def test_fingerprint_is_stable_and_covers_every_input(teacher, tok, rte, tokenizer):
    params = teacher[1]
    base = teacher_cache.fingerprint(params, tok, LAYER_MAP, "float32")
    assert base == teacher_cache.fingerprint(jax.device_get(params), tok, list(LAYER_MAP),
                                             jnp.float32)
    assert base == teacher_cache.fingerprint(nnx.to_pure_dict(params), tok, LAYER_MAP, "float32")
    changed = {
        "layer map": teacher_cache.fingerprint(params, tok, (1, 3), "float32"),
        "k=1": teacher_cache.fingerprint(params, tok, (), "float32"),
        "params": teacher_cache.fingerprint(_perturbed(params), tok, LAYER_MAP, "float32"),
        "max length": teacher_cache.fingerprint(params, data.tokenize(rte, tokenizer, 48),
                                                LAYER_MAP, "float32"),
        "data": teacher_cache.fingerprint(
            params, data.tokenize(rte.select(range(N - 1)), tokenizer, 64), LAYER_MAP, "float32"),
        "dtype": teacher_cache.fingerprint(params, tok, LAYER_MAP, "bfloat16"),
        "architecture": teacher_cache.fingerprint(params, tok, LAYER_MAP, "float32",
                                                  repr(bert.BertConfig(layer_norm_eps=1e-5))),
    }
    assert len({base, *changed.values()}) == len(changed) + 1, changed


def test_changed_inputs_rebuild(built, teacher, tok, rte, tokenizer, mesh, direct):
    cache_dir = built.path.parent
    graphdef, params = teacher
    other_map = _build(teacher, tok, mesh, cache_dir, layer_map=(1, 3))
    other_params = _build((graphdef, _perturbed(params)), tok, mesh, cache_dir)
    other_length = _build(teacher, data.tokenize(rte, tokenizer, 48), mesh, cache_dir)
    paths = {built.path, other_map.path, other_params.path, other_length.path}
    assert len(paths) == 4
    assert not (other_map.reused or other_params.reused or other_length.reused)
    assert not np.array_equal(other_params.logits, built.logits)
    assert not np.array_equal(other_map.features, built.features)
    assert built.logits.shape == other_length.logits.shape  # same rows, shorter inputs
    # The original entry is intact and still the one its inputs find.
    again = _build(teacher, tok, mesh, cache_dir)
    assert again.reused and again.path == built.path
    np.testing.assert_allclose(again.logits, direct[0], atol=1e-5)


def _tokenizer_variant(minilm_dir, folder, change):
    """A copy of the MiniLM tokenizer files with one change."""
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    if change == "vocab entry":  # "the" is renamed: it now splits into other word pieces
        backend = json.loads((folder / "tokenizer.json").read_text())
        vocab = backend["model"]["vocab"]
        vocab["thé"] = vocab.pop("the")
        (folder / "tokenizer.json").write_text(json.dumps(backend))
        lines = (folder / "vocab.txt").read_text().split("\n")
        lines[lines.index("the")] = "thé"
        (folder / "vocab.txt").write_text("\n".join(lines))
    else:  # cased input against an uncased vocabulary
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    return checkpoints.load_tokenizer(folder)


@pytest.mark.parametrize("change", ["vocab entry", "do_lower_case"])
def test_changed_tokenizer_invalidates_both_caches(built, teacher, tok, rte, minilm_dir, tmp_path,
                                                   monkeypatch, change):
    changed = _tokenizer_variant(minilm_dir, tmp_path / "tokenizer", change)
    encodes = []
    real_encode = tokenization._encode
    monkeypatch.setattr(tokenization, "_encode", lambda *a: encodes.append(1) or real_encode(*a))
    other = data.tokenize(rte, changed, 64)
    assert encodes and other.fingerprint != tok.fingerprint  # a tokenised-cache miss
    assert not np.array_equal(other.input_ids, tok.input_ids)
    # The teacher cache's key (its entry's name) changes with the tokenised fingerprint and,
    # on its own, with the token ids: a Tokenized keeping a stale fingerprint misses too.
    key = functools.partial(teacher_cache.fingerprint, teacher[1], layer_map=LAYER_MAP,
                            dtype="float32")
    stale = dataclasses.replace(other, fingerprint=tok.fingerprint)
    assert key(tokenized=tok) == built.fingerprint
    assert len({key(tokenized=t) for t in (tok, other, stale)}) == 3


def _damage(entry, how):
    if how == "only a temporary folder":  # a build killed before its rename
        entry.rename(entry.with_name(f".{entry.name}.tmp-killed"))
    elif how == "no manifest":
        (entry / "manifest.json").unlink()
    elif how == "truncated features.npy":
        size = (entry / "features.npy").stat().st_size
        os.truncate(entry / "features.npy", size // 2)
    elif how == "garbled manifest":
        (entry / "manifest.json").write_text('{"format": 1, "fingerp')
    elif how == "other fingerprint in manifest":
        manifest = json.loads((entry / "manifest.json").read_text())
        (entry / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 32}))
    elif how == "wrong row count":
        np.save(entry / "logits.npy", np.zeros((N - 1, 2), np.float32), allow_pickle=False)


@pytest.mark.parametrize("how", ["only a temporary folder", "no manifest", "truncated features.npy",
                                 "garbled manifest", "other fingerprint in manifest",
                                 "wrong row count"])
def test_partial_entries_are_rebuilt(built, teacher, tok, mesh, tmp_path, direct, how):
    entry = tmp_path / built.path.name
    shutil.copytree(built.path, entry)
    _damage(entry, how)
    rebuilt = _build(teacher, tok, mesh, tmp_path)
    assert not rebuilt.reused and rebuilt.path == entry
    np.testing.assert_allclose(rebuilt.logits, direct[0], atol=1e-5)
    _assert_cls_close(rebuilt.features, direct[1])
    assert _build(teacher, tok, mesh, tmp_path).reused


def test_interrupted_build_leaves_no_entry(teacher, rte, tokenizer, mesh, tmp_path, monkeypatch):
    tok = data.tokenize(rte, tokenizer, 128)  # batches of two lengths
    real, compiled_at_first_batch = steps.Precompiled.__call__, []

    def dies_mid_build(self, *args):  # the forward of each batch
        compiled_at_first_batch.append(len(self.compiled))
        if len(compiled_at_first_batch) == 2:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(steps.Precompiled, "__call__", dies_mid_build)
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, tok, mesh, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither an entry nor a leftover temporary folder
    # Every length bucket was compiled before the first batch ran.
    lengths = data.eval_lengths(tok, BATCH)
    assert compiled_at_first_batch[0] == len(lengths) == 2, lengths


def test_single_layer_student_stores_empty_cls(teacher, tok, mesh, tmp_path, direct):
    cache = _build(teacher, tok, mesh, tmp_path, layer_map=())
    assert cache.features.shape == (N, 0, 384)
    np.testing.assert_allclose(cache.logits, direct[0], atol=1e-5)
    batch = cache.add_to(next(data.train_batches(tok, BATCH, seed=0)))
    assert batch["teacher_features"].shape == (BATCH, 0, 384)
    assert _build(teacher, tok, mesh, tmp_path, layer_map=()).reused


def test_float32_cls_is_exact_and_separate(built, teacher, tok, mesh, direct):
    cache = _build(teacher, tok, mesh, built.path.parent, features_dtype=np.float32)
    assert not cache.reused and cache.path != built.path and cache.fingerprint == built.fingerprint
    assert cache.features.dtype == np.float32
    np.testing.assert_allclose(cache.features, direct[1], atol=1e-5, rtol=0)


def test_batch_size_must_divide_over_the_mesh(teacher, tok, mesh, tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        teacher_cache.build_or_load(*teacher, tok, LAYER_MAP, mesh=mesh, batch_size=6,
                                    cache_dir=tmp_path, progress=False)


def test_default_cache_dir_is_under_cache_root(teacher, tok, mesh):
    cache = teacher_cache.build_or_load(*teacher, tok, (), mesh=mesh, batch_size=BATCH,
                                        progress=False)
    assert cache.path.parent == data.cache_root() / "teacher"
