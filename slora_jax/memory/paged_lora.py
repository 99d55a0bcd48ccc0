"""The model's LoRA input as the engine builds it: from pool pages (`PagedLora`) or dense slots (`SlotLora`).

Both offer the `per_layer`/`layer_fn` pair of `model.LoraInputs`, so `forward`
runs with them unchanged. With `impl="pallas"` each projection is one
`ops.add_lora` launch that reads the adapters where they live (`PagedWeights`
over the layer's pool rows, or the layer's `SlotWeights`), driven by the step's
`LoraMeta` (built once on the host, shared by every projection and layer).
With the split pair (`KernelConfig.fused` False, `group_projections` True),
`PagedLora` also offers `layer_group_fn`: projections sharing x (q, k, v; gate,
up) are one `ops.add_lora_group` shrink and expand launch instead of one pair each.
`impl="reference"` is the jnp path (`PagedWeights.to_slots` then
`lora_reference`); the baselines of `ops.IMPLS` run on the gathered slots.
"""

from __future__ import annotations

import flax.struct
import jax

import jax.numpy as jnp

from slora_jax.compat import on_gpu_stream
from slora_jax.config import LlamaConfig
from slora_jax.memory.pool import AdapterTable, PoolLayout, paged_weights
from slora_jax.ops.lora import KernelConfig, LoraMeta, SlotWeights, add_lora, add_lora_group, lora_reference


def _add(impl: str, kernel: KernelConfig | None, meta: LoraMeta | None, y_TxO, x_TxI, w, slot_T):
    if impl == "reference":
        return lora_reference(y_TxO, x_TxI, w if isinstance(w, SlotWeights) else w.to_slots(), slot_T)
    if kernel is not None and kernel.lora_stream:
        return _beside(kernel.lora_stream, lambda zs, *a: (add_lora(zs[0], *a, impl=impl, config=kernel),),
                       (y_TxO,), x_TxI, w, meta)[0]
    return add_lora(y_TxO, x_TxI, w, meta, impl=impl, config=kernel)


def _beside(stream: int, op, ys_TxO, *args):
    """`ys + op(zeros, *args)`, the op called on GPU stream `stream` (`KernelConfig.lora_stream`): it
    needs no base output, so XLA may run it beside the base matmul."""
    shapes = [(y.shape, y.dtype) for y in ys_TxO]
    deltas = on_gpu_stream(lambda *a: tuple(op(tuple(jnp.zeros(s, d) for s, d in shapes), *a)), stream)(*args)
    return tuple(y + d for y, d in zip(ys_TxO, deltas))


@flax.struct.dataclass
class PagedLora:
    table: AdapterTable  # rows: the adapters of this batch
    slot_ids: jax.Array  # [B, S] int32, row of `table` for each token, -1 for none
    layout: PoolLayout = flax.struct.field(pytree_node=False)
    cfg: LlamaConfig = flax.struct.field(pytree_node=False)
    r_max: int = flax.struct.field(pytree_node=False)  # bound on the batch's ranks (a bucket)
    projections: tuple[str, ...] = flax.struct.field(pytree_node=False)  # targeted by any adapter of the batch
    meta: LoraMeta | None = None  # needed unless impl == "reference"
    impl: str = flax.struct.field(pytree_node=False, default="reference")
    kernel: KernelConfig | None = flax.struct.field(pytree_node=False, default=None)

    def per_layer(self):
        return None

    def _weights(self, layer: jax.Array, cache_now, proj: str):
        # The whole pool as rows (a free reshape) with this layer's page ids: slicing out
        # one layer would copy it.
        return paged_weights(cache_now().pool, self.layout, self.table, proj, *self.cfg.projection_shape(proj),
                             self.r_max, layer=layer)

    def layer_fn(self, layer: jax.Array, layer_weights, cache_now):
        del layer_weights
        slot_T = self.slot_ids.reshape(-1)

        def lora(proj: str, y_TxO: jax.Array, x_TxI: jax.Array) -> jax.Array:
            if proj not in self.projections:
                return y_TxO
            return _add(self.impl, self.kernel, self.meta, y_TxO, x_TxI, self._weights(layer, cache_now, proj), slot_T)

        lora.reads_pool = True  # adapter rows in the KV pool: see `DecoderLayer`

        return lora

    def layer_group_fn(self, layer: jax.Array, layer_weights, cache_now):
        """One launch pair for projections sharing x, on the split pair only (else None: one call each)."""
        del layer_weights
        kernel = self.kernel or KernelConfig()
        if self.impl != "pallas" or kernel.fused or not kernel.group_projections:
            return None

        def lora_group(projs: tuple[str, ...], ys_TxO: tuple[jax.Array, ...], x_TxI: jax.Array):
            todo = [i for i, p in enumerate(projs) if p in self.projections]  # the others launch nothing
            if not todo:
                return ys_TxO
            ws = [self._weights(layer, cache_now, projs[i]) for i in todo]
            group = lambda zs, x, ws, meta: add_lora_group(zs, x, ws, meta, config=kernel)  # noqa: E731
            if kernel.lora_stream:
                done = _beside(kernel.lora_stream, group, [ys_TxO[i] for i in todo], x_TxI, ws, self.meta)
            else:
                done = group([ys_TxO[i] for i in todo], x_TxI, ws, self.meta)
            out = list(ys_TxO)
            for i, y_TxO in zip(todo, done):
                out[i] = y_TxO
            return tuple(out)

        return lora_group


@flax.struct.dataclass
class SlotLora:
    """Dense adapter slots (`unified_memory=False`) with the step's metadata for the kernels."""

    weights: dict[str, SlotWeights]  # proj -> [L, S, ...]
    slot_ids: jax.Array  # [B, S] int32 slot of each token, -1 for none
    meta: LoraMeta | None = None
    impl: str = flax.struct.field(pytree_node=False, default="reference")
    kernel: KernelConfig | None = flax.struct.field(pytree_node=False, default=None)

    def per_layer(self):
        return self.weights

    def layer_fn(self, layer: jax.Array, layer_weights, cache_now):
        del layer, cache_now
        slot_T = self.slot_ids.reshape(-1)

        def lora(proj: str, y_TxO: jax.Array, x_TxI: jax.Array) -> jax.Array:
            if proj not in layer_weights:
                return y_TxO
            return _add(self.impl, self.kernel, self.meta, y_TxO, x_TxI, layer_weights[proj], slot_T)

        return lora


__all__ = ["PagedLora", "SlotLora"]
