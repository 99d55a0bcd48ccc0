"""Scheduling policies: which requests a step should try to run, and in what order.

The engine owns memory (pages, adapters, preemption) and budgets; a policy
only orders the candidates, may veto one for this step, and may drop waiting
requests. To add one, subclass `Scheduler` and register it in `SCHEDULERS`;
`EngineConfig.scheduler` picks it by name.
"""

from __future__ import annotations

from typing import Callable, Sequence

from slora_jax.config import EngineConfig
from slora_jax.engine.request import Request


def _fcfs(r: Request) -> tuple[float, int]:
    return (r.arrival_time, r.id)


class Scheduler:
    """First come, first served: running requests by arrival, then waiting ones by arrival."""

    name = "fcfs"

    def __init__(self, config: EngineConfig):
        self.config = config

    def order(self, running: Sequence[Request], waiting: Sequence[Request], now: float,
              is_resident: Callable[[str], bool]) -> list[Request]:
        return sorted(running, key=_fcfs) + sorted(waiting, key=_fcfs)

    def admits(self, req: Request, batch_adapters: set[str]) -> bool:
        """May `req` join a step whose plan already uses `batch_adapters`?"""
        return True

    def drop(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Waiting requests to abort now."""
        return []


class EarlyAbort(Scheduler):
    """S-LoRA's early abort: a request that has waited past its first-token SLO
    without starting is dropped, so capacity goes to requests that can still meet it."""

    name = "early_abort"

    def drop(self, waiting: Sequence[Request], now: float) -> list[Request]:
        slo = self.config.slo_first_token_s
        return [r for r in waiting if r.first_token_time is None and now - r.arrival_time > slo]


class AdapterCluster(Scheduler):
    """Adapter clustering: at most `max_adapters_per_batch` distinct adapters in a step,
    and waiting requests whose adapter is already resident go first (fewer swaps)."""

    name = "cluster"

    def order(self, running, waiting, now, is_resident):
        cold = lambda r: r.adapter is not None and not is_resident(r.adapter)
        return sorted(running, key=_fcfs) + sorted(waiting, key=lambda r: (cold(r), *_fcfs(r)))

    def admits(self, req, batch_adapters):
        return (req.adapter is None or req.adapter in batch_adapters
                or len(batch_adapters) < self.config.max_adapters_per_batch)


SCHEDULERS: dict[str, type[Scheduler]] = {s.name: s for s in (Scheduler, EarlyAbort, AdapterCluster)}


def make_scheduler(config: EngineConfig) -> Scheduler:
    try:
        return SCHEDULERS[config.scheduler](config)
    except KeyError:
        raise ValueError(f"unknown scheduler {config.scheduler!r}; known: {sorted(SCHEDULERS)}") from None
