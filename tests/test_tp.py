"""Tensor parallelism on 4 host CPU devices (conftest sets them up): TP = 1, 2, 4 give the
single-device logits and greedy tokens, with mixed adapters and ranks, under both LoRA
strategies; loaders place shards; the collectives are the ones each strategy promises."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import make_hf_model
from peft_utils import make_peft_adapter
from slora_jax import parallel
from slora_jax.adapters import load_adapter, pack_slots, random_adapter
from slora_jax.config import preset
from slora_jax.memory.pool import PoolLayout
from slora_jax.model import LoraInputs, decode_step, load_checkpoint, param_shapes, prefill
from slora_jax.model.generate import greedy_loop
from slora_jax.model.llama import prompt_positions
from test_model import hf_logits, pad, random_prompts, rel_err
from test_model_lora import ADAPTERS

# The GQA test model with 4 KV heads (8 query heads), so that TP 4 divides both.
TP_MODEL = dict(num_key_value_heads=4)
# Besides the peft adapters (ranks 8, 4, 16 with a rank-6 down): random ones of ranks 6 and 3,
# so that a column-parallel projection has a max rank tp=4 does not divide (up: 6) and a
# slot spans only some devices' rank columns (q at R=8: rank 3 -> local ranks 2, 1, 0, 0).
RANDOM_ADAPTERS = [(6, ("up", "v", "o")), (3, ("q", "gate", "down"))]
ROW_SLOTS = [0, 3, None, 1, 4, 2, None, 3]
ROW_LENS = [5, 12, 7, 1, 20, 3, 9, 14]
MAX_NEW = 8
TOL = 1e-5


def recorded_greedy(prefill_fn, decode_fn, cfg, prompts, weights):
    """Greedy tokens, and the logits `[B, V]` of every step: the prefill's last prompt token, then each decode."""
    steps = []

    def record(fn):
        def run(*args):
            logits, cache = fn(*args)
            steps.append(np.asarray(logits).reshape(len(prompts), -1))
            return logits, cache

        return run

    tokens = greedy_loop(record(prefill_fn), record(decode_fn), cfg, prompts, MAX_NEW, weights, ROW_SLOTS)
    return tokens, steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    hf = make_hf_model("llama3_gqa", **TP_MODEL)
    hf.save_pretrained(root / "base")
    cfg, params = load_checkpoint(root / "base", dtype=jnp.float32)
    peft_models, adapters = [], []
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        peft_models.append(make_peft_adapter(hf, root / name, seed=20 + i, **spec))
        adapters.append(load_adapter(root / name, cfg, name=name))
    adapters += [random_adapter(cfg, r, projs, seed=30 + r) for r, projs in RANDOM_ADAPTERS]
    prompts = random_prompts(cfg.vocab_size, ROW_LENS, seed=11)
    toks, lens = pad(prompts)
    slot_B = np.array([-1 if s is None else s for s in ROW_SLOTS], np.int32)
    slot_ids = jnp.asarray(np.repeat(slot_B[:, None], toks.shape[1], axis=1))
    weights = pack_slots(adapters, cfg, dtype=jnp.float32)
    ref_logits, _ = prefill(params, cfg, toks, lens, 32, LoraInputs(weights, slot_ids))
    base_logits, _ = prefill(params, cfg, toks, lens, 32, LoraInputs(weights, jnp.full_like(slot_ids, -1)))
    ref_tokens, ref_steps = recorded_greedy(functools.partial(prefill, params, cfg),
                                            functools.partial(decode_step, params, cfg), cfg, prompts, weights)
    return dict(dir=root / "base", cfg=cfg, hf=hf, peft=peft_models, adapters=adapters, prompts=prompts,
                toks=toks, lens=lens, slot_ids=slot_ids, ref_logits=np.asarray(ref_logits),
                base_logits=np.asarray(base_logits), ref_tokens=ref_tokens, ref_steps=ref_steps)


def tp_model(s, tp: int, strategy: str, unstacked: bool = False):
    """Mesh, params and adapter slots loaded straight into their shards (`unstacked`: per-layer
    buffers, params and LoRA weights both, so the layers run as a Python loop)."""
    mesh = parallel.make_mesh(s["cfg"], tp)
    cfg, params = parallel.load_checkpoint(s["dir"], mesh, dtype=jnp.float32, unstacked=unstacked)
    weights = parallel.pack_slots(s["adapters"], cfg, mesh, strategy)
    return mesh, params, parallel.unstack_lora(weights, mesh, strategy) if unstacked else weights


@pytest.fixture(scope="module")
def tp4_prefill(setup):
    """strategy -> (mesh, params, weights, prefill logits at every position, cache) at TP 4."""
    out = {}
    for strategy in parallel.LORA_STRATEGIES:
        mesh, params, weights = tp_model(setup, 4, strategy)
        logits, cache = parallel.prefill(params, setup["cfg"], setup["toks"], setup["lens"], 32,
                                         LoraInputs(weights, setup["slot_ids"]), mesh=mesh, strategy=strategy)
        out[strategy] = (mesh, params, weights, np.asarray(logits), cache)
    return out


