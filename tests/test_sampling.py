"""Tests of the per-request sampling parameters and the batched on-device sampler.

Distribution checks draw many samples at once by vmapping the sampler over
keys; the keys are fixed, so every check is deterministic. Every test uses the
same few shapes ([B, V] = [6, 32], N draws, batches padded to 8 rows), so the
sampler compiles only a handful of times.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.engine.sampling import (
    SamplingBatch,
    SamplingParams,
    request_key,
    request_key_data,
    sample,
    sample_batch,
    step_keys,
)

B, V, N = 6, 32, 20000  # rows, vocabulary, draws per row
PAD = 8  # SamplingBatch size

sample_jit = jax.jit(sample)
sample_batch_jit = jax.jit(sample_batch)


@jax.jit
def _draws(logits_BxV, temperature_B, top_k_B, top_p_B, keys_NxB):
    return jax.vmap(sample, in_axes=(None, None, None, None, 0))(logits_BxV, temperature_B, top_k_B, top_p_B, keys_NxB)


def draws(logits_BxV, temperature_B, top_k_B, top_p_B, seed=0):
    """[N, B] numpy tokens: N independent draws for every row."""
    return np.asarray(_draws(logits_BxV, temperature_B, top_k_B, top_p_B, keys(seed, N, B)))


def rows(*params):
    """temperature [B], top_k [B], top_p [B] arrays for (temperature, top_k, top_p) tuples."""
    t, k, p = zip(*params)
    return np.array(t, np.float32), np.array(k, np.int32), np.array(p, np.float32)


def keys(seed, *shape):
    return jax.random.split(jax.random.key(seed), shape)


def random_logits(seed, B=B, V=V, scale=2.0):
    return (scale * np.random.default_rng(seed).standard_normal((B, V))).astype(np.float32)


def ref_probs(logits_V, temperature, top_k, top_p):
    """float64 numpy reference of the distribution `sample` draws from: [V]."""
    V = logits_V.shape[0]
    order = np.argsort(-logits_V, kind="stable")
    z = logits_V[order].astype(np.float64) / temperature
    if 0 < top_k < V:
        z[top_k:] = -np.inf
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    if top_p < 1.0:
        probs[before >= top_p] = 0.0
    out = np.zeros(V)
    out[order] = probs / probs.sum()
    return out


def midpoint_top_p(logits_V, temperature, top_k, rank):
    """A top_p whose nucleus is exactly the `rank + 1` best tokens, far from any boundary."""
    probs = np.sort(ref_probs(logits_V, temperature, top_k, 1.0))[::-1]
    cum = np.cumsum(probs)
    lo = cum[rank - 1] if rank else 0.0
    return float((lo + cum[rank]) / 2)


# ---------------------------------------------------------------- SamplingParams


def test_params_defaults_and_normalization():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.stop_token_ids, p.ignore_eos) == (
        16, 0.0, 0, 1.0, None, (), False)
    assert p.greedy
    q = SamplingParams(max_new_tokens=np.int64(3), temperature=1, top_k=np.int32(5), top_p=np.float32(0.5),
                       seed=2**63, stop_token_ids=[7, np.int64(9)])
    assert q.stop_token_ids == (7, 9) and isinstance(q.stop_token_ids, tuple)
    assert type(q.temperature) is float and type(q.top_k) is int and type(q.max_new_tokens) is int
    assert not q.greedy
    with pytest.raises(AttributeError):
        q.temperature = 2.0  # frozen
    assert SamplingParams(stop_token_ids=[1]) == SamplingParams(stop_token_ids=(1,))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature="1"), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(seed=1.0), "seed"),
        (dict(stop_token_ids=[1, "2"]), "stop_token_ids"),
        (dict(stop_token_ids=[1.0]), "stop_token_ids"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(stop_token_ids="12"), "stop_token_ids"),
        (dict(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_finish_reason():
    p = SamplingParams(max_new_tokens=3, stop_token_ids=(5,))
    assert p.finish_reason(1, 1, eos_token_ids=(2,)) is None
    assert p.finish_reason(5, 1, eos_token_ids=(2,)) == "stop"
    assert p.finish_reason(2, 1, eos_token_ids=(2,)) == "stop"
    assert p.finish_reason(1, 3, eos_token_ids=(2,)) == "length"
    assert p.finish_reason(2, 3, eos_token_ids=(2,)) == "stop"  # the stop wins when both apply
    q = SamplingParams(max_new_tokens=3, stop_token_ids=(5,), ignore_eos=True)
    assert q.finish_reason(2, 1, eos_token_ids=(2,)) is None
    assert q.finish_reason(5, 1, eos_token_ids=(2,)) == "stop"  # stop tokens still apply


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax_including_ties():
    logits = random_logits(0)
    logits[1, [3, 17, 20]] = logits[1].max() + 1.0  # a three-way tie: argmax takes the first
    logits[2, :] = 0.5  # all tied
    t, k, p = rows((0.0, 0, 1.0), (0.0, 3, 0.5), (0.0, 0, 1.0), (0.0, 1, 0.1), (0.0, 40, 1.0), (0.0, 0, 0.9))
    expected = np.asarray(jnp.argmax(logits, axis=-1))
    for seed in range(3):
        np.testing.assert_array_equal(sample_jit(logits, t, k, p, keys(seed, B)), expected)
    assert expected[1] == 3 and expected[2] == 0


@pytest.mark.parametrize("temperature", [1e-3, 0.5, 1.0, 10.0, 1e4])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    logits = random_logits(1)
    logits[0, [4, 9]] = logits[0].max() + 0.25  # tie: still the first index, like argmax
    t, k, p = rows(*[(temperature, 1, top_p) for top_p in (1.0, 0.3, 1.0, 0.99, 1.0, 0.01)])
    out = draws(logits, t, k, p, seed=2)
    np.testing.assert_array_equal(out, np.broadcast_to(np.argmax(logits, axis=-1), out.shape))


def test_tiny_temperature_is_greedy():
    logits = random_logits(2)
    t, k, p = rows(*[(1e-7, 0, 1.0)] * 3, *[(1e-7, 5, 0.5)] * 3)
    np.testing.assert_array_equal(sample_jit(logits, t, k, p, keys(3, B)), np.argmax(logits, axis=-1))


# ---------------------------------------------------------------- support of top-k / top-p


def test_top_k_never_samples_outside_top_k():
    logits = random_logits(3, scale=0.5)  # flat: without the filter, every token would appear
    t, k, p = rows((1.0, 1, 1.0), (1.0, 2, 1.0), (0.7, 5, 1.0), (3.0, 10, 1.0), (1.0, 31, 1.0), (100.0, 4, 1.0))
    out = draws(logits, t, k, p, seed=4)
    for b in range(B):
        top = set(np.argsort(-logits[b])[: k[b]].tolist())
        seen = set(out[:, b].tolist())
        assert seen <= top, (b, seen - top)
        if k[b] <= 10:
            assert seen == top  # every allowed token shows up in N flat-ish draws


@pytest.mark.parametrize("seed", range(4))
def test_top_p_never_samples_outside_nucleus(seed):
    rng = np.random.default_rng(seed)
    logits = random_logits(10 + seed)
    params = []
    for b in range(B):
        temperature = float(rng.choice([0.5, 1.0, 2.0]))
        top_k = int(rng.choice([0, 0, 8, 20]))
        kept = V if top_k == 0 else top_k
        probs = np.sort(ref_probs(logits[b], temperature, top_k, 1.0))[::-1]
        # a nucleus boundary at a token of non-negligible probability
        rank = int(rng.choice(np.flatnonzero(probs[:kept] > 1e-2)))
        params.append((temperature, top_k, midpoint_top_p(logits[b], temperature, top_k, rank)))
    t, k, p = rows(*params)
    out = draws(logits, t, k, p, seed=20 + seed)
    for b in range(B):
        ref = ref_probs(logits[b], t[b], k[b], p[b])
        nucleus = set(np.flatnonzero(ref > 0).tolist())
        seen = set(out[:, b].tolist())
        assert seen <= nucleus, (b, seen - nucleus)
        assert set(np.flatnonzero(ref > 5e-3).tolist()) <= seen


def test_masked_logits_are_never_sampled():
    logits = random_logits(5, scale=0.3)
    logits[:, ::2] = -np.inf  # e.g. vocabulary padding
    t, k, p = rows((1.0, 0, 1.0), (5.0, 0, 1.0), (1.0, 20, 1.0), (1.0, 0, 0.99), (2.0, 30, 0.95), (0.0, 0, 1.0))
    out = draws(logits, t, k, p, seed=6)
    assert (out % 2 == 1).all()


# ---------------------------------------------------------------- distributions


def test_empirical_frequencies_match_reference():
    logits = np.full(V, -np.inf, np.float32)
    logits[:8] = random_logits(7, 1, 8, scale=1.5)[0]  # a small vocabulary: 8 live tokens
    logits_BxV = np.tile(logits, (B, 1))
    params = [
        (0.5, 0, 1.0),
        (1.0, 0, 1.0),
        (2.0, 0, 1.0),
        (1.0, 5, 1.0),
        (1.0, 0, midpoint_top_p(logits, 1.0, 0, 3)),
        (1.5, 6, midpoint_top_p(logits, 1.5, 6, 4)),
    ]
    t, k, p = rows(*params)
    out = draws(logits_BxV, t, k, p, seed=8)
    for b in range(B):
        ref = ref_probs(logits, t[b], k[b], p[b])
        freq = np.bincount(out[:, b], minlength=V) / N
        # the binomial std of a frequency is <= 0.0036 at N = 20000
        np.testing.assert_allclose(freq, ref, atol=0.015, err_msg=f"row {b}: {params[b]}")
        assert (freq[ref == 0] == 0).all()
    # the plain-temperature rows match softmax(logits / T) exactly as well
    for b, temperature in enumerate((0.5, 1.0, 2.0)):
        np.testing.assert_allclose(ref_probs(logits, temperature, 0, 1.0),
                                   np.asarray(jax.nn.softmax(logits / temperature)), atol=1e-6)


def test_top_k_at_or_above_vocab_is_off():
    logits = random_logits(9, scale=0.5)
    off = draws(logits, *rows(*[(1.0, 0, 1.0)] * B), seed=10)
    big = draws(logits, *rows(*[(1.0, V, 1.0)] * 3, *[(1.0, 1000, 1.0)] * 3), seed=10)
    np.testing.assert_array_equal(off, big)


# ---------------------------------------------------------------- seeds and keys


def test_request_key_derivation():
    data = lambda *a, **kw: tuple(request_key_data(*a, **kw).tolist())  # noqa: E731
    assert data(7, 0) == data(7, 99) == data(7, 5, engine_seed=3)  # a seed alone decides
    assert data(7, 0) != data(8, 0)
    assert data(0, 0) != data(2**32, 0) != data(2**40, 0)  # no truncation to 32 bits
    assert data(None, 1) == data(None, 1)
    assert data(None, 1) != data(None, 2)
    assert data(None, 1) != data(None, 1, engine_seed=1)
    assert data(None, 0) != data(None, 2**32)
    assert data(None, 3) != data(3, 3)
    typed = request_key(7, 0)
    assert jnp.issubdtype(typed.dtype, jax.dtypes.prng_key) and typed.shape == ()
    # Host key data: computed on the CPU device (no wait on an accelerator's queue), the same bits.
    assert data(None, 5, engine_seed=2) == tuple(np.asarray(jax.random.key_data(request_key(None, 5, 2))).tolist())
    from slora_jax.engine import sampling as sampling_mod

    assert sampling_mod._host_device().platform == "cpu"
    for bad in (dict(seed=-1, request_id=0), dict(seed=None, request_id=-1),
                dict(seed=None, request_id=0, engine_seed=2**64), dict(seed=None, request_id=1.5)):
        with pytest.raises(ValueError):
            request_key(**bad)


def test_typed_keys_and_key_data_agree():
    logits = random_logits(11, PAD)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=4),
              SamplingParams(temperature=1.2, top_p=0.7), SamplingParams(),
              SamplingParams(temperature=2.0, top_k=10, top_p=0.9), SamplingParams(temperature=1.0)]
    base = keys(12, B)
    idx = np.arange(B, dtype=np.int32) * 3
    raw = np.asarray(jax.random.key_data(base))
    np.testing.assert_array_equal(jax.random.key_data(step_keys(base, idx)), jax.random.key_data(step_keys(raw, idx)))
    batch = SamplingBatch.from_params(params, list(raw), idx.tolist(), size=PAD)  # raw key data inside
    typed = sample_jit(logits[:B], batch.temperature[:B], batch.top_k[:B], batch.top_p[:B], step_keys(base, idx))
    np.testing.assert_array_equal(typed, sample_batch_jit(logits, batch)[:B])


def batch_tokens(logits_BxV, params, key_data, token_index):
    """`sample_batch` over rows padded to PAD: numpy int32 [len(params)]."""
    batch = SamplingBatch.from_params(params, key_data, token_index, size=PAD)
    logits = np.zeros((PAD, V), np.float32)
    logits[: len(params)] = logits_BxV
    return np.asarray(sample_batch_jit(logits, batch))[: len(params)]


TARGETS = [
    SamplingParams(temperature=0.8, seed=1234),  # a temperature-only row: unfiltered or filtered path
    SamplingParams(temperature=1.3, top_k=6, top_p=0.8, seed=2**40 + 5),
    SamplingParams(temperature=1.0),  # no seed: engine seed + request id
]


@pytest.mark.parametrize("target", TARGETS)
def test_same_seed_same_token_regardless_of_batch(target):
    logits_V = random_logits(13, 1, scale=0.5)[0]
    rng = np.random.default_rng(14)
    target_key = request_key_data(target.seed, 77, engine_seed=5)

    def run(n, row, others, token_index):
        """The target's token at `token_index` in a batch of n rows, at position `row`."""
        logits = random_logits(int(rng.integers(1 << 30)), n)
        logits[row] = logits_V
        params = [others[i % len(others)] for i in range(n)]
        params[row] = target
        key_data = [request_key_data(q.seed, 1000 + i, engine_seed=5) for i, q in enumerate(params)]
        key_data[row] = target_key
        idx = rng.integers(0, 50, n).tolist()
        idx[row] = token_index
        return int(batch_tokens(logits, params, key_data, idx)[row])

    greedy = [SamplingParams()]
    sampled = [SamplingParams(temperature=2.0, seed=3), SamplingParams(temperature=0.5)]
    filtered = [SamplingParams(temperature=1.0, top_p=0.5, seed=9), SamplingParams(temperature=0.7, top_k=3)]
    tokens = []
    for token_index in range(6):
        got = {
            run(1, 0, greedy, token_index),
            run(6, 3, greedy, token_index),  # the only sampled row
            run(6, 0, sampled, token_index),  # no row filters
            run(8, 5, filtered, token_index),  # others filter: the sorted path
            run(4, 2, greedy + sampled + filtered, token_index),
        }
        assert len(got) == 1, (token_index, got)
        tokens.append(got.pop())
    assert len(set(tokens)) > 1  # the token index changes the draw


