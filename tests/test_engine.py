"""The serving engine against `transformers` + `peft`, request by request, and its invariants."""

from __future__ import annotations

import jax
import time

import numpy as np
import pytest
import torch

import dataclasses

from slora_jax.adapters import random_adapter, save_peft_adapter
from slora_jax.config import PROJECTIONS, EngineConfig, preset
from slora_jax.engine import Engine, SamplingParams
from slora_jax.engine.request import Status
from slora_jax.errors import ConfigError
from slora_jax.ops import KernelConfig
from test_model import random_prompts
from test_model_lora import setup  # noqa: F401  (fixture: base model + 3 peft adapters)
from test_model_lora import ADAPTERS


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_mixed_stream_with_preemption_matches_peft(setup, tiny_model_dirs, tmp_path_factory,  # noqa: F811
                                                   impl):
    """`impl` for attention and LoRA: the jnp references, or the Pallas kernels (interpret mode: the
    chunk-attention kernel in steps with prompt chunks, the decode kernel in decode-only steps)."""
    cfg, _, hf_base, peft_models, adapters = setup
    names = list(ADAPTERS)
    root = tmp_path_factory.getbasetemp()
    dirs = {n: next(root.glob(f"adapters*/{n}")) for n in names}
    # The adapters need 61 pages of the 56 (they swap), KV runs short: requests get preempted.
    engine = Engine.from_pretrained(tiny_model_dirs["llama3_gqa"], adapters=dirs, dtype="float32",
                                    num_pages=56, page_size=4, lora_chunk=16, max_num_seqs=4,
                                    max_batch_tokens=16, max_model_len=48, attention_impl=impl, lora_impl=impl,
                                    defer_unstaged_starts=False)  # a fixed schedule: the preemptions it asserts
    rng = np.random.default_rng(0)
    lens = [5, 17, 9, 1, 12, 20, 3, 8]
    new = [14, 20, 10, 16, 12, 20, 15, 10]
    which = [0, None, 2, 1, None, 0, 2, 1]
    prompts = random_prompts(cfg.vocab_size, lens, seed=21)
    ids, streamed = [], {}
    for i, (p, a, n) in enumerate(zip(prompts, which, new)):
        ids.append(engine.submit(p, None if a is None else names[a], SamplingParams(max_new_tokens=n)))
        if i % 3 == 2:  # later requests arrive while earlier ones run
            for ev in engine.step():
                streamed.setdefault(ev.request_id, []).extend([] if ev.token is None else [ev.token])
    while engine.has_unfinished():
        for ev in engine.step():
            streamed.setdefault(ev.request_id, []).extend([] if ev.token is None else [ev.token])
    outs = [engine.completion(i) for i in ids]
    assert sum(o.num_preemptions for o in outs) > 0, "the pool was meant to force preemption"
    for o, p, a, n in zip(outs, prompts, which, new):
        want = hf_greedy(hf_base if a is None else peft_models[a], p, n)
        assert o.token_ids == want, (o.request_id, a)
        assert streamed[o.request_id] == o.token_ids
        assert o.finish_reason == ("stop" if want[-1] in cfg.eos_token_ids and len(want) <= n else "length")
        assert o.arrival_time <= o.first_token_time <= o.finish_time
    st = engine.allocator.stats()
    assert st.kv == 0 and st.free + st.adapter == st.total
    assert all(r.pins == 0 for r in engine.store._resident.values())


def tiny_engine(**kw):
    """A tiny engine with 3 adapters. Starts are never deferred unless asked (`defer_unstaged_starts`):
    tests that count preemptions or evictions need a schedule that host timing cannot change."""
    cfg = preset("tiny")
    engine = Engine.from_pretrained("tiny", dtype="float32", **{"num_pages": 96, "page_size": 4, "lora_chunk": 16,
                                                                 "max_model_len": 64, "defer_unstaged_starts": False,
                                                                 **kw})
    for i, r in enumerate([2, 8, 24]):
        engine.add_adapter(f"a{i}", random_adapter(cfg, r, ("q", "k", "v", "o", "down")[: 2 + i], seed=i, name=f"a{i}"))
    return engine


