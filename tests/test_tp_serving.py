"""The engine under tensor parallelism (`EngineConfig.tp`) on 4 host CPU devices: the same
greedy tokens as one device, for a mixed stream of adapters of different ranks, with the
adapters in the unified pool's pages split per strategy (`unified_memory=True`, jnp and
Pallas) or swapping through dense slots (`unified_memory=False`); what it refuses, as
config errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from conftest import make_hf_model
from slora_jax.adapters import random_adapter
from slora_jax.config import EngineConfig, preset
from slora_jax.engine import Engine, SamplingParams
from slora_jax.errors import ConfigError
from slora_jax.model import param_shapes
from slora_jax.parallel.paged import ShardedPagedLora
from test_model import random_prompts

# GQA with 4 KV heads (8 query heads) and an MLP of 128, so that TP 4 divides all, and every
# shard width is a multiple of lora_chunk 16 (the Pallas paged kernels read whole chunks);
# 2 layers, to compile fast.
MODEL = dict(num_key_value_heads=4, intermediate_size=128, num_hidden_layers=2)
ADAPTER_RANKS = {"r3": (3, ("q", "v")), "r8": (8, ("q", "k", "v", "o")), "r16": (16, ("o", "gate", "down")),
                 "r6": (6, ("up", "k"))}
# Every adapter in the first step (the store's batch bounds are set at once: one compile).
ROWS = [("r8", 5), ("r6", 1), ("r3", 3), ("r16", 7), (None, 9), ("r8", 6), ("r16", 4), (None, 2)]
# One token bucket (min_batch_tokens = max_batch_tokens): one compile of the step per engine.
# Starts never deferred: a schedule host timing cannot change (the evictions asserted below).
ENGINE = dict(max_num_seqs=4, max_batch_tokens=32, min_batch_tokens=32, max_model_len=32, num_pages=64, page_size=4,
              lora_chunk=16, attention_impl="reference", defer_unstaged_starts=False)
SLOTS = dict(unified_memory=False, max_loras=3, max_lora_rank=16)  # 4 adapters through 3 dense slots


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """(model folder, adapters, prompts, the single-device tokens of every request)."""
    path = tmp_path_factory.mktemp("tp_serving") / "base"
    make_hf_model("llama3_gqa", **MODEL).save_pretrained(path)
    ref = Engine.from_pretrained(path, dtype="float32", lora_impl="reference", **ENGINE)
    cfg = ref.cfg
    adapters = [random_adapter(cfg, r, projs, seed=40 + r, name=n) for n, (r, projs) in ADAPTER_RANKS.items()]
    prompts = random_prompts(cfg.vocab_size, [n for _, n in ROWS], seed=3)
    want = run(ref, adapters, prompts)
    return path, adapters, prompts, want


def run(engine: Engine, adapters, prompts) -> list[list[int]]:
    for a in adapters:
        engine.add_adapter(a.name, a)
    outs = engine.generate(prompts, [a for a, _ in ROWS], SamplingParams(max_new_tokens=6))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("tp, strategy, impl, num_pages", [
    (2, "slora", "reference", 24),  # too few pages for all four adapters beside the KV cache: evictions
    (4, "replicated_a", "reference", 96),  # (A of q/k/v/gate/up, B of o/down whole on every device: more pages)
    (4, "slora", "pallas", 64),  # Pallas interpreted on CPU; a rank-split A of a_rank 1..4 per device
])  # both strategies and both implementations on paged shards, faster: tests/test_tp_paged.py
def test_tp_engine_adapter_pages(stream, tp, strategy, impl, num_pages):
    """Adapters in the unified pool's pages, each device's slab holding its shard: the
    single-device greedy tokens, the pool split along its pages, adapters loaded as shards."""
    path, adapters, prompts, want = stream
    engine = Engine.from_pretrained(path, dtype="float32", tp=tp, tp_lora_strategy=strategy, lora_impl=impl,
                                    **{**ENGINE, "num_pages": num_pages})
    assert run(engine, adapters, prompts) == want
    assert engine.pool.sharding.spec == P(None, None, "tp")
    store = engine.store
    assert (store.shards.tp, store.shards.strategy) == (tp, strategy)
    if num_pages < ENGINE["num_pages"]:
        assert store.stats["evictions"] > 0 and store.stats["pool_loads"] > len(adapters)
    lora = store.batch_lora(["r16"] if store.is_resident("r16") else [], [0], 4, impl)
    assert isinstance(lora, ShardedPagedLora) and lora.shards is store.shards
    assert engine.memory_report()["pages_adapter"] == sum(len(store.resident(n).pages) for n in ADAPTER_RANKS
                                                          if store.is_resident(n))


def test_tp_engine_dense_slots(stream):
    """`unified_memory=False`: weights loaded into their shards as per-layer buffers; R = 16
    split 4 ways under slora; adapters swapping through 3 dense slots."""
    path, adapters, prompts, want = stream
    engine = Engine.from_pretrained(path, dtype="float32", tp=4, tp_lora_strategy="slora", lora_impl="reference",
                                    **ENGINE, **SLOTS)
    assert run(engine, adapters, prompts) == want
    assert engine.store.stats["evictions"] > 0  # 4 adapters through 3 slots
    assert isinstance(engine.params["layers"], list)
    assert engine.params["layers"][0]["o"]["kernel"].sharding.spec == P("tp", None)
    assert engine.pool.sharding.spec == P(None, None, "tp")
    assert engine.store.weights["q"].a.sharding.spec == P(None, None, None, "tp")  # slots split as slora does


def test_tp_config_errors():
    cfg = preset("tiny")  # 4 heads, 2 KV heads
    params = param_shapes(cfg, jnp.float32)  # refused before any weight is touched
    with pytest.raises(ConfigError, match="lora_impl='gather_bmm'"):
        Engine(cfg, params, EngineConfig(tp=2, lora_impl="gather_bmm"))
    with pytest.raises(ConfigError, match=r"EngineConfig.tp: .*size 4 must divide num_key_value_heads=2"):
        Engine(cfg, params, EngineConfig(tp=4, unified_memory=False))
    odd = dataclasses.replace(cfg, intermediate_size=112)  # 56 MLP columns a device: not 16-wide blocks
    with pytest.raises(ConfigError, match=r"'pallas' at tp=2: .*'gate': \(64, 56\)"):
        Engine(odd, param_shapes(odd, jnp.float32), EngineConfig(tp=2, unified_memory=False, lora_impl="pallas"))
    # adapter pages: a device's slab of a page (2 x 1 token x 1 KV head x 16 = 32 elements) holds no 64-wide row
    with pytest.raises(ConfigError, match=r"tp=2 with unified_memory=True: a device's slab .* lora_chunk=64"):
        Engine(cfg, params, EngineConfig(tp=2, page_size=1))
    # the paged kernels read whole chunks of each shard: k's 16 output columns a device, chunks of 32
    with pytest.raises(ConfigError, match=r"'pallas' at tp=2, unified_memory=True: .*lora_chunk=32.*'k': \(64, 16\)"):
        Engine(cfg, params, EngineConfig(tp=2, lora_impl="pallas", lora_chunk=32))
    with pytest.raises(ValueError, match="tp_lora_strategy"):
        EngineConfig(tp=2, tp_lora_strategy="megatron")
    assert jax.device_count() == 4