def test_different_seeds_differ():
    logits = np.zeros((PAD, V), np.float32)  # uniform: 32**6 sequences, so they collide only by chance
    params = [SamplingParams(temperature=1.0)] * PAD

    def sequences(key_data):
        """Each row's first 6 tokens: PAD tuples."""
        tokens = np.stack([batch_tokens(logits, params, key_data, [i] * PAD) for i in range(6)], 1)
        return [tuple(row) for row in tokens.tolist()]

    seeded = sequences([request_key_data(s, 0) for s in range(PAD)]) + sequences(
        [request_key_data(s, 0) for s in range(PAD, 2 * PAD)])
    assert len(set(seeded)) == 2 * PAD
    unseeded = sequences([request_key_data(None, rid) for rid in range(PAD)])
    assert len(set(unseeded)) == PAD and not set(unseeded) & set(seeded)


# ---------------------------------------------------------------- jit with mixed rows


def test_mixed_batch_under_jit_compiles_once():
    sizes = []
    for trial in range(3):
        logits = random_logits(30 + trial, PAD)
        params = [
            SamplingParams(),
            SamplingParams(temperature=0.9, seed=trial),
            SamplingParams(temperature=0.0, top_k=5),
            SamplingParams(temperature=1.5, top_k=1),
            SamplingParams(temperature=0.6, top_p=0.9),
            SamplingParams(temperature=1.0, top_k=4, top_p=0.5, seed=11),
        ][: 6 - trial]  # different mixes, one padded shape
        key_data = [request_key_data(q.seed, i) for i, q in enumerate(params)]
        batch = SamplingBatch.from_params(params, key_data, [trial] * len(params), size=PAD)
        out = np.asarray(sample_batch_jit(logits, batch))
        sizes.append(sample_batch_jit._cache_size())
        assert out.shape == (PAD,) and out.dtype == np.int32
        argmax = np.argmax(logits, axis=-1)
        greedy_rows = [0, 2, 3] + list(range(len(params), PAD))  # top_k = 1 and padding rows are greedy too
        np.testing.assert_array_equal(out[greedy_rows], argmax[greedy_rows])
        for r, q in enumerate(params):
            if not q.greedy:
                assert ref_probs(logits[r], q.temperature, q.top_k, q.top_p)[out[r]] > 0, (r, q)
    assert sizes[0] == sizes[-1]  # no recompilation for new parameter values (all three mixes filter)