@pytest.mark.parametrize("defer", [False, True])
def test_random_workload_with_aborts_frees_everything(defer):
    engine = tiny_engine(max_num_seqs=6, max_batch_tokens=32, num_pages=72, defer_unstaged_starts=defer)
    rng = np.random.default_rng(1)
    ids = []
    for step in range(40):
        if step < 24 and rng.random() < 0.7:
            p = rng.integers(3, 250, rng.integers(1, 30)).tolist()
            ad = [None, "a0", "a1", "a2"][rng.integers(4)]
            ids.append(engine.submit(p, ad, SamplingParams(max_new_tokens=int(rng.integers(1, 20)),
                                                           temperature=float(rng.choice([0.0, 0.8])), top_k=5)))
        if ids and rng.random() < 0.1:
            engine.abort(int(rng.choice(ids)))
        engine.step()
    while engine.has_unfinished():
        engine.step()
    outs = [engine.completion(i) for i in ids]
    assert {o.finish_reason for o in outs} <= {"stop", "length", "abort"}
    assert "abort" in {o.finish_reason for o in outs}
    if not defer:  # deferred starts make the schedule depend on the staging threads' timing
        assert sum(o.num_preemptions for o in outs) > 0
    for o in outs:
        if o.finish_reason == "length":
            assert len(o.token_ids) == engine._requests[o.request_id].sampling.max_new_tokens
    st = engine.allocator.stats()
    assert st.kv == 0 and st.free + st.adapter == st.total


