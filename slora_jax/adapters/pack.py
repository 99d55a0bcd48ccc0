"""Pack adapters into dense stacked slots (`SlotWeights`) for the reference LoRA path.

Slot `s` holds `adapters[s]`. This is the simple, padded layout (every slot at
the projection's max rank) that `ops.lora.lora_reference` and the model's
reference path read; the serving path keeps adapters at their own rank in the
paged pool instead.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.config import PROJECTIONS, LlamaConfig
from slora_jax.errors import AdapterError
from slora_jax.ops.lora import SlotWeights


def pack_slots(
    adapters: Sequence[LoraAdapter],
    base_config: LlamaConfig,
    dtype=jnp.float32,
    max_rank: int | None = None,
) -> dict[str, SlotWeights]:
    """Stack `adapters` into one `SlotWeights` per projection any of them targets.

    For each such projection: `a` `[L, S, H_in, R]`, `b` `[L, S, R, H_out]` (module
    scale folded in, multiplied in fp32 before the cast to `dtype`), `ranks`
    `[L, S]` int32. Entries a slot does not use (untargeted (layer, proj), or
    rank < R) are zero and its rank there is 0. `R` is `max_rank` if given, else
    the projection's largest rank. Raises `AdapterError` if a module exceeds
    `max_rank` or does not fit `base_config`.
    """
    host = pack_slots_host(adapters, base_config, max_rank)
    return {proj: SlotWeights(jnp.asarray(w.a, dtype), jnp.asarray(w.b, dtype), jnp.asarray(w.ranks))
            for proj, w in host.items()}


def pack_slots_host(
    adapters: Sequence[LoraAdapter],
    base_config: LlamaConfig,
    max_rank: int | None = None,
) -> dict[str, SlotWeights]:
    """`pack_slots` as host numpy arrays (fp32 `a`/`b`), for callers that place them
    on devices themselves (e.g. straight into tensor-parallel shards)."""
    n_layers, n_slots = base_config.num_hidden_layers, len(adapters)
    packed = {}
    for proj in PROJECTIONS:
        entries = [(s, layer, m) for s, ad in enumerate(adapters) for (layer, p), m in ad.modules.items() if p == proj]
        if not entries:
            continue
        h_in, h_out = base_config.projection_shape(proj)
        r_max = max(m.rank for _, _, m in entries) if max_rank is None else max_rank
        a_LxSxIxR = np.zeros((n_layers, n_slots, h_in, r_max), np.float32)
        b_LxSxRxO = np.zeros((n_layers, n_slots, r_max, h_out), np.float32)
        ranks_LxS = np.zeros((n_layers, n_slots), np.int32)
        for s, layer, m in entries:
            where = f"adapter {adapters[s].name!r} layer {layer} {proj}"
            if m.rank > r_max:
                raise AdapterError(f"{where}: rank {m.rank} exceeds max_rank {r_max}")
            if layer >= n_layers or m.a.shape[0] != h_in or m.b.shape[1] != h_out:
                raise AdapterError(
                    f"{where}: a {m.a.shape} / b {m.b.shape} do not fit the base model "
                    f"({n_layers} layers, {proj} is {h_in} -> {h_out})"
                )
            a_LxSxIxR[layer, s, :, : m.rank] = m.a
            b_LxSxRxO[layer, s, : m.rank, :] = m.b.astype(np.float32) * np.float32(m.scale)
            ranks_LxS[layer, s] = m.rank
        packed[proj] = SlotWeights(a=a_LxSxIxR, b=b_LxSxRxO, ranks=ranks_LxS)
    return packed
