"""The serving engine: continuous batching of many adapters' requests over the unified pool.

Each `step()`:
1. the scheduler orders candidates; the engine gives each a token count (a
   decode token, or a prefill chunk) under the per-step token and sequence
   budgets, loading adapters into pool pages and reserving KV pages, evicting
   idle adapters and then preempting the latest running requests when pages
   run short (a preempted request is recomputed later: nothing is lost);
2. one jitted forward runs all those tokens as one ragged batch (the pool is
   donated), and samples on the device one token for each sequence that
   reached its last pending token;
3. the host appends tokens, checks stop conditions and frees what finished.

Shapes are padded to power-of-two buckets so a long run compiles a bounded
number of times.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import time
import warnings
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.adapters.store import AdapterStore, SlotAdapterStore
from slora_jax.config import PRESETS, PROJECTIONS, EngineConfig, LlamaConfig
from slora_jax.engine.request import Completion, Request, Status, TokenEvent
from slora_jax.engine.sampling import SamplingBatch, SamplingParams, request_key_data, sample_batch
from slora_jax.engine.packing import pack, unpack
from slora_jax.engine.scheduler import make_scheduler
from slora_jax.errors import AdapterError, ConfigError, RequestError
from slora_jax.memory.allocator import OutOfPages, PageAllocator
from slora_jax.memory.kv_cache import PagedKVCache
from slora_jax.memory.pool import PoolLayout, create_pool
from slora_jax.memory.slab import LoraSlab
from slora_jax.ops.lora import KernelConfig
from slora_jax.model import forward, init_random_params, load_checkpoint, unstack_layers
from slora_jax.parallel import serving


def _bucket(n: int, lo: int = 1) -> int:
    """Smallest power of two >= max(n, lo)."""
    return 1 << (max(n, lo) - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("spec", "cfg", "layout", "attention_impl", "prefill", "forward_fn"),
                   donate_argnames=("pool",))
def _step(params, pool, prev_sampled_R, buf_N, dev, spec, cfg, layout, attention_impl, prefill=False,
          forward_fn=forward):
    """One engine step on the device: the batch arrives as one packed buffer (`StepBatch`).

    `prefill`: some sequence runs a chunk of > 1 token (attention by chunks, `PagedKVCache`).
    `forward_fn`: `model.forward`, or under tensor parallelism `TensorParallel.forward`.
    """
    b: StepBatch = unpack(buf_N, dev, spec)
    # Decode tokens sampled by the step still in flight come from its device output, not the host.
    tokens_T = jnp.where(b.src_row_T >= 0, prev_sampled_R[jnp.maximum(b.src_row_T, 0)], b.tokens_T)
    cache = PagedKVCache(pool, b.page_table, b.seq_T[None], layout, attention_impl, prefill)
    logits_1xRxV, cache = forward_fn(params, cfg, tokens_T[None], b.pos_T[None], cache, b.lora, b.logits_index_R[None])
    return sample_batch(logits_1xRxV[0], b.sampling), cache.pool


@flax.struct.dataclass
class StepBatch:
    """What the host builds for one step (numpy leaves, packed into one transfer by `packing.pack`)."""

    tokens_T: np.ndarray  # [T] int32 token ids (those in src_row_T >= 0 filled in on the device)
    src_row_T: np.ndarray  # [T] int32, row of the in-flight step's samples that is this token, -1: tokens_T
    pos_T: np.ndarray  # [T] int32 positions, -1 for padding
    seq_T: np.ndarray  # [T] int32 page-table row of each token
    page_table: np.ndarray  # [R, max_pages] int32
    logits_index_R: np.ndarray  # [R] int32, the token each row samples after
    lora: object  # PagedLora | SlotLora | None
    sampling: SamplingBatch


@functools.cache
def _no_samples(R: int) -> jax.Array:
    return jnp.zeros(R, jnp.int32)


def _resolve_impls(ec: EngineConfig, cfg: LlamaConfig) -> EngineConfig:
    """Replace "auto" implementations (Pallas kernels on a GPU, jnp references elsewhere); check shapes."""
    auto = "pallas" if jax.default_backend() == "gpu" else "reference"
    ec = ec.replace(**{f: auto for f in ("attention_impl", "lora_impl") if getattr(ec, f) == "auto"})
    if ec.lora_impl == "pallas" and ec.unified_memory:
        bad = {p: s for p in PROJECTIONS for s in [cfg.projection_shape(p)] if s[0] % ec.lora_chunk or
               s[1] % ec.lora_chunk}
        if bad:
            raise ValueError(f"lora_impl='pallas' reads adapter pages in chunks of lora_chunk={ec.lora_chunk} "
                             f"columns, which must divide every projection's sizes; these do not: {bad}")
    return ec


@dataclasses.dataclass
class _InFlight:
    """A dispatched step: its sampled tokens (on the device) and the request of each sampling row."""

    sampled_R: jax.Array
    rows: list[tuple[int, Request]]
    row_of: dict[int, int]  # request id -> row
    decode_only: bool = False  # every row of the step computed one token (no prompt chunk)
    dispatched_at: float = 0.0  # perf_counter() at its dispatch


def _kernel_config(overrides: dict) -> KernelConfig | None:
    """`EngineConfig.lora_kernel` as a `KernelConfig` (None: the defaults); unknown fields are a `ConfigError`."""
    if not overrides:
        return None
    known = {f.name for f in dataclasses.fields(KernelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"EngineConfig.lora_kernel: unknown KernelConfig fields {unknown}; known: {sorted(known)}")
    return KernelConfig(**overrides)


class Engine:
    def __init__(self, cfg: LlamaConfig, params, engine_config: EngineConfig | None = None, tokenizer=None,
                 clock: Callable[[], float] = time.monotonic):
        ec = self.config = _resolve_impls(engine_config or EngineConfig(), cfg)
        tp = serving.TensorParallel(cfg, ec) if ec.tp > 1 else None  # mesh, shards, the step's forward
        if tp is not None:
            params = tp.place_params(params)
        elif ec.layer_loop == "unrolled" and not isinstance(params["layers"], (list, tuple)):
            # A copy: the caller's stacked weights stay alive while it holds them. To hold one copy on the
            # device, pass `model.unstack_layers(params, free=True)` (as `experiment.runner` does).
            params = unstack_layers(params)
        self.cfg, self.params, self.tokenizer, self.clock = cfg, params, tokenizer, clock
        self.dtype = params["embed"]["embedding"].dtype
        self.layout = PoolLayout.for_model(cfg, ec.num_pages, ec.page_size, ec.lora_chunk)
        self.pool = create_pool(self.layout, self.dtype) if tp is None else tp.create_pool(self.layout, self.dtype)
        self.allocator = PageAllocator(ec.num_pages)
        self._step = _step if tp is None else functools.partial(_step, forward_fn=tp.forward)
        # The first step's "previous samples" placed as later steps' are (replicated over the mesh
        # under TP), or the step compiles twice.
        self._no_samples = _no_samples if tp is None else functools.cache(lambda R: tp.replicate(_no_samples(R)))
        if tp is not None:
            self.store = tp.adapter_store(ec, self.layout, self.allocator, self.dtype)
        elif ec.unified_memory:
            self.store = AdapterStore(cfg, self.layout, self.allocator, ec.host_adapter_budget_bytes, self.dtype,
                                      ec.max_resident_adapters, ec.adapter_stage_threads,
                                      ec.host_adapter_spare_bytes)
        else:
            self.store = SlotAdapterStore(cfg, ec.max_loras, ec.max_lora_rank, ec.slot_projections or PROJECTIONS,
                                          host_budget_bytes=ec.host_adapter_budget_bytes, dtype=self.dtype)
        self.scheduler = make_scheduler(ec)
        self._kernel = _kernel_config(ec.lora_kernel)
        self.slab = None
        if ec.lora_slab_rows:
            if ec.lora_impl != "pallas" or not ec.unified_memory or tp is not None:
                raise ConfigError("EngineConfig.lora_slab_rows needs lora_impl 'pallas', unified_memory and tp 1 "
                                  f"(got {ec.lora_impl!r}, {ec.unified_memory}, {ec.tp})")
            self.slab = LoraSlab(cfg, self.layout, ec.lora_slab_rows, self.dtype,
                                 block=(self._kernel or KernelConfig()).slab_block_p)
        self.max_pages_per_seq = -(-ec.max_model_len // ec.page_size)
        if self.max_pages_per_seq > ec.num_pages:
            raise ValueError(f"max_model_len {ec.max_model_len} needs {self.max_pages_per_seq} pages; "
                             f"the pool has {ec.num_pages}")
        self._requests: dict[int, Request] = {}
        self._next_id = 0
        self._preempted_now: set[int] = set()
        # Adapters of waiting requests `_defer_start` left for a later step, kept staged until those
        # requests start or end (at most `max(prefetch_adapters, adapter_stage_threads)` of them).
        self._deferred: list[str] = []
        self._inflight: _InFlight | None = None  # the dispatched step whose tokens are not read yet
        self.num_steps = 0
        # Host seconds spent by step() in each phase (cumulative): admit (the waiting queue, the
        # scheduler's drops), schedule (adapter_load inside it),
        # run (batch building; dispatch inside it), prefetch, collect (wait for the device inside it).
        self.host_seconds: collections.Counter = collections.Counter()
        # Bytes the dispatched steps must read from device memory at least (cumulative): weights (all
        # parameters, once a step), kv (each row's cached tokens up to its last new one, attention's
        # read) and adapters (each distinct adapter of a step at its own ranks, once). Their sum over a
        # run, divided by the memory bandwidth, is the run's time at the HBM floor.
        self.bytes_read: collections.Counter = collections.Counter()
        # Wall seconds and sampled tokens by step kind (cumulative): "decode" steps, where every row
        # computes one token, and "mixed" steps, which carry a prompt chunk. A step's seconds run from
        # the end of the step() that read the step before it to the end of the step() that reads it: with
        # the overlapped loop that is the step's device time when the device is the bound, and the
        # seconds partition the loop's wall time (idle gaps of a real-time replay fall in the next step).
        # decode tokens / decode seconds is the engine's decode throughput.
        self.phase_stats: collections.Counter = collections.Counter()
        self._last_read: float | None = None
        self._weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        self._kv_token_bytes = (2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers
                                * self.dtype.itemsize)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, adapters: dict[str, str | os.PathLike | LoraAdapter] | None = None,
                        dtype: str = "bfloat16", seed: int = 0, **config_overrides) -> "Engine":
        """An engine for a Hugging Face model folder or a named random-weight preset (`PRESETS`)."""
        tokenizer = None
        ec, dtype = EngineConfig().replace(**config_overrides), jnp.dtype(dtype)
        if os.path.isdir(model):  # under TP: each leaf straight into its shards
            cfg, params = (load_checkpoint(model, dtype=dtype) if ec.tp == 1
                           else serving.load_checkpoint(model, ec, dtype))
            if any(os.path.exists(os.path.join(model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
                import transformers

                tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        elif model in PRESETS:
            cfg = PRESETS[model]
            params = (init_random_params(cfg, jax.random.key(seed), dtype) if ec.tp == 1
                      else serving.init_random_params(cfg, ec, dtype, seed))
        else:
            raise ValueError(f"{model!r} is neither a model folder nor a preset ({sorted(PRESETS)})")
        engine = cls(cfg, params, ec, tokenizer)
        for name, src in (adapters or {}).items():
            engine.add_adapter(name, src)
        return engine

    def add_adapter(self, name: str, source: str | os.PathLike | LoraAdapter) -> None:
        """Register an adapter (a PEFT folder, read lazily; or an in-memory `LoraAdapter`), at run time."""
        if isinstance(source, LoraAdapter):
            if source.name != name:
                raise ValueError(f"adapter object is named {source.name!r}, not {name!r}")
            self.store.add(source)
        else:
            if not os.path.isdir(source):
                raise AdapterError(f"{os.fspath(source)}: adapter folder not found")
            self.store.register(name, source)
        if self.slab is not None:
            self.slab.forget(name)  # a name given new weights: its slab rows are stale

    # ------------------------------------------------------------------ online API
    def submit(self, prompt: Sequence[int] | str, adapter: str | None = None, sampling: SamplingParams | None = None,
               arrival_time: float | None = None) -> int:
        """Queue a request; returns its id. Tokens arrive from `step()`."""
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        ids = self._encode(prompt)
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) + sampling.max_new_tokens > self.config.max_model_len:
            raise RequestError(f"prompt of {len(ids)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds "
                               f"max_model_len {self.config.max_model_len}")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids must be in [0, {self.cfg.vocab_size}); got {bad[:5]}")
        if adapter is not None:
            if adapter not in self.store:
                raise RequestError(f"unknown adapter {adapter!r}; add it with add_adapter() first")
            try:
                self.store.fetch(adapter)  # read and validated against the base model once, then kept
            except AdapterError as e:
                raise RequestError(f"adapter {adapter!r} cannot serve this model: {e}") from e
        rid = self._next_id
        self._next_id += 1
        self._requests[rid] = Request(
            rid, ids, adapter, sampling, self.clock() if arrival_time is None else arrival_time,
            request_key_data(sampling.seed, rid, self.config.seed),
        )
        return rid

    def abort(self, request_id: int) -> None:
        req = self._requests[request_id]
        if req.status is not Status.FINISHED:
            self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        # (a request whose token is in flight is still running)
        return any(r.status is not Status.FINISHED for r in self._requests.values())

    def completion(self, request_id: int) -> Completion:
        r = self._requests[request_id]
        if r.status is not Status.FINISHED:
            raise ValueError(f"request {request_id} has not finished")
        text = self.tokenizer.decode(r.output, skip_special_tokens=True) if self.tokenizer is not None else None
        return Completion(r.id, list(r.output), r.finish_reason, r.arrival_time, r.first_token_time, r.finish_time,
                          text, r.adapter, r.num_preemptions, r.error)

    def release(self, request_id: int) -> Completion:
        """The completion of a finished request, forgetting the request."""
        c = self.completion(request_id)
        del self._requests[request_id]
        return c

    def generate(self, prompts: Sequence[Sequence[int] | str], adapters: Sequence[str | None] | None = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run `prompts` to completion (offline batch); one `Completion` per prompt, in order."""
        n = len(prompts)
        adapters = [None] * n if adapters is None else list(adapters)
        samplings = sampling if isinstance(sampling, Sequence) else [sampling] * n
        if len(adapters) != n or len(samplings) != n:
            raise ValueError(f"{n} prompts but {len(adapters)} adapters and {len(samplings)} sampling params")
        ids = [self.submit(p, a, s) for p, a, s in zip(prompts, adapters, samplings)]
        while any(self._requests[i].status is not Status.FINISHED for i in ids):
            self.step()
        return [self.release(i) for i in ids]

    # ------------------------------------------------------------------ the step
    def step(self) -> list[TokenEvent]:
        """Run one engine step; returns the tokens produced and the requests ended.

        With `overlap_steps` (default) the step is dispatched before the previous
        step's sampled tokens are read, so the host's work for step t+1 overlaps
        the device's work for step t: tokens then arrive one `step()` later.
        """
        hs, ta = self.host_seconds, time.perf_counter()
        now = self.clock()
        events: list[TokenEvent] = []
        waiting = [r for r in self._requests.values() if r.status is Status.WAITING]
        for r in self.scheduler.drop(waiting, now):
            self._finish(r, "abort")
            events.append(TokenEvent(r.id, None, "abort"))
        t0 = time.perf_counter()
        hs["admit"] += t0 - ta
        plan = self._schedule(now, events)
        t1 = time.perf_counter()
        previous, self._inflight = self._inflight, (self._run(plan) if plan else None)
        t2 = time.perf_counter()
        self._prefetch(now)  # after the dispatch: packing and copies run while the device works
        t3 = time.perf_counter()
        if previous is not None:
            self._collect(previous, events)
            self._account(previous, ta)
        if not self.config.overlap_steps and self._inflight is not None:
            done, self._inflight = self._inflight, None
            self._collect(done, events)
            self._account(done, ta)
        if self._inflight is None or not self.has_unfinished():
            # Nothing in flight, or only a step whose rows have all ended: the device may now idle, and
            # the next step read counts from its dispatch or from the start of the step() that reads it.
            self._last_read = None
        hs["schedule"] += t1 - t0
        hs["run"] += t2 - t1
        hs["prefetch"] += t3 - t2
        hs["collect"] += time.perf_counter() - t3
        if plan:
            self.num_steps += 1
        return events

    def _account(self, done: "_InFlight", call_start: float) -> None:
        """Add a read step's wall seconds and sampled tokens to `phase_stats` under its kind."""
        now = time.perf_counter()
        start = self._last_read if self._last_read is not None else max(done.dispatched_at, call_start)
        kind = "decode" if done.decode_only else "mixed"
        self.phase_stats[f"{kind}_steps"] += 1
        self.phase_stats[f"{kind}_s"] += now - start
        self.phase_stats[f"{kind}_tokens"] += len(done.rows)
        self._last_read = now

    def _collect(self, inflight: "_InFlight", events: list[TokenEvent]) -> None:
        """Read a dispatched step's sampled tokens (waits for it); append them and check stop conditions."""
        t = time.perf_counter()
        sampled = np.asarray(inflight.sampled_R)
        self.host_seconds["wait"] += time.perf_counter() - t
        t = self.clock()
        for row, req in inflight.rows:
            req.inflight -= 1
            if req.status is Status.FINISHED:
                continue  # aborted, or stopped on the step before: the token is dropped
            tok = int(sampled[row])
            req.output.append(tok)
            if req.first_token_time is None:
                req.first_token_time = t
            reason = req.sampling.finish_reason(tok, len(req.output), self.cfg.eos_token_ids)
            if reason is None and len(req.prompt) + len(req.output) >= self.config.max_model_len:
                reason = "length"
            events.append(TokenEvent(req.id, tok, reason))
            if reason:
                self._finish(req, reason)

    def _schedule(self, now: float, events: list[TokenEvent]) -> list[tuple[Request, int]]:
        ec = self.config
        running = [r for r in self._requests.values() if r.status is Status.RUNNING]
        waiting = [r for r in self._requests.values() if r.status is Status.WAITING]
        order = self.scheduler.order(running, waiting, now, self.store.is_resident)
        plan: list[tuple[Request, int]] = []
        planned: set[int] = set()
        batch_adapters: set[str] = set()
        budget = ec.max_batch_tokens
        for req in order:
            if len(plan) == ec.max_num_seqs or budget == 0:
                break
            if req.status is Status.FINISHED or req.id in self._preempted_now or self._ends_in_flight(req):
                continue
            if not self.scheduler.admits(req, batch_adapters):
                continue
            was_waiting = req.status is Status.WAITING
            if was_waiting and plan and self._defer_start(req):
                continue
            if was_waiting and not self._start(req, events):
                if req.status is Status.FINISHED:
                    continue  # its adapter failed to load: the request ended with an error
                break  # FCFS: no room for the head of the queue, so none for those behind it
            n = min(req.num_pending, budget)
            need = -(-(req.num_computed + n) // ec.page_size) - len(req.pages)
            if not self._reserve(need, req, was_waiting, order, planned):
                if was_waiting:
                    self._release_resources(req)  # not preempted: it never ran
                    req.status = Status.WAITING
                    break
                if not plan and not any(r.status is Status.RUNNING for r in order):
                    req.error = (f"request needs {len(req.pages) + need} KV pages beside its adapter; "
                                 f"the pool has {ec.num_pages}")
                    self._finish(req, "error")
                    events.append(TokenEvent(req.id, None, "error"))
                continue
            if need > 0:
                req.pages.extend(self.allocator.alloc(need, ("kv", req.id), "kv").tolist())
            plan.append((req, n))
            planned.add(req.id)
            if req.adapter is not None:
                batch_adapters.add(req.adapter)
            budget -= n
        self._preempted_now.clear()
        return plan

    def _defer_start(self, req: Request) -> bool:
        """Leave waiting `req` for a later step if its adapter is still being staged (staging it
        now if it is not yet): the step has other rows, so the device keeps working while the
        staging threads pack, instead of the engine thread waiting for them before it dispatches.
        On one H200, S1 at n = 1000 had its engine thread wait 0.59 s of 12 s so (session 6)."""
        ec = self.config
        if (req.adapter is None or not (ec.defer_unstaged_starts and ec.prefetch_adapters)
                or self.store.ready(req.adapter)):
            return False
        if req.adapter not in self._deferred:
            if len(self._deferred) >= max(ec.prefetch_adapters, ec.adapter_stage_threads):
                # Staging is full: wait unstaged (it comes once the deferred ahead have started), rather
                # than stage more than the threads can pack, or drop staged rows that are soon needed.
                self.store.stats["start_deferred"] += 1
                self.store.stats["start_deferred_unstaged"] += 1
                return True
            try:
                self.store.prefetch(req.adapter)
            except AdapterError:
                return False  # `load` reports it, for this request
            self._deferred.append(req.adapter)
        self.store.stats["start_deferred"] += 1
        return True

    def _ends_in_flight(self, req: Request) -> bool:
        """The token `req` has in flight is its last (by length): nothing more to run for it."""
        n = len(req.output) + req.inflight
        return req.inflight > 0 and (n >= req.sampling.max_new_tokens
                                     or len(req.prompt) + n >= self.config.max_model_len)

    def _prefetch(self, now: float) -> None:
        """Stage the adapters of the first queued requests (in the scheduler's order), so their
        packing and host-to-device copies overlap the steps they wait through."""
        # The first queued requests' adapters (up to the limit), and those of deferred starts
        # (`_defer_start`) while a request of theirs waits.
        waiting = [r for r in self._requests.values() if r.status is Status.WAITING]
        queued = {r.adapter for r in waiting}
        self._deferred = [n for n in self._deferred if n in queued and not self.store.is_resident(n)]
        window: list[str] = []
        if self.config.prefetch_adapters:
            for r in self.scheduler.order([], waiting, now, self.store.is_resident):
                if len(window) >= self.config.prefetch_adapters:
                    break
                if r.adapter is not None and not self.store.is_resident(r.adapter) and r.adapter not in window:
                    window.append(r.adapter)
        names = window + [n for n in self._deferred if n not in window]
        self.store.prefetch_only(names)

    def _reserve(self, need: int, req: Request, was_waiting: bool, order: list[Request], planned: set[int]) -> bool:
        """Make `need` pages free for `req`: evict idle adapters, then (for a running request)
        preempt running requests from the back of the order. False if `req` cannot have them."""
        while need > self.allocator.num_free:
            if self.store.evict_idle(need):
                continue
            if was_waiting:
                return False  # new requests never push out running ones
            victim = next(r for r in reversed(order) if r.status is Status.RUNNING and r.id not in planned)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _start(self, req: Request, events: list[TokenEvent]) -> bool:
        """Make `req` running: its adapter resident and pinned. False if it must wait (or failed)."""
        if req.adapter is not None:
            t = time.perf_counter()
            try:
                self.pool = self.store.load(self.pool, req.adapter)
            except OutOfPages:
                return False
            except AdapterError as e:
                req.error = str(e)
                self._finish(req, "error")
                events.append(TokenEvent(req.id, None, "error"))
                return False
            finally:
                self.host_seconds["adapter_load"] += time.perf_counter() - t
            self.store.pin(req.adapter)
        req.status = Status.RUNNING
        return True

    def _release_resources(self, req: Request) -> None:
        if req.status is Status.RUNNING:
            self.allocator.free_owner(("kv", req.id))
            if req.adapter is not None:
                self.store.unpin(req.adapter)
        req.pages = []
        req.num_computed = 0

    def _preempt(self, req: Request) -> None:
        self._release_resources(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self._preempted_now.add(req.id)  # not rescheduled in the step that preempted it

    def _finish(self, req: Request, reason: str) -> None:
        self._release_resources(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = self.clock()

    def _run(self, plan: list[tuple[Request, int]]) -> "_InFlight":
        """Build the ragged batch and dispatch the jitted step (it does not wait for the device)."""
        # Only the token count varies per step (a power-of-two bucket); rows and adapters per batch are
        # fixed, and the store's adapter shape bounds only grow, so compiles stay few.
        T = _bucket(sum(n for _, n in plan), max(16, self.config.min_batch_tokens))
        R = _bucket(self.config.max_num_seqs)
        prev = self._inflight
        tokens, src_row, pos = np.zeros(T, np.int32), np.full(T, -1, np.int32), np.full(T, -1, np.int32)
        seq, slot = np.zeros(T, np.int32), np.full(T, -1, np.int32)
        page_table = np.zeros((R, self.max_pages_per_seq), np.int32)
        logits_index = np.zeros(R, np.int32)
        names = list(dict.fromkeys(r.adapter for r, _ in plan if r.adapter is not None))
        rows: list[tuple[int, Request]] = []
        token_index = []
        t = kv_tokens = 0
        for row, (req, n) in enumerate(plan):
            start, known = req.num_computed, req.tokens
            kv_tokens += start + n  # attention reads the row's cache up to its last new token
            m = max(0, min(n, len(known) - start))  # tokens known on the host; the rest is in flight
            tokens[t : t + m] = known[start : start + m]
            if m < n:  # the one token the in-flight step is sampling for this request
                src_row[t + m] = prev.row_of[req.id]
            pos[t : t + n] = np.arange(start, start + n)
            seq[t : t + n] = row
            if req.adapter is not None:
                slot[t : t + n] = names.index(req.adapter)
            page_table[row, : len(req.pages)] = req.pages
            logits_index[row] = t + n - 1
            token_index.append(len(req.output) + req.inflight)
            req.num_computed += n
            if not req.num_pending:  # reached its last pending token: this row samples
                req.inflight += 1
                rows.append((row, req))
            t += n
        lora = self.store.batch_lora(names, slot, R, self.config.lora_impl, self._kernel) if names else None
        if self.slab is not None and lora is not None:
            t0 = time.perf_counter()
            if self.slab.holds(names, lora.table):
                self.slab.ensure(names, lora.table, self.pool, lora.r_max)
                lora = self.slab.lora_input(lora, names, slot, self._kernel)
            else:  # more adapter rows than the slab has: this step reads the pool's pages (compiled once, here)
                if not self.slab.stats["steps_on_pages"]:
                    warnings.warn(f"the batch's adapters need more than EngineConfig.lora_slab_rows="
                                  f"{self.slab.P} slab rows; such steps run on the pool's pages "
                                  f"(Engine.slab.stats['steps_on_pages'])", RuntimeWarning, stacklevel=2)
                self.slab.stats["steps_on_pages"] += 1
            self.host_seconds["slab"] += time.perf_counter() - t0
        self.bytes_read["weights"] += self._weight_bytes
        self.bytes_read["kv"] += kv_tokens * self._kv_token_bytes
        self.bytes_read["adapters"] += sum(self.store.read_elems(n) for n in names) * self.dtype.itemsize
        sampling = SamplingBatch.from_params([r.sampling for r, _ in plan], [r.key_data for r, _ in plan],
                                             token_index, size=R)
        batch = StepBatch(tokens, src_row, pos, seq, page_table, logits_index, lora, sampling)
        buf, dev, spec = pack(batch)
        prev_sampled = prev.sampled_R if prev is not None else self._no_samples(R)
        # Chunks go to the chunk-attention kernel (the jnp reference has one path: no extra compile).
        prefill = self.config.attention_impl == "pallas" and any(n > 1 for _, n in plan)
        t = time.perf_counter()
        sampled, self.pool = self._step(self.params, self.pool, prev_sampled, buf, dev, spec=spec, cfg=self.cfg,
                                        layout=self.layout, attention_impl=self.config.attention_impl,
                                        prefill=prefill)
        self.host_seconds["dispatch"] += time.perf_counter() - t
        return _InFlight(sampled, rows, {req.id: row for row, req in rows}, all(n == 1 for _, n in plan), t)

    def memory_report(self) -> dict[str, float]:
        """Pool pages by kind, and internal fragmentation of KV and adapter pages."""
        st = self.allocator.stats()
        lo = self.layout
        kv_used = {("kv", r.id): r.num_computed * (lo.page_elems // lo.page_size)
                   for r in self._requests.values() if r.status is Status.RUNNING}
        return {
            "pages_total": st.total, "pages_free": st.free, "pages_kv": st.kv, "pages_adapter": st.adapter,
            "page_bytes": lo.page_bytes(self.dtype),
            "kv_fragmentation": self.allocator.fragmentation(kv_used, lo.page_elems),
            **self.store.memory(),
            **({} if self.slab is None else self.slab.memory()),
        }

    # ------------------------------------------------------------------ helpers
    def _encode(self, prompt: Sequence[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("string prompts need a tokenizer; this model folder has none (pass token ids)")
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]
