"""`PagedLora`: the model's LoRA input read straight from the unified pool's adapter pages.

It offers the `per_layer`/`layer_fn` pair of `model.LoraInputs`, so `forward`
runs with adapters that live in pages (at their own ranks) instead of dense
slots. This is the jnp path (each layer's adapters gathered to dense slots with
`lora_from_pages`, then `lora_reference`); page-reading kernels replace it
behind the same methods.
"""

from __future__ import annotations

import flax.struct
import jax

from slora_jax.config import LlamaConfig
from slora_jax.memory.pool import AdapterTable, PoolLayout, lora_from_pages
from slora_jax.ops.lora import lora_reference


@flax.struct.dataclass
class PagedLora:
    table: AdapterTable  # rows: the adapters of this batch
    slot_ids: jax.Array  # [B, S] int32, row of `table` for each token, -1 for none
    layout: PoolLayout = flax.struct.field(pytree_node=False)
    cfg: LlamaConfig = flax.struct.field(pytree_node=False)
    r_max: int = flax.struct.field(pytree_node=False)  # bound on the batch's ranks (a bucket)
    projections: tuple[str, ...] = flax.struct.field(pytree_node=False)  # targeted by any adapter of the batch

    def per_layer(self):
        return None

    def layer_fn(self, layer: jax.Array, layer_weights, cache):
        del layer_weights
        pool_layer = cache.pool[layer]
        slot_T = self.slot_ids.reshape(-1)

        def add_lora(proj: str, y_TxO: jax.Array, x_TxI: jax.Array) -> jax.Array:
            if proj not in self.projections:
                return y_TxO
            h_in, h_out = self.cfg.projection_shape(proj)
            w = lora_from_pages(pool_layer, self.layout, self.table, proj, h_in, h_out, self.r_max)
            return lora_reference(y_TxO, x_TxI, w, slot_T)

        return add_lora
