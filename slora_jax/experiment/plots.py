"""Plots (matplotlib PNG) and the metrics table of results folders.

- `plot_run`: latency and first-token-latency CDFs of one run.
- `plot_sweep`: throughput (req/s or tokens/s) of each sweep point, against the
  number of adapters when the sweep varies `adapters.n` (one line per other setting),
  else as bars grouped by setting, one per system; `plot_throughput`: both metrics in one PNG.
- `compare`: results folders (runs or sweeps) side by side; `slora-jax plot`.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Sequence

import numpy as np

from slora_jax.workload.metrics import RequestRecord, load_records

TABLE_COLUMNS = [  # (header, metric key, format)
    ("req/s", "throughput_req_s", "{:.2f}"),
    ("tok/s", "throughput_tok_s", "{:.1f}"),
    ("avg lat s", "avg_latency_s", "{:.2f}"),
    ("1st tok p50", "first_token_p50_s", "{:.3f}"),
    ("1st tok p90", "first_token_p90_s", "{:.3f}"),
    ("SLO att", "slo_attainment", "{:.3f}"),
    ("satisf", "user_satisfaction", "{:.3f}"),
    ("aborted", "num_aborted", "{}"),
]


METRIC_LABELS = {"throughput_req_s": "throughput (requests/s)", "throughput_tok_s": "throughput (generated tokens/s)"}


def _pyplot():
    """matplotlib's pyplot (Agg), imported on first use: the metrics table needs no matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, title: str = "", dpi: int = 120) -> str:
    """Title (if any), tight layout, PNG at `path`, figure closed; returns `path`."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def run_label(summary: dict[str, Any]) -> str:
    point = summary.get("point") or {}
    return ",".join(f"{k}={v}" for k, v in point.items()) or f"{summary['name']} ({summary['system']})"


def metrics_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: one row per run, the main metrics as columns."""
    rows = [["run", "status", *(h for h, _, _ in TABLE_COLUMNS)]]
    for s in summaries:
        m = s.get("metrics") or {}
        cells = ["-" if m.get(k) is None else fmt.format(m[k]) for _, k, fmt in TABLE_COLUMNS]
        rows.append([run_label(s), s["status"], *cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _cdf(ax, values: Sequence[float], label: str) -> None:
    x = np.sort(np.asarray(values, np.float64))
    if x.size:
        ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=label)


def _cdf_figure(path: str, series: dict[str, Sequence[float]], xlabel: str, slo_s: float | None = None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        _cdf(ax, values, label)
    if slo_s is not None:
        ax.axvline(slo_s, color="grey", linestyle=":", label=f"SLO {slo_s:g} s")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _latencies(records: Sequence[RequestRecord]) -> tuple[list[float], list[float]]:
    lat = [r.latency for r in records if r.finish_reason in ("stop", "length")]
    ftl = [r.first_token_latency for r in records if r.first_token_s is not None]
    return lat, ftl


def plot_run(out_dir: str, records: Sequence[RequestRecord], slo_s: float | None = None, label: str = "") -> list[str]:
    """`latency_cdf.png` and `first_token_cdf.png` of one run; returns the paths."""
    lat, ftl = _latencies(records)
    paths = [os.path.join(out_dir, "latency_cdf.png"), os.path.join(out_dir, "first_token_cdf.png")]
    _cdf_figure(paths[0], {label or "latency": lat}, "request latency (s)")
    _cdf_figure(paths[1], {label or "first token": ftl}, "first-token latency (s)", slo_s)
    return paths


def _draw_sweep(ax, summaries: Sequence[dict[str, Any]], metric: str) -> None:
    """`metric` against adapters.n (log x; one line per other setting; `oom` points as red x on the axis)."""
    lines: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for s in summaries:
        if not s.get("metrics") or s["metrics"].get(metric) is None:
            continue
        point = dict(s["point"])
        n = point.pop("adapters.n")
        label = ",".join(f"{k}={v}" for k, v in point.items()) or s["system"]
        lines[label].append((n, s["metrics"][metric]))
    for label, xy in lines.items():
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label)
    for s in summaries:  # runs that did not fit: marked on the axis
        if s["status"] == "oom":
            ax.plot([s["point"]["adapters.n"]], [0], marker="x", color="red", linestyle="none")
    ns = sorted({s["point"]["adapters.n"] for s in summaries})
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("number of adapters")
    if lines:
        ax.legend(fontsize=7)


def _draw_grouped(ax, summaries: Sequence[dict[str, Any]], metric: str) -> None:
    """Bars of `metric`: one group per setting other than the system, one bar per system in it."""
    def setting(s):
        return ",".join(f"{k}={v}" for k, v in (s.get("point") or {}).items() if k != "system") or s["name"]

    groups = list(dict.fromkeys(setting(s) for s in summaries))
    systems = list(dict.fromkeys(s["system"] for s in summaries))
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        values = {setting(s): (s.get("metrics") or {}).get(metric) or 0 for s in summaries if s["system"] == system}
        ax.bar([i + (j - (len(systems) - 1) / 2) * width for i in range(len(groups))],
               [values.get(g, 0) for g in groups], width, label=system)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=7)
    if len(systems) > 1:
        ax.set_yscale("log")  # systems differ by orders of magnitude
        ax.legend(fontsize=7)


