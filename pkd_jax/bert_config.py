"""The BERT architecture's settings (`BertConfig`, HuggingFace's field names) and activations."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax


def _gelu(x):
    # HF's (and torch's) erf form. jax.nn.gelu(approximate=False) goes through erfc, which
    # XLA:CPU evaluates about 2.5x slower than erf; the two agree to 1e-6.
    return x * 0.5 * (1.0 + jax.lax.erf(x * (2.0**-0.5)))


ACTIVATIONS = {
    "gelu": _gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture. Hashable, so it can sit in a module's static graph."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    num_labels: int = 2
    # Label names in id order (exported as id2label); None: LABEL_0, LABEL_1, ...
    label_names: tuple[str, ...] | None = None
    # Rematerialise each encoder layer in the backward pass (less memory, ~1/3 more compute).
    remat: bool = False
    # "auto": cuDNN flash attention on GPU for half precision, XLA elsewhere; or "xla", "cudnn".
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        if self.attention_impl not in ("auto", "xla", "cudnn"):
            raise ValueError(f"attention_impl={self.attention_impl!r}: use auto, xla or cudnn")
        if self.label_names is not None:  # a tuple, so that a config is hashable (and immutable)
            object.__setattr__(self, "label_names", tuple(self.label_names))
            if len(self.label_names) != self.num_labels:
                raise ValueError(f"{len(self.label_names)} label_names for num_labels={self.num_labels}")

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> "BertConfig":
        """From a `transformers.BertConfig` (or its dict); `overrides` win."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type={pos!r} is not supported (only 'absolute')")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        id2label = d.get("id2label") or {}
        names = tuple(id2label[k] for k in sorted(id2label, key=int))
        kwargs["num_labels"] = overrides.get("num_labels", len(names) or cls.num_labels)
        if len(names) == kwargs["num_labels"] and names != tuple(f"LABEL_{i}" for i in range(len(names))):
            kwargs["label_names"] = names
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """Fields of a HF `config.json` for BertForSequenceClassification."""
        d = dataclasses.asdict(self)
        for k in ("label_names", "remat", "attention_impl"):
            d.pop(k)
        names = self.label_names or tuple(f"LABEL_{i}" for i in range(self.num_labels))
        d["id2label"] = {i: n for i, n in enumerate(names)}
        d["label2id"] = {n: i for i, n in enumerate(names)}
        d["problem_type"] = "regression" if self.num_labels == 1 else "single_label_classification"
        d["position_embedding_type"] = "absolute"
        d["model_type"] = "bert"
        d["architectures"] = ["BertForSequenceClassification"]
        return d
