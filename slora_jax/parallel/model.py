"""The tensor-parallel forward: `model.llama`'s decoder layers under `shard_map`.

Each device runs `llama.decoder_stack` unchanged on its shards with its local
config (`mesh.local_config`: `N/tp` heads, `K/tp` KV heads, `F/tp` MLP width)
and a `ShardedProjections` epilogue that adds LoRA per strategy and does the
two all-reduces per layer. Around it: a vocab-parallel embedding lookup (each
device looks up the tokens of its vocabulary range, one `[T, H]` all-reduce)
and vocab-parallel logits (each device's `[B, S, V/tp]` columns; the result is
one global `[B, S, V]` array split over the vocabulary, no collective).

Inputs are the global arrays placed by `parallel.sharding` (params, LoRA
weights, KV cache); tokens, positions, slot ids are replicated.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from slora_jax.compat import shard_map
from slora_jax.config import LlamaConfig
from slora_jax.memory.kv_cache import PagedKVCache
from slora_jax.model import generate, llama
from slora_jax.model.llama import Params
from slora_jax.ops.lora import SlotWeights, build_lora_meta_jnp
from slora_jax.parallel import sharding
from slora_jax.parallel.lora import TP_LORA_IMPLS, GatheredLora, ShardedProjections
from slora_jax.parallel.mesh import TP_AXIS, check_tp, local_config, tp_size
from slora_jax.parallel.paged import ShardedPagedLora


def _vocab_parallel_embed(emb_VlxH: jax.Array, tokens_BxS: jax.Array) -> jax.Array:
    """Rows of this device's vocabulary range, zero elsewhere, summed over devices: `[B, S, H]`."""
    Vl = emb_VlxH.shape[0]
    local_BxS = tokens_BxS - lax.axis_index(TP_AXIS) * Vl
    mine_BxS = (local_BxS >= 0) & (local_BxS < Vl)
    h_BxSxH = jnp.take(emb_VlxH, jnp.clip(local_BxS, 0, Vl - 1), axis=0)
    return lax.psum(jnp.where(mine_BxS[..., None], h_BxSxH, 0).astype(emb_VlxH.dtype), TP_AXIS)


def _check_lora(weights, tp: int, strategy: str, impl: str) -> None:
    sharding.check_strategy(strategy)
    if impl not in TP_LORA_IMPLS:
        raise ValueError(f"LoRA implementation under tensor parallelism must be one of {TP_LORA_IMPLS}, got {impl!r}")
    for proj, w in (weights[0] if sharding.has_layer_list(weights) else weights).items():
        if strategy == "slora" and proj in sharding.COLUMN_PARALLEL and w.a.shape[-1] % tp:
            raise ValueError(
                f"LoRA {proj}: rank dimension {w.a.shape[-1]} is not a multiple of tp={tp}; place the "
                "weights with parallel.shard_lora_weights / parallel.pack_slots (they pad it)"
            )


def _check_paged(paged: ShardedPagedLora, cache, tp: int, strategy: str, impl: str) -> None:
    """Adapters in pool pages: they live in the cache's pool, placed for this mesh and strategy."""
    if impl not in TP_LORA_IMPLS:
        raise ValueError(f"LoRA implementation under tensor parallelism must be one of {TP_LORA_IMPLS}, got {impl!r}")
    if (paged.shards.tp, paged.shards.strategy) != (tp, strategy):
        raise ValueError(f"adapter pages placed for tp={paged.shards.tp}, strategy {paged.shards.strategy!r}; "
                         f"this forward runs tp={tp}, strategy {strategy!r}")
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"adapters in pool pages need the pool as the cache (a PagedKVCache), got "
                        f"{type(cache).__name__}")
    if paged.layout.num_pages != cache.layout.num_pages:
        raise ValueError(f"adapter pages of a pool of {paged.layout.num_pages} pages, the cache's pool has "
                         f"{cache.layout.num_pages}")


def _dense_lora(lora, num_layers: int):
    """(weights, slot_ids, meta) of a dense-slot LoRA source: `LoraInputs`, or one that also
    carries the step's `LoraMeta` (the engine's `SlotLora`)."""
    if lora is None:
        return {}, None, None
    weights = getattr(lora, "weights", None)
    if not isinstance(weights, (dict, list, tuple)):
        raise TypeError("under tensor parallelism LoRA comes as dense slots (LoraInputs, or SlotLora of "
                        "unified_memory=False) or as adapter pages placed for the mesh (paged.ShardedPagedLora), "
                        f"got {type(lora).__name__}")
    if sharding.has_layer_list(weights) and len(weights) != num_layers:
        raise ValueError(f"per-layer LoRA weights: {len(weights)} layers, the model has {num_layers}")
    return weights if sharding.has_layer_list(weights) else dict(weights), lora.slot_ids, getattr(lora, "meta", None)


