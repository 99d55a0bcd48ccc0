"""Where every array lives under tensor parallelism: `PartitionSpec`s and loaders that
place host data straight into its shards.

Base model (Megatron; shown for one layer's leaves, layer-stacked ones `[L, ...]` get a
leading `None`; `unstack_layers` turns stacked ones into a list of per-layer buffers,
which the forward runs as a Python loop: under `scan`, XLA on a GPU copies every layer's
weights out of the stacked arrays each step):

    q, k, v, gate, up   column-parallel   kernel [H, O]     -> P(None, "tp")
    o, down             row-parallel      kernel [I, H]     -> P("tp", None)
    norms               replicated
    embed.embedding     vocab-parallel    [V, H]            -> P("tp", None)
    lm_head.kernel      vocab-parallel    [H, V]            -> P(None, "tp")

The vocabulary is split rather than replicated because the embedding and the
lm_head are the largest single leaves (Llama-3: 128256 x 4096 each) and decode
reads the whole lm_head every step: splitting it divides that read by `tp`.
Its costs are one `[T, H]` all-reduce after the embedding lookup and logits that
come out split over the vocabulary (a global `[B, S, V]` array, sharded).

KV cache: split by KV heads (`DenseKVCache` `[L, B, K, S, D]` on `K`; the paged
pool `[L, num_pages, page_elems]` on `page_elems`, each device's slab being
pages of its own `K/tp` heads, see `create_pool`).

LoRA (`SlotWeights` `a [S, I, R]`, `b [S, R, O]` per layer; stacked `[L, ...]` or a list of
per-layer dicts), by strategy (see `lora.py`):

    strategy       projection   a                    b
    slora          column       split on R           split on O (like the base)
    slora          row          split on I (input)   split on O (= H)
    replicated_a   column       replicated           split on O
    replicated_a   row          split on I           replicated

`slora` pads a column-parallel projection's R to a multiple of `tp` with zero
columns (each device takes `R/tp` of them); slots keep their true ranks.
`padded_rank(..., rank_block=16)` also makes each device's rank columns a
multiple of 16, as the Pallas SGMV kernels take them.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from slora_jax.compat import shard_map
from slora_jax.config import PROJECTIONS, TP_LORA_STRATEGIES, LlamaConfig
from slora_jax.memory.kv_cache import PagedKVCache
from slora_jax.memory.pool import PoolLayout
from slora_jax.model import checkpoint, llama
from slora_jax.model.cache import DenseKVCache
from slora_jax.model.llama import Params
from slora_jax.ops.lora import SlotWeights, random_slot_weights
from slora_jax.parallel.mesh import TP_AXIS, check_tp, tp_size

COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")
ROW_PARALLEL = ("o", "down")
LORA_STRATEGIES = TP_LORA_STRATEGIES

_COL = P(None, TP_AXIS)  # one layer's [in, out] on out
_ROW = P(TP_AXIS, None)  # one layer's [in, out] on in


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _stacked(specs):
    """Specs of the same leaves with a leading (unsplit) layer axis."""
    return jax.tree.map(lambda s: P(None, *s), specs, is_leaf=_is_spec)


def _layered(per_layer, num_layers: int, unstacked: bool):
    """Specs of per-layer leaves laid out stacked `[L, ...]`, or as a list of `num_layers` trees."""
    return [per_layer] * num_layers if unstacked else _stacked(per_layer)


def has_layer_list(tree) -> bool:
    """Whether `params["layers"]` (or LoRA weights) are a list of per-layer trees (`unstack_layers`)."""
    return isinstance(tree, (list, tuple))


def param_specs(cfg: LlamaConfig, unstacked: bool = False) -> Params:
    """`PartitionSpec` tree shaped like the params of `cfg` (`unstacked`: layers as a list)."""
    layer: dict[str, Any] = {"attn_norm": {"scale": P()}, "mlp_norm": {"scale": P()}}
    layer.update({p: {"kernel": _COL if p in COLUMN_PARALLEL else _ROW} for p in PROJECTIONS})
    specs: Params = {"embed": {"embedding": P(TP_AXIS, None)},
                     "layers": _layered(layer, cfg.num_hidden_layers, unstacked), "final_norm": {"scale": P()}}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = {"kernel": P(None, TP_AXIS)}
    return specs


def specs_like(params: Params, cfg: LlamaConfig) -> Params:
    """`param_specs` for the layout of `params` (stacked or per-layer layers)."""
    return param_specs(cfg, unstacked=has_layer_list(params["layers"]))


def named(mesh: Mesh, specs):
    """`NamedSharding`s on `mesh` for a tree of `PartitionSpec`s."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def check_strategy(strategy: str) -> None:
    if strategy not in LORA_STRATEGIES:
        raise ValueError(f"LoRA tensor-parallel strategy must be one of {LORA_STRATEGIES}, got {strategy!r}")


