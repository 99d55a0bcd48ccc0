"""Scheduling policies: which requests a step should try to run, in what order.

The engine owns memory (pages, adapters, preemption); a policy only orders the
candidates and may drop waiting requests. To add one, subclass `Scheduler` and
register it in `SCHEDULERS`.
"""

from __future__ import annotations

from typing import Sequence

from slora_jax.engine.request import Request


class Scheduler:
    """First come, first served: running requests by arrival, then waiting ones by arrival."""

    name = "fcfs"

    def order(self, running: Sequence[Request], waiting: Sequence[Request], now: float) -> list[Request]:
        key = lambda r: (r.arrival_time, r.id)
        return sorted(running, key=key) + sorted(waiting, key=key)

    def drop(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Waiting requests to abort now (none under FCFS)."""
        return []


SCHEDULERS: dict[str, type[Scheduler]] = {"fcfs": Scheduler}


def make_scheduler(name: str) -> Scheduler:
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}") from None
