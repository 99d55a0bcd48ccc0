"""Serving metrics on hand-made records with known answers, and their invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from slora_jax.workload import RequestRecord, load_records, memory_summary, save_records, serving_metrics


def rec(i, arrival, first, finish, gen, reason="length", **kw):
    return RequestRecord(i, f"a{i % 2}", 8, gen, arrival, first, finish, gen, reason, **kw)


RECORDS = [
    rec(0, 0.0, 1.0, 3.0, 10),
    rec(1, 1.0, 4.0, 5.0, 5, "stop"),
    rec(2, 2.0, None, 9.0, 0, "abort"),
    rec(3, 2.0, 8.0, 10.0, 5, num_preemptions=2),  # first token after exactly 6 s: misses the SLO
]


def test_metrics_known_answers():
    m = serving_metrics(RECORDS, slo_s=6.0)
    assert m["num_requests"] == 4 and m["num_finished"] == 3 and m["num_aborted"] == 1 and m["num_errors"] == 0
    assert m["num_preemptions"] == 2 and m["generated_tokens"] == 20
    assert m["elapsed_s"] == 10.0
    assert m["throughput_req_s"] == pytest.approx(0.3) and m["throughput_tok_s"] == pytest.approx(2.0)
    assert m["avg_latency_s"] == pytest.approx(5.0)  # (3 + 4 + 8) / 3
    assert m["first_token_mean_s"] == pytest.approx(10 / 3)  # (1 + 3 + 6) / 3
    assert m["first_token_p50_s"] == pytest.approx(3.0)
    assert m["first_token_p90_s"] == pytest.approx(5.4)  # linear between 3 and 6
    assert m["first_token_p99_s"] == pytest.approx(5.94)
    assert m["slo_attainment"] == pytest.approx(0.5)
    assert m["user_satisfaction"] == pytest.approx((35 / 36 + 27 / 36) / 4)
    # a looser SLO: all three started requests meet it
    loose = serving_metrics(RECORDS, slo_s=12.0)
    assert loose["slo_attainment"] == pytest.approx(0.75)
    assert loose["user_satisfaction"] == pytest.approx((1 - 1 / 144 + 1 - 9 / 144 + 1 - 36 / 144) / 4)


def test_metrics_edge_cases():
    empty = serving_metrics([])
    assert empty["num_requests"] == 0 and empty["throughput_req_s"] is None and empty["slo_attainment"] is None
    only_aborted = serving_metrics([rec(0, 0.0, None, 1.0, 0, "abort")])
    assert only_aborted["first_token_p50_s"] is None and only_aborted["avg_latency_s"] is None
    assert only_aborted["slo_attainment"] == 0.0 and only_aborted["throughput_req_s"] == 0.0
    with pytest.raises(ValueError):
        serving_metrics(RECORDS, slo_s=0)


records = st.lists(
    st.tuples(st.floats(0, 100), st.one_of(st.none(), st.floats(0, 20)), st.floats(0, 20), st.integers(0, 50),
              st.sampled_from(["stop", "length", "abort", "error", "timeout"])).map(
        lambda t: (t[0], None if t[1] is None else t[0] + t[1], t[0] + (t[1] or 0) + t[2], t[3], t[4])),
    min_size=1, max_size=30,
).map(lambda rs: [rec(i, *r) for i, r in enumerate(rs)])


@settings(max_examples=60, deadline=None)
@given(rs=records, slo=st.floats(0.1, 30))
def test_metric_invariants(rs, slo):
    m = serving_metrics(rs, slo)
    assert 0 <= m["user_satisfaction"] <= m["slo_attainment"] <= 1
    assert m["num_finished"] + m["num_aborted"] + m["num_errors"] + m["num_timeouts"] == len(rs)
    if m["first_token_p50_s"] is not None:
        assert m["first_token_p50_s"] <= m["first_token_p90_s"] <= m["first_token_p99_s"]
    # order of records does not matter
    rev = serving_metrics(rs[::-1], slo)
    assert rev.keys() == m.keys()
    for k, v in m.items():
        assert rev[k] == (v if v is None else pytest.approx(v)), k


def test_records_round_trip_and_memory_summary(tmp_path):
    rs = RECORDS + [rec(4, 0.5, 0.7, 0.9, 2, token_ids=(5, 6))]
    save_records(rs, tmp_path / "r.jsonl")
    assert load_records(tmp_path / "r.jsonl") == rs
    s = memory_summary([{"pages_kv": 2, "pages_adapter": 4}, {"pages_kv": 6, "pages_adapter": 0}])
    assert s == {"peak_pages_kv": 6, "mean_pages_kv": 4, "peak_pages_adapter": 4, "mean_pages_adapter": 2}
