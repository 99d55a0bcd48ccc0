"""The serving engine: requests, scheduling policies, on-device sampling, the step loop."""

from slora_jax.engine.engine import Engine
from slora_jax.engine.request import Completion, TokenEvent
from slora_jax.engine.sampling import SamplingParams
from slora_jax.engine.scheduler import SCHEDULERS, Scheduler

__all__ = ["Completion", "Engine", "SCHEDULERS", "SamplingParams", "Scheduler", "TokenEvent"]
