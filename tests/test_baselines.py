"""Baseline systems on the same model: merged kernels are W + s*A@B; greedy tokens equal transformers + peft."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.adapters import load_adapter, random_adapter, save_peft_adapter
from slora_jax.baselines import MergedCopiesServer, OutOfDeviceMemory, PeftMergeServer, merge_lora
from slora_jax.engine import SamplingParams
from slora_jax.errors import RequestError
from slora_jax.model import load_checkpoint

SPECS = {"a": (4, ("q", "v")), "b": (8, ("q", "k", "v", "o")), "c": (16, ("o", "gate", "up", "down"))}


@pytest.fixture(scope="module")
def model(tiny_model_dirs, tmp_path_factory):
    model_dir = tiny_model_dirs["llama2_mha"]
    cfg, params = load_checkpoint(model_dir, dtype=jnp.float32)
    root = tmp_path_factory.mktemp("baseline_adapters")
    dirs = {}
    for i, (name, (rank, projs)) in enumerate(SPECS.items()):
        dirs[name] = str(root / name)
        save_peft_adapter(random_adapter(cfg, rank, projs, alpha=2 * rank, seed=i, name=name), dirs[name])
    return model_dir, cfg, params, dirs


def test_merged_kernels_are_w_plus_scaled_ab(model):
    _, cfg, params, dirs = model
    adapter = load_adapter(dirs["c"], cfg)
    merged = merge_lora(params, cfg, adapter)
    for proj in ("q", "k", "v", "o", "gate", "up", "down"):
        w_LxIxO = np.asarray(params["layers"][proj]["kernel"])
        want = w_LxIxO.copy()
        for layer in range(cfg.num_hidden_layers):
            m = adapter.modules.get((layer, proj))
            if m is not None:
                want[layer] += m.scale * m.a @ m.b
        np.testing.assert_allclose(merged["layers"][proj]["kernel"], want, rtol=1e-5, atol=1e-6)
        # untouched projections are shared, not copied
        assert (merged["layers"][proj] is params["layers"][proj]) == (proj in ("q", "k", "v"))
    assert merged["embed"] is params["embed"]


def run_all(system, prompts, adapters, new):
    ids = [system.submit(p, a, SamplingParams(max_new_tokens=n, ignore_eos=True), arrival_time=float(i))
           for i, (p, a, n) in enumerate(zip(prompts, adapters, new))]
    while system.has_unfinished():
        system.step()
    return [system.release(i) for i in ids]


def peft_greedy(model_dir, dirs, prompts, adapters, new):
    """Each request alone through transformers + peft (EOS does not stop it, like ignore_eos)."""
    import torch
    import transformers
    from peft import PeftModel

    base = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None
    model = PeftModel.from_pretrained(base, dirs["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(dirs[name], adapter_name=name)
    outs = []
    with torch.no_grad():
        for p, a, n in zip(prompts, adapters, new):
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, pad_token_id=0, adapter_names=[a or "__base__"])
            outs.append(out[0, len(p):].tolist())
    return outs


def test_baselines_give_the_greedy_tokens_of_transformers_peft(model):
    model_dir, cfg, params, dirs = model
    rng = np.random.default_rng(3)
    adapters = ["a", None, "b", "c", "a", "b", "c", None, "a"]
    prompts = [rng.integers(0, cfg.vocab_size, rng.integers(1, 13)).tolist() for _ in adapters]
    new = rng.integers(1, 9, len(adapters)).tolist()
    want = peft_greedy(model_dir, dirs, prompts, adapters, new)
    assert [len(w) for w in want] == new
    for cls, kw in [(PeftMergeServer, {}), (MergedCopiesServer, {"memory_budget_bytes": 1 << 30})]:
        server = cls(cfg, params, max_batch_size=3, max_model_len=64)  # the shapes of test_experiment's runs
        for name, d in dirs.items():
            server.add_adapter(name, d)
        outs = run_all(server, prompts, adapters, new)
        assert [c.token_ids for c in outs] == want, cls.__name__
        assert [len(c.token_ids) for c in outs] == new
        assert all(c.arrival_time <= c.first_token_time <= c.finish_time for c in outs)
        # FCFS over adapters, at most 3 requests a batch: a(0, 4, 8), base(1, 7), b(2, 5), c(3, 6)
        assert server.num_steps == 4
        first = [outs[i].first_token_time for i in range(len(outs))]
        assert first[0] == first[4] == first[8] < first[1] == first[7] < first[2] == first[5] < first[3] == first[6]


def test_merged_copies_report_out_of_memory(model):
    _, cfg, params, dirs = model
    copy = sum(x.nbytes for x in jax.tree.leaves(params))
    server = MergedCopiesServer(cfg, params, memory_budget_bytes=3 * copy)  # the base + 2 copies
    server.add_adapter("a", dirs["a"])
    server.add_adapter("b", dirs["b"])
    with pytest.raises(OutOfDeviceMemory, match="adapter 'c'"):
        server.add_adapter("c", dirs["c"])
    assert server.memory_report()["num_copies"] == 2


def test_static_batch_server_rejects_what_it_cannot_do(model):
    _, cfg, params, dirs = model
    server = PeftMergeServer(cfg, params, max_model_len=24)
    with pytest.raises(RequestError, match="greedy"):
        server.submit([1, 2], None, SamplingParams(temperature=0.5))
    with pytest.raises(RequestError, match="max_model_len"):
        server.submit([1] * 10, None, SamplingParams(max_new_tokens=15))
    with pytest.raises(RequestError, match="unknown adapter"):
        server.submit([1, 2], "zzz")
    with pytest.raises(RequestError, match="token ids"):
        server.submit([cfg.vocab_size], None)



def test_warm_compiles_every_shape_the_batches_need(model):
    """After `warm(input range, output range)`, serving requests in those ranges compiles nothing (the
    campaign's `compiles.replay` was 2-3 for peft_merge: host arrays of new shapes staged onto the device)."""
    from slora_jax.experiment.campaign import COMPILES

    _, cfg, params, dirs = model
    rng = np.random.default_rng(5)
    server = PeftMergeServer(cfg, params, max_batch_size=3, max_model_len=64)
    for name, d in dirs.items():
        server.add_adapter(name, d)
    server.warm((2, 12), (1, 8))
    before = COMPILES.count
    adapters = ["a", None, "b", "c", "a"]
    prompts = [rng.integers(0, cfg.vocab_size, rng.integers(2, 13)).tolist() for _ in adapters]
    run_all(server, prompts, adapters, rng.integers(1, 9, len(adapters)).tolist())
    assert COMPILES.count == before
