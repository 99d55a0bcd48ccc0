"""The engine under tensor parallelism (`EngineConfig.tp`) on 4 host CPU devices: the same
greedy tokens as one device, for a mixed stream of adapters of different ranks swapping
through dense slots; what it refuses, as config errors."""

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
from test_model import random_prompts

# GQA with 4 KV heads (8 query heads), so that TP 4 divides both.
ADAPTER_RANKS = {"r3": (3, ("q", "v")), "r8": (8, ("q", "k", "v", "o")), "r16": (16, ("o", "gate", "down")),
                 "r6": (6, ("up", "k"))}
ROWS = [("r8", 5), (None, 9), ("r3", 3), ("r16", 7), ("r6", 1), ("r8", 6), ("r16", 4), (None, 2)]
ENGINE = dict(unified_memory=False, max_loras=3, max_lora_rank=16, max_num_seqs=4, max_batch_tokens=32,
              max_model_len=32, num_pages=64, page_size=4, attention_impl="reference")


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """(model folder, adapters, prompts, the single-device tokens of every request)."""
    path = tmp_path_factory.mktemp("tp_serving") / "base"
    make_hf_model("llama3_gqa", num_key_value_heads=4).save_pretrained(path)
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


@pytest.mark.parametrize("tp, strategy", [(4, "slora")])  # replicated_a: tests/test_tp.py
def test_tp_engine_gives_the_single_device_tokens(stream, tp, strategy):
    """Weights loaded into their shards as per-layer buffers; R = 16 split 4 ways under slora."""
    path, adapters, prompts, want = stream
    engine = Engine.from_pretrained(path, dtype="float32", tp=tp, tp_lora_strategy=strategy, lora_impl="reference",
                                    **ENGINE)
    assert run(engine, adapters, prompts) == want
    assert engine.store.stats["evictions"] > 0  # 4 adapters through 3 slots
    assert isinstance(engine.params["layers"], list)
    assert engine.params["layers"][0]["o"]["kernel"].sharding.spec == P("tp", None)
    assert engine.pool.sharding.spec == P(None, None, "tp")
    a = engine.store.weights["q"].a  # [L, slots, H, R]: slots stay laid out as the strategy splits them
    assert a.sharding.is_fully_replicated if strategy == "replicated_a" else a.sharding.spec == P(None, None, None, "tp")


def test_tp_config_errors():
    cfg = preset("tiny")  # 4 heads, 2 KV heads
    params = param_shapes(cfg, jnp.float32)  # refused before any weight is touched
    with pytest.raises(ConfigError, match="needs unified_memory=False"):
        Engine(cfg, params, EngineConfig(tp=2))
    with pytest.raises(ConfigError, match="lora_impl='gather_bmm'"):
        Engine(cfg, params, EngineConfig(tp=2, unified_memory=False, lora_impl="gather_bmm"))
    with pytest.raises(ConfigError, match=r"EngineConfig.tp: .*size 4 must divide num_key_value_heads=2"):
        Engine(cfg, params, EngineConfig(tp=4, unified_memory=False))
    odd = dataclasses.replace(cfg, intermediate_size=112)  # 56 MLP columns a device: not 16-wide blocks
    with pytest.raises(ConfigError, match=r"'pallas' at tp=2: .*'gate': \(64, 56\)"):
        Engine(odd, param_shapes(odd, jnp.float32), EngineConfig(tp=2, unified_memory=False, lora_impl="pallas"))
    with pytest.raises(ValueError, match="tp_lora_strategy"):
        EngineConfig(tp=2, tp_lora_strategy="megatron")
    assert jax.device_count() == 4
