"""The KV cache behind a small interface.

The model's forward touches the cache only through two methods, called once per
layer with that layer's index:

- `write(layer, k, v, pos) -> cache`: store the new tokens' K/V
  (`[B, S, n_kv, head_dim]`) at their positions `pos [B, S]` (-1 = padding, not stored);
- `attend(layer, q, pos) -> o`: causal attention of the new queries over
  everything the sequence has stored so far.

`DenseKVCache` keeps one contiguous `[L, B, S_max, n_kv, head_dim]` buffer per
K and V. The unified paged pool implements the same two methods over pages, so
swapping it in changes nothing in the model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from slora_jax.config import LlamaConfig
from slora_jax.ops.attention import attention_reference


class DenseKVCache(NamedTuple):
    k: jax.Array  # [L, B, S_max, K, D]
    v: jax.Array  # [L, B, S_max, K, D]

    @classmethod
    def create(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "DenseKVCache":
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, layer: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, pos_BxS: jax.Array):
        B, S = pos_BxS.shape
        b_BxS = jnp.broadcast_to(jnp.arange(B)[:, None], (B, S))
        # Padding (-1) is sent out of range and dropped by the scatter.
        t_BxS = jnp.where(pos_BxS >= 0, pos_BxS, self.max_len)
        k = self.k.at[layer, b_BxS, t_BxS].set(k_BxSxKxD.astype(self.k.dtype), mode="drop")
        v = self.v.at[layer, b_BxS, t_BxS].set(v_BxSxKxD.astype(self.v.dtype), mode="drop")
        return DenseKVCache(k, v)

    def attend(self, layer: jax.Array, q_BxSxNxD: jax.Array, pos_BxS: jax.Array) -> jax.Array:
        return attention_reference(q_BxSxNxD, self.k[layer], self.v[layer], pos_BxS)
