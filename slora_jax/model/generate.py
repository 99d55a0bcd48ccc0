"""Greedy generation on the dense (non-paged) KV cache: the model's end-to-end check.

The serving engine (continuous batching on the unified pool) supersedes this
for serving; this loop stays as the simplest correct reference.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from slora_jax.config import LlamaConfig
from slora_jax.model.llama import LoraInputs, Params, decode_step, prefill
from slora_jax.ops.lora import SlotWeights


def greedy_generate(
    params: Params,
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    lora_weights: dict[str, SlotWeights] | None = None,
    slots: Sequence[int | None] | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """Greedy-decode every prompt together; returns the generated ids of each.

    A sequence stops after `max_new_tokens` or after emitting an EOS token
    (kept in its output, as `transformers` does). `slots[i]` is prompt i's
    adapter slot in `lora_weights`, or None for the base model.
    """
    return greedy_loop(
        functools.partial(prefill, params, cfg),
        functools.partial(decode_step, params, cfg),
        cfg, prompts, max_new_tokens, lora_weights, slots, eos_token_ids,
    )


def greedy_loop(
    prefill_fn: Callable,
    decode_fn: Callable,
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    lora_weights: dict[str, SlotWeights] | None = None,
    slots: Sequence[int | None] | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """`greedy_generate` over any model runner: `prefill_fn(tokens, lengths, max_len, lora,
    logits_index)` and `decode_fn(tokens, pos, cache, lora)` with the signatures of
    `prefill` / `decode_step` after `(params, cfg)` (the tensor-parallel runner plugs in here)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = set(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    B = len(prompts)
    lens_B = np.array([len(p) for p in prompts], np.int32)
    S = int(lens_B.max())
    tokens_BxS = np.zeros((B, S), np.int32)
    for b, p in enumerate(prompts):
        tokens_BxS[b, : len(p)] = p

    lora = None
    if lora_weights is not None:
        slot_B = np.array([-1 if s is None else s for s in (slots or [None] * B)], np.int32)
        lora = LoraInputs(lora_weights, jnp.asarray(np.repeat(slot_B[:, None], S, axis=1)))
    logits, cache = prefill_fn(jnp.asarray(tokens_BxS), jnp.asarray(lens_B), S + max_new_tokens, lora,
                               jnp.asarray(lens_B - 1))
    next_B = np.asarray(jnp.argmax(logits[:, 0], axis=-1))
    if lora is not None:
        lora = lora._replace(slot_ids=jnp.asarray(slot_B[:, None]))

    out: list[list[int]] = [[] for _ in range(B)]
    done_B = np.zeros(B, bool)
    for step in range(max_new_tokens):
        for b in np.flatnonzero(~done_B):
            out[b].append(int(next_B[b]))
            done_B[b] = next_B[b] in eos or len(out[b]) >= max_new_tokens
        if done_B.all():
            break
        pos_B = np.where(done_B, -1, lens_B + step).astype(np.int32)
        logits_BxV, cache = decode_fn(jnp.asarray(next_B), jnp.asarray(pos_B), cache, lora)
        next_B = np.asarray(jnp.argmax(logits_BxV, axis=-1))
    return out
