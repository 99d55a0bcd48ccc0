"""The batch's adapters in a dense slab (`slora_jax.memory.slab`): placement invariants, contents, engine parity."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slora_jax.config import preset
from slora_jax.engine.sampling import SamplingParams
from slora_jax.errors import ConfigError
from slora_jax.memory.pool import PoolLayout
from slora_jax.memory import slab as slab_mod
from slora_jax.memory.slab import GROUPS, LoraSlab, SlabLora
from test_engine import random_prompts, tiny_engine

KERNEL = {"slab_block_n": 16, "slab_block_k": 32, "slab_block_p": 16}  # the tiny model's sizes (hidden 64)
RANKS = [1, 4, 8, 16, 24, 64, 3, 32, 16, 8, 2, 40]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(0, len(RANKS) - 1), min_size=1, max_size=8, unique=True), min_size=1,
                max_size=12))
def test_placement_holds_each_batch_in_disjoint_rows_without_reading_much_more(batches):
    cfg = preset("tiny")
    slab = LoraSlab(cfg, PoolLayout.for_model(cfg, 8, 4, 16), 256, jnp.float32, block=16)
    for batch in batches:
        need = {f"a{i}": RANKS[i] for i in batch}
        before = dict(slab.entries)
        compactions = slab.stats["compactions"]
        placed, new = slab.plan(need)
        slab.entries = placed
        assert set(placed) == set(need) and all(placed[n].rows == r for n, r in need.items())
        spans = sorted((e.start, e.start + e.rows) for e in placed.values())
        assert all(0 <= s and e <= slab.P for s, e in spans)
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # disjoint
        assert slab.n_rows <= -(-(1.25 * sum(need.values()) + slab.block) // slab.block) * slab.block
        # Exactly the adapters that are new or moved are written; without a compaction none moves.
        assert set(new) == {n for n in need if before.get(n) != placed[n]}
        if slab.stats["compactions"] == compactions:
            assert all(placed[n] == before[n] for n in need if n in before)


def test_a_batch_past_the_slab_is_refused():
    cfg = preset("tiny")
    slab = LoraSlab(cfg, PoolLayout.for_model(cfg, 8, 4, 16), 64, jnp.float32, block=16)
    with pytest.raises(ConfigError, match="slab rows"):
        slab.plan({"a": 40, "b": 40})
    with pytest.raises(ConfigError, match="multiple of 16"):
        LoraSlab(cfg, PoolLayout.for_model(cfg, 8, 4, 16), 40, jnp.float32, block=16)


def test_engine_with_a_slab_gives_the_same_tokens_and_holds_the_adapters_weights(monkeypatch):
    monkeypatch.setattr(slab_mod, "WRITE_CHUNK", 2)  # three adapters: a full chunk and a padded one
    prompts = random_prompts(250, [4, 9, 2, 7, 5, 3], seed=6)
    adapters = ["a0", "a1", "a2", "a0", None, "a1"]
    sp = SamplingParams(max_new_tokens=6)
    want = tiny_engine(lora_impl="reference", max_num_seqs=4).generate(prompts, adapters, sp)
    engine = tiny_engine(lora_impl="pallas", lora_kernel=KERNEL, max_num_seqs=4, lora_slab_rows=64)
    seen = []
    lora_input = engine.slab.lora_input
    engine.slab.lora_input = lambda *a, **k: seen.append(lora_input(*a, **k)) or seen[-1]
    got = engine.generate(prompts, adapters, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert seen and all(isinstance(x, SlabLora) for x in seen) and engine.slab.stats["adapters_written"] >= 3
    # Every adapter still in the slab holds its folded weights at its rows (zeros past a projection's rank).
    cfg = engine.cfg
    assert engine.slab.entries
    for name, e in engine.slab.entries.items():
        ad = engine.store.host(name).folded(np.float32)
        for gi, (a, b) in engine.slab.arrays.items():
            for g, proj in enumerate(GROUPS[gi]):
                for layer in range(cfg.num_hidden_layers):
                    m = ad.modules.get((layer, proj))
                    r = 0 if m is None else m.rank
                    a_got = np.asarray(a[layer * len(GROUPS[gi]) + g, :, e.start : e.start + e.rows])
                    b_got = np.asarray(b[layer * len(GROUPS[gi]) + g, e.start : e.start + e.rows,
                                         : cfg.projection_shape(proj)[1]])
                    if r:
                        np.testing.assert_allclose(a_got[:, :r], m.a, rtol=1e-6)
                        np.testing.assert_allclose(b_got[:r], m.b, rtol=1e-6)
                    assert not a_got[:, r:].any() and not b_got[r:].any()
    rep = engine.memory_report()
    assert rep["slab_bytes"] > 0 and rep["slab_adapters"] == len(engine.slab.entries)

    # `slab_max_tokens`: steps of more tokens (the 32-token prefill here) take the paths on pool pages.
    # And a slab of 32 rows: a batch of all three adapters (ranks 2 + 8 + 24) does not fit, so that step
    # runs on the pool's pages, with a warning, instead of failing mid-step.
    widths = []
    slab_linear = slab_mod.lora_linear_slab
    monkeypatch.setattr(slab_mod, "lora_linear_slab", lambda x, *a, **k: widths.append(x.shape[0]) or slab_linear(x, *a, **k))
    engine = tiny_engine(lora_impl="pallas", lora_kernel={**KERNEL, "slab_max_tokens": 16}, max_num_seqs=4,
                         lora_slab_rows=32)
    slab_steps, lora_steps = [], []
    lora_input, batch_lora = engine.slab.lora_input, engine.store.batch_lora
    engine.slab.lora_input = lambda *a, **k: slab_steps.append(1) or lora_input(*a, **k)
    engine.store.batch_lora = lambda *a, **k: lora_steps.append(1) or batch_lora(*a, **k)
    with pytest.warns(RuntimeWarning, match="lora_slab_rows=32"):
        got = engine.generate(prompts, adapters, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert widths and set(widths) == {16} and engine.num_steps > 0
    on_pages = engine.slab.stats["steps_on_pages"]
    assert on_pages > 0 and slab_steps and on_pages + len(slab_steps) == len(lora_steps)


def slab_lora_case(slots_BxT: np.ndarray, **kernel):
    """`test_pool.paged_lora_case` with its adapters copied into a slab:
    (params, tokens, positions, cache, the reference `PagedLora`, the `SlabLora`)."""
    from test_pool import CFG, paged_lora_case

    from slora_jax.ops import KernelConfig

    params, toks, pos, cache, lora = paged_lora_case(slots_BxT)
    paged = lora("pallas", **kernel)
    names = ["a0", "a1", "a2"]  # the table's rows in order (a fourth is padding)
    slab = LoraSlab(CFG, paged.layout, 128, jnp.float32, block=kernel.get("slab_block_p", 16))
    slab.ensure(names, paged.table, cache.pool, paged.r_max)
    return params, toks, pos, cache, lora("reference"), slab.lora_input(paged, names, slots_BxT.reshape(-1),
                                                                        KernelConfig(**kernel))


def test_model_on_the_slab_equals_reference():
    """Mixed ranks (one per-layer), targets on all seven projections, rows with no adapter: the slab
    kernels (interpret mode) give the jnp logits, here under `scan` (the engine test runs per-layer weights)."""
    import jax

    from test_pool import CFG

    from slora_jax.model import forward

    slots = np.array([[1, 1, 0, -1], [2, 0, 0, 1], [-1, 2, 2, 1]], np.int32)
    params, toks, pos, cache, ref, slab = slab_lora_case(slots, interpret=True, **KERNEL)
    run = jax.jit(forward, static_argnums=1)
    want, _ = run(params, CFG, toks, pos, cache, ref)
    got, _ = run(params, CFG, toks, pos, cache, slab)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_slab_needs_the_pallas_paged_path():
    with pytest.raises(ConfigError, match="lora_slab_rows needs"):
        tiny_engine(lora_impl="reference", lora_slab_rows=64)
    with pytest.raises(ConfigError, match="lora_slab_rows needs"):
        tiny_engine(lora_impl="pallas", unified_memory=False, lora_slab_rows=64)
