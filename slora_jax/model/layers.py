"""Flax (linen) building blocks of the Llama decoder.

The modules declare parameters (names, shapes, initializers) and compute one
decoder layer. They hold no state: the forward in `llama.py` calls
`DecoderLayer(cfg).apply({"params": p}, ...)` inside a `lax.scan` over
layer-stacked parameters, so the jitted step sees only pure functions.

Attention is passed in as a callable `attend(q, k, v) -> (o, aux)` so that the
layer knows nothing about where K/V live (dense cache, paged pool, or none).
LoRA is passed in as a callable `lora(proj, y, x) -> y` for the same reason, and
optionally as `lora_group(projs, ys, x) -> ys` for projections that share x (q, k,
v; gate, up), so a LoRA source can serve them with one launch; or as
`linear(projs, x, ws) -> ys | None`, which computes the base projections too (from
their weights `ws`, one launch for base and LoRA), None leaving them to the others.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slora_jax.config import LlamaConfig

# normal(0.02), the initializer_range Llama checkpoints use.
_kernel_init = nn.initializers.normal(stddev=0.02)

AttendFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
LoraFn = Callable[[str, jax.Array, jax.Array], jax.Array]
LoraGroupFn = Callable[[tuple[str, ...], tuple[jax.Array, ...], jax.Array], tuple[jax.Array, ...]]
LinearFn = Callable[[tuple[str, ...], jax.Array, tuple[jax.Array, ...]], "tuple[jax.Array, ...] | None"]


def no_lora(proj: str, y: jax.Array, x: jax.Array) -> jax.Array:
    del proj, x
    return y


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BxSxH: jax.Array) -> jax.Array:
        w_H = self.param("scale", nn.initializers.ones, (x_BxSxH.shape[-1],), self.param_dtype)
        x32 = x_BxSxH.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # As transformers does: normalize in fp32, cast back, then scale.
        return x32.astype(x_BxSxH.dtype) * w_H.reshape((1,) * (x_BxSxH.ndim - 1) + (-1,))


class Projection(nn.Module):
    """`y = x @ W` (no bias), `W: [in, out]`."""

    features: int
    param_dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x_TxI: jax.Array, weight_only: bool = False) -> jax.Array:
        """`x @ W`, or (`weight_only`) W itself in x's dtype, for a kernel that computes the product."""
        w_IxO = self.param("kernel", _kernel_init, (x_TxI.shape[-1], self.features), self.param_dtype)
        w_IxO = w_IxO.astype(x_TxI.dtype)
        return w_IxO if weight_only else jnp.dot(x_TxI, w_IxO)


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """Rotary inverse frequencies `[head_dim // 2]`, with `llama3` scaling if configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * jnp.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, blended, scaled)


def rope_tables(cfg: LlamaConfig, pos_BxS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, S, head_dim]` (halves repeated, the `rotate_half` convention)."""
    ang_BxSxD2 = pos_BxS.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)[None, None, :]
    ang_BxSxD = jnp.concatenate([ang_BxSxD2, ang_BxSxD2], axis=-1)
    return jnp.cos(ang_BxSxD), jnp.sin(ang_BxSxD)


def apply_rope(x_BxSxNxD: jax.Array, cos_BxSxD: jax.Array, sin_BxSxD: jax.Array) -> jax.Array:
    x = x_BxSxNxD.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BxSxD[:, :, None, :] + rot * sin_BxSxD[:, :, None, :]
    return out.astype(x_BxSxNxD.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm attention block and SwiGLU MLP block, each with a residual."""

    cfg: LlamaConfig
    param_dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(
        self,
        h_BxSxH: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        attend: AttendFn,
        lora: LoraFn = no_lora,
        lora_group: LoraGroupFn | None = None,
        linear: LinearFn | None = None,
    ) -> tuple[jax.Array, Any]:
        cfg, pd = self.cfg, self.param_dtype
        B, S, H = h_BxSxH.shape
        N, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def weight(name: str, x_TxI: jax.Array) -> jax.Array:
            return Projection(cfg.projection_shape(name)[1], pd, name=name)(x_TxI, weight_only=True)

        def projs(names: tuple[str, ...], x_TxI: jax.Array) -> tuple[jax.Array, ...]:
            ws = tuple(weight(n, x_TxI) for n in names)
            done = None if linear is None else linear(names, x_TxI, ws)
            if done is not None:
                return done
            ys = tuple(jnp.dot(x_TxI, w) for w in ws)
            if lora_group is None:
                return tuple(lora(n, y, x_TxI) for n, y in zip(names, ys))
            return lora_group(names, ys, x_TxI)

        def proj(name: str, x_TxI: jax.Array) -> jax.Array:
            w_IxO = weight(name, x_TxI)
            done = None if linear is None else linear((name,), x_TxI, (w_IxO,))
            return lora(name, jnp.dot(x_TxI, w_IxO), x_TxI) if done is None else done[0]

        x_TxH = RMSNorm(cfg.rms_norm_eps, pd, name="attn_norm")(h_BxSxH).reshape(B * S, H)
        q_TxO, k_TxO, v_TxO = projs(("q", "k", "v"), x_TxH)
        if getattr(lora if lora_group is None else lora_group, "reads_pool", False):
            # `attend` writes k/v into the KV cache before reading q. With adapters in the same
            # pool (a LoRA fn marked `reads_pool`), q's LoRA reads pool pages too, and nothing
            # orders that read before the write: XLA then copies the whole pool to keep the old
            # version (3 pool copies a step on each device under tensor parallelism, where each
            # projection has its own LoRA launch). The barrier makes k/v available only once q is
            # computed. (A `lora_group` computing q, k, v in one launch orders them already; one
            # that does not marks itself `reads_pool`.)
            q_TxO, k_TxO, v_TxO = jax.lax.optimization_barrier((q_TxO, k_TxO, v_TxO))
        q_BxSxNxD = q_TxO.reshape(B, S, N, D)
        k_BxSxKxD = k_TxO.reshape(B, S, K, D)
        v_BxSxKxD = v_TxO.reshape(B, S, K, D)
        cos, sin = rope
        q_BxSxNxD = apply_rope(q_BxSxNxD, cos, sin)
        k_BxSxKxD = apply_rope(k_BxSxKxD, cos, sin)
        o_BxSxNxD, aux = attend(q_BxSxNxD, k_BxSxKxD, v_BxSxKxD)
        h_BxSxH = h_BxSxH + proj("o", o_BxSxNxD.reshape(B * S, N * D)).reshape(B, S, H)

        x_TxH = RMSNorm(cfg.rms_norm_eps, pd, name="mlp_norm")(h_BxSxH).reshape(B * S, H)
        g_TxF, u_TxF = projs(("gate", "up"), x_TxH)
        m_TxF = (jax.nn.silu(g_TxF.astype(jnp.float32)) * u_TxF.astype(jnp.float32)).astype(x_TxH.dtype)
        h_BxSxH = h_BxSxH + proj("down", m_TxF).reshape(B, S, H)
        return h_BxSxH, aux
