"""Merging a LoRA adapter into the base weights: `W' = W + scale * A @ B` for each adapted projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.adapters.pack import pack_slots
from slora_jax.config import LlamaConfig
from slora_jax.model.llama import Params
from slora_jax.ops.lora import SlotWeights


def _merged_kernels(kernels: dict[str, jax.Array], weights: dict[str, SlotWeights]) -> dict[str, jax.Array]:
    out = {}
    for proj, w in weights.items():
        w_LxIxO = kernels[proj]
        delta_LxIxO = jnp.einsum("lir,lro->lio", w.a[:, 0].astype(jnp.float32), w.b[:, 0].astype(jnp.float32))
        out[proj] = (w_LxIxO.astype(jnp.float32) + delta_LxIxO).astype(w_LxIxO.dtype)
    return out


def merge_slot_weights(params: Params, weights: dict[str, SlotWeights]) -> Params:
    """`params` with slot 0 of `weights` merged into each projection's kernel (out of place).

    weights: projection -> `SlotWeights` with `a [L, 1, in, R]`, `b [L, 1, R, out]`
    (scale folded into b, zero where a layer is not adapted). The sum is taken
    in fp32 and cast back to the kernel's dtype. Only the adapted kernels are
    new arrays; every other leaf is the same array as in `params`. Runs op by
    op (a few large ops; jitting it would compile once per adapter shape).
    """
    kernels = _merged_kernels({p: params["layers"][p]["kernel"] for p in weights}, weights)
    layers = {**params["layers"], **{p: {"kernel": k} for p, k in kernels.items()}}
    return {**params, "layers": layers}


def merge_lora(params: Params, cfg: LlamaConfig, adapter: LoraAdapter) -> Params:
    """`params` with `adapter` merged in (a new pytree; `params` is unchanged)."""
    return merge_slot_weights(params, pack_slots([adapter], cfg, dtype=jnp.float32))