def test_overlapped_steps_give_the_synchronous_tokens():
    """Step t+1 is dispatched before step t's tokens are read: the same completions (stop tokens met a step
    late, preemption, sampling), every page back, and tokens reported one `step()` later."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 250, rng.integers(1, 30)).tolist() for _ in range(14)]
    adapters = [[None, "a0", "a1", "a2"][i % 4] for i in range(14)]
    sps = [SamplingParams(max_new_tokens=int(rng.integers(1, 16)), temperature=float(rng.choice([0.0, 0.9])),
                          stop_token_ids=tuple(int(t) for t in rng.integers(3, 250, 40)), seed=i)
           for i in range(14)]
    outs, engines = {}, {}
    for overlap in (False, True):
        engines[overlap] = e = tiny_engine(max_num_seqs=5, max_batch_tokens=24, num_pages=60, overlap_steps=overlap)
        t0 = time.perf_counter()
        done = e.generate(prompts, adapters, sps)
        wall = time.perf_counter() - t0
        assert sum(o.num_preemptions for o in done) > 0  # (when differs: pages come back a step later)
        outs[overlap] = [(o.token_ids, o.finish_reason) for o in done]
        # Every step is read once and counted under one kind; the seconds partition (part of) the wall time.
        ph = e.phase_stats
        unread = e._inflight is not None  # (overlapped: the last step dispatched may stay unread)
        assert ph["decode_steps"] + ph["mixed_steps"] == e.num_steps - unread and ph["decode_steps"] > 0 < ph["mixed_steps"]
        assert 0 < ph["decode_s"] + ph["mixed_s"] <= wall
        sampled = ph["decode_tokens"] + ph["mixed_tokens"]
        generated = sum(len(o.token_ids) for o in done)
        # (overlapped: a row may sample once more after its stop token, the token dropped)
        assert sampled == generated if not overlap else generated <= sampled <= generated + len(done)
    assert outs[True] == outs[False]
    assert {r for _, r in outs[True]} == {"stop", "length"}
    for e in engines.values():
        st = e.allocator.stats()
        assert st.kv == 0 and st.free + st.adapter == st.total and not e.has_unfinished()

    e = engines[True]  # (reused: its steps are compiled)
    rid = e.submit([5, 6, 7], "a1", SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert e.step() == []  # prefill dispatched, nothing read yet
    got = [ev.token for ev in e.step()]  # decode 1 dispatched, the prefill's token read
    assert len(got) == 1 and e.has_unfinished()
    while e.has_unfinished():
        got += [ev.token for ev in e.step() if ev.token is not None]
    assert got == e.completion(rid).token_ids and len(got) == 3


def test_same_seed_same_tokens_whatever_the_batch():
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=1234)
    alone = tiny_engine().generate([[5, 6, 7]], ["a1"], sp)[0].token_ids
    engine = tiny_engine()
    crowd = engine.generate([[1, 2], [5, 6, 7], [9] * 11], [None, "a1", "a2"],
                            [SamplingParams(max_new_tokens=5, temperature=0.7), sp, SamplingParams()])
    assert crowd[1].token_ids == alone
    other = tiny_engine().generate([[5, 6, 7]], ["a1"], SamplingParams(max_new_tokens=8, temperature=1.0, seed=99))
    assert other[0].token_ids != alone


def test_bad_requests_and_adapters(tmp_path):
    from slora_jax.errors import RequestError

    engine = tiny_engine(defer_unstaged_starts=True)  # "huge" below meets `_defer_start` first
    good = engine.submit([1, 2], "a0", SamplingParams(max_new_tokens=3))
    bad_calls = [
        (lambda: engine.submit([1, 2], "nope"), "unknown adapter"),
        (lambda: engine.submit([]), "empty"),
        (lambda: engine.submit("hello"), "tokenizer"),
        (lambda: engine.submit(list(range(60)), None, SamplingParams(max_new_tokens=8)), "max_model_len"),
        (lambda: engine.submit([1, 999]), "token ids"),
        (lambda: engine.submit([1], None, SamplingParams(temperature=-1.0)), "temperature"),
        (lambda: engine.submit([1], None, SamplingParams(top_p=0.0)), "top_p"),
        (lambda: engine.submit([1], None, SamplingParams(top_k=-2)), "top_k"),
    ]
    for call, match in bad_calls:
        with pytest.raises(RequestError, match=match):
            call()
    with pytest.raises(TypeError, match="unknown engine config"):
        Engine.from_pretrained("tiny", num_pagez=3)
    # An adapter for another model shape: refused at submission, for that request only.
    (tmp_path / "wrong").mkdir()
    other = dataclasses.replace(preset("tiny"), hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                num_key_value_heads=1)
    save_peft_adapter(random_adapter(other, 4, ("q",)), tmp_path / "wrong")
    engine.add_adapter("wrong", tmp_path / "wrong")
    with pytest.raises(RequestError, match="cannot serve"):
        engine.submit([1, 2, 3], "wrong")
    # An adapter that validates but needs more pages than the whole pool fails when it is loaded.
    engine.add_adapter("huge", random_adapter(preset("tiny"), 256, PROJECTIONS, name="huge"))
    huge = engine.submit([4, 5], "huge", SamplingParams(max_new_tokens=3))
    while engine.has_unfinished():
        engine.step()
    assert engine.completion(huge).finish_reason == "error" and "whole pool" in engine.completion(huge).error
    assert engine.completion(good).finish_reason == "length" and len(engine.completion(good).token_ids) == 3


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        self.t += 0.01
        return self.t


def test_early_abort_drops_requests_past_their_slo():
    engine = tiny_engine(scheduler="early_abort", slo_first_token_s=6.0)
    engine.clock = FakeClock()
    late = engine.submit([1, 2, 3], "a0", SamplingParams(max_new_tokens=4), arrival_time=engine.clock() - 10)
    fresh = engine.submit([4, 5], "a1", SamplingParams(max_new_tokens=4))
    events = engine.step()
    assert any(e.request_id == late and e.finish_reason == "abort" for e in events)
    while engine.has_unfinished():
        engine.step()
    assert engine.completion(late).token_ids == [] and engine.completion(late).finish_reason == "abort"
    assert len(engine.completion(fresh).token_ids) == 4
    with pytest.raises(ValueError, match="unknown scheduler"):
        tiny_engine(scheduler="lottery")


def test_adapter_clustering_caps_adapters_per_step_and_keeps_outputs():
    prompts = random_prompts(250, [4, 9, 2, 7, 5, 3], seed=5)
    adapters = ["a0", "a1", "a2", "a0", None, "a1"]
    want = [o.token_ids for o in tiny_engine().generate(prompts, adapters, SamplingParams(max_new_tokens=6))]
    engine = tiny_engine(scheduler="cluster", max_adapters_per_batch=1)
    plans = []
    run = engine._run
    engine._run = lambda plan: (plans.append({r.adapter for r, _ in plan} - {None}), run(plan))[1]
    got = [o.token_ids for o in engine.generate(prompts, adapters, SamplingParams(max_new_tokens=6))]
    assert got == want
    assert plans and all(len(p) <= 1 for p in plans)


def test_prefetching_queued_adapters_keeps_outputs():
    """Two sequences at a time: queued requests' adapters are staged ahead and used; same tokens as
    without prefetching."""
    prompts = random_prompts(250, [4, 9, 2, 7, 5, 3], seed=7)
    adapters = ["a0", "a1", "a2", "a0", None, "a1"]
    sp = SamplingParams(max_new_tokens=4)
    off = tiny_engine(max_num_seqs=2, max_batch_tokens=16, prefetch_adapters=0)
    want = [o.token_ids for o in off.generate(prompts, adapters, sp)]
    assert off.store.stats["prefetch_hits"] == 0
    on = tiny_engine(max_num_seqs=2, max_batch_tokens=16, max_resident_adapters=2)  # adapters swap in and out
    assert [o.token_ids for o in on.generate(prompts, adapters, sp)] == want
    assert on.store.stats["prefetch_hits"] > 0 and on.store.stats["evictions"] > 0 and not on.store._staged
    with pytest.raises(ValueError, match="prefetch_adapters"):
        tiny_engine(prefetch_adapters=-1)


def test_a_request_whose_adapter_is_still_staging_starts_later_without_blocking(monkeypatch):
    """With other rows to run, a new request whose adapter the staging threads are still packing
    waits in the queue (the step dispatches at once) and starts once it is packed; its tokens
    are the ones it gets when loads block. With nothing else to run, the load waits."""
    import threading
    import time

    from slora_jax.adapters.store import AdapterStore

    gate = threading.Event()
    pack = AdapterStore._pack

    def slow_pack(self, adapter, placement):
        if adapter.name == "a1":
            gate.wait(30)
        return pack(self, adapter, placement)

    prompts = random_prompts(250, [5, 7], seed=11)
    sp = SamplingParams(max_new_tokens=12)
    want = [o.token_ids for o in tiny_engine().generate(prompts, ["a0", "a1"], sp)]
    monkeypatch.setattr(AdapterStore, "_pack", slow_pack)
    engine = tiny_engine(defer_unstaged_starts=True)
    first = engine.submit(prompts[0], "a0", sp)
    engine.step()  # nothing else to run: a0's load waits for its packing
    assert engine._requests[first].status is Status.RUNNING
    second = engine.submit(prompts[1], "a1", sp)
    t0 = time.perf_counter()
    for _ in range(3):
        engine.step()
    assert time.perf_counter() - t0 < 20  # did not wait for the gate
    assert engine._requests[second].status is Status.WAITING and engine.store.stats["start_deferred"] >= 3
    assert "a1" in engine.store._staged
    gate.set()
    while engine.has_unfinished():
        engine.step()
    assert [engine.completion(i).token_ids for i in (first, second)] == want
    assert engine.store.stats["prefetch_hits"] >= 1
    gate.clear()
    engine = tiny_engine(defer_unstaged_starts=False)
    engine.submit(prompts[0], "a0", sp)
    engine.step()
    engine.submit(prompts[1], "a1", sp)
    threading.Timer(0.5, gate.set).start()
    t0 = time.perf_counter()
    engine.step()  # waits for the pack
    assert time.perf_counter() - t0 >= 0.4 and engine.store.stats["start_deferred"] == 0


def test_deferred_starts_stage_a_bounded_set_and_pack_each_adapter_once(monkeypatch):
    """Many new requests whose adapters are not packed yet: at most `max(prefetch_adapters,
    adapter_stage_threads)` are staged for deferred starts (the rest wait unstaged), none is
    dropped and packed again while its request waits, and every request ends."""
    import collections
    import threading

    from slora_jax.adapters.store import AdapterStore

    gate, packs = threading.Event(), collections.Counter()
    pack = AdapterStore._pack

    def slow_pack(self, adapter, placement):
        packs[adapter.name] += 1
        if adapter.name != "a0":
            gate.wait(30)
        return pack(self, adapter, placement)

    monkeypatch.setattr(AdapterStore, "_pack", slow_pack)
    engine = tiny_engine(defer_unstaged_starts=True, prefetch_adapters=2, adapter_stage_threads=2,
                         max_num_seqs=16, num_pages=400)
    cfg = preset("tiny")
    names = [f"b{i}" for i in range(10)]
    for i, name in enumerate(names):
        engine.add_adapter(name, random_adapter(cfg, 4, ("q", "v"), seed=10 + i, name=name))
    sp = SamplingParams(max_new_tokens=6)
    prompts = random_prompts(250, [5] * (len(names) + 1), seed=3)
    ids = [engine.submit(prompts[0], "a0", SamplingParams(max_new_tokens=40))]
    engine.step()  # a0 loads (nothing else to run)
    ids += [engine.submit(p, n, sp) for p, n in zip(prompts[1:], names)]
    for _ in range(5):
        engine.step()
        assert len(engine._deferred) <= 2 and len(engine.store._staged) <= 4
    waiting = [engine._requests[i] for i in ids[1:]]
    assert all(r.status is Status.WAITING for r in waiting) and engine.store.stats["start_deferred"] >= 5 * 2
    gate.set()
    while engine.has_unfinished():
        engine.step()
        assert len(engine._deferred) <= 2 and len(engine.store._staged) <= 4
    assert [engine.completion(i).finish_reason for i in ids] == ["length"] * len(ids)
    assert all(packs[n] == 1 for n in names), packs  # none dropped while waiting, so none packed twice
    assert engine.store.stats["packs"] == len(names) + 1 and engine.store.stats["start_deferred_unstaged"] > 0


def test_string_prompts_with_the_model_folders_tokenizer(tmp_path, tiny_model_dirs):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "with_tok"
    shutil.copytree(tiny_model_dirs["llama2_mha"], d)
    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(d)
    engine = Engine.from_pretrained(str(d), dtype="float32", num_pages=64, page_size=4, lora_chunk=16,
                                    max_model_len=32)
    out = engine.generate(["w5 w9 w17"], sampling=SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    ids = engine.generate([[5, 9, 17]], sampling=SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == ids.token_ids and len(out.token_ids) == 4
    assert out.text == " ".join(f"w{t}" for t in out.token_ids)


def test_memory_report_counts_pages_by_kind():
    engine = tiny_engine(max_model_len=64)
    rid = engine.submit(list(range(1, 10)), "a2", SamplingParams(max_new_tokens=3))
    engine.step()
    rep = engine.memory_report()
    assert rep["pages_kv"] == 3 and rep["resident_adapters"] == 1  # 9 prompt tokens, 4 per page
    assert rep["pages_free"] + rep["pages_kv"] + rep["pages_adapter"] == rep["pages_total"]
    assert rep["kv_fragmentation"] == pytest.approx(3 / 12)
    while engine.has_unfinished():
        engine.step()
    assert engine.memory_report()["pages_kv"] == 0 and engine.completion(rid).finish_reason == "length"


@pytest.mark.parametrize("unified", [True, False])
def test_bytes_read_per_step(unified):
    """`Engine.bytes_read`, the HBM floor's bytes: all weights each step, each row's cache up to its
    last new token, each distinct adapter of a step once at its own ranks (both adapter stores)."""
    cfg = preset("tiny")
    kw = {} if unified else dict(unified_memory=False, max_loras=2, max_lora_rank=32)
    engine = tiny_engine(max_batch_tokens=32, **kw)
    p0, p1, g = 7, 5, 4  # prompt lengths (one prefill step each, same step), generated tokens
    engine.generate([list(range(1, 1 + p0)), list(range(1, 1 + p1))], ["a1", "a1"], SamplingParams(max_new_tokens=g))
    assert engine.num_steps == g  # one prefill step, then g - 1 decode steps
    item = 4  # float32
    params = sum(x.size for x in jax.tree.leaves(engine.params)) * item
    kv_tok = 2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers * item
    kv = sum(p + d for p in (p0, p1) for d in range(g))  # step d reads p + d cached tokens
    a1 = cfg.num_hidden_layers * 8 * sum(sum(cfg.projection_shape(p)) for p in ("q", "k", "v"))  # rank 8, q/k/v
    assert dict(engine.bytes_read) == {"weights": g * params, "kv": kv * kv_tok, "adapters": g * a1 * item}


def test_no_unified_memory_ablation_gives_the_same_tokens():
    prompts = random_prompts(250, [4, 9, 2, 7, 5, 3, 6], seed=6)
    adapters = ["a0", "a1", "a2", "a0", None, "a1", "big"]
    sp = SamplingParams(max_new_tokens=6)

    def run(**kw):
        engine = tiny_engine(**kw)
        engine.add_adapter("big", random_adapter(preset("tiny"), 48, ("q", "v"), seed=9, name="big"))
        return engine, engine.generate(prompts, adapters, sp)

    _, unified = run()
    # Two slots of rank 32: adapters swap through the slots; "big" (rank 48) cannot fit in one.
    engine, slots = run(unified_memory=False, max_loras=2, max_lora_rank=32)
    for u, s, a in zip(unified, slots, adapters):
        if a == "big":
            assert s.finish_reason == "error" and "fixed adapter slots" in s.error
        else:
            assert s.token_ids == u.token_ids
    rep = engine.memory_report()
    assert rep["pages_adapter"] == 0 and rep["resident_adapters"] <= 2 and rep["adapter_slots_bytes"] > 0
    assert engine.store.stats["evictions"] > 0


def test_slots_hold_only_their_projections():
    """`slot_projections`: the fixed slots reserve memory for those projections only, give the same
    tokens as the pool, and refuse an adapter of another projection."""
    cfg = preset("tiny")
    prompts = random_prompts(250, [4, 9, 2, 7], seed=3)
    adapters, sp = ["a0", "a1", "a2", None], SamplingParams(max_new_tokens=5)
    unified = tiny_engine().generate(prompts, adapters, sp)
    slot = dict(unified_memory=False, max_loras=2, max_lora_rank=32)
    engine = tiny_engine(**slot, slot_projections=("o", "q", "k", "v"))  # a0-a2 target q, k, v, o
    assert engine.store.projections == ("q", "k", "v", "o")
    assert [c.token_ids for c in engine.generate(prompts, adapters, sp)] == [c.token_ids for c in unified]
    qkvo = sum(sum(cfg.projection_shape(p)) for p in ("q", "k", "v", "o"))
    assert engine.memory_report()["adapter_slots_bytes"] == 2 * 32 * cfg.num_hidden_layers * qkvo * 4  # float32
    assert tiny_engine(**slot).memory_report()["adapter_slots_bytes"] > engine.memory_report()["adapter_slots_bytes"]
    out = tiny_engine(**slot, slot_projections=("q", "k", "v")).generate(prompts, adapters, sp)
    assert [c.finish_reason for c in out[:3]] == ["length", "length", "error"] and "fixed adapter slots" in out[2].error
    assert [c.token_ids for c in out[:2]] == [c.token_ids for c in unified[:2]]
    with pytest.raises(ValueError, match="slot_projections"):
        EngineConfig(slot_projections=("q", "qq"))


def test_public_api_names():
    """The issue's import line: `from slora_jax import Engine, SamplingParams`."""
    import slora_jax
    from slora_jax import Engine as E, SamplingParams as SP

    assert E is Engine and SP is SamplingParams and {"Engine", "SamplingParams"} <= set(slora_jax.__all__)


def test_lora_kernel_overrides_reach_the_kernels():
    """`EngineConfig.lora_kernel` becomes the `KernelConfig` of every step's LoRA input; unknown names are refused."""
    with pytest.raises(ConfigError, match="bogus"):
        tiny_engine(lora_kernel={"bogus": 1})
    engine = tiny_engine(lora_kernel={"paged_warps": 4, "paged_k_steps": 2})
    seen, batch_lora = [], engine.store.batch_lora

    def spy(names, slot_T, rows, impl="reference", kernel=None):
        seen.append(kernel)
        return batch_lora(names, slot_T, rows, impl, kernel)

    engine.store.batch_lora = spy
    engine.generate([[5, 6, 7], [8, 9]], ["a1", "a2"], SamplingParams(max_new_tokens=3))
    assert seen and all(k == KernelConfig(paged_warps=4, paged_k_steps=2) for k in seen)