def _draw(ax, summaries: Sequence[dict[str, Any]], metric: str) -> None:
    if any("adapters.n" in (s.get("point") or {}) for s in summaries):
        _draw_sweep(ax, summaries, metric)
    else:
        _draw_grouped(ax, summaries, metric)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(alpha=0.3)


def plot_sweep(out_dir: str, summaries: Sequence[dict[str, Any]], metric: str = "throughput_req_s") -> str:
    """`sweep_<metric>.png`: against adapters.n (log x) when swept, else bars grouped by setting."""
    path = os.path.join(out_dir, f"sweep_{metric}.png")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw(ax, summaries, metric)
    return save_figure(fig, path)


def plot_throughput(path: str, summaries: Sequence[dict[str, Any]], title: str = "") -> str:
    """One PNG, two panels: requests/s and generated tokens/s of `summaries` (as `plot_sweep` draws them)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("throughput_req_s", "throughput_tok_s")):
        _draw(ax, summaries, metric)
    return save_figure(fig, path, title, dpi=110)


def load_results(path: str) -> list[tuple[dict[str, Any], list[RequestRecord]]]:
    """(metrics.json, records) of a run folder, or of every point of a sweep folder."""
    if os.path.exists(os.path.join(path, "metrics.json")):
        with open(os.path.join(path, "metrics.json")) as f:
            summary = json.load(f)
        return [(summary, load_records(os.path.join(path, "requests.jsonl")))]
    subdirs = sorted(d for d in os.listdir(path) if os.path.exists(os.path.join(path, d, "metrics.json")))
    if not subdirs:
        raise FileNotFoundError(f"{path}: neither a results folder (metrics.json) nor a sweep of them")
    return [run for d in subdirs for run in load_results(os.path.join(path, d))]


def compare(paths: Sequence[str], out_dir: str) -> list[str]:
    """Redraw and compare results folders: CDFs overlaid, throughput per run; prints nothing, returns PNG paths."""
    runs = [run for p in paths for run in load_results(p)]
    os.makedirs(out_dir, exist_ok=True)
    lat, ftl = {}, {}
    for summary, records in runs:
        label = f"{os.path.basename(summary['name'])}: {run_label(summary)}"
        lat[label], ftl[label] = _latencies(records)
    slo = next((s["metrics"]["slo_s"] for s, _ in runs if s.get("metrics")), None)
    out = [os.path.join(out_dir, "latency_cdf.png"), os.path.join(out_dir, "first_token_cdf.png")]
    _cdf_figure(out[0], lat, "request latency (s)")
    _cdf_figure(out[1], ftl, "first-token latency (s)", slo)
    out += [plot_sweep(out_dir, [s for s, _ in runs], m) for m in ("throughput_req_s", "throughput_tok_s")]
    return out
