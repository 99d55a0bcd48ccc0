"""Workloads (request traces) and serving metrics."""

from slora_jax.workload.metrics import (
    RequestRecord,
    load_records,
    memory_summary,
    save_records,
    serving_metrics,
)
from slora_jax.workload.trace import (
    POPULARITY_PATTERNS,
    TraceRequest,
    load_trace,
    punica_group_sizes,
    punica_trace,
    save_trace,
    slora_trace,
)

__all__ = [
    "POPULARITY_PATTERNS",
    "RequestRecord",
    "TraceRequest",
    "load_records",
    "load_trace",
    "memory_summary",
    "punica_group_sizes",
    "punica_trace",
    "save_records",
    "save_trace",
    "serving_metrics",
    "slora_trace",
]
