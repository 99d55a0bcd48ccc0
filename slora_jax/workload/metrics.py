"""Serving metrics from per-request records (S-LoRA's and Punica's definitions).

Times in a `RequestRecord` are seconds from the start of the run. Definitions:

- elapsed: from the first arrival to the last finish;
- throughput: finished requests / elapsed (req/s), generated tokens / elapsed
  (tokens/s; tokens of every request, also aborted ones);
- latency: finish - arrival, averaged over finished requests;
- first-token latency: first token - arrival over requests that got one
  (mean, p50, p90, p99);
- SLO attainment: the fraction of *all* requests whose first token came within
  `slo_s` (aborted, failed and never-started requests miss it; requests cut
  off by a time limit count by their first token, if they had one);
- user satisfaction: the mean over all requests of max(0, 1 - (t / slo_s)^2)
  for first-token latency t (0 without a first token).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np

FINISHED = ("stop", "length")  # finish reasons of requests that ran to their end


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    id: int
    adapter: str | None
    input_len: int
    output_len: int  # tokens requested
    arrival_s: float
    first_token_s: float | None
    finish_s: float
    num_generated: int
    finish_reason: str  # "stop" | "length" | "abort" | "error" | "timeout" (cut off by the run's time limit)
    num_preemptions: int = 0
    error: str | None = None
    token_ids: tuple[int, ...] | None = None  # the generated tokens, when the run keeps them

    @property
    def first_token_latency(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def latency(self) -> float:
        return self.finish_s - self.arrival_s


def _pct(x: np.ndarray, q: float) -> float | None:
    return float(np.percentile(x, q)) if x.size else None


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def serving_metrics(records: Sequence[RequestRecord], slo_s: float = 6.0) -> dict[str, float | int | None]:
    """The metrics of one run (see the module docstring); None where no request qualifies."""
    if slo_s <= 0:
        raise ValueError(f"slo_s must be > 0, got {slo_s}")
    n = len(records)
    finished = [r for r in records if r.finish_reason in FINISHED]
    elapsed = (max(r.finish_s for r in records) - min(r.arrival_s for r in records)) if records else 0.0
    ftl_all = np.array([np.inf if r.first_token_s is None else r.first_token_latency for r in records])
    ftl = ftl_all[np.isfinite(ftl_all)]
    latency = np.array([r.latency for r in finished])
    tokens = sum(r.num_generated for r in records)
    per_s = (lambda x: x / elapsed) if elapsed > 0 else (lambda x: None)
    return {
        "num_requests": n,
        "num_finished": len(finished),
        "num_aborted": sum(r.finish_reason == "abort" for r in records),
        "num_errors": sum(r.finish_reason == "error" for r in records),
        "num_timeouts": sum(r.finish_reason == "timeout" for r in records),
        "num_preemptions": sum(r.num_preemptions for r in records),
        "generated_tokens": tokens,
        "elapsed_s": elapsed,
        "throughput_req_s": per_s(len(finished)),
        "throughput_tok_s": per_s(tokens),
        "avg_latency_s": _mean(latency),
        "first_token_mean_s": _mean(ftl),
        "first_token_p50_s": _pct(ftl, 50),
        "first_token_p90_s": _pct(ftl, 90),
        "first_token_p99_s": _pct(ftl, 99),
        "slo_s": slo_s,
        "slo_attainment": float((ftl_all < slo_s).mean()) if n else None,
        "user_satisfaction": float(np.clip(1 - (ftl_all / slo_s) ** 2, 0, None).mean()) if n else None,
    }


def memory_summary(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    """Peak and mean of each pool statistic over per-step `memory_report()` samples (`peak_*`, `mean_*`)."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for s in samples for k in s):
        x = np.array([s[key] for s in samples if key in s], np.float64)
        out[f"peak_{key}"] = float(x.max())
        out[f"mean_{key}"] = float(x.mean())
    return out


def save_records(records: Iterable[RequestRecord], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        for r in records:
            d = dataclasses.asdict(r)
            if r.token_ids is None:
                del d["token_ids"]
            f.write(json.dumps(d) + "\n")


def load_records(path: str | os.PathLike) -> list[RequestRecord]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                if d.get("token_ids") is not None:
                    d["token_ids"] = tuple(d["token_ids"])
                out.append(RequestRecord(**d))
    return out
