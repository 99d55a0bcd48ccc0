"""Requests as the engine tracks them, and what it hands back."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from slora_jax.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not started, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"  # holds KV pages and a pin on its adapter
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    adapter: str | None
    sampling: SamplingParams
    arrival_time: float
    key_data: np.ndarray  # the request's PRNG key data (sampling)
    output: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the pool (or being computed by a dispatched step)
    inflight: int = 0  # sampled tokens of dispatched steps not yet read (0 or 1)
    pages: list[int] = dataclasses.field(default_factory=list)  # KV page table
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.prompt) + len(self.output) + self.inflight - self.num_computed


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """A token produced in a step (streaming), or the end of a request (token None)."""

    request_id: int
    token: int | None
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    """The result of one request."""

    request_id: int
    token_ids: list[int]  # generated tokens only
    finish_reason: str
    arrival_time: float
    first_token_time: float | None
    finish_time: float
    text: str | None = None
    adapter: str | None = None
    num_preemptions: int = 0
    error: str | None = None