def forward(
    params: Params,
    cfg: LlamaConfig,
    tokens_BxS: jax.Array,
    pos_BxS: jax.Array,
    cache,
    lora=None,
    logits_index_B: jax.Array | None = None,
    *,
    mesh: Mesh,
    strategy: str = "slora",
    lora_impl: str = "reference",
):
    """`model.forward` over the `tp` devices of `mesh`; same arguments and results.

    `params` placed by `parallel.sharding`, layers stacked or per layer (a list:
    the layers run as a Python loop). `cache` is a `DenseKVCache`
    (`sharding.dense_kv_cache`) or `PagedKVCache` (`sharding.paged_kv_cache`)
    split by KV heads. `lora`: dense slots (`LoraInputs`, or a `SlotLora` whose
    `meta` is then used) placed by `sharding.shard_lora_weights` /
    `init_random_lora` for the same `strategy`, stacked or per layer; or adapters
    in the pages of the cache's pool (`paged.ShardedPagedLora`, placed for the
    same `strategy`; `cache` then is the `PagedKVCache` over that pool).
    `lora_impl`: "reference" (jnp) or "pallas" (the SGMV kernels per shard).
    Logits come back fp32 `[B, S | n, V]`, split over the vocabulary.
    """
    tp = tp_size(mesh)
    check_tp(cfg, tp)
    paged = lora if isinstance(lora, ShardedPagedLora) else None
    if paged is not None:
        _check_paged(paged, cache, tp, strategy, lora_impl)
        weights, slot_ids, meta = {}, paged.slot_ids, paged.meta
    else:
        weights, slot_ids, meta = _dense_lora(lora, cfg.num_hidden_layers)
        _check_lora(weights, tp, strategy, lora_impl)
    local_cfg = local_config(cfg, tp)

    def per_device(params, tokens_BxS, pos_BxS, cache, weights, paged, slot_ids, meta, logits_index_B):
        h_BxSxH = _vocab_parallel_embed(params["embed"]["embedding"], tokens_BxS)
        gathered = None
        if slot_ids is not None:
            slot_T = slot_ids.reshape(-1)
            if lora_impl == "pallas" and meta is None:
                meta = build_lora_meta_jnp(slot_T)
            gathered = GatheredLora(slot_T, lora_impl, meta)
        epilogue = ShardedProjections(weights, gathered, strategy, paged)
        h_BxSxH, cache = llama.decoder_stack(params["layers"], local_cfg, h_BxSxH, pos_BxS, cache, epilogue)
        return llama.final_logits(params, local_cfg, h_BxSxH, logits_index_B), cache

    cache_spec = sharding.cache_specs(cache)
    in_specs = (sharding.specs_like(params, cfg), P(), P(), cache_spec, sharding.lora_specs(weights, strategy),
                P(), P(), P(), P())
    # check_vma=False: Pallas calls (the paged-attention and SGMV kernels) do not declare how their
    # outputs vary over mesh axes; every collective here is written out explicitly anyway.
    run = shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=(P(None, None, TP_AXIS), cache_spec),
                    check_vma=False)
    return run(params, tokens_BxS, pos_BxS, cache, weights, paged, slot_ids, meta, logits_index_B)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "strategy", "lora_impl"), donate_argnames=("cache",))
def forward_jit(params, cfg, tokens_BxS, pos_BxS, cache, lora=None, logits_index_B=None, *, mesh, strategy="slora",
                lora_impl="reference"):
    """`forward`, jitted with the cache donated."""
    return forward(params, cfg, tokens_BxS, pos_BxS, cache, lora, logits_index_B, mesh=mesh, strategy=strategy,
                   lora_impl=lora_impl)


def prefill(params, cfg, tokens_BxS, lengths_B, max_len, lora=None, logits_index_B=None, *, mesh,
            strategy="slora", lora_impl="reference"):
    """`model.prefill` under TP: a fresh `DenseKVCache` split by KV heads, filled with the prompts."""
    B, S = tokens_BxS.shape
    cache = sharding.dense_kv_cache(cfg, B, max_len, mesh, params["embed"]["embedding"].dtype)
    return forward_jit(params, cfg, tokens_BxS, llama.prompt_positions(lengths_B, S), cache, lora,
                       logits_index_B, mesh=mesh, strategy=strategy, lora_impl=lora_impl)


def decode_step(params, cfg, tokens_B, pos_B, cache, lora=None, *, mesh, strategy="slora", lora_impl="reference"):
    """`model.decode_step` under TP; logits `[B, V]` (split over the vocabulary)."""
    logits, cache = forward_jit(params, cfg, tokens_B[:, None], pos_B[:, None], cache, lora, mesh=mesh,
                                strategy=strategy, lora_impl=lora_impl)
    return logits[:, 0], cache


def greedy_generate(
    params: Params,
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    lora_weights: dict[str, SlotWeights] | None = None,
    slots: Sequence[int | None] | None = None,
    eos_token_ids: Sequence[int] | None = None,
    *,
    mesh: Mesh,
    strategy: str = "slora",
    lora_impl: str = "reference",
) -> list[list[int]]:
    """`model.greedy_generate` under TP (params and LoRA weights placed by `parallel.sharding`)."""
    step_kw = dict(mesh=mesh, strategy=strategy, lora_impl=lora_impl)
    return generate.greedy_loop(
        functools.partial(prefill, params, cfg, **step_kw),
        functools.partial(decode_step, params, cfg, **step_kw),
        cfg, prompts, max_new_tokens, lora_weights, slots, eos_token_ids,
    )
