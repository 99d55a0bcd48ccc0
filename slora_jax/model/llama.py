"""The functional Llama: parameters are a pytree, the forward a pure function.

Parameter tree (per-layer leaves stacked on a leading `[L]` axis, kernels `[in, out]`):

    {"embed": {"embedding": [V, H]},
     "layers": {"attn_norm": {"scale": [L, H]},
                "q" | "k" | "v" | "o" | "gate" | "up" | "down": {"kernel": [L, in, out]},
                "mlp_norm": {"scale": [L, H]}},
     "final_norm": {"scale": [H]},
     "lm_head": {"kernel": [H, V]}}          # absent when embeddings are tied

`forward` runs a chunk of `S` new tokens for each of `B` sequences at given
positions against a KV cache (see `cache.py`): a prompt prefill is a chunk at
positions `0..n-1` on an empty cache, a decode step a chunk of one token.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from slora_jax.config import LlamaConfig
from slora_jax.model.cache import DenseKVCache
from slora_jax.model.layers import DecoderLayer, LoraFn, RMSNorm, no_lora, rope_tables
from slora_jax.ops.lora import SlotWeights, lora_reference

Params = dict[str, Any]


class LoraInputs(NamedTuple):
    """The LoRA part of a forward: adapter weights in dense slots and each token's slot.

    weights: projection name -> `SlotWeights` stacked over layers (`a: [L, S, in, R]`);
      projections no resident adapter targets are simply absent. With per-layer
      params (`unstack_layers`) it may also be a list of such dicts, one per layer
      (`a: [S, in, R]`, each its own buffer).
    slot_ids: int32 `[B, S]` adapter slot of each token, -1 for the base model.

    Any other LoRA source (e.g. adapters read from the pool's pages) plugs into
    `forward` by offering the same two methods, and optionally a third,
    `layer_group_fn(layer, layer_weights, cache_now) -> lora_group | None`: a hook
    `lora_group(projs, ys, x) -> ys` for projections sharing x (q, k, v; gate, up),
    used instead of one `lora` call each (`DecoderLayer`'s `lora_group`); a fourth,
    `layer_linear_fn(...) -> linear | None`, whose `linear(projs, x, ws) -> ys | None`
    computes base projections and LoRA together (`DecoderLayer`'s `linear`); and
    `prepare() -> source`, called once a forward before the layers.
    """

    weights: dict[str, SlotWeights]
    slot_ids: jax.Array

    def per_layer(self):
        """Pytree with a leading layer axis, sliced per layer, or a list of per-layer trees (or None)."""
        return self.weights

    def layer_fn(self, layer: jax.Array, layer_weights, cache_now) -> LoraFn:
        """`lora(proj, y, x) -> y` for one layer, given this layer's slice of `per_layer()`.

        `cache_now()` returns the cache as it is at the time of the call (LoRA read
        from the cache, e.g. pool pages, must read the current value: a read of an
        older one keeps that buffer alive past the in-place K/V write, i.e. a copy).
        """
        del layer, cache_now
        slot_T = self.slot_ids.reshape(-1)

        def add_lora(proj: str, y_TxO: jax.Array, x_TxI: jax.Array) -> jax.Array:
            if proj not in layer_weights:
                return y_TxO
            return lora_reference(y_TxO, x_TxI, layer_weights[proj], slot_T)

        return add_lora


def _embed(cfg: LlamaConfig, dtype) -> nn.Embed:
    return nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), param_dtype=dtype)


def init_random_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.bfloat16) -> Params:
    """Random weights of the config's shapes (normal(0.02) kernels, unit norms), jitted."""
    return _init_params(cfg, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(cfg: LlamaConfig, key: jax.Array, dtype) -> Params:
    k_emb, k_layers, k_head = jax.random.split(key, 3)
    H = cfg.hidden_size
    h_1x1xH = jnp.zeros((1, 1, H), dtype)
    rope = rope_tables(cfg, jnp.zeros((1, 1), jnp.int32))
    # Only shapes matter at init: stand in for attention with the identity on q.
    init_layer = lambda k: DecoderLayer(cfg, dtype).init(k, h_1x1xH, rope, lambda q, kk, v: (q, None))["params"]
    params: Params = {
        "embed": _embed(cfg, dtype).init(k_emb, jnp.zeros((1,), jnp.int32))["params"],
        "layers": jax.vmap(init_layer)(jax.random.split(k_layers, cfg.num_hidden_layers)),
        "final_norm": RMSNorm(cfg.rms_norm_eps, dtype).init(k_head, h_1x1xH)["params"],
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": nn.initializers.normal(0.02)(k_head, (H, cfg.vocab_size), dtype)}
    return params


def unstack_layers(params: Params, free: bool = False) -> Params:
    """The same parameters with `layers` as a list of per-layer trees (each leaf its own buffer).

    `forward` then runs the layers as a Python loop instead of a `scan` (more to
    compile, no per-layer weight copies on a GPU). `free`: each stacked leaf is
    deleted as soon as it is split, so the peak is the model plus one leaf (do not
    use `params` afterwards); else the stacked leaves live until the caller drops
    them, and both copies are held until then.
    """
    leaves, treedef = jax.tree.flatten(params["layers"])
    n = leaves[0].shape[0]
    split = []
    for leaf in leaves:
        split.append([leaf[i] for i in range(n)])
        if free:
            leaf.delete()
    return {**params, "layers": [treedef.unflatten([s[i] for s in split]) for i in range(n)]}


def stack_layers(params: Params, free: bool = False) -> Params:
    """The inverse of `unstack_layers`: `layers` as one tree of `[L, ...]` leaves (for `scan`).

    `free`: each layer's leaves are deleted once stacked (do not use `params` afterwards).
    """
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    flat = [jax.tree.flatten(layer) for layer in layers]
    treedef = flat[0][1]
    stacked = []
    for j in range(len(flat[0][0])):
        parts = [leaves[j] for leaves, _ in flat]
        stacked.append(jnp.stack(parts))
        if free:
            for a in parts:
                a.delete()
    return {**params, "layers": treedef.unflatten(stacked)}


def param_shapes(cfg: LlamaConfig, dtype=jnp.bfloat16) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s, computed without allocating."""
    return jax.eval_shape(lambda k: _init_params(cfg, k, jnp.dtype(dtype)), jax.random.key(0))


def forward(
    params: Params,
    cfg: LlamaConfig,
    tokens_BxS: jax.Array,
    pos_BxS: jax.Array,
    cache: DenseKVCache,
    lora: LoraInputs | None = None,
    logits_index_B: jax.Array | None = None,
) -> tuple[jax.Array, DenseKVCache]:
    """Run `S` new tokens per sequence; returns fp32 logits and the updated cache.

    Args:
      tokens_BxS: int32 token ids.
      pos_BxS: int32 position of each token in its sequence; -1 marks padding.
      cache: anything with the `write`/`attend` interface of `DenseKVCache`.
      lora: optional `LoraInputs`.
      logits_index_B: if given, logits only for these tokens: `[B]` (token
        `logits_index_B[b]` of row b, logits `[B, 1, V]`) or `[B, n]` (logits
        `[B, n, V]`), as decoding, the last prompt token or a ragged batch needs.
    Returns:
      logits `[B, S | 1 | n, V]` in fp32, and the cache holding the new tokens' K/V.
    """
    h_BxSxH = jnp.take(params["embed"]["embedding"], tokens_BxS, axis=0)
    h_BxSxH, cache = decoder_stack(params["layers"], cfg, h_BxSxH, pos_BxS, cache, lora)
    return final_logits(params, cfg, h_BxSxH, logits_index_B), cache


def decoder_stack(
    layer_params: Params,
    cfg: LlamaConfig,
    h_BxSxH: jax.Array,
    pos_BxS: jax.Array,
    cache: DenseKVCache,
    lora: LoraInputs | None = None,
) -> tuple[jax.Array, DenseKVCache]:
    """The decoder layers: a `lax.scan` over the layer-stacked `params["layers"]`, or a
    Python loop over a list of per-layer trees (`unstack_layers`).

    The tensor-parallel forward (`slora_jax.parallel`) runs this same function
    on each device's shards with a per-device `cfg` (its share of the heads and
    of the MLP width) and a `lora` object whose hook also does the all-reduces.
    """
    rope = rope_tables(cfg, jnp.maximum(pos_BxS, 0))
    if hasattr(lora, "prepare"):  # once a step, before the layers (e.g. tables every layer reads)
        lora = lora.prepare()
    lora_w = None if lora is None else lora.per_layer()
    if isinstance(layer_params, (list, tuple)):
        # Per-layer trees (`unstack_layers`): a Python loop, each layer's weights their own
        # buffers. Under `scan`, XLA on a GPU copies every layer's weight slice out of the
        # stacked arrays before its matmuls (a whole extra pass over the weights a step).
        # LoRA weights may come per layer too (a list): a slice of stacked ones is a copy
        # wherever a kernel (a custom call) takes it as an operand.
        carry = (h_BxSxH, cache)
        for i, params_i in enumerate(layer_params):
            if lora_w is None or isinstance(lora_w, (list, tuple)):
                w_i = None if lora_w is None else lora_w[i]
            else:
                w_i = jax.tree.map(lambda a, i=i: a[i], lora_w)
            carry = _decoder_layer_jit(carry, jnp.int32(i), params_i, w_i, lora, rope, pos_BxS, cfg=cfg)
        return carry
    if isinstance(lora_w, (list, tuple)):
        raise ValueError("per-layer LoRA weights (a list) need per-layer params (model.unstack_layers)")

    def body(carry, xs):
        return _decoder_layer(carry, *xs, lora, rope, pos_BxS, cfg=cfg), None

    xs = (jnp.arange(cfg.num_hidden_layers), layer_params, lora_w)
    (h_BxSxH, cache), _ = jax.lax.scan(body, (h_BxSxH, cache), xs)
    return h_BxSxH, cache


def _decoder_layer(carry, i, layer_params, lora_w, lora, rope, pos_BxS, *, cfg: LlamaConfig):
    """Decoder layer `i` on `carry = (h [B, S, H], cache)`; `lora_w` its slice of `lora.per_layer()`."""
    h_BxSxH, cache = carry
    live = [cache]  # the cache as of now: before this layer's K/V write, then after it

    def attend(q_BxSxNxD, k_BxSxKxD, v_BxSxKxD):
        live[0] = live[0].write(i, k_BxSxKxD, v_BxSxKxD, pos_BxS)
        return live[0].attend(i, q_BxSxNxD, pos_BxS), live[0]

    lora_fn = no_lora if lora is None else lora.layer_fn(i, lora_w, lambda: live[0])
    group_fn = getattr(lora, "layer_group_fn", None)
    lora_group = None if group_fn is None else group_fn(i, lora_w, lambda: live[0])
    linear_fn = getattr(lora, "layer_linear_fn", None)
    linear = None if linear_fn is None else linear_fn(i, lora_w, lambda: live[0])
    return DecoderLayer(cfg, h_BxSxH.dtype).apply({"params": layer_params}, h_BxSxH, rope, attend, lora_fn,
                                                  lora_group, linear)


# The Python layer loop calls this: every layer has the same argument shapes, so the layer
# is traced and lowered once (kernels included) and called L times; XLA inlines the calls,
# so each layer still reads its own weight buffers. Tracing and lowering every layer anew
# took ~40 s for a 40-layer model with LoRA kernels (13B at TP 4, lowered for a GPU).
_decoder_layer_jit = jax.jit(_decoder_layer, static_argnames=("cfg",))


def final_logits(params: Params, cfg: LlamaConfig, h_BxSxH: jax.Array,
                 logits_index_B: jax.Array | None = None) -> jax.Array:
    """Final norm and the vocabulary projection, fp32 `[B, S | n, V]` (`V` local under TP:
    the lm_head, or the tied embedding, may be a vocab shard)."""
    B = h_BxSxH.shape[0]
    if logits_index_B is not None:
        idx_Bxn = logits_index_B.reshape(B, -1)
        h_BxSxH = jnp.take_along_axis(h_BxSxH, idx_Bxn[:, :, None], axis=1)
    h_BxSxH = RMSNorm(cfg.rms_norm_eps, h_BxSxH.dtype).apply({"params": params["final_norm"]}, h_BxSxH)
    if cfg.tie_word_embeddings:
        w_HxV = params["embed"]["embedding"].T
    else:
        w_HxV = params["lm_head"]["kernel"]
    return jnp.einsum("bsh,hv->bsv", h_BxSxH, w_HxV, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def forward_jit(params, cfg, tokens_BxS, pos_BxS, cache, lora=None, logits_index_B=None):
    """`forward`, jitted with the cache donated (updated in place)."""
    return forward(params, cfg, tokens_BxS, pos_BxS, cache, lora, logits_index_B)


def prefill(
    params: Params,
    cfg: LlamaConfig,
    tokens_BxS: jax.Array,
    lengths_B: jax.Array,
    max_len: int,
    lora: LoraInputs | None = None,
    logits_index_B: jax.Array | None = None,
) -> tuple[jax.Array, DenseKVCache]:
    """Full-sequence forward of right-padded prompts.

    Returns logits `[B, S, V]` for every prompt position (or `[B, 1, V]` at
    `logits_index_B`) and a `DenseKVCache` of capacity `max_len` holding the
    prompts' K/V, ready for `decode_step`.
    """
    B, S = tokens_BxS.shape
    cache = DenseKVCache.create(cfg, B, max_len, params["embed"]["embedding"].dtype)
    return forward_jit(params, cfg, tokens_BxS, prompt_positions(lengths_B, S), cache, lora, logits_index_B)


def prompt_positions(lengths_B: jax.Array, S: int) -> jax.Array:
    """int32 `[B, S]` positions of right-padded prompts: `0..len-1`, then -1 (padding)."""
    pos_BxS = jnp.where(jnp.arange(S)[None, :] < lengths_B[:, None], jnp.arange(S)[None, :], -1)
    return pos_BxS.astype(jnp.int32)


def decode_step(
    params: Params,
    cfg: LlamaConfig,
    tokens_B: jax.Array,
    pos_B: jax.Array,
    cache: DenseKVCache,
    lora: LoraInputs | None = None,
) -> tuple[jax.Array, DenseKVCache]:
    """One new token per sequence at position `pos_B` (-1: inactive row); logits `[B, V]`.

    `lora.slot_ids` is `[B, 1]`. The cache is donated.
    """
    logits, cache = forward_jit(params, cfg, tokens_B[:, None], pos_B[:, None], cache, lora)
    return logits[:, 0], cache
