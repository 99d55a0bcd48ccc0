"""Campaigns (slora_jax/experiment/campaign.py) and scripts/gpu_experiments.py, in its --smoke mode."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from slora_jax.errors import ConfigError
from slora_jax.experiment import campaign as cp
from slora_jax.experiment.config_io import load_experiment
from slora_jax.experiment.runner import build_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISSUE6 = os.path.join(ROOT, "experiments", "campaigns", "issue6.yaml")


def gpu_experiments():
    spec = importlib.util.spec_from_file_location("gpu_experiments", os.path.join(ROOT, "scripts/gpu_experiments.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("smoke", [False, True])
def test_issue6_campaign_points(smoke):
    c = cp.load_campaign(ISSUE6, smoke=smoke)
    got = {(p.exp.name, p.exp.system, p.point.get("adapters.n")) for p in c.points}
    for system in ("slora", "slora_no_unified", "peft_merge", "merged_copies"):
        for setting in ("slora_s1", "slora_s2"):
            assert {(setting, system, n) for n in (5, 100, 1000)} <= got
    assert {("slora_s1", "hf_peft", 5), ("slora_s2", "hf_peft", 100)} <= got
    pops = {(p.exp.system, p.point["workload.popularity"]) for p in c.points if p.exp.name == "punica_textgen"}
    assert pops == {(s, x) for s in ("slora", "hf_peft") for x in ("distinct", "uniform", "skewed", "identical")}
    lvb = [p for p in c.points if p.exp.name == "lora_vs_base"]
    assert {p.point["workload.base_fraction"] for p in lvb} == {0.0, 1.0} and all(p.exp.preload_adapters for p in lvb)
    defer = {(p.exp.name, p.exp.engine.defer_unstaged_starts) for p in c.points if p.exp.system == "slora"
             and p.exp.name.startswith("slora_s")}
    assert defer == ({(f"slora_s{i}", True) for i in (1, 2)} | {(f"slora_s{i}_nodefer", False) for i in (1, 2)}
                     | {(f"slora_s{i}_threads8", True) for i in (1, 2)} | {("slora_s2_nospare", True), ("slora_s1_slab", True), ("slora_s2_slab", True)})
    threads = {p.exp.name: p.exp.engine.adapter_stage_threads for p in c.points if p.exp.system == "slora"}
    assert threads["slora_s2_threads8"] == 8 and threads["slora_s2"] == 4
    spares = {p.exp.name: p.exp.engine.host_adapter_spare_bytes for p in c.points if p.exp.system == "slora"}
    assert spares["slora_s2_nospare"] == 0 and spares["slora_s2"] > 0
    slab = {p.exp.name: p.exp.engine.lora_slab_rows for p in c.points if p.exp.name.startswith("lora_vs_base")}
    assert slab == {"lora_vs_base": 0, "lora_vs_base_nomid": 0, "lora_vs_base_linear": 0, "lora_vs_base_slab": 1024,
                    "lora_vs_base_slab64": 1024}
    nomid = [p.exp.engine for p in c.points if p.exp.name == "lora_vs_base_nomid"]
    assert len(nomid) == 1 and nomid[0].lora_kernel == {"paged_mid_max_tokens": 0}
    assert {p.exp.engine.lora_slab_rows for p in c.points if p.exp.name == "slora_s1_slab"} == {1024}
    s2_slab = [p.exp.engine for p in c.points if p.exp.name == "slora_s2_slab"]
    assert len(s2_slab) == 2 and all(e.lora_slab_rows == 4096 and e.lora_kernel == {"slab_max_tokens": 64} for e in s2_slab)
    # the slab runs only on the Pallas path: the slab experiments name it, so --smoke (CPU) runs them too
    assert all(p.exp.engine.lora_impl == "pallas" for p in c.points if p.exp.engine.lora_slab_rows)
    slots = {p.exp.name: p.exp.engine.max_lora_rank for p in c.points if p.exp.system == "slora_no_unified"}
    assert slots == {"slora_s1": 8, "slora_s2": 64}
    if not smoke:  # the same device memory as slora's 6000 pages of 8 MiB: KV pages + q/k/v/o slots
        pages = {p.exp.name: p.exp.engine.num_pages for p in c.points if p.exp.system == "slora_no_unified"}
        slot_bytes = {n: 64 * r * 32 * 4 * (4096 + 4096) * 2 for n, r in slots.items()}
        assert {n: pages[n] + slot_bytes[n] / (8 << 20) for n in pages} == {"slora_s1": 6000, "slora_s2": 6000}
    for p in c.points:
        e = p.exp
        assert e.warmup_requests == 0 and e.adapters.in_memory
        # One token bucket a step shape, but for lora_vs_base: a full decode batch (64) not padded to 128
        buckets = (64, 128) if e.name.startswith("lora_vs_base") and not smoke else (e.engine.max_batch_tokens,)
        assert (e.engine.min_batch_tokens, e.engine.max_batch_tokens) == (buckets[0], buckets[-1])
        assert e.model.name == ("tiny" if smoke else "llama-7b")
    # every target names points the campaign has
    for t in c.targets:
        for side in ("num", "den"):
            assert any(r.exp.name == t[side]["experiment"] and all(
                r.point.get(k) == v for k, v in t[side].items() if k != "experiment") for r in c.points), t["name"]


def test_bad_campaigns(tmp_path):
    (tmp_path / "a.yaml").write_text("experiments: [{name: x}]\n")
    with pytest.raises(ConfigError, match="config"):
        cp.load_campaign(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("experiments: []\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        cp.load_campaign(str(tmp_path / "b.yaml"))
    cfg = os.path.join(ROOT, "experiments/configs/quickstart.yaml")
    (tmp_path / "c.yaml").write_text(f"experiments: [{{config: {cfg}}}, {{config: {cfg}}}]\n")
    with pytest.raises(ConfigError, match="same point"):
        cp.load_campaign(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text(f"experiments: [{{config: {cfg}, overrides: {{engine.bogus: 1}}}}]\n")
    with pytest.raises(ConfigError, match="bogus"):
        cp.load_campaign(str(tmp_path / "d.yaml"))


def test_token_buckets_and_targets():
    assert cp.token_buckets(16, 256) == [16, 32, 64, 128, 256]
    assert cp.token_buckets(128, 128) == [128]
    assert cp.token_buckets(1, 100) == [16, 32, 64, 128]
    records = [{"experiment": "e", "point": {"n": 5, "system": "a"}, "status": "ok", "metrics": {"m": 10.0}},
               {"experiment": "e", "point": {"n": 9, "system": "a"}, "status": "ok", "metrics": {"m": 9.0}},
               {"experiment": "e", "point": {"n": 9, "system": "b"}, "status": "oom", "metrics": None}]
    targets = [{"name": "t", "metric": "m", "num": {"experiment": "e", "n": 9, "system": "a"},
                "den": {"experiment": "e", "n": 5}, "min": 0.95},
               {"name": "u", "metric": "m", "num": {"experiment": "e", "system": "b"},
                "den": {"experiment": "e", "n": 5}, "min": 1}]
    t, u = cp.evaluate_targets(records, targets)
    assert t["value"] == pytest.approx(0.9) and t["met"] is False and t["den"]["value"] == 10.0
    assert u["value"] is None and u["met"] is None and u["num"]["status"] == "oom"
    assert "value_at_floor" not in t  # only for generated tokens/s
    # Tokens/s targets also give the ratio at the HBM floor: bytes per generated token, den over num.
    for r, bpt in zip(records[:2], (100.0, 125.0)):
        r["metrics"].update(throughput_tok_s=r["metrics"]["m"], bytes_per_generated_token=bpt)
    (f,) = cp.evaluate_targets(records, [{**targets[0], "metric": "throughput_tok_s"}])
    assert f["value"] == pytest.approx(0.9) and f["value_at_floor"] == pytest.approx(0.8)
    assert "at floor" in cp.targets_table([f]) and "0.800" in cp.targets_table([f])
    # A tokens/s target over an oom point (metrics None) has no value and no floor ratio; it does not raise.
    (g,) = cp.evaluate_targets(records, [{**targets[1], "metric": "throughput_tok_s"}])
    assert g["value"] is None and g["value_at_floor"] is None and g["met"] is None
    combined = cp.combine([{"points": records, "target_defs": targets},
                           {"points": [{**records[2], "status": "ok", "metrics": {"m": 20.0}}], "target_defs": []}])
    assert len(combined["points"]) == 3 and combined["targets"][1]["value"] == 2.0


def test_base_fraction_puts_a_seeded_subset_on_the_base_model():
    exp = load_experiment(None, ["workload.num_requests=200", "workload.base_fraction=0.25", "adapters.n=5"])
    trace = build_trace(exp.workload, 5)
    base = sum(r.adapter is None for r in trace)
    assert 25 < base < 75 and trace == build_trace(exp.workload, 5)
    full = load_experiment(None, ["workload.base_fraction=1", "adapters.n=5"])
    assert all(r.adapter is None for r in build_trace(full.workload, 5))


def test_gpu_experiments_smoke(tmp_path, capsys):
    """The script's --smoke run of a slice of issue 6's campaign: the engine at n = 5 and 1000 (in-memory
    adapters, warmed: nothing compiles in the timed replay), merged_copies refused up front at n = 100;
    the summary, targets and PNG; then --resume (nothing reruns), the budget guard and --combine."""
    script = gpu_experiments()
    out = tmp_path / "out"
    args = [ISSUE6, "--smoke", "--only", "s1_slora,s1_baselines", "--skip-systems", "peft_merge", "--out", str(out),
            "--work-dir", str(tmp_path / "work")]
    c = cp.load_campaign(ISSUE6, smoke=True)
    keep = [p for p in c.points if p.entry in ("s1_slora", "s1_baselines") and p.exp.system != "peft_merge"
            and (p.exp.system, p.point["adapters.n"]) in {("slora", 5), ("slora", 1000), ("merged_copies", 100)}]
    summary = cp.run_campaign(cp.Campaign("issue6", c.path, keep, c.targets), str(out), budget_s=600,
                              work_dir=str(tmp_path / "work"), facts={"smoke": True}, echo=print)
    assert [(r["system"], r["point"]["adapters.n"], r["status"]) for r in summary["points"]] == [
        ("slora", 5, "ok"), ("slora", 1000, "ok"), ("merged_copies", 100, "oom")]
    ok = summary["points"][:2]
    assert all(r["metrics"]["num_finished"] > 0 and r["compiles"]["replay"] == 0 for r in ok)
    assert ok[0]["compiles"]["warm"] > 0 and ok[1]["compiles"]["warm"] == 0  # the second engine reuses the compiles
    assert "copies" in summary["points"][2]["error"] and summary["points"][2]["compiles"]["warm"] == 0
    [t] = [t for t in summary["targets"] if t["name"] == "s1_slora_n1000_over_n5"]
    assert t["value"] == pytest.approx(ok[1]["metrics"]["throughput_tok_s"] / ok[0]["metrics"]["throughput_tok_s"])
    files = sorted(os.listdir(out))
    assert files == ["issue6.json", "issue6_slora_s1.png"]
    assert json.load(open(out / "issue6.json"))["points"] == json.loads(json.dumps(summary["points"]))
    assert os.path.getsize(out / "issue6.json") < 50_000
    capsys.readouterr()

    # the script: resumed points are kept, not rerun; a point the budget cannot hold is skipped
    assert script.main([*args, "--resume", str(out / "issue6.json"), "--tag", "again", "--budget-s", "500", "--reserve-s", "1e6"]) == 0
    again = json.load(open(out / "issue6_again.json"))
    assert [r.get("resumed") for r in again["points"]] == [True, True, True]
    assert len(again["skipped"]) == 3 and all("budget" in s["why"] for s in again["skipped"])
    assert again["targets"] == json.loads(json.dumps(summary["targets"]))
    assert script.main(["--combine", str(out / "issue6.json"), str(out / "issue6_again.json"),
                        "--out", str(tmp_path / "combined")]) == 0
    assert sorted(os.listdir(tmp_path / "combined")) == ["issue6_combined.json", "issue6_combined_slora_s1.png"]
    assert "s1_slora_n1000_over_n5" in capsys.readouterr().out


def test_s2_on_the_slab_smoke(tmp_path):
    """S2's churn (ranks 8-64, a new adapter with most requests) on the slab for full decode batches, the
    campaign's s2_slora_slab in --smoke: both points finish, the steps ran on the slab (interpreted kernels),
    and nothing compiled in the timed replay."""
    c = cp.load_campaign(ISSUE6, smoke=True)
    keep = [p for p in c.points if p.entry == "s2_slora_slab"]
    summary = cp.run_campaign(cp.Campaign("issue6", c.path, keep, c.targets), str(tmp_path / "out"), budget_s=600,
                              work_dir=str(tmp_path / "work"), facts={"smoke": True}, echo=lambda *a: None)
    assert [(r["point"]["adapters.n"], r["status"]) for r in summary["points"]] == [(5, "ok"), (1000, "ok")]
    for r in summary["points"]:
        assert r["metrics"]["num_finished"] > 0 and r["compiles"]["replay"] == 0
        assert r["memory"]["peak_slab_adapters"] >= 1 and r["memory"]["peak_slab_rows_used"] > 0