def lora_spec(proj: str, strategy: str, stacked: bool = True) -> SlotWeights:
    """`SlotWeights` of `PartitionSpec`s for one projection's `[L, S, ...]` weights (`stacked`)
    or one layer's `[S, ...]`."""
    check_strategy(strategy)
    on_in = P(None, TP_AXIS, None)  # a [S, I, R] along I
    on_last = P(None, None, TP_AXIS)  # a along R, or b [S, R, O] along O
    if proj in COLUMN_PARALLEL:
        spec = SlotWeights(a=on_last if strategy == "slora" else P(), b=on_last, ranks=P())
    else:
        spec = SlotWeights(a=on_in, b=on_last if strategy == "slora" else P(), ranks=P())
    return _stacked(spec) if stacked else spec


def lora_specs(weights, strategy: str):
    """Specs shaped like `weights`: `{proj: SlotWeights}` stacked over layers, or a list of
    such dicts, one per layer."""
    if has_layer_list(weights):
        return [{proj: lora_spec(proj, strategy, stacked=False) for proj in w} for w in weights]
    return {proj: lora_spec(proj, strategy) for proj in weights}


def cache_specs(cache):
    """Specs of a KV cache split by KV heads (`DenseKVCache` or a `PagedKVCache` from `paged_kv_cache`)."""
    if isinstance(cache, DenseKVCache):
        kv = P(None, None, TP_AXIS, None, None)  # [L, B, K, S_max, D]
        return DenseKVCache(kv, kv)
    if isinstance(cache, PagedKVCache):
        return cache.replace(pool=P(None, None, TP_AXIS), page_table=P(), seq_ids=P())
    raise TypeError(f"no tensor-parallel layout for a cache of type {type(cache).__name__}")


# ----------------------------------------------------------------------------- placement


def put_sharded(host: np.ndarray, sharding: NamedSharding, dtype=None) -> jax.Array:
    """A global array from a host array, each device receiving (and converting) only its slice."""
    dtype = host.dtype if dtype is None else jnp.dtype(dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index], dtype))


def shard_params(params: Params, cfg: LlamaConfig, mesh: Mesh) -> Params:
    """Re-lay params that already are on devices or on host, stacked or per-layer (prefer
    `load_checkpoint` / `init_random_params`: this one passes whole leaves through)."""
    check_tp(cfg, tp_size(mesh))
    return jax.device_put(params, named(mesh, specs_like(params, cfg)))


@functools.lru_cache(maxsize=None)
def _splitter(num_layers: int, sharding: NamedSharding):
    return jax.jit(lambda a: [a[i] for i in range(num_layers)], out_shardings=[sharding] * num_layers)


def _split_layers(stacked, per_layer_specs, mesh: Mesh, donate: bool = True) -> list:
    """A list of per-layer trees from a tree of `[L, ...]` leaves placed on `mesh`, leaf by leaf,
    each stacked leaf deleted once split (`donate`): the peak is the model plus one leaf."""
    leaves, treedef = jax.tree.flatten(stacked)
    specs = treedef.flatten_up_to(per_layer_specs)
    num_layers = leaves[0].shape[0]
    split = []
    for leaf, spec in zip(leaves, specs):
        split.append(_splitter(num_layers, NamedSharding(mesh, spec))(leaf))
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
    return [treedef.unflatten([s[layer] for s in split]) for layer in range(num_layers)]


def unstack_layers(params: Params, cfg: LlamaConfig, mesh: Mesh, donate: bool = True) -> Params:
    """`model.unstack_layers` for params placed on `mesh` (stacked `param_specs`): each layer's
    shards become their own buffers, so the TP forward runs its layers as a Python loop
    (under `scan`, XLA on a GPU copies every layer's weights each step). `donate`: each
    stacked leaf is deleted once split (do not use `params` afterwards); else both stay."""
    per_layer = param_specs(cfg, unstacked=True)["layers"][0]
    return {**params, "layers": _split_layers(params["layers"], per_layer, mesh, donate)}


def unstack_lora(weights: dict[str, SlotWeights], mesh: Mesh, strategy: str) -> list[dict[str, SlotWeights]]:
    """Stacked `{proj: SlotWeights [L, ...]}` on `mesh` -> one `{proj: SlotWeights [S, ...]}` per
    layer, each its own buffers (what a kernel takes without a copy). Consumes (deletes) `weights`."""
    specs = {proj: lora_spec(proj, strategy, stacked=False) for proj in weights}
    return _split_layers(dict(weights), specs, mesh)


