"""`PagedKVCache`: the model's KV-cache interface (`write`/`attend`) over the unified pool.

Token `t` of a sequence lives in page `page_table[row, t // P]`, slot `t % P`
(KV view of the pool, see `pool.py`), where `row` is the sequence's row of the
page table. `seq_ids [B, S]` gives the row of every token of the forward, so
one forward can mix sequences freely: the engine runs prefill chunks and
decode tokens of many sequences as one ragged `[1, T]` batch.

Attention reads the pool in place. `attention_impl="pallas"`: with `prefill`
set, the Pallas chunk kernel (`ops.attention.paged_ragged_attention`), which
needs each sequence's tokens contiguous in the flattened batch and reads each
K/V tile once per chunk; otherwise every token is a query of its own for the
decode kernel (any layout; the right choice when every sequence has one new
token). `"reference"`: the jnp path (pages gathered to a contiguous cache).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from slora_jax.memory.pool import PoolLayout
from slora_jax.ops.attention import paged_attention, paged_ragged_attention


@flax.struct.dataclass
class PagedKVCache:
    pool: jax.Array  # [L, num_pages, page_elems]
    page_table: jax.Array  # [R, max_pages] int32, page ids of each sequence in order
    seq_ids: jax.Array  # [B, S] int32, page-table row of each token of the forward
    layout: PoolLayout = flax.struct.field(pytree_node=False)
    attention_impl: str = flax.struct.field(pytree_node=False, default="reference")
    prefill: bool = flax.struct.field(pytree_node=False, default=False)  # some sequence has a chunk of > 1 token

    @classmethod
    def batched(cls, pool: jax.Array, page_table: jax.Array, layout: PoolLayout, seq_len: int,
                attention_impl: str = "reference") -> "PagedKVCache":
        """Row b of a `[B, S]` forward is sequence b of the page table."""
        B = page_table.shape[0]
        seq_ids = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, seq_len))
        return cls(pool, page_table, seq_ids, layout, attention_impl, prefill=seq_len > 1)

    def _kv(self) -> jax.Array:
        lo = self.layout
        return self.pool.reshape(lo.num_layers, lo.num_pages, 2, lo.page_size, lo.num_kv_heads, lo.head_dim)

    def write(self, layer: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, pos_BxS: jax.Array):
        P = self.layout.page_size
        page_BxS = self.page_table[self.seq_ids, jnp.maximum(pos_BxS, 0) // P]
        # Padding (-1) goes to an out-of-range page and is dropped by the scatter.
        page_BxS = jnp.where(pos_BxS >= 0, page_BxS, self.layout.num_pages)
        kv_new = jnp.stack([k_BxSxKxD, v_BxSxKxD], axis=2).astype(self.pool.dtype)  # [B, S, 2, K, D]
        kv = self._kv().at[layer, page_BxS, :, pos_BxS % P].set(kv_new, mode="drop")
        return self.replace(pool=kv.reshape(self.pool.shape))

    def attend(self, layer: jax.Array, q_BxSxNxD: jax.Array, pos_BxS: jax.Array) -> jax.Array:
        B, S, N, D = q_BxSxNxD.shape
        if self.prefill:
            o_TxNxD = paged_ragged_attention(q_BxSxNxD.reshape(B * S, N, D), self._kv(), None, self.page_table,
                                             self.seq_ids.reshape(B * S), pos_BxS.reshape(B * S), layer=layer,
                                             impl=self.attention_impl)
            return o_TxNxD.reshape(B, S, N, D)
        pages_TxM = self.page_table[self.seq_ids.reshape(B * S)]
        o_Tx1xNxD = paged_attention(q_BxSxNxD.reshape(B * S, 1, N, D), self._kv(), None, pages_TxM,
                                    pos_BxS.reshape(B * S, 1), layer=layer, impl=self.attention_impl)
        return o_Tx1xNxD.reshape(B, S, N, D)