def row_errors(logits, ref, lens):
    return [rel_err(logits[b, :n], ref[b, :n]) for b, n in enumerate(np.asarray(lens))]


def test_adapters_change_the_output(setup):
    """Guard: every adapter row differs from the base model, or the parity below proves little."""
    errs = row_errors(setup["ref_logits"], setup["base_logits"], setup["lens"])
    assert all(e > 1e-2 for e, s in zip(errs, ROW_SLOTS) if s is not None), errs


@pytest.mark.parametrize("strategy", parallel.LORA_STRATEGIES)
@pytest.mark.parametrize("tp, unstacked", [(1, False), (2, True), (4, False)])
def test_tp_greedy_matches_single_device(setup, tp, unstacked, strategy):
    """Same greedy tokens, and the same logits at every step (prefill's last token, each decode);
    layers stacked (a scan) or per-layer buffers (a Python loop)."""
    cfg = setup["cfg"]
    mesh, params, weights = tp_model(setup, tp, strategy, unstacked)
    if unstacked:
        assert isinstance(params["layers"], list) and isinstance(weights, list)
        assert params["layers"][0]["q"]["kernel"].sharding.spec == P(None, "tp")
    kw = dict(mesh=mesh, strategy=strategy)
    tokens, steps = recorded_greedy(functools.partial(parallel.prefill, params, cfg, **kw),
                                    functools.partial(parallel.decode_step, params, cfg, **kw), cfg,
                                    setup["prompts"], weights)
    assert tokens == setup["ref_tokens"]
    assert len(steps) == len(setup["ref_steps"]) == MAX_NEW
    for t, (got, want) in enumerate(zip(steps, setup["ref_steps"])):
        for b, ref_row in enumerate(setup["ref_tokens"]):
            if t < len(ref_row):  # rows still generating at this step
                assert rel_err(got[b], want[b]) < TOL, (t, b)


