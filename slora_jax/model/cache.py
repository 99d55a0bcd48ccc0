"""The KV cache behind a small interface.

The model's forward touches the cache only through two methods, called once per
layer with that layer's index:

- `write(layer, k, v, pos) -> cache`: store the new tokens' K/V
  (`[B, S, n_kv, head_dim]`) at their positions `pos [B, S]` (-1 = padding, not stored);
- `attend(layer, q, pos) -> o`: causal attention of the new queries over
  everything the sequence has stored so far.

`DenseKVCache` keeps one contiguous `[L, B, n_kv, S_max, head_dim]` buffer per
K and V: heads before positions, the layout the attention's dots read. Positions before
heads (`[L, B, S_max, n_kv, head_dim]`) made XLA on a GPU give the buffer that physical
layout anyway and add a transpose of the whole cache to the compiled step (a 16 GiB fusion
for 7B at batch 64 x 1024 positions, seen when the static-batch baselines ran out of memory
on an H100, session 28). The unified paged pool implements the same two methods over pages, so
swapping it in changes nothing in the model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from slora_jax.config import LlamaConfig
from slora_jax.ops.attention import attention_reference


class DenseKVCache(NamedTuple):
    k: jax.Array  # [L, B, K, S_max, D]
    v: jax.Array  # [L, B, K, S_max, D]

    @classmethod
    def create(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "DenseKVCache":
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, pos_BxS: jax.Array):
        B, S = pos_BxS.shape
        b_BxS = jnp.broadcast_to(jnp.arange(B)[:, None], (B, S))
        # Padding (-1) is sent out of range and dropped by the scatter.
        t_BxS = jnp.where(pos_BxS >= 0, pos_BxS, self.max_len)
        # Indices split by a slice: the indexed block is [B, S, K, D], as the new K/V are.
        k = self.k.at[layer, b_BxS, :, t_BxS].set(k_BxSxKxD.astype(self.k.dtype), mode="drop")
        v = self.v.at[layer, b_BxS, :, t_BxS].set(v_BxSxKxD.astype(self.v.dtype), mode="drop")
        return DenseKVCache(k, v)

    def attend(self, layer: jax.Array, q_BxSxNxD: jax.Array, pos_BxS: jax.Array) -> jax.Array:
        k_BxTxKxD = jnp.swapaxes(self.k[layer], 1, 2)  # a view for the dot: no copy once XLA lays it out
        v_BxTxKxD = jnp.swapaxes(self.v[layer], 1, 2)
        return attention_reference(q_BxSxNxD, k_BxTxKxD, v_BxTxKxD, pos_BxS)
