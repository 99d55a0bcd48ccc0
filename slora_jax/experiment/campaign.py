"""Campaigns: several experiments run in one process, under a time budget, into one compact summary.

A campaign file (YAML, `experiments/campaigns/`) lists experiments, each an
experiment config with overrides (a sweep of its own, or not), plus overrides
common to all, the overrides of a `--smoke` run (a tiny CPU run of the same
structure), and targets (ratios of two points' metrics with a minimum):

    name: issue6_jax
    common: {time_limit_s: 15, adapters.distinct: 8}
    smoke: {model.name: tiny}
    experiments:
      - {name: s1, config: ../configs/slora_s1.yaml, overrides: {sweep.adapters.n: [5, 100, 1000]}}
    targets:
      - name: s1_n1000_over_n5
        metric: throughput_tok_s
        num: {experiment: slora_s1, system: slora, adapters.n: 1000}
        den: {experiment: slora_s1, system: slora, adapters.n: 5}
        min: 0.95

Every point runs in this process: the model is built once and shared, jit
caches are shared, and each system is warmed before its clock starts by
compiling exactly the shapes the run can need (`prepare`): for the engine, the
adapter shape bounds grown by one request per rank (or every adapter the trace
uses loaded, with `preload_adapters`), then one step per token bucket; for the
static-batch baselines, each (prompt, cache) length bucket and merge.

Each point records the XLA compilations of its warm-up and of its timed replay
(`compiles`; any in the replay means the warm-up missed a shape). The summary
(`<out>/<name>.json`) is rewritten after every point, so a run that is killed
leaves what it finished. A point starts only while the budget
leaves its time limit plus a reserve; past the budget a running point is
interrupted (SIGALRM) and recorded as `cut`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import yaml
from tqdm.auto import tqdm

from slora_jax.config import ExperimentConfig
from slora_jax.engine import Engine
from slora_jax.errors import ConfigError
from slora_jax.experiment import plots
from slora_jax.experiment.config_io import load_experiment, point_label, sweep_points
from slora_jax.experiment.runner import (
    SystemFactory,
    adapters_used,
    preload_adapters,
    run_point,
    serve_requests,
)
from slora_jax.provenance import git_commit
from slora_jax.workload import TraceRequest


@dataclasses.dataclass(frozen=True)
class Point:
    entry: str  # the campaign entry it comes from
    exp: ExperimentConfig  # resolved, no sweep
    point: dict[str, Any]  # the swept keys' values, and the system

    @property
    def key(self) -> str:
        return point_key(self.exp.name, self.point)


@dataclasses.dataclass(frozen=True)
class Campaign:
    name: str
    path: str
    points: list[Point]
    targets: list[dict[str, Any]]


def point_key(experiment: str, point: dict[str, Any]) -> str:
    return f"{experiment}:{json.dumps(point, sort_keys=True)}"


def load_campaign(path: str, smoke: bool = False) -> Campaign:
    """The campaign's points in file order (each experiment's sweep expanded), `smoke` overrides applied."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the campaign: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("experiments"), list):
        raise ConfigError(f"{path}: a campaign is a mapping with a list of `experiments`")
    unknown = set(raw) - {"name", "common", "smoke", "experiments", "targets"}
    if unknown:
        raise ConfigError(f"{path}: unknown campaign keys {sorted(unknown)}")
    here = os.path.dirname(os.path.abspath(path))
    points: list[Point] = []
    for i, entry in enumerate(raw["experiments"]):
        if not isinstance(entry, dict) or "config" not in entry:
            raise ConfigError(f"{path}: experiments[{i}] needs a `config` (an experiment YAML)")
        overrides = {**(raw.get("common") or {}), **(entry.get("overrides") or {})}
        if smoke:
            overrides.update({**(raw.get("smoke") or {}), **(entry.get("smoke") or {})})
        exp = load_experiment(os.path.join(here, entry["config"]), overrides)
        for point, cfg in sweep_points(exp):
            points.append(Point(entry.get("name", exp.name), cfg, {**point, "system": cfg.system}))
    keys = [p.key for p in points]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{path}: two entries give the same point; give them different sweeps")
    targets = raw.get("targets") or []
    for t in targets:
        missing = {"name", "metric", "num", "den"} - set(t)
        if missing:
            raise ConfigError(f"{path}: target {t.get('name', '?')!r} lacks {sorted(missing)}")
    return Campaign(raw.get("name") or os.path.splitext(os.path.basename(path))[0], path, points, targets)