@pytest.mark.parametrize("strategy", parallel.LORA_STRATEGIES)
def test_tp4_prefill_logits_every_position(setup, tp4_prefill, strategy):
    _, _, _, logits, cache = tp4_prefill[strategy]
    assert {sh.data.shape[2] for sh in cache.k.addressable_shards} == {setup["cfg"].num_key_value_heads // 4}
    assert max(row_errors(logits, setup["ref_logits"], setup["lens"])) < TOL


def test_tp4_matches_peft(setup, tp4_prefill):
    logits = tp4_prefill["slora"][3]
    checked = 0
    for row, (p, s) in enumerate(zip(setup["prompts"], ROW_SLOTS)):
        if s is not None and s >= len(setup["peft"]):
            continue  # random adapters have no peft model; the single-device parity covers them
        model = setup["hf"] if s is None else setup["peft"][s]
        checked += 1
        assert rel_err(logits[row, : len(p)], hf_logits(model, p)) < 1e-4, (row, s)
    assert checked == 5


def test_shards_are_placed_by_partition(setup, tp4_prefill):
    cfg = setup["cfg"]
    L, H, F, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    _, params, weights, _, _ = tp4_prefill["slora"]
    shard = lambda x: {s.data.shape for s in x.addressable_shards}
    assert shard(params["layers"]["q"]["kernel"]) == {(L, H, cfg.q_size // 4)}
    assert shard(params["layers"]["k"]["kernel"]) == {(L, H, cfg.kv_size // 4)}
    assert shard(params["layers"]["o"]["kernel"]) == {(L, cfg.q_size // 4, H)}
    assert shard(params["layers"]["down"]["kernel"]) == {(L, F // 4, H)}
    assert shard(params["embed"]["embedding"]) == {(V // 4, H)}
    assert shard(params["lm_head"]["kernel"]) == {(H, V // 4)}
    S = len(setup["adapters"])
    # up: max rank 6, padded to 8, 2 rank columns per device; B split like up's output.
    assert shard(weights["up"].a) == {(L, S, H, 2)} and shard(weights["up"].b) == {(L, S, 8, F // 4)}
    assert shard(weights["down"].a) == {(L, S, F // 4, 6)} and shard(weights["down"].b) == {(L, S, 6, H // 4)}
    ranks = np.asarray(weights["up"].ranks)
    assert sorted(set(ranks[0].tolist())) == [0, 4, 6]  # true ranks kept, not the padded R
    rep = tp4_prefill["replicated_a"][2]
    assert shard(rep["up"].a) == {(L, S, H, 6)} and shard(rep["down"].b) == {(L, S, 6, H)}


def count_collectives(mesh, cfg, lora, strategy):
    """Collective ops in the lowered (not compiled) TP forward, params given as shapes."""
    shardings = parallel.sharding.named(mesh, parallel.param_specs(cfg))
    params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          param_shapes(cfg, jnp.float32), shardings)
    B, S = 2, 3
    cache = parallel.dense_kv_cache(cfg, B, 8, mesh, jnp.float32)
    toks = jnp.zeros((B, S), jnp.int32)
    if lora is not None:
        lora = LoraInputs(lora, jnp.zeros((B, S), jnp.int32))
    hlo = parallel.forward_jit.lower(params, cfg, toks, toks, cache, lora, mesh=mesh, strategy=strategy).as_text()
    return {op: len(re.findall(f'"stablehlo.{op}"', hlo)) for op in ("all_gather", "all_reduce")}


def test_collectives_per_strategy():
    """Per layer (the scan body is lowered once): the base model's 2 all-reduces (plus one
    for the embedding); `slora` adds an all-gather per column-parallel LoRA projection and an
    all-reduce per row-parallel one; `replicated_a` adds nothing."""
    cfg = preset("tiny")
    mesh = parallel.make_mesh(cfg, 2)
    ad = random_adapter(cfg, 8, ("q", "k", "v", "o", "gate", "up", "down"))
    assert count_collectives(mesh, cfg, None, "slora") == {"all_gather": 0, "all_reduce": 3}
    for strategy, want in [("slora", {"all_gather": 5, "all_reduce": 5}),
                           ("replicated_a", {"all_gather": 0, "all_reduce": 3})]:
        w = parallel.pack_slots([ad], cfg, mesh, strategy)
        assert count_collectives(mesh, cfg, w, strategy) == want, strategy


def test_paged_kv_pool_split_by_kv_heads(setup, tp4_prefill):
    """The unified pool's KV view split by KV heads, read by the Pallas paged-attention kernel,
    gives the dense single-device logits."""
    cfg, tp = setup["cfg"], 4
    mesh, params, weights, _, _ = tp4_prefill["slora"]
    B, S = setup["toks"].shape
    layout = PoolLayout.for_model(cfg, num_pages=B * 3 + 1, page_size=8)
    page_table = jnp.arange(1, B * 3 + 1, dtype=jnp.int32).reshape(B, 3)[:, ::-1]  # pages out of order
    cache = parallel.paged_kv_cache(parallel.create_pool(layout, mesh, jnp.float32), page_table, layout, S, mesh,
                                    attention_impl="pallas")  # the kernel (interpreted on CPU) on each device's slab
    assert cache.layout.num_kv_heads == cfg.num_key_value_heads // tp
    logits, cache = parallel.forward_jit(params, cfg, setup["toks"], prompt_positions(setup["lens"], S), cache,
                                         LoraInputs(weights, setup["slot_ids"]), mesh=mesh)
    assert cache.pool.sharding.spec == P(None, None, "tp")
    assert max(row_errors(np.asarray(logits), setup["ref_logits"], setup["lens"])) < TOL


def test_tp_size_errors():
    gqa2 = preset("tiny")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"size 4 must divide num_key_value_heads=2.*fit this model: \[1, 2\]"):
        parallel.make_mesh(gqa2, 4)
    with pytest.raises(ValueError, match=r"size 3 must divide num_attention_heads=4, num_key_value_heads=2"):
        parallel.make_mesh(gqa2, 3)
    with pytest.raises(ValueError, match="needs 8 devices, only 4"):
        parallel.make_mesh(preset("llama-70b"), 8)
    mesh = parallel.make_mesh(gqa2, 2)
    with pytest.raises(ValueError, match="strategy must be one of"):
        parallel.pack_slots([random_adapter(gqa2, 4)], gqa2, mesh, "megatron")


def test_unpadded_slora_weights_are_refused():
    cfg = preset("tiny")
    mesh = parallel.make_mesh(cfg, 2)
    w = pack_slots([random_adapter(cfg, 3, ("q",))], cfg)  # R = 3, not split over 2 devices
    toks = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="q: rank dimension 3 is not a multiple of tp=2"):  # refused before tracing
        parallel.forward(param_shapes(cfg), cfg, toks, toks, None, LoraInputs(w, toks), mesh=mesh, strategy="slora")


def test_random_init_draws_each_shard():
    cfg = preset("tiny")
    mesh = parallel.make_mesh(cfg, 2)
    params = parallel.init_random_params(cfg, jax.random.key(0), mesh, jnp.float32)
    shapes = param_shapes(cfg, jnp.float32)
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, shapes)
    q0, q1 = (np.asarray(s.data) for s in params["layers"]["q"]["kernel"].addressable_shards)
    assert q0.shape == (cfg.num_hidden_layers, cfg.hidden_size, cfg.q_size // 2) and not np.allclose(q0, q1)
    assert abs(float(np.std(np.asarray(params["lm_head"]["kernel"]))) - 0.02) < 1e-3
    assert np.all(np.asarray(params["layers"]["mlp_norm"]["scale"]) == 1)
    per_layer = parallel.init_random_params(cfg, jax.random.key(0), mesh, jnp.float32, unstacked=True)
    assert len(per_layer["layers"]) == cfg.num_hidden_layers
    for i, layer in enumerate(per_layer["layers"]):  # the same draws, each layer its own buffers
        np.testing.assert_array_equal(np.asarray(layer["o"]["kernel"]), np.asarray(params["layers"]["o"]["kernel"][i]))
        assert layer["o"]["kernel"].sharding.spec == P("tp", None)
