"""Request traces: the S-LoRA generator, Punica's popularity patterns, and JSONL save/replay.

A trace is a list of `TraceRequest`s: when each request arrives (seconds from
the start), which adapter it uses (an index into the experiment's adapters, or
None for the base model) and how many prompt and output tokens it has. The
same arguments and seed always give the same trace.

- `slora_trace` (S-LoRA, Sheng et al. 2023, sec. 7): adapter ids from a power
  law over `n` adapters (`numpy`'s power distribution with parameter alpha:
  alpha = 1 is uniform, smaller is more skewed towards adapter 0),
  inter-arrival times Gamma(shape 1/cv^2, scale cv^2/rate) (cv = 1: Poisson at
  `rate` req/s), input and output lengths uniform in inclusive ranges.
- `punica_trace` (Punica, Chen et al. 2023, sec. 7): every batch of
  `batch_size` consecutive requests is split into adapter groups by a
  popularity pattern (`punica_group_sizes`); all requests arrive at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

import numpy as np

from slora_jax.config import POPULARITY_PATTERNS


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    id: int
    arrival_s: float  # seconds from the start of the trace
    adapter: int | None  # index into the experiment's adapters; None = the base model
    input_len: int  # prompt tokens
    output_len: int  # tokens to generate
    prompt: tuple[int, ...] | None = None  # token ids; None: the runner draws `input_len` random ids

    def __post_init__(self):
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"request {self.id}: input_len and output_len must be >= 1, "
                             f"got {self.input_len}, {self.output_len}")
        if self.prompt is not None and len(self.prompt) != self.input_len:
            raise ValueError(f"request {self.id}: prompt has {len(self.prompt)} tokens, input_len is {self.input_len}")
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"request {self.id}: arrival_s must be finite and >= 0, got {self.arrival_s}")
        if self.adapter is not None and self.adapter < 0:
            raise ValueError(f"request {self.id}: adapter index must be >= 0 or None, got {self.adapter}")


def _check_range(name: str, lo_hi: Sequence[int]) -> tuple[int, int]:
    lo, hi = (int(v) for v in lo_hi)
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be a range [lo, hi] with 1 <= lo <= hi, got {list(lo_hi)}")
    return lo, hi


def slora_trace(num_requests: int, n_adapters: int, alpha: float, rate: float, cv: float,
                input_len: Sequence[int], output_len: Sequence[int], seed: int = 0) -> list[TraceRequest]:
    """S-LoRA's synthetic trace; lengths are uniform in the inclusive ranges `[lo, hi]`."""
    if num_requests < 0 or n_adapters < 1:
        raise ValueError(f"need num_requests >= 0 and n_adapters >= 1, got {num_requests}, {n_adapters}")
    if not alpha > 0 or not rate > 0 or not cv >= 0:
        raise ValueError(f"need alpha > 0, rate > 0, cv >= 0; got alpha={alpha}, rate={rate}, cv={cv}")
    (in_lo, in_hi), (out_lo, out_hi) = _check_range("input_len", input_len), _check_range("output_len", output_len)
    rng = np.random.default_rng(seed)
    N = num_requests
    adapter_N = np.minimum((rng.power(alpha, N) * n_adapters).astype(np.int64), n_adapters - 1)
    in_N = rng.integers(in_lo, in_hi + 1, N)
    out_N = rng.integers(out_lo, out_hi + 1, N)
    # cv -> 0 is the limit of Gamma(1/cv^2, cv^2/rate): evenly spaced arrivals (and 1/cv^2 overflows).
    gap_N = np.full(N, 1.0 / rate) if cv < 1e-6 else rng.gamma(1.0 / cv**2, cv**2 / rate, N)
    arrival_N = np.cumsum(gap_N)
    return [TraceRequest(i, float(arrival_N[i]), int(adapter_N[i]), int(in_N[i]), int(out_N[i])) for i in range(N)]


