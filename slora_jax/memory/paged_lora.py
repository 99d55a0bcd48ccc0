"""The model's LoRA input as the engine builds it: from pool pages (`PagedLora`) or dense slots (`SlotLora`).

Both offer the `per_layer`/`layer_fn` pair of `model.LoraInputs`, so `forward`
runs with them unchanged. With `impl="pallas"` each projection is one
`ops.add_lora` launch that reads the adapters where they live (`PagedWeights`
over the layer's pool rows, or the layer's `SlotWeights`), driven by the step's
`LoraMeta` (built once on the host, shared by every projection and layer).
With the split pair (`KernelConfig.fused` False, `group_projections` True),
`PagedLora` also offers `layer_group_fn`: projections sharing x (q, k, v; gate,
up) are one `ops.add_lora_group` shrink and expand launch instead of one pair each.
With `KernelConfig.linear_max_tokens` > 0, `layer_linear_fn` also computes
the base projections: calls of that many tokens or fewer are one launch for the
base matmul and its LoRA (`ops.lora_linear_group`), reading row tables built once
a forward (`prepare`) and shared by every layer.
`impl="reference"` is the jnp path (`PagedWeights.to_slots` then
`lora_reference`); the baselines of `ops.IMPLS` run on the gathered slots.
"""

from __future__ import annotations

import flax.struct
import jax

import jax.numpy as jnp

from slora_jax.compat import on_gpu_stream
from slora_jax.config import LlamaConfig
from slora_jax.memory.pool import PROJECTIONS, AdapterTable, PoolLayout, paged_weights
from slora_jax.ops.lora import (
    KernelConfig,
    LoraMeta,
    SlotWeights,
    add_lora,
    add_lora_group,
    linear_fits,
    lora_linear_group,
    lora_reference,
    paged_row_tables,
)


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
    # proj -> (a_tab [1, S, H_in/C, R], b_tab [1, H_out/C, S, R]) of layer 0's rows (`prepare`)
    row_tables: dict | None = None

    def per_layer(self):
        return None

    def _linear_on(self) -> bool:
        k = self.kernel or KernelConfig()
        return self.impl == "pallas" and k.linear_max_tokens > 0 and not k.fused and not k.lora_stream

    def prepare(self) -> "PagedLora":
        """With base + LoRA in one launch: the row tables of every targeted projection, built once a forward."""
        if not self._linear_on() or self.row_tables is not None:
            return self
        return self.replace(row_tables={proj: self._row_tables(proj) for proj in self.projections})

    def _row_tables(self, proj: str):
        """`proj`'s row tables over layer 0's rows (`ops.paged_row_tables`)."""
        rows = jnp.zeros((1, self.layout.lora_chunk), jnp.bfloat16)  # only the page tables and ranks are read
        return paged_row_tables((paged_weights(rows, self.layout, self.table, proj, *self.cfg.projection_shape(proj),
                                               self.r_max),))

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

    def layer_linear_fn(self, layer: jax.Array, layer_weights, cache_now):
        """`linear(projs, x, ws)`: base projections and their LoRA in one launch where `linear_fits` (else None)."""
        del layer_weights
        if not self._linear_on():
            return None
        kernel = self.kernel

        def linear(projs: tuple[str, ...], x_TxI: jax.Array, ws_IxO: tuple[jax.Array, ...]):
            if not any(p in self.projections for p in projs):
                return None  # no adapter targets them: XLA's matmul alone
            pws = [self._weights(layer, cache_now, p) for p in projs]
            if not linear_fits(x_TxI.shape[0], pws, kernel):
                return None
            # a projection no adapter targets (q targeted, v not) has all ranks 0: an all -1 table
            tabs = [self.row_tables[p] if p in (self.row_tables or {}) else self._row_tables(p) for p in projs]
            n_out = max(b.shape[1] for _, b in tabs)  # b_tab [1, H_out/C, S, R]: k, v narrower than q (GQA)
            a_tab = jnp.concatenate([a for a, _ in tabs])
            b_tab = jnp.concatenate([jnp.pad(b, ((0, 0), (0, n_out - b.shape[1]), (0, 0), (0, 0)), constant_values=-1)
                                     for _, b in tabs])
            row_offset = layer * self.layout.num_pages * self.layout.rows_per_page  # layer `layer`'s rows
            return lora_linear_group(x_TxI, ws_IxO, pws, self.meta, tables=(a_tab, b_tab), row_offset=row_offset,
                                     config=kernel)

        return linear


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