# ------------------------------------------------------------------------------------------- warming systems
def token_buckets(min_tokens: int, max_tokens: int) -> list[int]:
    """The engine's token buckets: powers of two from max(16, min_tokens) up to cover max_tokens."""
    lo = 1 << (max(16, min_tokens) - 1).bit_length()
    hi = 1 << (max(max_tokens, lo) - 1).bit_length()
    return [1 << k for k in range(lo.bit_length() - 1, hi.bit_length())]


def warm_engine(engine: Engine, exp: ExperimentConfig, trace: Sequence[TraceRequest], names: list[str]) -> int:
    """Compile every shape the engine's step can take in this run; returns the warm-up steps taken.

    First one-token requests on one adapter of each configured rank (or given folder), so the store's
    adapter shape bounds (which only grow) reach their largest; with `exp.preload_adapters`, on every
    adapter the trace uses instead (they stay resident). Then, for each token bucket, one step of
    prompts filling it, on those adapters and, if the trace has base-model requests, on none (a batch
    with no adapter is another shape), each generating two tokens (prompt steps and a decode step).
    """
    ec = engine.config
    steps0 = engine.num_steps
    trace = list(trace)
    with_adapters = any(r.adapter is not None for r in trace)
    resident: list[str] = []
    if with_adapters and exp.preload_adapters:
        resident = adapters_used(trace, names)
        preload_adapters(engine, resident)
    elif with_adapters:
        resident = names[: min(len(names), len(exp.adapters.folders) or len(exp.adapters.ranks))]
        preload_adapters(engine, resident)
    kinds: list[list[str | None]] = [resident[-ec.max_num_seqs:]] if resident else []
    if not with_adapters or any(r.adapter is None for r in trace):
        kinds.append([None])
    longest = ec.max_model_len - 2  # room for the two generated tokens
    for bucket in token_buckets(ec.min_batch_tokens, ec.max_batch_tokens):
        total = min(bucket, ec.max_batch_tokens)
        k = -(-total // longest)
        if k > ec.max_num_seqs:
            continue  # no step can hold this many tokens
        lens = [total // k + (i < total % k) for i in range(k)]
        for adapters in kinds:
            # Two tokens each: the prompt steps, then a decode-only step (attention without chunks,
            # another compiled variant of the step).
            serve_requests(engine, [(n, adapters[i % len(adapters)]) for i, n in enumerate(lens)], max_new_tokens=2)
    return engine.num_steps - steps0


def prepare(system, exp: ExperimentConfig, trace: list[TraceRequest], prompts: dict, names: list[str]) -> None:
    """Ready a system before its clock starts: compile what the run needs (see the module docstring)."""
    del prompts
    if isinstance(system, Engine):
        warm_engine(system, exp, trace, names)
    elif hasattr(system, "warm") and trace:
        system.warm((min(r.input_len for r in trace), max(r.input_len for r in trace)),
                    (min(r.output_len for r in trace), max(r.output_len for r in trace)))
    COMPILES.mark()


class CompileCounter:
    """XLA compilations (count, seconds) seen through `jax.monitoring`; `mark()` notes where warm-up ended."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        self.marked = (0, 0.0)
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
            self.seconds += duration_secs

    def mark(self) -> None:
        self.marked = (self.count, self.seconds)

    def since(self, start: tuple[int, float]) -> dict[str, float]:
        """Compiles from `start` to the mark (setup and warm-up) and from the mark on (the timed replay)."""
        (c0, s0), (c1, s1) = start, self.marked
        return {"warm": c1 - c0, "warm_s": round(s1 - s0, 2), "replay": self.count - c1,
                "replay_s": round(self.seconds - s1, 2)}


COMPILES = CompileCounter()


# ------------------------------------------------------------------------------------------- targets
def _select(records: list[dict], sel: dict[str, Any]) -> dict | None:
    for r in records:
        if r["experiment"] == sel.get("experiment", r["experiment"]) and all(
                r["point"].get(k) == v for k, v in sel.items() if k != "experiment"):
            return r
    return None


def evaluate_targets(records: list[dict], targets: list[dict]) -> list[dict]:
    """Each target's ratio num/den of `metric` (None where a point is missing, failed or has no value)."""
    out = []
    for t in targets:
        row = {k: t.get(k) for k in ("name", "text", "metric", "min")}
        values = []
        for side in ("num", "den"):
            r = _select(records, t[side])
            v = None if r is None or r["status"] != "ok" else (r.get("metrics") or {}).get(t["metric"])
            row[side] = {**t[side], "value": v, "status": None if r is None else r["status"]}
            values.append(v)
        num, den = values
        row["value"] = num / den if num is not None and den else None
        # The same ratio at the HBM floor: each run's generated tokens over the bytes its steps had to
        # read (bandwidth cancels). A target above it asks for more than the hardware allows.
        if t["metric"] == "throughput_tok_s":
            bpt = [((_select(records, t[side]) or {}).get("metrics") or {}).get("bytes_per_generated_token")
                   for side in ("num", "den")]  # an oom or error point has metrics None
            row["value_at_floor"] = bpt[1] / bpt[0] if all(bpt) else None
        row["met"] = None if row["value"] is None or t.get("min") is None else bool(row["value"] >= t["min"])
        out.append(row)
    return out


def targets_table(rows: list[dict]) -> str:
    lines = [f"{'target':40} {'value':>9} {'min':>6}  met  {'at floor':>8}"]
    for t in rows:
        v = "-" if t["value"] is None else f"{t['value']:.3f}"
        f = "-" if t.get("value_at_floor") is None else f"{t['value_at_floor']:.3f}"
        lines.append(f"{t['name']:40} {v:>9} {t['min'] if t['min'] is not None else '-':>6}  "
                     f"{'-' if t['met'] is None else ('yes' if t['met'] else 'NO '):3}  {f:>8}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- output
def write_plots(out: str, prefix: str, records: list[dict]) -> list[str]:
    """One PNG per experiment (requests/s and tokens/s panels) at the top of `out`."""
    paths = []
    by_exp: dict[str, list[dict]] = {}
    for r in records:
        by_exp.setdefault(r["experiment"], []).append(r)
    for name, rs in by_exp.items():
        summaries = [{**r, "name": r["experiment"]} for r in rs]
        paths.append(plots.plot_throughput(os.path.join(out, f"{prefix}_{name}.png"), summaries, name))
    return paths


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class BudgetExceeded(Exception):
    """The campaign's time budget ran out during a point."""


def _alarm(signum, frame):
    raise BudgetExceeded("the campaign's time budget ran out")


def run_campaign(campaign: Campaign, out: str, *, budget_s: float = 0.0, reserve_s: float = 20.0,
                 start: float | None = None, work_dir: str = "", records_dir: str = "",
                 factories: dict[str, SystemFactory] | None = None, resume: Sequence[dict] = (),
                 do_plots: bool = True, facts: dict[str, Any] | None = None,
                 echo: Callable[[str], None] = print) -> dict:
    """Run every point of `campaign`; write `<out>/<name>.json` (after each point) and PNGs; return the summary.

    budget_s (0: none) counts from `start` (default: now); a point starts only if at least its
    `time_limit_s` + `reserve_s` is left. `work_dir` holds the random adapters, reused by later runs
    (default: `slora_jax_campaign` in the temporary folder, not under `out`: they are GBs); `records_dir`, if set, also gets each point's full results folder (per-request
    records, trace, CDF plots). `factories` builds systems the library does not (e.g. hf_peft).
    `resume`: records of an earlier summary; points recorded there as ok or oom are not run again.
    """
    start = time.monotonic() if start is None else start
    os.makedirs(out, exist_ok=True)
    work_dir = work_dir or os.path.join(tempfile.gettempdir(), "slora_jax_campaign")  # not under `out`: GBs
    path = os.path.join(out, f"{campaign.name}.json")
    done = {point_key(r["experiment"], r["point"]): r for r in resume if r["status"] in ("ok", "oom")}
    summary: dict[str, Any] = {
        "campaign": campaign.name, "file": os.path.relpath(campaign.path), "git_commit": git_commit(),
        "device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__,
        "python": platform.python_version(), "argv": sys.argv, "budget_s": budget_s, **(facts or {}),
        "points": [], "skipped": [], "targets": [], "target_defs": campaign.targets,
    }
    models: dict = {}
    factories = factories or {}
    if budget_s:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(budget_s - (time.monotonic() - start))))
    bar = tqdm(campaign.points, desc=campaign.name, unit="point", mininterval=2.0)
    try:
        for p in bar:
            bar.set_postfix_str(f"{p.exp.name} {point_label(p.point)}"[:60])
            if p.key in done:
                summary["points"].append({**done[p.key], "resumed": True})
                continue
            left = budget_s - (time.monotonic() - start) if budget_s else float("inf")
            if left < p.exp.time_limit_s + reserve_s:
                summary["skipped"].append({"experiment": p.exp.name, "point": p.point, "why": f"budget: {left:.0f} s left"})
                continue
            summary["points"].append(_run_one(p, work_dir, records_dir, factories, models))
            r = summary["points"][-1]
            m = r.get("metrics") or {}
            bar.write(f"{p.exp.name:16} {point_label(p.point)[:58]:58} {r['status']:6} "
                      f"{m.get('throughput_req_s') or 0:8.2f} req/s {m.get('throughput_tok_s') or 0:9.1f} tok/s "
                      f"({r['wall_s']:.0f} s)")
            summary["wall_s"] = time.monotonic() - start
            summary["targets"] = evaluate_targets(summary["points"], campaign.targets)
            _write_json(path, summary)
    except BudgetExceeded:
        summary["points"].append({"experiment": p.exp.name, "entry": p.entry, "system": p.exp.system,
                                  "point": p.point, "status": "cut", "error": "the budget ran out during the point"})
    finally:
        if budget_s:
            signal.alarm(0)
        bar.close()
    seen = {point_key(r["experiment"], r["point"]) for r in summary["points"] + summary["skipped"]}
    summary["skipped"] += [{"experiment": p.exp.name, "point": p.point, "why": "budget: the campaign stopped"}
                           for p in campaign.points if p.key not in seen]
    summary["wall_s"] = time.monotonic() - start
    summary["targets"] = evaluate_targets(summary["points"], campaign.targets)
    _write_json(path, summary)
    if do_plots:
        summary["plots"] = [os.path.basename(x) for x in
                            write_plots(out, campaign.name, [r for r in summary["points"] if r.get("metrics")
                                                             or r["status"] == "oom"])]
        _write_json(path, summary)
    echo(plots.metrics_table([{**r, "name": r["experiment"]} for r in summary["points"]]))
    echo(targets_table(summary["targets"]))
    echo(f"summary: {path} ({summary['wall_s']:.0f} s; {len(summary['skipped'])} points skipped)")
    return summary


def _run_one(p: Point, work_dir: str, records_dir: str, factories: dict[str, SystemFactory], models: dict) -> dict:
    t = time.monotonic()
    start = (COMPILES.count, COMPILES.seconds)
    COMPILES.marked = start
    exp = dataclasses.replace(p.exp, output_dir=work_dir)
    out_dir = os.path.join(records_dir, exp.name, point_label(p.point)) if records_dir else ""
    record = {"experiment": p.exp.name, "entry": p.entry, "system": p.exp.system, "point": p.point}
    try:
        res = run_point(exp, out_dir, p.point, factories.get(exp.system), models, write=bool(records_dir),
                        prepare=prepare)
        record.update({k: res.summary[k] for k in ("status", "error", "metrics", "memory", "memory_plan_gib")})
        record["run"] = {k: v for k, v in res.summary["run"].items()
                         if k not in ("git_commit", "jax_version", "device")}
    except BudgetExceeded:
        raise
    except Exception as e:  # noqa: BLE001 - one failed point must not lose the others
        record.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                      traceback=traceback.format_exc()[-3000:])
    record["compiles"] = COMPILES.since(start)  # replay > 0: the warm-up missed a shape
    record["wall_s"] = time.monotonic() - t
    return record


def combine(summaries: Sequence[dict], name: str = "combined") -> dict:
    """Summaries of several runs as one (later runs' points replace earlier ones'), targets recomputed."""
    points: dict[str, dict] = {}
    target_defs: dict[str, dict] = {}
    for s in summaries:
        for r in s["points"]:
            points[point_key(r["experiment"], r["point"])] = r
        for t in s.get("target_defs", []):
            target_defs[t["name"]] = t
    records = list(points.values())
    return {"campaign": name, "sources": [{k: s.get(k) for k in ("campaign", "git_commit", "device", "jax_version",
                                                                 "wall_s")} for s in summaries],
            "points": records, "targets": evaluate_targets(records, list(target_defs.values())),
            "target_defs": list(target_defs.values())}