MIXES = {
    "greedy": [SamplingParams(), SamplingParams(temperature=1e-7, top_p=0.5)],
    "unfiltered": [SamplingParams(), SamplingParams(temperature=0.7, seed=2)],
    "filtered": [SamplingParams(temperature=0.9, seed=3), SamplingParams(temperature=1.1, top_k=3)],
}


@pytest.mark.parametrize("expect", list(MIXES))
def test_host_mode_same_tokens_and_no_device_branch(expect):
    """The host-chosen path gives the tokens of the device-chosen one, and the jitted
    sampler then has no conditional (on a GPU, a device-chosen branch syncs the host)."""
    params = MIXES[expect]
    kd = [request_key_data(q.seed, i) for i, q in enumerate(params)]
    batch = SamplingBatch.from_params(params, kd, [3, 5], size=PAD)
    assert batch.mode == expect
    logits = random_logits(40, PAD)
    keys = step_keys(batch.key_data, batch.token_index)
    on_device = sample(logits, batch.temperature, batch.top_k, batch.top_p, keys)
    np.testing.assert_array_equal(np.asarray(sample_batch_jit(logits, batch)), np.asarray(on_device))
    assert "case" not in jax.jit(sample_batch).lower(logits, batch).as_text()
    unchosen = dataclasses.replace(batch, mode=None)
    assert "case" in jax.jit(sample_batch).lower(logits, unchosen).as_text()
    with pytest.raises(ValueError, match="mode"):
        sample(logits, batch.temperature, batch.top_k, batch.top_p, keys, mode="beam")