def punica_group_sizes(pattern: str, batch_size: int) -> list[int]:
    """Sizes of the adapter groups of one batch (they sum to `batch_size`).

    distinct: every request its own adapter; uniform: ceil(sqrt(batch)) groups
    of (nearly) equal size; skewed: Zipf-like, group sizes int(1.5^k) (1, 1, 2,
    3, 5, 7, 11, ...) while they fit, the remainder added to the last group (so
    sizes never shrink); identical: one group.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pattern == "distinct":
        return [1] * batch_size
    if pattern == "identical":
        return [batch_size]
    if pattern == "uniform":
        n = math.ceil(math.sqrt(batch_size))
        q, r = divmod(batch_size, n)
        return [q + 1] * r + [q] * (n - r)
    if pattern == "skewed":
        sizes, a = [], 1.0
        while sum(sizes) + int(a) <= batch_size:
            sizes.append(int(a))
            a *= 1.5
        sizes[-1] += batch_size - sum(sizes)
        return sizes
    raise ValueError(f"unknown popularity pattern {pattern!r}; known: {list(POPULARITY_PATTERNS)}")


def punica_trace(pattern: str, num_requests: int, batch_size: int, n_adapters: int, input_len: Sequence[int],
                 output_len: Sequence[int], seed: int = 0) -> list[TraceRequest]:
    """Requests all arriving at 0, adapters by Punica popularity pattern.

    Batch b (requests `b*batch_size ...`) is split into the pattern's groups;
    group g uses adapter `(b * groups + g) % n_adapters`, so batches cycle
    through the adapters (with `identical`, every request uses adapter 0).
    """
    if n_adapters < 1:
        raise ValueError(f"n_adapters must be >= 1, got {n_adapters}")
    (in_lo, in_hi), (out_lo, out_hi) = _check_range("input_len", input_len), _check_range("output_len", output_len)
    sizes = punica_group_sizes(pattern, batch_size)
    groups_per_batch = 0 if pattern == "identical" else len(sizes)
    adapter_N = []
    for b in range(-(-num_requests // batch_size)):
        for g, size in enumerate(sizes):
            adapter_N += [(b * groups_per_batch + g) % n_adapters] * size
    rng = np.random.default_rng(seed)
    in_N = rng.integers(in_lo, in_hi + 1, num_requests)
    out_N = rng.integers(out_lo, out_hi + 1, num_requests)
    return [TraceRequest(i, 0.0, adapter_N[i], int(in_N[i]), int(out_N[i])) for i in range(num_requests)]


_FIELDS = ("id", "arrival_s", "adapter", "input_len", "output_len")


def save_trace(trace: Sequence[TraceRequest], path: str | os.PathLike) -> None:
    """One JSON object per line: id, arrival_s, adapter, input_len, output_len (and prompt if set)."""
    with open(path, "w") as f:
        for r in trace:
            d = {k: getattr(r, k) for k in _FIELDS}
            if r.prompt is not None:
                d["prompt"] = list(r.prompt)
            f.write(json.dumps(d) + "\n")


def load_trace(path: str | os.PathLike) -> list[TraceRequest]:
    """Read a JSONL trace (as `save_trace` writes, or a real one in that format), in arrival order.

    `id` may be omitted (the record's index in the file is used); `adapter` may be null or
    omitted (the base model); `prompt` is optional.
    """
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON: {e}") from None
            if not isinstance(d, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
            unknown = set(d) - {*_FIELDS, "prompt"}
            missing = {"arrival_s", "input_len", "output_len"} - set(d)
            if unknown or missing:
                raise ValueError(f"{where}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
            try:
                prompt = d.get("prompt")
                out.append(TraceRequest(
                    id=_int(d.get("id", len(out))), arrival_s=float(d["arrival_s"]),
                    adapter=None if d.get("adapter") is None else _int(d["adapter"]),
                    input_len=_int(d["input_len"]), output_len=_int(d["output_len"]),
                    prompt=None if prompt is None else tuple(_int(t) for t in prompt),
                ))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
    ids = [r.id for r in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{os.fspath(path)}: request ids are not unique")
    return sorted(out, key=lambda r: (r.arrival_s, r.id))


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return v