def load_checkpoint(path, mesh: Mesh, dtype=jnp.bfloat16, unstacked: bool = False) -> tuple[LlamaConfig, Params]:
    """`model.load_checkpoint` with every leaf placed straight into its shards on `mesh`
    (`unstacked`: then split into per-layer buffers, `unstack_layers`)."""
    cfg = checkpoint.read_config(path)
    check_tp(cfg, tp_size(mesh))
    params = checkpoint.load_checkpoint(path, dtype, shardings=named(mesh, param_specs(cfg)))[1]
    return cfg, unstack_layers(params, cfg, mesh) if unstacked else params


def init_random_params(cfg: LlamaConfig, key: jax.Array, mesh: Mesh, dtype=jnp.bfloat16,
                       unstacked: bool = False) -> Params:
    """Random params drawn by each device for its own shard only, one layer at a time
    (`unstacked`: then split into per-layer buffers, `unstack_layers`).

    The distributions of `model.init_random_params` (normal(0.02) kernels and
    embeddings, unit norms), other draws. Neither a 70B model nor its fp32
    temporaries ever exist whole on one device.
    """
    tp = tp_size(mesh)
    check_tp(cfg, tp)
    specs = param_specs(cfg)
    shapes = llama.param_shapes(cfg, dtype)

    def leaf(k, path: tuple[str, ...], shape: tuple[int, ...], spec: P) -> jax.Array:
        """This device's shard of one leaf."""
        axes = tuple(spec) + (None,) * (len(shape) - len(spec))
        local = tuple(d // tp if ax == TP_AXIS else d for d, ax in zip(shape, axes))
        if path[-1] == "scale":
            return jnp.ones(local, dtype)
        k = jax.random.fold_in(k, lax.axis_index(TP_AXIS))
        normal = lambda kk, shp: (jax.random.normal(kk, shp, jnp.float32) * 0.02).astype(dtype)
        if path[0] == "layers":  # [L, ...]: one layer at a time bounds the temporaries
            return lax.map(lambda kl: normal(kl, local[1:]), jax.random.split(k, local[0]))
        return normal(k, local)

    def per_device(key):
        paths_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
        keys = jax.random.split(key, len(paths_shapes))
        flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
        leaves = [leaf(k, tuple(p.key for p in kp), s.shape, spec)
                  for k, (kp, s), spec in zip(keys, paths_shapes, flat_specs)]
        return jax.tree.unflatten(jax.tree.structure(shapes), leaves)

    params = jax.jit(shard_map(per_device, mesh=mesh, in_specs=P(), out_specs=specs, check_vma=False))(key)
    return unstack_layers(params, cfg, mesh) if unstacked else params


def padded_rank(proj: str, rank: int, tp: int, strategy: str, rank_block: int = 1) -> int:
    """The `R` a projection's slot weights are placed with: each device's rank columns a
    multiple of `rank_block` (16 lets the Pallas kernels take a shard without a per-step
    pad), and a `slora` column-parallel `R` split `tp` ways."""
    step = rank_block * (tp if strategy == "slora" and proj in COLUMN_PARALLEL else 1)
    return -(-rank // step) * step


def shard_lora_weights(weights: dict[str, SlotWeights], mesh: Mesh, strategy: str = "slora",
                       dtype=None, rank_block: int = 1) -> dict[str, SlotWeights]:
    """Place `SlotWeights` (host numpy, e.g. `pack_slots_host`, or device arrays) in their shards.

    `R` is zero-padded to `padded_rank` first (with `slora`, a column-parallel `R`
    to a multiple of `tp`). `dtype` (default: the weights' own) is applied per shard.
    """
    check_strategy(strategy)
    tp = tp_size(mesh)
    out = {}
    for proj, w in weights.items():
        a, b, ranks = (np.asarray(x) for x in w)
        pad = padded_rank(proj, a.shape[-1], tp, strategy, rank_block) - a.shape[-1]
        if pad:
            a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
            b = np.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
        spec = named(mesh, lora_spec(proj, strategy, stacked=a.ndim == 4))
        out[proj] = SlotWeights(put_sharded(a, spec.a, dtype), put_sharded(b, spec.b, dtype),
                                put_sharded(ranks.astype(np.int32), spec.ranks))
    return out


def pack_slots(adapters, cfg: LlamaConfig, mesh: Mesh, strategy: str = "slora", dtype=jnp.float32,
               max_rank: int | None = None, rank_block: int = 1) -> dict[str, SlotWeights]:
    """`adapters.pack_slots` straight into tensor-parallel shards (no full copy on one device)."""
    from slora_jax.adapters.pack import pack_slots_host

    check_tp(cfg, tp_size(mesh))
    return shard_lora_weights(pack_slots_host(adapters, cfg, max_rank), mesh, strategy, dtype, rank_block)


@functools.lru_cache(maxsize=None)
def _lora_drawer(ranks: tuple[int, ...], h_in: int, h_out: int, R: int, dtype, shardings: SlotWeights):
    """One layer's random `SlotWeights`, jitted into `shardings` (one compile per projection shape)."""
    draw = functools.partial(random_slot_weights, ranks=ranks, h_in=h_in, h_out=h_out, dtype=dtype, max_rank=R)
    return jax.jit(draw, out_shardings=shardings)


def init_random_lora(key: jax.Array, cfg: LlamaConfig, ranks: Sequence[int], projections: Sequence[str],
                     mesh: Mesh, strategy: str = "slora", dtype=jnp.bfloat16, rank_block: int = 16,
                     unstacked: bool = False):
    """Random dense-slot LoRA weights for experiments, drawn directly into their shards.

    Slot `s` has rank `ranks[s]` on every layer of each projection in `projections`
    (`ops.lora.random_slot_weights` per layer); `R` is the max rank padded by
    `padded_rank` (default: each device's rank columns a multiple of 16, as the
    Pallas kernels take them). Stacked `[L, ...]` weights, or with `unstacked` a
    list of per-layer dicts, each layer drawn into its own buffers (other draws).
    """
    check_strategy(strategy)
    tp = tp_size(mesh)
    check_tp(cfg, tp)
    L = cfg.num_hidden_layers
    dtype = jnp.dtype(dtype)
    layers = [{} for _ in range(L)]
    out = {}
    for n, proj in enumerate(projections):
        h_in, h_out = cfg.projection_shape(proj)
        R = padded_rank(proj, max(ranks), tp, strategy, rank_block)
        k = jax.random.fold_in(key, n)
        if unstacked:
            draw = _lora_drawer(tuple(int(r) for r in ranks), h_in, h_out, R, dtype,
                                named(mesh, lora_spec(proj, strategy, stacked=False)))
            for i in range(L):
                layers[i][proj] = draw(jax.random.fold_in(k, i))
            continue

        def draw(k, h_in=h_in, h_out=h_out, R=R):  # [L, S, ...], one layer at a time (bounded temporaries)
            one = functools.partial(random_slot_weights, ranks=ranks, h_in=h_in, h_out=h_out, dtype=dtype,
                                    max_rank=R)
            return lax.map(one, jax.random.split(k, L))

        out[proj] = jax.jit(draw, out_shardings=named(mesh, lora_spec(proj, strategy)))(k)
    return layers if unstacked else out


def dense_kv_cache(cfg: LlamaConfig, batch: int, max_len: int, mesh: Mesh, dtype=jnp.bfloat16) -> DenseKVCache:
    """A zeroed `DenseKVCache` allocated directly split by KV heads."""
    make = functools.partial(DenseKVCache.create, cfg, batch, max_len, dtype)
    return jax.jit(make, out_shardings=named(mesh, cache_specs(DenseKVCache(None, None))))()


def local_pool_layout(layout: PoolLayout, tp: int) -> PoolLayout:
    """The pool layout one device sees: pages of its `K/tp` KV heads (`page_elems / tp` each)."""
    if layout.num_kv_heads % tp:
        raise ValueError(f"tensor-parallel size {tp} must divide the pool's num_kv_heads={layout.num_kv_heads}")
    return PoolLayout(layout.num_layers, layout.num_pages, layout.page_size, layout.num_kv_heads // tp,
                      layout.head_dim, layout.lora_chunk)


def create_pool(layout: PoolLayout, mesh: Mesh, dtype=jnp.bfloat16) -> jax.Array:
    """A zeroed unified pool `[L, num_pages, page_elems]` (`layout`: the single-device one)
    split along `page_elems`: device `i`'s slab `[L, num_pages, page_elems / tp]` is, for
    every page id, a page of the local layout (`local_pool_layout`) holding KV heads
    `i*K/tp ... (i+1)*K/tp - 1`. Page ids mean the same on every device; the byte
    order of the global array is therefore not the single-device one."""
    local_pool_layout(layout, tp_size(mesh))
    make = functools.partial(jnp.zeros, (layout.num_layers, layout.num_pages, layout.page_elems), dtype)
    return jax.jit(make, out_shardings=NamedSharding(mesh, P(None, None, TP_AXIS)))()


def paged_kv_cache(pool: jax.Array, page_table: jax.Array, layout: PoolLayout, seq_len: int, mesh: Mesh,
                   attention_impl: str = "reference") -> PagedKVCache:
    """`PagedKVCache.batched` over a pool from `create_pool`, carrying the per-device layout
    that the TP forward's devices read their slabs with."""
    local = local_pool_layout(layout, tp_size(mesh))
    return PagedKVCache.batched(pool, page_table, local, seq_len, attention_impl)
