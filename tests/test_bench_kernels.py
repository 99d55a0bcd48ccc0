"""scripts/bench_kernels.py on the CPU: the whole flow, where its wall time goes, resuming, the result file."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bk():
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "scripts/bench_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_phases_are_exclusive(bk):
    phases = bk.Phases()
    with phases("outer"):
        time.sleep(0.02)
        with phases("inner"):
            time.sleep(0.05)
    assert 0.02 <= phases.s["outer"] < 0.05 <= phases.s["inner"]
    totals = phases.totals(1.0)
    assert totals["other"] == pytest.approx(1.0 - phases.s["outer"] - phases.s["inner"], abs=1e-3)


def test_result_writer_appends_rows(bk, tmp_path):
    path = str(tmp_path / "r.json")
    writer = bk.ResultWriter(path)
    result = {"benchmark": "b", "runs": [{"phase_s": {"timing": 1.0}}], "rows": [{"case": {"tokens": 1}}]}
    writer.write(result)
    with open(path) as f:
        assert json.load(f) == result
    result["rows"].append({"case": {"tokens": 2}})
    result["runs"][0]["phase_s"]["json"] = 0.5
    writer.write(result)
    with open(path) as f:
        assert json.load(f) == result


def test_smoke_run_records_phases_and_resumes(bk, tmp_path):
    """Two runs of one case each (the second resumes the first): every run has its own `phase_s`."""
    args = ["--smoke", "--impls", "gather_bmm", "--tokens", "1", "--ranks", "16", "--out", str(tmp_path),
            "--git-commit", "test"]
    switch = sys.getswitchinterval()
    try:
        bk.main([*args, "--pops", "identical"])
        bk.main([*args, "--pops", "identical,distinct", "--resume", str(tmp_path / "lora_kernels.json")])
    finally:
        sys.setswitchinterval(switch)
    with open(tmp_path / "lora_kernels.json") as f:
        result = json.load(f)
    assert [(r["case"]["popularity"], r["run"]) for r in result["rows"]] == [("identical", 0), ("distinct", 1)]
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        phase_s = run["phase_s"]
        assert {"ceilings", "prepare", "compile_wait", "data", "reference", "check", "timing", "json",
                "other"} <= set(phase_s)
        assert all(v >= 0 for v in phase_s.values())
        assert sum(phase_s.values()) <= run["wall_s"] + 1e-2
    for row in result["rows"]:
        assert "median_us" in row, row
        assert row["phase_s"]["timing"] > 0 and all(v >= 0 for v in row["phase_s"].values())


def test_retime_replaces_one_impls_rows(bk, tmp_path):
    """`--resume --retime`: the file's cases only, the named impl's rows replaced (the old ones kept in
    `replaced_rows`), the other impls' rows kept with their `vs` against the new time."""
    args = ["--smoke", "--tokens", "1", "--ranks", "16", "--out", str(tmp_path), "--git-commit", "test"]
    path = tmp_path / "lora_kernels.json"
    switch = sys.getswitchinterval()
    try:
        bk.main([*args, "--pops", "identical,skewed", "--impls", "gather_bmm,onehot"])
        with open(path) as f:
            before = json.load(f)
        bk.main([*args, "--pops", "identical,skewed,distinct", "--impls", "gather_bmm", "--resume", str(path),
                 "--retime"])
    finally:
        sys.setswitchinterval(switch)
    with open(path) as f:
        result = json.load(f)
    # both cases re-timed, in the file (not only the first the writer saw); no distinct case: not in the file
    assert [(r["case"]["popularity"], r["case"]["impl"], r["run"]) for r in result["rows"]] == [
        ("identical", "gather_bmm", 1), ("identical", "onehot", 0), ("skewed", "gather_bmm", 1), ("skewed", "onehot", 0)]
    assert result["replaced_rows"] == [before["rows"][0], before["rows"][2]]
    assert result["runs"][1]["retime"] == ["gather_bmm"]
    for k in (0, 2):
        gather, onehot = result["rows"][k : k + 2]
        assert onehot["median_us"] == before["rows"][k + 1]["median_us"]
        assert onehot["vs"] == {"gather_bmm": gather["median_us"] / onehot["median_us"]}
        assert gather["vs"] == {"onehot": onehot["median_us"] / gather["median_us"]}
    with pytest.raises(SystemExit):
        bk.main([*args, "--retime"])


