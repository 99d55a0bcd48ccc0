"""Experiment configs (YAML + overrides + sweeps), the runner end to end, `slora-jax plot`, and bench_hf_peft."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import pytest

from slora_jax.cli import main as cli
from slora_jax.config import PRESETS, ExperimentConfig, LlamaConfig
from slora_jax.errors import ConfigError
from slora_jax.experiment import load_experiment, sweep_points
from slora_jax.experiment.config_io import dump, point_label
from slora_jax.workload import load_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_and_sweep_point_is_valid(path):
    exp = load_experiment(path)
    points = sweep_points(exp)
    assert points and all(isinstance(c, ExperimentConfig) and not c.sweep for _, c in points)
    assert len({point_label(p) for p, _ in points}) == len(points)  # one folder per point


def test_overrides_sweeps_and_round_trip(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nadapters: {n: 3}\nsweep:\n  adapters.n: [5, 100]\n  system: [slora, peft_merge]\n")
    exp = load_experiment(path)
    assert [(p["adapters.n"], c.adapters.n, c.system) for p, c in sweep_points(exp)] == [
        (5, 5, "slora"), (5, 5, "peft_merge"), (100, 100, "slora"), (100, 100, "peft_merge")]
    # a fixed value replaces the sweep over that key; sweep.* adds one
    exp = load_experiment(path, ["adapters.n=7", "sweep.workload.cv=[1, 4]", "engine.num_pages=64",
                                 "workload.input_len=[8, 16]"])
    assert exp.sweep == {"system": ["slora", "peft_merge"], "workload.cv": [1, 4]}
    assert exp.adapters.n == 7 and exp.engine.num_pages == 64 and exp.workload.input_len == (8, 16)
    assert point_label({"system": "slora", "adapters.ranks": [64, 32]}) == "system=slora,adapters.ranks=64-32"
    # comma-joined keys move together (a zip inside the grid)
    zipped = load_experiment(path, ['sweep={"system,engine.num_pages": [[slora, 60], [slora_no_unified, 40]]}'])
    assert [(c.system, c.engine.num_pages) for _, c in sweep_points(zipped)] == [
        ("slora", 60), ("slora_no_unified", 40)]
    with pytest.raises(ConfigError, match="swept together"):
        load_experiment(path, ['sweep={"system,engine.num_pages": [[slora, 60]]}', "system=slora"])
    with pytest.raises(ConfigError, match="one per key"):
        sweep_points(load_experiment(path, ['sweep={"system,engine.num_pages": [slora]}']))
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump(exp))
    assert load_experiment(saved) == exp


@pytest.mark.parametrize("overrides, message", [
    (["engine.bogus=1"], "bogus"),
    (["nope=1"], "nope"),
    (["system=vllm"], "system must be one of"),
    (["mode=fast"], "mode must be"),
    (["adapters.n=many"], "adapters.n"),
    (["adapters.projections=[q, x]"], "adapters.projections"),
    (["engine.num_pages=0"], "num_pages"),
    (["workload.input_len=[1, 2, 3]"], "workload.input_len"),
    (["workload.popularity=zipf"], "workload.popularity"),
    (["workload.input_len=[8, 900]"], "max_model_len"),
    (["impl=pallas", "system=peft_merge"], "impl"),
    (["sweep.system=slora"], "sweep"),
    (["adapters.n"], "key=value"),
])
def test_bad_configs_raise_config_errors_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_experiment(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_experiment(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_experiment(tmp_path / "bad.yaml")
    assert cli(["run", str(tmp_path / "list.yaml")]) == 2  # the CLI reports config errors, no traceback
    script = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/run_experiment.py"), str(tmp_path / "list.yaml")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert script.returncode == 2 and "config error" in script.stderr


QUICK = ["workload.num_requests=6", "workload.input_len=[4, 12]", "workload.output_len=[2, 6]", "workload.rate=50",
         "engine.max_batch_tokens=16", "engine.max_num_seqs=4", "adapters.n=3", "warmup_requests=3", "progress=false",
         "save_tokens=true"]


def test_quickstart_config_end_to_end_with_every_system(tmp_path, capsys):
    """The README's quickstart config, shrunk, swept over the three built-in systems: same greedy tokens."""
    out = str(tmp_path / "results")
    assert cli(["run", os.path.join(ROOT, "experiments/configs/quickstart.yaml"), f"output_dir={out}",
                "sweep.system=[slora, peft_merge, merged_copies]", *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "system=peft_merge" in printed and "req/s" in printed
    root = os.path.join(out, "quickstart")
    summaries = json.load(open(os.path.join(root, "sweep.json")))
    assert [s["system"] for s in summaries] == ["slora", "peft_merge", "merged_copies"]
    tokens = []
    for s in summaries:
        run_dir = os.path.join(root, f"system={s['system']}")
        assert s["status"] == "ok" and s["metrics"]["num_finished"] == 6
        assert s["metrics"]["generated_tokens"] == sum(r.output_len for r in load_records(f"{run_dir}/requests.jsonl"))
        for f in ("config.yaml", "trace.jsonl", "requests.jsonl", "metrics.json", "latency_cdf.png",
                  "first_token_cdf.png"):
            assert os.path.getsize(os.path.join(run_dir, f)) > 0, f
        assert load_experiment(f"{run_dir}/config.yaml").system == s["system"]
        records = load_records(f"{run_dir}/requests.jsonl")
        assert all(0 <= r.arrival_s <= r.first_token_s <= r.finish_s for r in records)
        tokens.append([r.token_ids for r in records])
    assert tokens[0] == tokens[1] == tokens[2]
    assert summaries[0]["memory"]["peak_pages_kv"] > 0 and summaries[0]["memory"]["peak_pages_adapter"] > 0
    host_s = summaries[0]["run"]["host_s"]  # the engine's host time by phase, within the replay
    assert {"schedule", "run", "dispatch", "collect", "wait", "adapter_load"} <= set(host_s)
    assert 0 < host_s["dispatch"] <= host_s["run"] and host_s["wait"] <= host_s["collect"]
    assert sum(host_s[k] for k in ("schedule", "run", "prefetch", "collect")) <= summaries[0]["run"]["replay_s"]
    assert summaries[0]["run"]["store"]["pool_hits"] > 0 and isinstance(summaries[0]["run"]["store_s"], dict)
    loop = summaries[0]["run"]["loop_s"]  # the replay loop's host time: in step() and around it, and GC pauses
    assert loop["step"] > 0 and loop["other"] >= 0 and loop["step"] + loop["other"] <= summaries[0]["run"]["replay_s"]
    assert loop["step"] >= sum(host_s[k] for k in ("schedule", "run", "prefetch", "collect"))
    assert loop["gc"] >= 0 and loop["gc_collections"] >= 0
    read = summaries[0]["run"]["bytes_read"]  # the replay's HBM-floor bytes (tests/test_engine.py checks the sums)
    assert read["weights"] > 0 and read["kv"] > 0 and read["adapters"] > 0
    m = summaries[0]["metrics"]
    assert m["bytes_per_generated_token"] == pytest.approx(sum(read.values()) / m["generated_tokens"])
    assert os.path.exists(os.path.join(root, "sweep_throughput_req_s.png"))
    assert os.path.exists(os.path.join(root, "sweep_throughput_tok_s.png"))
    # the same random adapters are reused, not rewritten, by later runs
    assert len(glob.glob(os.path.join(out, "_adapters", "*", "r*"))) == 3

    assert cli(["plot", root, "--out", str(tmp_path / "cmp")]) == 0
    assert sorted(os.listdir(tmp_path / "cmp")) == ["first_token_cdf.png", "latency_cdf.png",
                                                    "sweep_throughput_req_s.png", "sweep_throughput_tok_s.png"]
    assert cli(["plot", str(tmp_path)]) == 2  # not a results folder


def test_system_settings_checked_when_the_system_is_built(tmp_path):
    from slora_jax.experiment import run_point

    quick = os.path.join(ROOT, "experiments/configs/quickstart.yaml")
    for overrides, message in [(["impl=bogus"], "lora_impl"),  # unknown impl, or an engine without lora_impl
                               (["engine.unified_memory=false"], "slora_no_unified"),
                               (["system=hf_peft"], "bench_hf_peft"),
                               (["model.name=nope"], "neither a model folder nor a preset")]:
        exp = load_experiment(quick, [f"output_dir={tmp_path}", *QUICK, *overrides])
        with pytest.raises(ConfigError, match=message):
            run_point(exp, str(tmp_path / "run"))


def test_no_unified_slots_take_the_adapters_projections(tmp_path):
    """`slora_no_unified` reserves slots for the random adapters' projections only, unless
    `engine.slot_projections` says otherwise."""
    from slora_jax.experiment.runner import cached_model, make_system

    quick = os.path.join(ROOT, "experiments/configs/quickstart.yaml")
    for extra, want in [([], ("q", "v")), (["engine.slot_projections=[q,k,v,o]"], ("q", "k", "v", "o"))]:
        exp = load_experiment(quick, [f"output_dir={tmp_path}", "system=slora_no_unified", "adapters.projections=[v,q]",
                                      *QUICK, *extra])
        engine = make_system(exp, time.monotonic, cached_model(exp, {}))
        assert engine.store.projections == want and set(engine.store.weights) == set(want)


@pytest.mark.parametrize("system", ["slora", "slora_no_unified", "peft_merge"])
def test_memory_plan_matches_what_the_system_allocates(tmp_path, system):
    """`memory_plan`'s parts are the bytes the built system holds: weights, the pool and the slots
    (the engine's own report), the baselines' largest dense cache (a `DenseKVCache` of that shape)."""
    from slora_jax.experiment.runner import cached_model, make_system, memory_plan
    from slora_jax.model.cache import DenseKVCache

    quick = os.path.join(ROOT, "experiments/configs/quickstart.yaml")
    exp = load_experiment(quick, [f"output_dir={tmp_path}", f"system={system}", *QUICK])
    model = cached_model(exp, {})
    cfg, params = model
    plan = memory_plan(exp, cfg)
    assert plan["weights"] == sum(x.nbytes for x in jax.tree.leaves(params))
    assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
    built = make_system(exp, time.monotonic, model)
    if system == "peft_merge":
        B, (_, T) = 4, built.shapes(exp.workload.input_len[1], exp.workload.output_len[1])  # max_num_seqs 4
        cache = DenseKVCache.create(cfg, B, T, built.params["embed"]["embedding"].dtype)
        assert plan["dense_kv_cache"] == cache.k.nbytes + cache.v.nbytes and set(plan) == {"weights", "dense_kv_cache",
                                                                                           "total"}
    else:
        rep = built.memory_report()
        assert plan["kv_pool"] == rep["pages_total"] * rep["page_bytes"]
        assert plan.get("adapter_slots", 0) == rep.get("adapter_slots_bytes", 0)
        assert ("adapter_slots" in plan) == (system == "slora_no_unified")


def test_merged_copies_out_of_memory_is_a_result(tmp_path):
    from slora_jax.experiment import run

    exp = load_experiment(os.path.join(ROOT, "experiments/configs/quickstart.yaml"),
                          [f"output_dir={tmp_path}", "system=merged_copies", "baseline.memory_budget_bytes=1000000",
                           *QUICK])
    [res] = run(exp, echo=lambda s: None)
    assert res.summary["status"] == "oom" and "budget" in res.summary["error"]
    saved = json.load(open(os.path.join(res.out_dir, "metrics.json")))
    assert saved["status"] == "oom" and saved["metrics"] is None
    plan = saved["memory_plan_gib"]  # what the point needed, by part, also in the error's text
    assert plan["model_copies"] == pytest.approx(exp.adapters.n * plan["weights"], abs=2e-3) and "planned GiB" in saved["error"]


def test_time_limit_cuts_the_run_off(tmp_path):
    from slora_jax.experiment import run_point

    ticks = iter(range(10**6))  # a clock that advances 1 s per reading
    exp = load_experiment(os.path.join(ROOT, "experiments/configs/quickstart.yaml"),
                          [f"output_dir={tmp_path}", "system=peft_merge", "mode=offline", "time_limit_s=6", *QUICK])
    res = run_point(exp, str(tmp_path / "run"), clock=lambda: float(next(ticks)))
    reasons = [r.finish_reason for r in res.records]
    assert len(reasons) == 6 and 0 < reasons.count("timeout") < 6
    assert res.summary["metrics"]["num_timeouts"] == reasons.count("timeout")
    assert res.summary["metrics"]["num_finished"] == 6 - reasons.count("timeout")


def bench_hf_peft():
    spec = importlib.util.spec_from_file_location("bench_hf_peft", os.path.join(ROOT, "scripts/bench_hf_peft.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_bench_hf_peft_builds_the_presets_shapes(name):
    hf = bench_hf_peft().hf_config(PRESETS[name])
    assert LlamaConfig.from_hf(hf.to_dict()) == PRESETS[name]


def test_bench_hf_peft_matches_peft_merge(tmp_path, tiny_model_dirs):
    """Also with an adapter that shares its weight folder (hf_peft registers it as an alias in peft)."""
    bench = bench_hf_peft()
    args = [f"output_dir={tmp_path}", f"model.name={tiny_model_dirs['llama2_mha']}", "mode=offline",
            "adapters.ranks=[4, 8]", *QUICK, "adapters.distinct=2", "workload.seed=4"]
    config = os.path.join(ROOT, "experiments/configs/quickstart.yaml")
    assert bench.main([config, *args, "name=hf"]) == 0
    assert cli(["run", config, *args, "name=ours", "system=peft_merge"]) == 0
    hf, ours = (load_records(tmp_path / n / "requests.jsonl") for n in ("hf", "ours"))
    assert [r.token_ids for r in hf] == [r.token_ids for r in ours]
    assert all(len(r.token_ids) == r.output_len for r in hf)
    assert len({r.adapter for r in hf}) == 3
    summary = json.load(open(tmp_path / "hf" / "metrics.json"))
    assert summary["system"] == "hf_peft" and summary["metrics"]["num_finished"] == 6
    assert summary["memory"]["peak_peft_aliasing"] == 1 and summary["memory"]["peak_peft_folders_loaded"] == 2


def test_gc_timer_counts_collections():
    import gc

    from slora_jax.experiment.runner import GcTimer

    with GcTimer() as t:
        gc.collect()
        gc.collect(0)
    assert t.collections == 2 and t.seconds > 0
    gc.collect()
    assert t.collections == 2  # not counted once the block is left


def test_in_memory_adapters_are_read_once_per_folder_and_folded_for_the_engine(tmp_path):
    import numpy as np

    from slora_jax.config import AdapterSetConfig, preset
    from slora_jax.experiment.runner import adapter_folders, in_memory_adapters

    cfg = preset("tiny")
    folders = adapter_folders(AdapterSetConfig(n=5, ranks=(4, 8), distinct=2), cfg, str(tmp_path))
    cache = {}
    raw = in_memory_adapters(folders, cfg, cache)
    folded = in_memory_adapters(folders, cfg, cache, "bfloat16")
    assert [n for n, _ in folded] == [f"adapter{i}" for i in range(5)]
    key = next(iter(raw[0][1].modules))
    # adapters of one folder share its arrays, in both forms; each folder was read once
    assert folded[0][1].modules[key].a is folded[2][1].modules[key].a
    assert raw[1][1].modules[key].a is raw[3][1].modules[key].a and len(cache) == 4
    for (_, r), (_, f) in zip(raw, folded):
        m, fm = r.modules[key], f.modules[key]
        assert fm.scale == 1.0 and fm.a.dtype.name == "bfloat16" and m.a.dtype == np.float32
        np.testing.assert_array_equal(fm.b.astype(np.float32),
                                      (m.b * np.float32(m.scale)).astype(fm.b.dtype).astype(np.float32))


def test_cached_model_holds_one_form_of_the_weights():
    """An engine system gets per-layer weights, a baseline the stacked ones; the cache never holds both
    (two copies of a 7B model beside S1's pool did not fit an H100), and the move keeps every value."""
    import jax
    import numpy as np

    from slora_jax.experiment.runner import cached_model

    exp = load_experiment(os.path.join(ROOT, "experiments/configs/quickstart.yaml"))
    models: dict = {}
    cfg, stacked = cached_model(dataclasses.replace(exp, system="peft_merge"), models)
    assert not isinstance(stacked["layers"], list) and len(models) == 1
    want = jax.tree.map(np.asarray, stacked)
    _, per_layer = cached_model(exp, models)  # system slora, layer_loop "unrolled"
    assert isinstance(per_layer["layers"], list) and len(per_layer["layers"]) == cfg.num_hidden_layers
    assert len(models) == 1 and all(a.is_deleted() for a in jax.tree.leaves(stacked["layers"]))
    for i, layer in enumerate(per_layer["layers"]):
        jax.tree.map(lambda a, w: np.testing.assert_array_equal(a, w[i]), layer, want["layers"])
    assert cached_model(exp, models)[1] is per_layer  # same form: no move
    _, again = cached_model(dataclasses.replace(exp, system="merged_copies"), models)
    assert len(models) == 1 and all(a.is_deleted() for a in jax.tree.leaves(per_layer["layers"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again), want)


def test_device_memory_is_recorded_in_gib():
    """Each point's run record carries the device allocator's numbers (None on the CPU, which keeps none)."""
    from slora_jax.experiment.runner import device_memory_gib

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    got = device_memory_gib(Device({"bytes_in_use": 2**31, "peak_bytes_in_use": 3 * 2**30, "bytes_limit": 2**36,
                                    "largest_free_block_bytes": 2**29, "num_allocs": 7}))
    assert got == {"in_use": 2.0, "peak_in_use": 3.0, "limit": 64.0, "largest_free_block": 0.5}
    assert device_memory_gib(Device(None)) is None and device_memory_gib(Device({})) is None