def test_sampling_batch_padding_and_errors():
    params = [SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=1), SamplingParams(top_k=2**40)]
    kd = [request_key_data(q.seed, i) for i, q in enumerate(params)]
    b = SamplingBatch.from_params(params, kd, [4, 0], size=4)
    np.testing.assert_array_equal(b.temperature, np.array([0.5, 0, 0, 0], np.float32))
    np.testing.assert_array_equal(b.top_k, [3, np.iinfo(np.int32).max, 0, 0])
    np.testing.assert_array_equal(b.top_p, np.array([0.9, 1, 1, 1], np.float32))
    np.testing.assert_array_equal(b.token_index, [4, 0, 0, 0])
    assert b.key_data.dtype == np.uint32 and b.key_data.shape == (4, *kd[0].shape)
    np.testing.assert_array_equal(b.key_data[:2], np.stack(kd))
    assert len(jax.tree_util.tree_leaves(b)) == 5
    with pytest.raises(ValueError, match="size"):
        SamplingBatch.from_params(params, kd, [0, 0], size=1)
    with pytest.raises(ValueError, match="token_index"):
        SamplingBatch.from_params(params, kd, [0], size=4)
    empty = SamplingBatch.from_params([], [], [], size=2)
    assert empty.temperature.shape == (2,) and (empty.top_p == 1).all()
