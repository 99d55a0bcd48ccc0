"""Device time from a JAX profiler trace (Perfetto JSON), for the benchmark scripts.

`gpu_kernels(run)` runs `run()` under `jax.profiler.trace` and returns the
device kernel events `(device_name, kernel_name, start_us, dur_us)`, or None
when no trace is written (e.g. on a CPU). `summarize` ranks kernels by time
and reports the device's busy time against the span; `by_category` splits each
device's time into kernel categories (collectives, matmuls, attention, ...) to
see where a tensor-parallel step's time goes.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import shutil
import tempfile

import jax


def gpu_kernels(run) -> list[tuple[str, str, float, float]] | None:
    d = tempfile.mkdtemp()
    try:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            run()
        files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            return None
        with gzip.open(files[0]) as f:
            ev = json.load(f)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    pids = {e["pid"]: e["args"].get("name", "") for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p: n for p, n in pids.items() if "/device:GPU" in n or "GPU" in n and "host" not in n.lower()}
    return [(gpu[e["pid"]], e["name"], e["ts"], e["dur"]) for e in ev
            if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]


def _busy(spans: list[tuple[float, float]]) -> tuple[float, float, list[float]]:
    """(busy time = union of the intervals, span, idle gaps) of `(start, end)` intervals."""
    spans = sorted(spans)
    busy, gaps, end = 0.0, [], spans[0][0] if spans else 0.0
    for a, b in spans:
        if a > end:
            gaps.append(a - end)
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return busy, (end - spans[0][0] if spans else 0.0), gaps


def summarize(kernels, top: int = 12) -> dict:
    """Kernels ranked by summed time; busy time (union over all devices) against the span."""
    by, calls = {}, {}
    for _, name, _, dur in kernels:
        by[name] = by.get(name, 0.0) + dur
        calls[name] = calls.get(name, 0) + 1
    busy, span, gaps = _busy([(ts, ts + dur) for _, _, ts, dur in kernels])
    ranked = sorted(by.items(), key=lambda kv: -kv[1])[:top]
    return {"device_us_total": sum(by.values()), "kernels": sum(calls.values()), "span_us": span, "busy_us": busy,
            "idle_gaps_over_50us": {"count": sum(g > 50 for g in gaps), "us": sum(g for g in gaps if g > 50),
                                    "largest_us": sorted(gaps)[-5:]},
            "top": [{"name": n[:120], "us": u, "calls": calls[n]} for n, u in ranked]}


CATEGORIES = (  # first match wins; names as XLA / NCCL / Pallas (Triton) kernels appear in traces
    # XLA names a fused collective after its HLO op: psum (all-reduce), all_gather
    ("collective", re.compile(r"nccl|psum|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|collective|one_shot|"
                              r"two_shot", re.I)),
    ("lora", re.compile(r"sgmv|lora|shrink|expand", re.I)),
    ("attention", re.compile(r"attention|paged", re.I)),
    ("matmul", re.compile(r"gemm|matmul|cublas|cutlass|dot|nvjet|sm90_xmma", re.I)),
)


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if pat.search(name):
            return cat
    return "other"


def by_category(kernels, steps: int, top: int = 6) -> dict:
    """Per device and per step: kernel time by category, busy time and span (µs); the
    devices' mean; and each category's largest kernels (summed over devices and steps)."""
    devices = sorted({d for d, *_ in kernels})
    per = {}
    for dev in devices:
        ks = [k for k in kernels if k[0] == dev]
        cats = {}
        for _, name, _, dur in ks:
            cats[category(name)] = cats.get(category(name), 0.0) + dur / steps
        busy, span, _ = _busy([(ts, ts + dur) for _, _, ts, dur in ks])
        per[dev] = {"us_per_step": cats, "busy_us_per_step": busy / steps, "span_us_per_step": span / steps,
                    "kernels_per_step": len(ks) / steps}
    mean = {}
    for v in per.values():
        for c, us in v["us_per_step"].items():
            mean[c] = mean.get(c, 0.0) + us / len(per)
    tops = {c: summarize([k for k in kernels if category(k[1]) == c], top=top)["top"]
            for c in sorted({category(k[1]) for k in kernels})}
    return {"devices": len(per), "mean_us_per_step": mean, "per_device": per, "top": tops}
