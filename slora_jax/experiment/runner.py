"""Run an experiment: build the model, adapters, trace and system, replay the trace, write the results.

A results folder holds `config.yaml` (the resolved config), `trace.jsonl`,
`requests.jsonl` (one `RequestRecord` per request), `metrics.json` (status,
serving metrics, pool memory, run facts) and PNG plots. A sweep writes one such
folder per point under `<output_dir>/<name>/`, plus `sweep.json` and a plot
comparing the points.

Replay is `online` (each request is submitted when the wall clock reaches its
arrival time, and stamped with that time) or `offline` (everything at once:
maximum throughput). Every system offers the engine's API (`add_adapter`,
`submit`, `step`, `has_unfinished`, `release`, `memory_report`); optionally
`check_fits(n)` (refuse n adapters up front), `deadline` (the replay's time
limit, for systems whose step can run long) and `close()` (after the run).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.adapters.peft import WEIGHTS_NAME, load_adapter
from slora_jax.adapters.random import random_adapter, save_peft_adapter
from slora_jax.baselines import MergedCopiesServer, OutOfDeviceMemory, PeftMergeServer
from slora_jax.baselines.static_batch import batch_shapes
from slora_jax.config import (
    PRESETS,
    PROJECTIONS,
    AdapterSetConfig,
    EngineConfig,
    ExperimentConfig,
    LlamaConfig,
    ModelSource,
    WorkloadConfig,
)
from slora_jax.engine import Engine, SamplingParams
from slora_jax.errors import ConfigError, RequestError
from slora_jax.experiment import plots
from slora_jax.experiment.config_io import dump, point_label, sweep_points
from slora_jax.memory.pool import PoolLayout
from slora_jax.model import init_random_params, load_checkpoint, stack_layers, unstack_layers
from slora_jax.provenance import git_commit
from slora_jax.workload import (
    RequestRecord,
    TraceRequest,
    load_trace,
    memory_summary,
    punica_trace,
    save_records,
    save_trace,
    serving_metrics,
    slora_trace,
)

Clock = Callable[[], float]
# (experiment, clock) -> (system, model config); the default builds ours, scripts/bench_hf_peft.py its own.
SystemFactory = Callable[[ExperimentConfig, Clock], tuple[Any, LlamaConfig]]
# (system, experiment, trace, prompts, adapter names) -> None: readies a system before the clock starts.
Prepare = Callable[[Any, ExperimentConfig, list[TraceRequest], dict[int, list[int]], list[str]], None]
ENGINE_SYSTEMS = ("slora", "slora_no_unified")


@dataclasses.dataclass
class RunResult:
    out_dir: str
    point: dict[str, Any]
    summary: dict[str, Any]  # what metrics.json holds
    records: list[RequestRecord]


# ------------------------------------------------------------------------------------------- building blocks
def load_model(src: ModelSource) -> tuple[LlamaConfig, dict]:
    """A Hugging Face model folder, or a preset with random weights (seeded)."""
    dtype = jnp.dtype(src.dtype)
    if os.path.isdir(src.name):
        return load_checkpoint(src.name, dtype=dtype)
    if src.name in PRESETS:
        return PRESETS[src.name], init_random_params(PRESETS[src.name], jax.random.key(src.seed), dtype)
    raise ConfigError(f"model.name {src.name!r} is neither a model folder nor a preset ({sorted(PRESETS)})")


def adapter_folders(ac: AdapterSetConfig, cfg: LlamaConfig, default_dir: str) -> list[tuple[str, str]]:
    """(name, PEFT folder) of each of the `ac.n` adapters, writing missing random ones.

    Random adapters are cached under `<dir>/<model shape hash>/r<rank>_<projections>_s<seed>`
    and reused by later runs (written to a temporary folder first, so a killed run leaves none half-written).
    """
    if ac.folders:
        return [(f"adapter{i}", ac.folders[i % len(ac.folders)]) for i in range(ac.n)]
    root = os.path.join(ac.dir or default_dir, hashlib.sha1(repr(cfg).encode()).hexdigest()[:12])
    k = min(ac.distinct or ac.n, ac.n)
    folders = []
    for j in range(k):
        rank, seed = ac.ranks[j % len(ac.ranks)], ac.seed + j
        path = os.path.join(root, f"r{rank}_{'-'.join(ac.projections)}_s{seed}")
        if not os.path.exists(os.path.join(path, WEIGHTS_NAME)):
            tmp = f"{path}.tmp{os.getpid()}"
            save_peft_adapter(random_adapter(cfg, rank, ac.projections, seed=seed), tmp)
            os.replace(tmp, path)
        folders.append(path)
    return [(f"adapter{i}", folders[i % k]) for i in range(ac.n)]


def in_memory_adapters(folders: list[tuple[str, str]], cfg: LlamaConfig, cache: dict | None = None,
                       dtype: str | None = None) -> list[tuple[str, LoraAdapter]]:
    """(name, in-memory adapter) for each (name, folder): each folder read once (into `cache`, keyed
    `("adapter", folder, dtype)`), adapters of the same folder sharing its arrays; with `dtype`,
    `LoraAdapter.folded` into it (as the engine's pool holds them: packing is then a copy)."""
    cache = {} if cache is None else cache
    out = []
    for name, folder in folders:
        key = ("adapter", folder, dtype)
        if key not in cache:
            if ("adapter", folder, None) not in cache:
                cache[("adapter", folder, None)] = load_adapter(folder, cfg)
            cache[key] = cache[("adapter", folder, None)].folded(dtype) if dtype else cache[("adapter", folder, None)]
        out.append((name, dataclasses.replace(cache[key], name=name)))
    return out


def build_trace(wc: WorkloadConfig, n_adapters: int) -> list[TraceRequest]:
    if wc.kind == "slora":
        trace = slora_trace(wc.num_requests, n_adapters, wc.alpha, wc.rate, wc.cv, wc.input_len, wc.output_len,
                            wc.seed)
    elif wc.kind == "punica":
        trace = punica_trace(wc.popularity, wc.num_requests, wc.batch_size, n_adapters, wc.input_len, wc.output_len,
                             wc.seed)
    else:
        try:
            trace = load_trace(wc.trace)
        except (OSError, ValueError) as e:
            raise ConfigError(f"workload.trace: {e}") from None
        bad = [r.id for r in trace if r.adapter is not None and r.adapter >= n_adapters]
        if bad:
            raise ConfigError(f"workload.trace: requests {bad[:5]} use adapter indices >= adapters.n ({n_adapters})")
    if wc.base_fraction > 0:  # a seeded subset of the requests on the base model
        base = np.random.default_rng([wc.seed, 1]).random(len(trace)) < wc.base_fraction
        trace = [dataclasses.replace(r, adapter=None) if b else r for r, b in zip(trace, base)]
    return trace


def request_prompt(r: TraceRequest, vocab_size: int, seed: int) -> list[int]:
    """The request's prompt, or `input_len` random token ids that depend only on (seed, id)."""
    if r.prompt is not None:
        return list(r.prompt)
    return np.random.default_rng([seed, r.id]).integers(0, vocab_size, r.input_len).tolist()


def cached_model(exp: ExperimentConfig, models: dict) -> tuple[LlamaConfig, dict]:
    """`exp`'s model from `models` (loaded on a miss; one model at a time), its layers unstacked for the
    engine's unrolled layer loop, else stacked.

    The cache holds one copy: a change of form moves the weights leaf by leaf and frees the old form
    (trees returned earlier are then invalid). Keeping both forms held two copies of the weights on the
    device: a 7B model (12.6 GiB) twice beside S1's 47 GiB pool did not fit an H100 (session 26).
    """
    if exp.model not in models:
        models.clear()
        models[exp.model] = load_model(exp.model)
    cfg, params = models[exp.model]
    unrolled = exp.system in ENGINE_SYSTEMS and exp.engine.layer_loop == "unrolled"
    if unrolled != isinstance(params["layers"], (list, tuple)):
        params = unstack_layers(params, free=True) if unrolled else stack_layers(params, free=True)
        models[exp.model] = cfg, params
    return cfg, params


def slot_projections(exp: ExperimentConfig) -> tuple[str, ...]:
    """The projections `slora_no_unified`'s fixed slots hold: `engine.slot_projections`, else the random
    adapters' projections, else (given folders) all seven."""
    if exp.engine.slot_projections:
        return tuple(exp.engine.slot_projections)
    return PROJECTIONS if exp.adapters.folders else tuple(exp.adapters.projections)


def memory_plan(exp: ExperimentConfig, cfg: LlamaConfig) -> dict[str, int]:
    """Bytes the point's system holds on the device by design, by part (not counted: XLA's temporaries, and
    the opt-in slab, whose arrays are made per projection group on first use):
    the base weights; the engines' pool (and `slora_no_unified`'s slots); the static-batch baselines'
    largest dense KV cache (and `merged_copies`' copies). Recorded with every point, and named in the
    error of one that runs out of memory."""
    item = jnp.dtype(exp.model.dtype).itemsize
    ec, L = exp.engine, cfg.num_hidden_layers
    plan = {"weights": cfg.num_params() * item}
    if exp.system in ENGINE_SYSTEMS:
        plan["kv_pool"] = ec.num_pages * PoolLayout.for_model(cfg, ec.num_pages, ec.page_size, ec.lora_chunk).page_bytes(
            exp.model.dtype)
        if exp.system == "slora_no_unified":
            per_rank = sum(sum(cfg.projection_shape(p)) for p in slot_projections(exp))
            plan["adapter_slots"] = ec.max_loras * ec.max_lora_rank * L * per_rank * item
    elif exp.system in ("peft_merge", "merged_copies"):
        w = exp.workload
        B = 1 << (ec.max_num_seqs - 1).bit_length()
        T = (batch_shapes(w.input_len[1], w.output_len[1], exp.baseline.min_prompt_bucket)[1] if w.kind != "file"
             else ec.max_model_len)
        plan["dense_kv_cache"] = 2 * L * B * cfg.num_key_value_heads * T * cfg.head_dim * item
        if exp.system == "merged_copies":
            plan["model_copies"] = exp.adapters.n * plan["weights"]
    plan["total"] = sum(plan.values())
    return plan


def make_system(exp: ExperimentConfig, clock: Clock, model: tuple[LlamaConfig, dict]):
    """The system `exp.system` on the given model."""
    cfg, params = model
    ec: EngineConfig = exp.engine
    if exp.system in ENGINE_SYSTEMS:
        if exp.system == "slora_no_unified":
            ec = ec.replace(unified_memory=False, slot_projections=slot_projections(exp))
        elif not ec.unified_memory:
            raise ConfigError("engine.unified_memory=false is the system slora_no_unified; "
                              "set system: slora_no_unified")
        if exp.impl:
            if "lora_impl" not in {f.name for f in dataclasses.fields(EngineConfig)}:
                raise ConfigError(f"impl={exp.impl!r} needs EngineConfig.lora_impl, which this build does not have")
            try:
                ec = ec.replace(lora_impl=exp.impl)
            except ValueError as e:
                raise ConfigError(f"impl: {e}") from None
        return Engine(cfg, params, ec, clock=clock)
    kw = dict(max_batch_size=ec.max_num_seqs, max_model_len=ec.max_model_len,
              host_budget_bytes=ec.host_adapter_budget_bytes, clock=clock,
              min_prompt_bucket=exp.baseline.min_prompt_bucket)
    if exp.system == "peft_merge":
        return PeftMergeServer(cfg, params, **kw)
    if exp.system == "merged_copies":
        return MergedCopiesServer(cfg, params, memory_budget_bytes=exp.baseline.memory_budget_bytes, **kw)
    raise ConfigError(f"system {exp.system!r} is not built in; hf_peft runs from scripts/bench_hf_peft.py")


# ------------------------------------------------------------------------------------------- replay
class GcTimer:
    """Seconds and count of Python's garbage collections (all generations) while active."""

    def __init__(self):
        self.seconds, self.collections, self._t = 0.0, 0, None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.collections += 1
            self._t = None

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


def replay(system, trace: list[TraceRequest], prompts: dict[int, list[int]], names: list[str], exp: ExperimentConfig,
           clock: Clock, desc: str = "requests", loop_s: dict[str, float] | None = None
           ) -> tuple[list[RequestRecord], list[dict]]:
    """Serve `trace` on `system`; returns one record per submitted request and the per-step memory reports.

    Past `exp.time_limit_s` nothing more is submitted and running requests are aborted ("timeout").
    `loop_s`, if given, receives the loop's host seconds: in `system.step()` ("step") and in
    everything else ("other": submitting, recording, memory reports, sleeping for arrivals), and
    Python's garbage collections anywhere in the loop ("gc", "gc_collections"). Objects alive
    before the loop (model, adapters, trace) are frozen out of the collector meanwhile
    (`gc.freeze`), so its collections walk only what the loop allocates.
    """
    online = exp.mode == "online"
    pending = collections.deque(sorted(trace, key=lambda r: (r.arrival_s, r.id)))
    by_rid: dict[int, TraceRequest] = {}
    records: list[RequestRecord] = []
    memory: list[dict] = []
    bar = tqdm(total=len(trace), desc=desc, unit="req", disable=not exp.progress, leave=False)
    t0 = clock()
    deadline = t0 + exp.time_limit_s if exp.time_limit_s else float("inf")
    if hasattr(system, "deadline"):
        system.deadline = deadline

    def record(c, r: TraceRequest, reason: str) -> None:
        records.append(RequestRecord(
            r.id, c.adapter, r.input_len, r.output_len, c.arrival_time - t0,
            None if c.first_token_time is None else c.first_token_time - t0, c.finish_time - t0,
            len(c.token_ids), reason, c.num_preemptions, c.error, tuple(c.token_ids) if exp.save_tokens else None))
        bar.update(1)

    def submit(r: TraceRequest) -> None:
        arrival = t0 + (r.arrival_s if online else 0.0)
        adapter = None if r.adapter is None else names[r.adapter]
        try:
            rid = system.submit(prompts[r.id], adapter, SamplingParams(max_new_tokens=r.output_len,
                                                                       ignore_eos=exp.ignore_eos), arrival_time=arrival)
        except RequestError as e:
            records.append(RequestRecord(r.id, adapter, r.input_len, r.output_len, arrival - t0, None, clock() - t0, 0,
                                         "error", error=str(e)))
            bar.update(1)
            return
        by_rid[rid] = r

    in_step = 0.0
    gc.freeze()
    t_loop = time.perf_counter()
    try:
        with GcTimer() as gct:
            while (pending or system.has_unfinished()) and clock() < deadline:
                now = clock() - t0
                while pending and (not online or pending[0].arrival_s <= now):
                    submit(pending.popleft())
                if system.has_unfinished():
                    t = time.perf_counter()
                    events = system.step()
                    in_step += time.perf_counter() - t
                    for ev in events:
                        if ev.finish_reason is not None:
                            c = system.release(ev.request_id)
                            record(c, by_rid.pop(ev.request_id), c.finish_reason)
                    memory.append(system.memory_report())
                elif pending:
                    time.sleep(min(max(pending[0].arrival_s - (clock() - t0), 0.0), 0.05))
    finally:
        gc.unfreeze()
    if loop_s is not None:
        loop_s.update(step=in_step, other=time.perf_counter() - t_loop - in_step, gc=gct.seconds,
                      gc_collections=gct.collections)
    for rid, r in list(by_rid.items()):  # the time limit cut these off
        system.abort(rid)
        record(system.release(rid), r, "timeout")
    bar.close()
    return sorted(records, key=lambda rec: rec.id), memory


def serve_requests(system, requests: list[tuple[int, str | None]], seed: int = 0, max_new_tokens: int = 1) -> None:
    """Serve requests of (prompt length, adapter) with random prompts to completion; their results are dropped."""
    rng = np.random.default_rng(seed)
    sp = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    ids = [system.submit(rng.integers(0, system.cfg.vocab_size, n).tolist(), a, sp) for n, a in requests]
    while system.has_unfinished():
        system.step()
    for i in ids:
        system.release(i)


def adapters_used(trace: list[TraceRequest], names: list[str]) -> list[str]:
    """The adapters `trace` uses, in the order of their first use."""
    return list(dict.fromkeys(names[r.adapter] for r in trace if r.adapter is not None))


def preload_adapters(engine: Engine, adapters: list[str]) -> None:
    """One-token requests on each of `adapters`, a batch at a time: they end resident in the pool (or the
    slots), as many as it holds (the last ones, if not all)."""
    step = engine.config.max_num_seqs
    for i in range(0, len(adapters), step):
        serve_requests(engine, [(16, a) for a in adapters[i: i + step]])


def warmup(system, requests: list[TraceRequest], prompts: dict[int, list[int]], names: list[str],
           exp: ExperimentConfig, clock: Clock, trace: list[TraceRequest] = ()) -> None:
    """Compile before the clock starts: `requests` (on adapters 0, 1, ... so every rank is seen) all
    together, then one at a time, offline; their records are dropped. All together first: the engine's
    batch shape bounds only grow, so they reach their largest at once and the rest reuses them.
    With `exp.preload_adapters`, an engine then loads the adapters `trace` uses."""
    if requests:
        requests = [dataclasses.replace(r, adapter=i % len(names)) for i, r in enumerate(requests)]
        warm = dataclasses.replace(exp, mode="offline", progress=False, time_limit_s=0.0)
        replay(system, requests, prompts, names, warm, clock)
        for r in requests:
            replay(system, [r], prompts, names, warm, clock)
    if exp.preload_adapters and isinstance(system, Engine):
        preload_adapters(system, adapters_used(list(trace), names))


# ------------------------------------------------------------------------------------------- one run
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (OutOfDeviceMemory, MemoryError)) or "RESOURCE_EXHAUSTED" in str(e)


