"""scripts/kernel_time_model.py: join static rows with profiled ones, fit the wait line, check and predict."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tm():
    spec = importlib.util.spec_from_file_location("kernel_time_model", os.path.join(ROOT, "scripts/kernel_time_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(tokens, rank, pop, impl="pallas_paged"):
    return dict(tokens=tokens, h_in=4096, h_out=4096, rank=str(rank), popularity=pop, impl=impl)


def _write(tm, tmp_path, line=(2.0, 0.2, 1.5), spill_us=50.0):
    """Static rows and a profile whose times follow `line` exactly (spilling kernels take `spill_us`)."""
    rng = np.random.default_rng(0)
    static, prof = [], []
    for i, (tokens, rank, pop) in enumerate([(t, r, p) for t in (1, 8, 64) for r in (16, 64, 128)
                                             for p in ("distinct", "identical")]):
        case = _case(tokens, rank, pop)
        kernels = []
        for name in ("sgmv_shrink_paged_x1", "sgmv_expand_paged_x1"):
            waits = int(rng.integers(5, 40))
            row = {"case": case, "kernel": name, "sass_waits": waits, "round_trips": 6,
                   "stack_bytes": 64 if (i == 3 and "shrink" in name) else 0}
            static.append(row)
            kernels.append((name, spill_us if row["stack_bytes"] else float(np.dot(tm.features(row), line))))
        top = [{"name": name, "us": 2 * us, "calls": 2.0} for name, us in kernels]  # two launches a call
        prof.append({"case": case, "profile": {"top_kernels": top + [{"name": "memcpy32_post", "us": 1, "calls": 1}]}})
    s, p = tmp_path / "static.json", tmp_path / "prof.json"
    s.write_text(json.dumps({"rows": static}))
    p.write_text(json.dumps({"rows": prof}))
    return str(s), str(p)


def test_fit_recovers_the_line_and_leaves_out_spills_and_large_calls(tm, tmp_path):
    s, p = _write(tm, tmp_path)
    rows = tm.join(s, p, max_tokens=8)
    assert rows and all(int(r["case"]["tokens"]) <= 8 for r in rows)  # the 64-token rows are out
    assert {r["kernel"] for r in rows} == {"sgmv_shrink_paged_x1", "sgmv_expand_paged_x1"}  # memcpy has no row
    assert sum(r["stack_bytes"] > 0 for r in rows) == 1
    coef = tm.fit(rows)
    np.testing.assert_allclose(coef, [2.0, 0.2, 1.5], rtol=1e-6)  # the spilling kernel's 50 us did not pull it
    err = tm.errors(rows, coef)
    assert err["n"] == len(rows) - 1 and err["max_rel_err"] < 1e-6


def test_main_checks_and_predicts(tm, tmp_path):
    s, p = _write(tm, tmp_path)
    out = tmp_path / "model.json"
    result = tm.main(["--fit", f"{s}:{p}", "--check", f"{s}:{p}", "--predict", s, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["model"] == result["model"] and saved["checks"][0]["median_rel_err"] < 1e-6
    preds = saved["predictions"][0]["rows"]
    assert len(preds) == 24 and sum(r["spills"] for r in preds) == 1  # 12 cases of <= 8 tokens, 2 kernels each
    r = next(r for r in preds if not r["spills"])
    assert r["predicted_us"] == pytest.approx(2.0 + 0.2 * r["sass_waits"] + 1.5 * tm.weight_us(r))


def test_weight_bytes_follow_popularity_and_kernel(tm):
    shrink = {"case": _case(8, 16, "distinct"), "kernel": "sgmv_shrink_paged_x1"}
    one = {"case": _case(8, 16, "identical"), "kernel": "sgmv_paged_one_launch_x1"}
    assert tm.weight_us(shrink) == pytest.approx(8 * 16 * 4096 * 2 / 4e12 * 1e6)
    assert tm.weight_us(one) == pytest.approx(16 * 8192 * 2 / 4e12 * 1e6)


def test_static_rows_without_waits_are_refused(tm, tmp_path):
    s = tmp_path / "old.json"
    s.write_text(json.dumps({"rows": [{"case": _case(1, 16, "distinct"), "kernel": "k", "stack_bytes": 0}]}))
    with pytest.raises(SystemExit, match="sass_waits"):
        tm.join(str(s), str(s), 8)


def test_variants_are_compared_case_by_case(tm, tmp_path):
    """`--against`: a variant with half the waits of the base in every case, timed on the line, is
    predicted and measured at the same ratio, below 1 in every case."""
    static, prof = [], []
    for tokens in (1, 8):
        for impl, waits in (("pallas_paged", 30), ("pallas_paged[x=1]", 15)):
            case = _case(tokens, 16, "identical", impl)
            row = {"case": case, "kernel": "sgmv_paged_one_launch_x1", "sass_waits": waits, "round_trips": 7,
                   "stack_bytes": 0}
            static.append(row)
            prof.append({"case": case, "profile": {"top_kernels": [
                {"name": row["kernel"], "us": float(np.dot(tm.features(row), (2.0, 0.2, 1.5))), "calls": 1.0}]}})
    s, p = tmp_path / "s.json", tmp_path / "p.json"
    s.write_text(json.dumps({"rows": static}))
    p.write_text(json.dumps({"rows": prof}))
    fit_s, fit_p = _write(tm, tmp_path)
    result = tm.main(["--fit", f"{fit_s}:{fit_p}", "--check", f"{s}:{p}", "--against", "pallas_paged"])
    (v,) = result["checks"][0]["variants"]
    assert v["impl"] == "pallas_paged[x=1]" and v["cases"] == 2 and v["direction"] == 2
    assert v["predicted_median"] == pytest.approx(v["measured_median"], rel=1e-6) and v["measured_median"] < 0.8
