"""Serving in static batches of one adapter each: the common part of the merged-weight baselines.

A step takes the oldest waiting request's adapter, batches up to
`max_batch_size` waiting requests of that adapter (in arrival order: FCFS over
adapters), runs them to completion on the dense-KV-cache model (prefill, then
greedy decode until every row is done) with that adapter's weights merged in,
and returns their tokens. Nothing else runs meanwhile, as in a server that
generates one padded batch at a time. Subclasses say where a batch's merged
weights come from (`_params_for`). Past `deadline` (the runner's time limit) a
batch stops decoding; its requests stay unfinished for the caller to abort.

The API mirrors the engine's (`add_adapter`, `submit`, `step`, `abort`,
`has_unfinished`, `completion`, `release`, `memory_report`), so the experiment runner drives both
the same way. Only greedy sampling is supported.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.adapters.peft import load_adapter
from slora_jax.config import LlamaConfig
from slora_jax.engine.request import Completion, TokenEvent
from slora_jax.engine.sampling import SamplingParams
from slora_jax.errors import AdapterError, RequestError
from slora_jax.model.llama import Params, decode_step, prefill


def _pow2(n: int, lo: int = 1) -> int:
    return 1 << (max(n, lo) - 1).bit_length()


def batch_shapes(prompt_len: int, max_new_tokens: int, min_prompt_bucket: int = 16) -> tuple[int, int]:
    """(padded prompt length S, cache length) of a batch whose longest prompt and output are these."""
    S = _pow2(prompt_len, max(16, min_prompt_bucket))
    return S, _pow2(S + max_new_tokens)


@dataclasses.dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    adapter: str | None
    sampling: SamplingParams
    arrival_time: float
    output: list[int] = dataclasses.field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None


def tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


class StaticBatchServer:
    def __init__(self, cfg: LlamaConfig, params: Params, max_batch_size: int = 32, max_model_len: int = 1024,
                 host_budget_bytes: int = 8 << 30, clock: Callable[[], float] = time.monotonic,
                 min_prompt_bucket: int = 16):
        self.cfg, self.params, self.clock = cfg, params, clock
        self.max_batch_size, self.max_model_len = max_batch_size, max_model_len
        self.host_budget_bytes = host_budget_bytes
        self.min_prompt_bucket = min_prompt_bucket
        self.deadline = float("inf")  # clock time after which a batch stops decoding
        self._paths: dict[str, str | None] = {}  # None: an in-memory adapter (kept in `_host`)
        self._host: collections.OrderedDict[str, LoraAdapter] = collections.OrderedDict()  # LRU
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self.num_steps = 0

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, source: str | os.PathLike | LoraAdapter) -> None:
        """Register a PEFT folder (read when first used) or an in-memory `LoraAdapter` (kept)."""
        if name in self._paths:
            raise ValueError(f"adapter name {name!r} is already registered")
        if isinstance(source, LoraAdapter):
            self._paths[name] = None
            self._host[name] = source
            return
        if not os.path.isdir(source):
            raise AdapterError(f"{os.fspath(source)}: adapter folder not found")
        self._paths[name] = os.fspath(source)

    def host(self, name: str) -> LoraAdapter:
        """The adapter in host memory: read from disk, cached LRU under the host byte budget."""
        if name in self._host:
            self._host.move_to_end(name)
            return self._host[name]
        adapter = self._host[name] = load_adapter(self._paths[name], self.cfg, name=name)
        for old in [n for n in self._host if self._paths[n] is not None]:  # in-memory adapters stay
            if sum(a.nbytes for a in self._host.values()) <= self.host_budget_bytes or old == name:
                break
            del self._host[old]
        return adapter

    def _params_for(self, adapter: str | None) -> Params:
        """The weights a batch of `adapter`'s requests runs with."""
        raise NotImplementedError

    def _batch_done(self, adapter: str | None) -> None:
        """Called after a batch: drop what `_params_for` made for it."""

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: Sequence[int], adapter: str | None = None, sampling: SamplingParams | None = None,
               arrival_time: float | None = None) -> int:
        sampling = sampling or SamplingParams()
        if not sampling.greedy:
            raise RequestError(f"{type(self).__name__} supports greedy sampling only (temperature 0)")
        ids = [int(t) for t in prompt]
        if not ids or not all(0 <= t < self.cfg.vocab_size for t in ids):
            raise RequestError(f"prompt must be a non-empty list of token ids in [0, {self.cfg.vocab_size})")
        if len(ids) + sampling.max_new_tokens > self.max_model_len:
            raise RequestError(f"prompt of {len(ids)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds "
                               f"max_model_len {self.max_model_len}")
        if adapter is not None and adapter not in self._paths:
            raise RequestError(f"unknown adapter {adapter!r}; add it with add_adapter() first")
        rid = self._next_id
        self._next_id += 1
        arrival = self.clock() if arrival_time is None else arrival_time
        self._requests[rid] = _Request(rid, ids, adapter, sampling, arrival)
        return rid

    def abort(self, request_id: int) -> None:
        r = self._requests[request_id]
        if r.finish_reason is None:
            r.finish_reason, r.finish_time = "abort", self.clock()

    def has_unfinished(self) -> bool:
        return any(r.finish_reason is None for r in self._requests.values())

    def completion(self, request_id: int) -> Completion:
        r = self._requests[request_id]
        if r.finish_reason is None:
            raise ValueError(f"request {request_id} has not finished")
        return Completion(r.id, list(r.output), r.finish_reason, r.arrival_time, r.first_token_time, r.finish_time,
                          None, r.adapter)

    def release(self, request_id: int) -> Completion:
        c = self.completion(request_id)
        del self._requests[request_id]
        return c

    def memory_report(self) -> dict[str, float]:
        return {"base_param_bytes": tree_bytes(self.params)}

    # ------------------------------------------------------------------ the step
    def step(self) -> list[TokenEvent]:
        """Run one static batch to completion; returns its tokens and finish events."""
        waiting = sorted((r for r in self._requests.values() if r.finish_reason is None),
                         key=lambda r: (r.arrival_time, r.id))
        if not waiting:
            return []
        adapter = waiting[0].adapter
        batch = [r for r in waiting if r.adapter == adapter][: self.max_batch_size]
        events = self._generate(self._params_for(adapter), batch)
        self._batch_done(adapter)
        self.num_steps += 1
        return events

    def shapes(self, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
        """(padded prompt length S, cache length) of a batch whose longest prompt and output are these."""
        return batch_shapes(prompt_len, max_new_tokens, self.min_prompt_bucket)

    def warm(self, input_len: tuple[int, int], output_len: tuple[int, int]) -> int:
        """Compile every (prompt, cache) shape that requests with lengths in these ranges can need
        (prefill and one decode step each, on the base weights); returns the number of shapes."""
        B = _pow2(self.max_batch_size)
        lo_in, hi_in = input_len
        lo_out, hi_out = output_len
        shapes = {self.shapes(p, m) for p in {lo_in, hi_in} | {1 << k for k in range(hi_in.bit_length())}
                  if lo_in <= p <= hi_in for m in {lo_out, hi_out} | {1 << k for k in range(hi_out.bit_length())}
                  if lo_out <= m <= hi_out}
        for S, max_len in sorted(shapes):
            # inputs made as `_generate` makes them (numpy, then `jnp.asarray`): moving a host array of a new
            # shape onto the device is itself a small compile in JAX 0.10 (its `stage` primitive)
            lens_B = np.full(B, S, np.int32)
            logits_Bx1xV, cache = prefill(self.params, self.cfg, jnp.asarray(np.zeros((B, S), np.int32)),
                                          jnp.asarray(lens_B), max_len, logits_index_B=jnp.asarray(lens_B - 1))
            next_B = np.asarray(jnp.argmax(logits_Bx1xV[:, 0], axis=-1))  # as `_generate` does, so these compile too
            logits_BxV, _ = decode_step(self.params, self.cfg, jnp.asarray(next_B), jnp.asarray(lens_B), cache)
            np.asarray(jnp.argmax(logits_BxV, axis=-1))
        return len(shapes)

    def _generate(self, params: Params, batch: list[_Request]) -> list[TokenEvent]:
        """Greedy-decode `batch` together on a dense cache; shapes padded (few compiles): the batch to
        `max_batch_size`, prompt and cache lengths to powers of two."""
        n = len(batch)
        B = _pow2(self.max_batch_size)
        lens_B = np.ones(B, np.int32)  # padding rows: one token, then inactive
        lens_B[:n] = [len(r.prompt) for r in batch]
        S, max_len = self.shapes(int(lens_B.max()), max(r.sampling.max_new_tokens for r in batch))
        tokens_BxS = np.zeros((B, S), np.int32)
        for b, r in enumerate(batch):
            tokens_BxS[b, : len(r.prompt)] = r.prompt
        logits_Bx1xV, cache = prefill(params, self.cfg, jnp.asarray(tokens_BxS), jnp.asarray(lens_B), max_len,
                                      logits_index_B=jnp.asarray(lens_B - 1))
        next_B = np.asarray(jnp.argmax(logits_Bx1xV[:, 0], axis=-1))
        done_B = np.arange(B) >= n
        events = []
        for step in range(max_len):
            t = self.clock()
            for b in np.flatnonzero(~done_B):
                r = batch[b]
                tok = int(next_B[b])
                r.output.append(tok)
                r.first_token_time = t if r.first_token_time is None else r.first_token_time
                reason = r.sampling.finish_reason(tok, len(r.output), self.cfg.eos_token_ids)
                events.append(TokenEvent(r.id, tok, reason))
                if reason:
                    r.finish_reason, r.finish_time, done_B[b] = reason, t, True
            if done_B.all() or t >= self.deadline:
                return events
            pos_B = np.where(done_B, -1, lens_B + step).astype(np.int32)
            logits_BxV, cache = decode_step(params, self.cfg, jnp.asarray(next_B), jnp.asarray(pos_B), cache)
            next_B = np.asarray(jnp.argmax(logits_BxV, axis=-1))
        raise AssertionError("unreachable: every request stops within max_len tokens")
