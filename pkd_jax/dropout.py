"""Dropout whose random bits cost 7-10x less than `jax.random.bernoulli`'s (docs/benchmarks.md).

`jax.random.bernoulli` draws a float32 uniform per element, and with JAX's partitionable
threefry (the default) each element costs one threefry2x32 block, whose 64 output bits are
folded to 32. BERT training draws a mask for every attention probability (B·heads·S² elements
per layer), and on a CPU those bits were the largest item of a PKD step's profile after the
matmuls. Here one threefry2x32 block yields four 16-bit draws, so a mask costs a quarter of the
blocks, and the block counter is the element's flat index over the mask's shape, as in JAX's
partitionable mode: a mask sharded over devices is computed shard by shard, never replicated.

A 16-bit draw drops an element with probability round(rate·2¹⁶)/2¹⁶ (0.1 → 0.100006) and the
kept elements are scaled by the inverse of the exact keep probability, so E[dropout(x)] = x (in
bfloat16, up to the rounding of each product to bfloat16).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

_LEVELS = 1 << 16


def _threshold(rate: float) -> int:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return round(rate * _LEVELS)


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean mask, True with probability 1 − round(rate·2¹⁶)/2¹⁶, independently per element."""
    threshold = np.uint32(_threshold(rate))
    blocks = (*shape[:-1], shape[-1] // 4) if shape else ()
    if (
        str(jax.random.key_impl(key)) != "threefry2x32"
        or not shape
        or shape[-1] % 4
        or math.prod(blocks) >= 1 << 32
    ):  # other key implementations, odd sizes: JAX's 16-bit draws, one block per element
        return jax.random.bits(key, shape, jnp.uint16) >= threshold.astype(np.uint16)
    counter = jnp.zeros(blocks, jnp.uint32)
    for axis, size in enumerate(blocks):  # flat row-major index of each block
        counter = counter * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, blocks, axis)
    k = jax.random.key_data(key)
    hi, lo = threefry2x32_p.bind(k[0], k[1], jnp.zeros_like(counter), counter)
    draws = [hi & 0xFFFF, hi >> 16, lo & 0xFFFF, lo >> 16]
    return jnp.concatenate([d >= threshold for d in draws], axis=-1)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of `x` in its own dtype; the identity when `key` is None or rate is 0."""
    threshold = _threshold(rate)
    if key is None or threshold == 0:
        return x
    # The scale in (at least) float32 and each product rounded to x's dtype once: a bfloat16
    # scale, 1/0.9 -> 1.109375, would shrink every dropout's output by 0.16 %.
    compute = jnp.promote_types(x.dtype, jnp.float32)
    scale = jnp.asarray(_LEVELS / (_LEVELS - threshold), compute)
    kept = (x.astype(compute) * scale).astype(x.dtype)
    return jnp.where(keep_mask(key, rate, x.shape), kept, jnp.zeros((), x.dtype))
