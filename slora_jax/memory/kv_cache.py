"""`PagedKVCache`: the model's KV-cache interface (`write`/`attend`) over the unified pool.

Token `t` of sequence `b` lives in page `page_table[b, t // P]`, slot `t % P`
(KV view of the pool, see `pool.py`). Attention here is the jnp reference:
the sequence's pages are gathered to a contiguous `[B, T, K, D]` first. The
Pallas paged-attention kernels replace `attend` without changing the interface.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from slora_jax.memory.pool import PoolLayout
from slora_jax.ops.attention import attention_reference


@flax.struct.dataclass
class PagedKVCache:
    pool: jax.Array  # [L, num_pages, page_elems]
    page_table: jax.Array  # [B, max_pages] int32, page ids of each sequence in order
    layout: PoolLayout = flax.struct.field(pytree_node=False)

    def _kv(self) -> jax.Array:
        lo = self.layout
        return self.pool.reshape(lo.num_layers, lo.num_pages, 2, lo.page_size, lo.num_kv_heads, lo.head_dim)

    def write(self, layer: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, pos_BxS: jax.Array):
        P, B = self.layout.page_size, pos_BxS.shape[0]
        page_BxS = jnp.take_along_axis(self.page_table, jnp.maximum(pos_BxS, 0) // P, axis=1)
        # Padding (-1) goes to an out-of-range page and is dropped by the scatter.
        page_BxS = jnp.where(pos_BxS >= 0, page_BxS, self.layout.num_pages)
        slot_BxS = pos_BxS % P
        kv_new = jnp.stack([k_BxSxKxD, v_BxSxKxD], axis=2).astype(self.pool.dtype)  # [B, S, 2, K, D]
        kv = self._kv().at[layer, page_BxS, :, slot_BxS].set(kv_new, mode="drop")
        return self.replace(pool=kv.reshape(self.pool.shape))

    def attend(self, layer: jax.Array, q_BxSxNxD: jax.Array, pos_BxS: jax.Array) -> jax.Array:
        lo = self.layout
        B, n_pages = self.page_table.shape
        seq_BxMx2xPxKxD = self._kv()[layer][self.page_table]
        k_BxTxKxD = seq_BxMx2xPxKxD[:, :, 0].reshape(B, n_pages * lo.page_size, lo.num_kv_heads, lo.head_dim)
        v_BxTxKxD = seq_BxMx2xPxKxD[:, :, 1].reshape(B, n_pages * lo.page_size, lo.num_kv_heads, lo.head_dim)
        return attention_reference(q_BxSxNxD, k_BxTxKxD, v_BxTxKxD, pos_BxS)