def device_memory_gib(device=None) -> dict[str, float] | None:
    """The device allocator's numbers in GiB: in use now, the process's peak so far, the limit and the largest
    free block; None where the backend keeps none (the CPU)."""
    stats = (device or jax.devices()[0]).memory_stats()
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_free_block_bytes")
    return {k.replace("_bytes", "").replace("bytes_", ""): round(stats[k] / 2**30, 3) for k in keys if k in stats}


def run_point(exp: ExperimentConfig, out_dir: str, point: dict[str, Any] | None = None,
              system_factory: SystemFactory | None = None, models: dict | None = None,
              clock: Clock = time.monotonic, write: bool = True, prepare: Prepare | None = None) -> RunResult:
    """Run one experiment (no sweep) into `out_dir` (`write=False`: write nothing, return the results).

    `models` caches the model (and in-memory adapters) across calls; `prepare` replaces the
    warm-up by `exp.warmup_requests` (scripts/gpu_experiments.py warms compiles its own way).
    """
    if exp.sweep:
        raise ValueError("run_point runs one point; use run() for a sweep")
    models = {} if models is None else models
    if write:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(dump(exp))
    summary: dict[str, Any] = {
        "name": exp.name, "system": exp.system, "impl": exp.impl, "mode": exp.mode, "point": point or {},
        "status": "ok", "error": None, "metrics": None, "memory": None, "memory_plan_gib": None,
        "run": {"git_commit": git_commit(), "device": str(jax.devices()[0].device_kind),
                "jax_version": jax.__version__},
    }
    records: list[RequestRecord] = []
    t_setup = clock()
    system = None
    try:
        plan = lambda cfg: {k: round(v / 2**30, 3) for k, v in memory_plan(exp, cfg).items()}
        if system_factory is None:
            model = cached_model(exp, models)
            cfg = model[0]
            summary["memory_plan_gib"] = plan(cfg)  # before the system allocates: an OOM point has it too
            system = make_system(exp, clock, model)
        else:
            system, cfg = system_factory(exp, clock)
            summary["memory_plan_gib"] = plan(cfg)
        if hasattr(system, "check_fits"):
            system.check_fits(exp.adapters.n)
        adapters: list[tuple[str, Any]] = adapter_folders(exp.adapters, cfg,
                                                          os.path.join(exp.output_dir, "_adapters"))
        if exp.adapters.in_memory and exp.system != "hf_peft":
            adapters = in_memory_adapters(adapters, cfg, models,
                                          exp.model.dtype if exp.system in ENGINE_SYSTEMS else None)
        trace = build_trace(exp.workload, exp.adapters.n)
        if write:
            save_trace(trace, os.path.join(out_dir, "trace.jsonl"))
        prompts = {r.id: request_prompt(r, cfg.vocab_size, exp.workload.seed) for r in trace}
        for name, source in adapters:
            system.add_adapter(name, source)
        names = [n for n, _ in adapters]
        t_warm = clock()
        if prepare is None:
            warmup(system, trace[: exp.warmup_requests], prompts, names, exp, clock, trace)
        else:
            prepare(system, exp, trace, prompts, names)
        t_run = clock()
        steps_before = getattr(system, "num_steps", 0)
        host_before = dict(getattr(system, "host_seconds", {}))
        phases_before = dict(getattr(system, "phase_stats", {}))
        bytes_before = dict(getattr(system, "bytes_read", {}))
        store = getattr(system, "store", None)
        store_before = (dict(store.stats), dict(store.seconds)) if hasattr(store, "seconds") else None
        loop_s: dict[str, float] = {}
        records, memory = replay(system, trace, prompts, names, exp, clock, desc=exp.name, loop_s=loop_s)
        summary["run"]["loop_s"] = {k: round(v, 4) for k, v in loop_s.items()}
        summary["run"].update(setup_s=t_warm - t_setup, warmup_s=t_run - t_warm, replay_s=clock() - t_run,
                              num_not_submitted=len(trace) - len(records),
                              num_steps=getattr(system, "num_steps", steps_before) - steps_before)
        if hasattr(system, "host_seconds"):  # the engine's host time by phase during the replay
            summary["run"]["host_s"] = {k: round(v - host_before.get(k, 0.0), 4)
                                        for k, v in system.host_seconds.items()}
        if store_before is not None:  # the adapter store's counters and host seconds during the replay
            summary["run"]["store"] = {k: v - store_before[0].get(k, 0) for k, v in store.stats.items()}
            summary["run"]["store_s"] = {k: round(v - store_before[1].get(k, 0.0), 4) for k, v in store.seconds.items()}
        summary["metrics"] = serving_metrics(records, exp.engine.slo_first_token_s)
        if hasattr(system, "phase_stats"):  # wall seconds and sampled tokens of decode-only and mixed steps
            ph = {k: v - phases_before.get(k, 0) for k, v in system.phase_stats.items()}
            summary["run"]["phases"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in ph.items()}
            summary["metrics"]["decode_tok_s"] = (ph["decode_tokens"] / ph["decode_s"]
                                                  if ph.get("decode_s") else None)
        if hasattr(system, "bytes_read"):  # what the replay's steps had to read (the HBM floor's bytes)
            read = {k: v - bytes_before.get(k, 0) for k, v in system.bytes_read.items()}
            tokens = summary["metrics"].get("generated_tokens") or 0
            summary["run"]["bytes_read"] = read
            summary["metrics"]["bytes_per_generated_token"] = sum(read.values()) / tokens if tokens else None
        summary["memory"] = memory_summary(memory)
    except ConfigError:
        raise
    except Exception as e:
        if not _is_oom(e):
            raise
        plan = summary.get("memory_plan_gib")
        limit = (device_memory_gib() or {}).get("limit")
        note = "" if plan is None else (" [planned GiB: " + ", ".join(f"{k} {v}" for k, v in plan.items())
                                        + ("" if limit is None else f"; device limit {limit}") + "]")
        summary.update(status="oom", error=f"{type(e).__name__}: {e}{note}")
    finally:
        summary["run"]["device_memory_gib"] = device_memory_gib()  # also for an oom point: what held the memory
        if hasattr(system, "close"):
            system.close()
        del system
        gc.collect()
    if write:
        save_records(records, os.path.join(out_dir, "requests.jsonl"))
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if records:
            plots.plot_run(out_dir, records, exp.engine.slo_first_token_s)
    return RunResult(out_dir, point or {}, summary, records)


def run(exp: ExperimentConfig, system_factory: SystemFactory | None = None, echo: Callable[[str], None] = print,
        clock: Clock = time.monotonic) -> list[RunResult]:
    """Run `exp` (every point of its sweep) into `<output_dir>/<name>/`; prints a metrics table."""
    root = os.path.join(exp.output_dir, exp.name)
    points = sweep_points(exp)
    models: dict = {}
    results = []
    for i, (point, cfg) in enumerate(points):
        out_dir = root if not exp.sweep else os.path.join(root, point_label(point))
        if exp.sweep:
            echo(f"[{i + 1}/{len(points)}] {point_label(point)}")
        results.append(run_point(cfg, out_dir, point, system_factory, models, clock))
    if exp.sweep:
        with open(os.path.join(root, "sweep.json"), "w") as f:
            json.dump([r.summary for r in results], f, indent=2)
        for metric in ("throughput_req_s", "throughput_tok_s"):
            plots.plot_sweep(root, [r.summary for r in results], metric)
    echo(plots.metrics_table([r.summary for r in results]))
    echo(f"results: {root}")
    return results
