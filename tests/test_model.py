"""The functional Llama against `transformers` on tiny random fp32 models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import TINY_MODELS
from slora_jax.config import PRESETS, LlamaConfig, preset
from slora_jax.model import (
    DenseKVCache,
    decode_step,
    forward,
    greedy_generate,
    init_random_params,
    load_checkpoint,
    param_shapes,
    prefill,
)

MODELS = list(TINY_MODELS)
PROMPT_LENS = [1, 6, 17, 40]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_prompts(vocab: int, lens, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lens]


def hf_logits(hf_model, prompt) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0].numpy()


def pad(prompts):
    lens = np.array([len(p) for p in prompts], np.int32)
    toks = np.zeros((len(prompts), lens.max()), np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    return jnp.asarray(toks), jnp.asarray(lens)


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    """name -> (our config, fp32 params, HF model loaded from the same folder)."""
    out = {}
    for name, d in tiny_model_dirs.items():
        cfg, params = load_checkpoint(d, dtype=jnp.float32)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        out[name] = (cfg, params, hf)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_prefill_logits_match_transformers(loaded, name):
    cfg, params, hf = loaded[name]
    prompts = random_prompts(cfg.vocab_size, PROMPT_LENS, seed=1)
    toks, lens = pad(prompts)
    logits, cache = prefill(params, cfg, toks, lens, max_len=64)
    assert logits.shape == (len(prompts), max(PROMPT_LENS), cfg.vocab_size)
    assert isinstance(cache, DenseKVCache) and cache.k.shape[3] == 64 and cache.max_len == 64
    for i, p in enumerate(prompts):
        assert rel_err(logits[i, : len(p)], hf_logits(hf, p)) < 1e-4, (name, len(p))


@pytest.mark.parametrize("name", MODELS)
def test_decode_token_by_token_matches_transformers(loaded, name):
    """Prefill a prefix, then feed the rest one token per step; rows have different lengths."""
    cfg, params, hf = loaded[name]
    full = random_prompts(cfg.vocab_size, [30, 23, 12], seed=2)
    prefix_lens = [5, 9, 1]
    toks, lens = pad([p[:n] for p, n in zip(full, prefix_lens)])
    _, cache = prefill(params, cfg, toks, lens, max_len=32)
    ref = [hf_logits(hf, p) for p in full]
    for step in range(max(len(p) - n for p, n in zip(full, prefix_lens))):
        pos = [n + step if n + step < len(p) else -1 for p, n in zip(full, prefix_lens)]
        tok = [p[q] if q >= 0 else 0 for p, q in zip(full, pos)]
        logits, cache = decode_step(params, cfg, jnp.array(tok, jnp.int32), jnp.array(pos, jnp.int32), cache)
        for b, q in enumerate(pos):
            if q >= 0:
                assert rel_err(logits[b], ref[b][q]) < 1e-4, (name, b, q)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_matches_transformers(loaded, name):
    cfg, params, hf = loaded[name]
    prompts = random_prompts(cfg.vocab_size, [3, 11, 7, 1], seed=3)
    ours = greedy_generate(params, cfg, prompts, max_new_tokens=12)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=12, do_sample=False, pad_token_id=0,
            )
        assert got == out[0, len(p):].tolist()


def test_sharded_checkpoint_and_bf16(tmp_path, loaded, tiny_model_dirs):
    cfg, params32, hf = loaded["llama3_gqa"]
    d = tmp_path / "sharded"
    hf.save_pretrained(d, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists()
    cfg2, params = load_checkpoint(d, dtype=jnp.float32)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params32)
    cfg3, p16 = load_checkpoint(tiny_model_dirs["llama3_gqa"])  # default dtype bf16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    prompt = random_prompts(cfg.vocab_size, [20], seed=4)
    toks, lens = pad(prompt)
    l16, _ = prefill(p16, cfg3, toks, lens, max_len=20)
    assert rel_err(l16[0], hf_logits(hf, prompt[0])) < 3e-2


def test_forward_is_pure_and_jittable(loaded):
    """The same inputs give the same outputs under jit and without; the cache is donated."""
    cfg, params, _ = loaded["llama2_mha"]
    toks, lens = pad(random_prompts(cfg.vocab_size, [9, 4], seed=5))
    pos = jnp.where(jnp.arange(9)[None, :] < lens[:, None], jnp.arange(9)[None, :], -1)
    cache = DenseKVCache.create(cfg, 2, 16, jnp.float32)
    eager, _ = forward(params, cfg, toks, pos, cache)
    step = jax.jit(forward, static_argnums=1, donate_argnums=4)
    jitted, new_cache = step(params, cfg, toks, pos, DenseKVCache.create(cfg, 2, 16, jnp.float32))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    # Padding positions were never written.
    assert not np.asarray(new_cache.k)[:, 1, :, 4:].any()


def test_presets_have_real_shapes():
    assert abs(preset("llama-7b").num_params() - 6.74e9) < 0.01e9
    assert abs(preset("llama-13b").num_params() - 13.02e9) < 0.01e9
    assert abs(preset("llama3-8b").num_params() - 8.03e9) < 0.01e9
    assert abs(preset("llama-70b").num_params() - 68.98e9) < 0.01e9
    shapes = param_shapes(preset("llama3-8b"))  # no allocation
    assert shapes["layers"]["k"]["kernel"].shape == (32, 4096, 1024)
    assert shapes["lm_head"]["kernel"].shape == (4096, 128256)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt-2")
    assert set(PRESETS) >= {"llama-7b", "llama-13b", "llama3-8b", "llama-70b", "tiny"}


def test_init_random_params_runs():
    cfg = preset("tiny")
    params = init_random_params(cfg, jax.random.key(0))
    assert params["layers"]["q"]["kernel"].dtype == jnp.bfloat16
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, param_shapes(cfg))
    out = greedy_generate(params, cfg, [[1, 2, 3]], max_new_tokens=4, eos_token_ids=())
    assert len(out[0]) == 4 and all(0 <= t < cfg.vocab_size for t in out[0])
    p32 = init_random_params(cfg, jax.random.key(0), dtype=jnp.float32)
    assert p32["embed"]["embedding"].dtype == jnp.float32


def test_config_gqa_validation():
    with pytest.raises(ValueError, match="multiple of"):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=3, num_key_value_heads=2, head_dim=4)


@pytest.mark.parametrize("reads_pool", [False, True])
def test_q_read_ordered_before_the_kv_write_when_lora_reads_the_pool(reads_pool):
    """A LoRA fn marked `reads_pool` (adapters in the KV pool's pages) gets q, k, v through an
    optimization barrier before `attend` (which writes k/v into the pool); others do not."""
    from slora_jax.model.layers import DecoderLayer

    cfg = preset("tiny")
    layer = DecoderLayer(cfg, jnp.float32)
    h = jnp.ones((1, 2, cfg.hidden_size), jnp.float32)
    rope = (jnp.ones((1, 2, cfg.head_dim)), jnp.zeros((1, 2, cfg.head_dim)))
    attend = lambda q, k, v: (q, None)  # noqa: E731  (q's heads as the attention output: shapes only)

    def lora(proj, y, x):
        return y + 1.0

    lora.reads_pool = reads_pool
    params = layer.init(jax.random.key(0), h, rope, attend, lora)
    jaxpr = str(jax.make_jaxpr(lambda p: layer.apply(p, h, rope, attend, lora))(params))
    assert ("optimization_barrier" in jaxpr) == reads_pool