@pytest.fixture(scope="module")
def be():
    spec = importlib.util.spec_from_file_location("bench_engine", os.path.join(ROOT, "scripts/bench_engine.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    spec.loader.exec_module(module)
    return module


def test_bench_engine_pool_copy_detector(be):
    """Only an instruction whose own result is a pool-shaped copy counts, not a kernel with a copied operand."""
    hlo = "\n".join([
        "  %copy.7 = bf16[32,2048,2,16,32,128]{5,4,3,2,1,0} copy(%param.1)",
        "  %copy_fusion.2 = bf16[32,2048,2,16,32,128]{5,4,3,2,1,0} fusion(%p), kind=kLoop",
        "  %pallas_call.358 = bf16[16,32,128]{2,1,0} custom-call(%copy.196, %x), operand_layout_constraints="
        "{s32[1]{0}, bf16[32,2048,2,16,32,128]{5,4,3,2,1,0}}",
        "  ROOT %tuple = (bf16[32,2048,2,16,32,128]{5,4,3,2,1,0}) tuple(%copy.7)",
        "  %copy.9 = s32[1]{0} copy(%c)",
    ])
    got = be.pool_sized_copy_lines(hlo, (32, 2048))
    assert [ln.split(" = ")[0] for ln in got] == ["%copy.7", "%copy_fusion.2"]


def test_bench_engine_results_keyed_by_model(be, tmp_path):
    """The results sit under the preset run (`tiny` here), not always under `llama_7b`."""
    be.main(["--out", str(tmp_path), "--model", "tiny", "--skip-tiny", "--batch", "2", "--adapters", "2",
             "--new", "4", "--labels", "lora"])  # the default chunk: 128 does not divide tiny's widths
    with open(tmp_path / "engine.json") as f:
        res = json.load(f)
    assert "llama_7b" not in res and res["tiny"]["model"] == "tiny" and res["tiny"]["lora"]["decode_steps"] == 4
    assert "--lora-chunk 32" in res["command"]  # tiny: 32 divides every projection size, 64 does not
    assert be.default_lora_chunk(be.preset("llama-7b")) == 128


def test_slab_impl_spec_rows_and_skips(bk):
    """`pallas_slab[...]` is ours (summaries compare baselines against impls named pallas*), sized to the
    largest draw's adapters at a power of two, and skipped past decode-sized calls."""
    import numpy as np

    name, cfg, paged = bk.parse_impl("pallas_slab[slab_shrink_splits=8]")
    assert (name, cfg.slab_shrink_splits, paged) == ("slab", 8, False)
    name, cfg, paged = bk.parse_impl("pallas_paged[paged_wait_loads=cg,paged_k_steps=None,paged_k_loop=2]")
    assert (name, cfg.paged_wait_loads, cfg.paged_k_steps, cfg.paged_k_loop, paged) == ("pallas", "cg", None, 2, True)
    ranks_S = np.array([8, 16, 64, 128])
    slots = [np.array([0, 0, 1, -1]), np.array([3, 2, 2, 2])]  # 24 and 192 rows
    assert bk.slab_rows(slots, ranks_S, 64) == 256 and bk.slab_rows(slots[:1], ranks_S, 64) == 64
    assert bk.skip_reason("slab", 1024, 4096, 4096, 16, 1, 1, cfg=cfg).startswith("the slab kernels take")
    assert bk.skip_reason("slab", 256, 4096, 11008, 16, 1, 1, cfg=cfg) is None


def test_triton_gemm_off_names_impls_of_the_run(bk, tmp_path):
    """`--triton-gemm-off` takes labels of this run's impls (or '(reference)'); others are an error."""
    args = ["--smoke", "--impls", "gather_bmm", "--tokens", "1", "--ranks", "16", "--pops", "identical",
            "--out", str(tmp_path), "--git-commit", "test"]
    with pytest.raises(SystemExit):
        bk.main([*args, "--triton-gemm-off", "onehot"])
    assert bk.TRITON_GEMM_OFF and set(bk.TRITON_GEMM_OFF) <= {*bk.IMPLS_DEFAULT, "(reference)"}


def test_tight_segments_sizes_the_metadata_to_the_case(bk, tmp_path):
    """`--tight-segments`: the metadata's segment bound is the case's own (one adapter: one segment),
    recorded in each row with its tile count; a file run one way cannot be resumed the other way;
    `--block-m` must be a valid tile height."""
    args = ["--smoke", "--impls", "gather_bmm", "--tokens", "16", "--ranks", "16", "--pops", "identical",
            "--out", str(tmp_path), "--git-commit", "test"]
    switch = sys.getswitchinterval()
    try:
        bk.main([*args, "--tight-segments"])
        with open(tmp_path / "lora_kernels.json") as f:
            result = json.load(f)
        (row,) = result["rows"]
        assert "median_us" in row and row["segments"] == 1
        # NT bounds ceil(T / block_m) + G tiles: 2 here, against 16 with the default G = min(T, 1000) = 16
        assert (row["max_segments"], row["tiles"]) == (1, 2)
        assert result["runs"][0]["metadata"] == {"tight_segments": True, "block_m": None} and row["block_m"] == 16
        with pytest.raises(SystemExit):
            bk.main([*args, "--pops", "distinct", "--resume", str(tmp_path / "lora_kernels.json")])
        with pytest.raises(SystemExit):
            bk.main([*args, "--block-m", "24"])
        bk.main([*args, "--block-m", "32", "--name", "bm"])
        with open(tmp_path / "bm.json") as f:
            (row,) = json.load(f)["rows"]
        assert "median_us" in row and (row["block_m"], row["tiles"]) == (32, 16)  # min(T, ceil(16 / 32) + 16)
    finally:
        sys.setswitchinterval(switch)


def test_by_tokens_table(bk):
    """The README's per-token table: floor ratios of the engine impl, and its speedup over the best
    impl not named pallas* (another pallas impl is not a baseline); cases with no baseline are left out."""
    def row(impl, us, floor_ratio=None):
        r = {"case": {"impl": impl}, "median_us": us}
        return r if floor_ratio is None else {**r, "floor_ratio": floor_ratio}

    by_case = {
        (64, 4096, 4096, "16", "distinct"): {"pallas_paged": row("pallas_paged", 10.0, 0.6),
                                             "loop": row("loop", 30.0), "pallas": row("pallas", 1.0)},
        (64, 4096, 4096, "16", "identical"): {"pallas_paged": row("pallas_paged", 10.0, 0.2),
                                              "loop": row("loop", 5.0), "onehot": row("onehot", 50.0)},
        (64, 4096, 4096, "16", "skewed"): {"pallas_paged": row("pallas_paged", 10.0, 0.4),
                                           "onehot": row("onehot", 20.0)},
        (8, 4096, 4096, "16", "skewed"): {"pallas_paged": row("pallas_paged", 10.0, 0.1),
                                          "pallas": row("pallas", 5.0)},  # no baseline: left out
    }
    lines = bk.by_tokens_table(by_case, "pallas_paged", 64)
    assert lines[-2:] == ["| 64 | 3 | 0.40 (0.60) | 1 | 2.00x | 1 |", "| >= 64 | 3 | 0.40 (0.60) | 1 | 2.00x | 1 |"]
    assert not any(line.startswith("| 8 ") for line in lines)
    assert bk.by_tokens_table({}, "pallas_paged", 64) == []


def test_ratio_table(bk, capsys, tmp_path):
    """`--against`: each other impl's time over the reference impl's, case by case (median, range, cases
    more than 5% slower), over all cases or per value of `--by`; cases without a timed reference row and
    untimed rows are left out."""
    def row(impl, T, pop, us=None):
        r = {"case": {"impl": impl, "tokens": T, "h_in": 4096, "h_out": 4096, "rank": 16, "popularity": pop}}
        return r if us is None else {**r, "median_us": us, "floor_us": 1.0, "floor_ratio": 1.0 / us}

    rows = [row("ref", 64, "distinct", 10.0), row("a", 64, "distinct", 5.0), row("b", 64, "distinct", 30.0),
            row("ref", 64, "identical", 10.0), row("a", 64, "identical", 20.0), row("b", 64, "identical"),
            row("ref", 256, "identical", 4.0), row("a", 256, "identical", 4.1),
            row("a", 1024, "identical", 1.0)]  # no reference row: left out
    by_case = {}
    for r in rows:
        by_case.setdefault(bk.case_key(r["case"]), {})[r["case"]["impl"]] = r
    lines = bk.ratio_table(by_case, "ref")
    assert lines[-2:] == ["| a | all | 3 | 1.02x | 0.50-2.00x | 1 |", "| b | all | 1 | 3.00x | 3.00-3.00x | 1 |"]
    lines = bk.ratio_table(by_case, "ref", by="popularity")
    assert lines[-3:] == ["| a | distinct | 1 | 0.50x | 0.50-0.50x | 0 |", "| a | identical | 2 | 1.51x | 1.02-2.00x | 1 |",
                          "| b | distinct | 1 | 3.00x | 3.00-3.00x | 1 |"]
    assert bk.ratio_table(by_case, "missing") == []
    with pytest.raises(ValueError):
        bk.ratio_table(by_case, "ref", by="impl")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": rows, "device": "test"}))
    bk.main(["--summarize", str(path), "--engine-impl", "ref", "--against", "ref", "--by", "tokens"])
    out = capsys.readouterr().out
    assert "| a | 64 | 2 | 1.25x | 0.50-2.00x | 1 |" in out and "| a | 256 | 1 | 1.02x | 1.02-1.02x | 0 |" in out
    # --metric device: the profiled device times instead; rows without a profile are left out
    by_case[bk.case_key(rows[0]["case"])]["ref"]["profile"] = {"device_us": 8.0}
    by_case[bk.case_key(rows[0]["case"])]["a"]["profile"] = {"device_us": 2.0}
    assert bk.ratio_table(by_case, "ref", metric="device")[-1:] == ["| a | all | 1 | 0.25x | 0.25-0.25x | 0 |"]


def test_plot_grid(bk, tmp_path):
    """`--plot`: the engine impl's speedup over the best baseline and its floor ratio, by popularity and
    tokens, drawn to a PNG; the series it draws are returned (cases without a baseline left out)."""
    def row(impl, T, pop, us, floor_ratio=0.1):
        return {"case": {"impl": impl, "tokens": T, "h_in": 4096, "h_out": 4096, "rank": 16, "popularity": pop},
                "median_us": us, "floor_us": us * floor_ratio, "floor_ratio": floor_ratio}

    rows = [row("pallas_paged", 64, "distinct", 10.0, 0.4), row("loop", 64, "distinct", 30.0),
            row("onehot", 64, "distinct", 20.0), row("pallas_paged", 256, "distinct", 10.0, 0.6),
            row("padded_bmm", 256, "distinct", 5.0), row("pallas_paged", 64, "identical", 10.0, 0.2),
            row("pallas_slab", 64, "identical", 1.0)]  # not a baseline: no identical point
    by_case = {}
    for r in rows:
        by_case.setdefault(bk.case_key(r["case"]), {})[r["case"]["impl"]] = r
    path = tmp_path / "grid.png"
    series = bk.plot_grid(by_case, "pallas_paged", str(path), title="test")
    assert series == {"distinct": {64: ([2.0], [0.4]), 256: ([0.5], [0.6])}}
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no case"):
        bk.plot_grid(by_case, "missing", str(tmp_path / "none.png"))


def test_profile_chain_reports_per_call_device_time(bk, monkeypatch):
    """`--profile`'s row fields: a trace of 2 calls of 3 kernels each, with host gaps, divided per call."""
    events = [("/device:GPU:0", "shrink", 0.0, 2.0), ("/device:GPU:0", "expand", 5.0, 1.0),
              ("/device:GPU:0", "reduce", 6.0, 1.0), ("/device:GPU:0", "shrink", 10.0, 2.0),
              ("/device:GPU:0", "expand", 15.0, 1.0), ("/device:GPU:0", "reduce", 16.0, 4.0)]
    ran = []

    class Done:
        def block_until_ready(self):
            ran.append(True)

    def fake_trace(run):
        run()
        return events

    monkeypatch.setattr(bk.profiling, "gpu_kernels", fake_trace)
    prof = bk.profile_chain(lambda y, *a: Done(), None, (), n_rot=2)
    assert ran == [True]
    assert prof["device_us"] == pytest.approx(11.0 / 2) and prof["span_us"] == pytest.approx(20.0 / 2)
    assert prof["kernels_a_call"] == 3
    assert prof["top_kernels"][0] == {"name": "reduce", "us": 2.5, "calls": 1.0}
    monkeypatch.setattr(bk.profiling, "gpu_kernels", lambda run: None)  # no trace (a CPU): no fields
    assert bk.profile_chain(lambda y, *a: Done(), None, (), n_rot=2) is None


def test_profile_chains_cut_one_trace_at_idle_gaps(bk, monkeypatch):
    """One trace for a case's chains: the kernel events are cut where the device idled (the host sleeps
    between chains), one run per chain; a cut that does not match the chains gives None (profile one by
    one), no trace gives {}."""
    ran = []

    class Done:
        def block_until_ready(self):
            return self

    def exe(name):
        return lambda y, *a: ran.append(name) or Done()

    trace = [("gpu", "k1", 0.0, 3.0), ("gpu", "k2", 3.5, 1.0), ("gpu", "k1", 5.0, 3.0), ("gpu", "k2", 8.2, 1.0),
             ("gpu", "pallas", 9000.0, 4.0), ("gpu", "pallas", 9004.5, 4.0)]  # chain 2 starts 9 ms later

    def fake(run):
        run()
        return trace

    monkeypatch.setattr(bk.profiling, "gpu_kernels", fake)
    chains = [("loop", exe("loop"), None, (), 2), ("pallas_paged", exe("pp"), None, (), 2)]
    got = bk.profile_chains(chains, gap_s=1e-3)
    assert ran == ["loop", "pp"]
    assert got["loop"]["device_us"] == pytest.approx(4.0) and got["loop"]["kernels_a_call"] == 2
    assert got["loop"]["span_us"] == pytest.approx(9.2 / 2)
    assert got["pallas_paged"]["device_us"] == pytest.approx(4.0) and got["pallas_paged"]["kernels_a_call"] == 1
    assert [len(r) for r in bk.split_at_gaps(trace, 500.0)] == [4, 2]
    assert bk.profile_chains(chains[:1], gap_s=1e-3) is None  # two runs for one chain: do not guess
    monkeypatch.setattr(bk.profiling, "gpu_kernels", lambda run: None)
    assert bk.profile_chains(chains, gap_s=1e-3) == {}
