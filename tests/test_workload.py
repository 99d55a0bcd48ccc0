"""Trace generators (S-LoRA, Punica popularity) and JSONL save/replay."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from slora_jax.workload import (
    POPULARITY_PATTERNS,
    TraceRequest,
    load_trace,
    punica_group_sizes,
    punica_trace,
    save_trace,
    slora_trace,
)

ranges = st.tuples(st.integers(1, 50), st.integers(0, 50)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 60), n_adapters=st.integers(1, 20), alpha=st.floats(0.05, 3), rate=st.floats(0.1, 100),
       cv=st.floats(0, 4), inp=ranges, out=ranges, seed=st.integers(0, 2**32 - 1))
def test_slora_trace_is_valid_and_deterministic(n, n_adapters, alpha, rate, cv, inp, out, seed):
    trace = slora_trace(n, n_adapters, alpha, rate, cv, inp, out, seed)
    assert trace == slora_trace(n, n_adapters, alpha, rate, cv, inp, out, seed)
    assert [r.id for r in trace] == list(range(n))
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals) and all(a > 0 for a in arrivals)
    for r in trace:
        assert 0 <= r.adapter < n_adapters
        assert inp[0] <= r.input_len <= inp[1] and out[0] <= r.output_len <= out[1]


def test_slora_trace_statistics():
    n, rate, cv = 40_000, 5.0, 2.0
    trace = slora_trace(n, 10, 1.0, rate, cv, (8, 512), (8, 16), seed=3)
    gaps = np.diff([0.0] + [r.arrival_s for r in trace])
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    # alpha = 1 is uniform over the adapters
    counts = np.bincount([r.adapter for r in trace], minlength=10)
    assert counts.min() > 0.9 * n / 10 and counts.max() < 1.1 * n / 10
    lens = np.array([r.input_len for r in trace])
    assert lens.min() == 8 and lens.max() == 512 and lens.mean() == pytest.approx(260, rel=0.02)
    # smaller alpha is more skewed toward adapter 0: P(id < k) = (k / n) ** alpha
    skewed = np.array([r.adapter for r in slora_trace(n, 10, 0.3, rate, cv, (8, 8), (8, 8), seed=3)])
    for k in (1, 3, 5):
        assert (skewed < k).mean() == pytest.approx((k / 10) ** 0.3, abs=0.01)
    # cv = 0: evenly spaced arrivals
    even = slora_trace(5, 2, 1.0, 4.0, 0.0, (8, 8), (8, 8))
    assert [r.arrival_s for r in even] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25])


def test_different_seeds_give_different_traces():
    a, b = (slora_trace(50, 20, 0.5, 1.0, 1.0, (8, 512), (8, 512), seed=s) for s in (0, 1))
    assert a != b


@pytest.mark.parametrize("bad", [dict(alpha=0), dict(rate=0), dict(cv=-1), dict(n_adapters=0),
                                 dict(input_len=(0, 5)), dict(output_len=(9, 8))])
def test_slora_trace_rejects_bad_arguments(bad):
    kw = dict(num_requests=4, n_adapters=3, alpha=1.0, rate=1.0, cv=1.0, input_len=(8, 16), output_len=(8, 16))
    with pytest.raises(ValueError):
        slora_trace(**{**kw, **bad})


def test_punica_group_sizes_known_values():
    assert punica_group_sizes("distinct", 4) == [1, 1, 1, 1]
    assert punica_group_sizes("identical", 32) == [32]
    assert punica_group_sizes("uniform", 32) == [6, 6, 5, 5, 5, 5]  # ceil(sqrt(32)) = 6 groups
    assert punica_group_sizes("uniform", 16) == [4, 4, 4, 4]
    assert punica_group_sizes("skewed", 32) == [1, 1, 2, 3, 5, 7, 13]
    with pytest.raises(ValueError, match="unknown popularity"):
        punica_group_sizes("zipf", 8)


@given(pattern=st.sampled_from(POPULARITY_PATTERNS), bs=st.integers(1, 300))
def test_punica_group_sizes_properties(pattern, bs):
    sizes = punica_group_sizes(pattern, bs)
    assert sum(sizes) == bs and min(sizes) >= 1
    if pattern == "uniform":
        assert len(sizes) == math.ceil(math.sqrt(bs)) and max(sizes) - min(sizes) <= 1
    if pattern == "skewed":
        assert sizes == sorted(sizes)
        assert all(b <= 1.5 * a + 1 for a, b in zip(sizes, sizes[1:-1]))


@pytest.mark.parametrize("pattern", POPULARITY_PATTERNS)
def test_punica_trace_batches_follow_the_pattern(pattern):
    trace = punica_trace(pattern, 70, 32, 1000, (4, 9), (2, 3), seed=1)
    assert len(trace) == 70 and all(r.arrival_s == 0 for r in trace)
    for b in range(2):  # the two full batches
        ids = [r.adapter for r in trace[32 * b: 32 * (b + 1)]]
        assert sorted(np.unique(ids, return_counts=True)[1].tolist()) == sorted(punica_group_sizes(pattern, 32))
    first, second = ({r.adapter for r in trace[i: i + 32]} for i in (0, 32))
    assert (first == second) == (pattern == "identical")  # other patterns move on to fresh adapters
    assert punica_trace(pattern, 70, 32, 1000, (4, 9), (2, 3), seed=1) == trace


traces = st.lists(
    st.builds(lambda i, t, a, n, o, p: TraceRequest(i, t, a, n, o, tuple(range(n)) if p else None),
              st.just(0), st.floats(0, 1e6), st.one_of(st.none(), st.integers(0, 5000)),
              st.integers(1, 64), st.integers(1, 64), st.booleans()),
    max_size=20,
).map(lambda rs: [TraceRequest(i, r.arrival_s, r.adapter, r.input_len, r.output_len, r.prompt)
                  for i, r in enumerate(rs)])


@settings(max_examples=30, deadline=None)
@given(trace=traces)
def test_jsonl_round_trip(tmp_path_factory, trace):
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    save_trace(trace, path)
    assert load_trace(path) == sorted(trace, key=lambda r: (r.arrival_s, r.id))


def test_load_trace_real_format_and_errors(tmp_path):
    p = tmp_path / "real.jsonl"
    p.write_text('{"arrival_s": 1.5, "input_len": 3, "output_len": 2, "adapter": 4}\n\n'
                 '{"arrival_s": 0.5, "input_len": 2, "output_len": 1, "prompt": [5, 6]}\n')
    assert load_trace(p) == [TraceRequest(1, 0.5, None, 2, 1, (5, 6)), TraceRequest(0, 1.5, 4, 3, 2)]
    for line, msg in [("[1]", "expected a JSON object"), ("{oops", "not JSON"),
                      ('{"arrival_s": 0, "input_len": 2}', "missing fields"),
                      ('{"arrival_s": 0, "input_len": 2, "output_len": 1, "rank": 8}', "unknown fields"),
                      ('{"arrival_s": 0, "input_len": 2.5, "output_len": 1}', "integer"),
                      ('{"arrival_s": -1, "input_len": 2, "output_len": 1}', "arrival_s"),
                      ('{"arrival_s": 0, "input_len": 3, "output_len": 1, "prompt": [1]}', "prompt has 1")]:
        p.write_text(json.dumps({"arrival_s": 0, "input_len": 1, "output_len": 1}) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=msg) as e:
            load_trace(p)
        assert ":2:" in str(e.value)
    p.write_text('{"id": 3, "arrival_s": 0, "input_len": 1, "output_len": 1}\n' * 2)
    with pytest.raises(ValueError, match="not unique"):
        load_trace(p)
