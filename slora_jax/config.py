"""Typed configs. A field exists once, here, with its default.

`LlamaConfig` describes a base model. It is frozen and hashable so it can be a
static argument of jitted functions. `LlamaConfig.from_hf(dict)` reads a
Hugging Face `config.json` (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
`rope_parameters`) and refuses what the model does not implement, naming the
field. Named presets give real model shapes for random-weight experiments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slora_jax.errors import CheckpointError

# The seven projections a LoRA adapter may target, in a fixed order.
PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

# LoRA under tensor parallelism (slora_jax.parallel): S-LoRA's partition, or A replicated (the ablation).
TP_LORA_STRATEGIES: tuple[str, ...] = ("slora", "replicated_a")

# Hugging Face module name of each projection inside a decoder layer.
HF_MODULE_NAMES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x (`rope_type: llama3`) frequency scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(input features, output features) of a projection; k/v are GQA-narrow."""
        h, f = self.hidden_size, self.intermediate_size
        return {
            "q": (h, self.q_size),
            "k": (h, self.kv_size),
            "v": (h, self.kv_size),
            "o": (self.q_size, h),
            "gate": (h, f),
            "up": (h, f),
            "down": (f, h),
        }[proj]

    def num_params(self) -> int:
        per_layer = sum(i * o for i, o in map(self.projection_shape, PROJECTIONS)) + 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size
        return self.num_hidden_layers * per_layer + emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Build from a Hugging Face config dict; unsupported values raise `CheckpointError`."""

        def bad(field: str, why: str) -> CheckpointError:
            return CheckpointError(f"{source}: unsupported `{field}`: {why}")

        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if d.get("model_type", "llama") != "llama" or list(archs) != ["LlamaForCausalLM"]:
            raise bad(
                "architectures",
                f"model_type={d.get('model_type')!r}, architectures={archs!r}; only LlamaForCausalLM is supported",
            )
        if d.get("attention_bias", False):
            raise bad("attention_bias", "attention projections with bias are not supported")
        if d.get("mlp_bias", False):
            raise bad("mlp_bias", "MLP projections with bias are not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"{d['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise bad("pretraining_tp", "only 1 is supported")

        # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in two fields.
        rope = d.get("rope_parameters")
        field = "rope_parameters"
        if rope is None:
            rope = dict(d.get("rope_scaling") or {})
            field = "rope_scaling"
            rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise CheckpointError(f"{source}: `{field}` of type llama3 lacks {e.args[0]!r}") from None
        elif rope_type != "default":
            raise bad(field, f"rope type {rope_type!r}; supported: 'default', 'llama3'")

        def get(name: str, conv, default=None, src: dict = d):
            if src.get(name) is None:
                if default is None:
                    raise CheckpointError(f"{source}: missing required field {name!r}")
                return default
            try:
                return conv(src[name])
            except (TypeError, ValueError):
                raise CheckpointError(f"{source}: field {name!r} = {src[name]!r} is not a valid {conv.__name__}") from None

        heads = get("num_attention_heads", int)
        hidden = get("hidden_size", int)
        eos = d.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        try:
            return cls(
                vocab_size=get("vocab_size", int),
                hidden_size=hidden,
                intermediate_size=get("intermediate_size", int),
                num_hidden_layers=get("num_hidden_layers", int),
                num_attention_heads=heads,
                num_key_value_heads=get("num_key_value_heads", int, heads),
                head_dim=get("head_dim", int, hidden // heads),
                rms_norm_eps=get("rms_norm_eps", float, 1e-6),
                rope_theta=get("rope_theta", float, 10000.0, src=rope),
                rope_scaling=scaling,
                max_position_embeddings=get("max_position_embeddings", int, 4096),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None


def _llama3_scaling() -> RopeScaling:
    return RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )


# Real model shapes (random weights) for experiments; see ../shared/BENCHMARKS.md.
PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "llama-13b": LlamaConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=_llama3_scaling(), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-70b": LlamaConfig(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    # A few-MB model for CPU tests, quickstarts and smoke runs.
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        max_position_embeddings=1024,
    ),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving-engine settings; `Engine.from_pretrained(..., **overrides)` sets any of them."""

    num_pages: int = 512  # pages in the unified pool (KV and adapters share them)
    page_size: int = 16  # tokens per KV page
    lora_chunk: int = 64  # adapter row width in the pool (elements)
    max_num_seqs: int = 32  # sequences per step (decoding and prefilling)
    max_batch_tokens: int = 256  # tokens per step (decode tokens + prefill chunks)
    # Smallest token bucket: a step's tokens are padded to a power of two from here (at least 16) up to
    # max_batch_tokens, one compile each; = max_batch_tokens gives one shape (one compile of the step).
    min_batch_tokens: int = 16
    max_model_len: int = 1024  # prompt + generated tokens of one request
    attention_impl: str = "auto"  # "pallas" (the paged-attention kernel) | "reference"; auto: pallas on a GPU
    lora_impl: str = "auto"  # "pallas" (one-launch SGMV on pool pages) | "reference" | a baseline of
    # `slora_jax.ops.IMPLS` (on weights gathered to slots each step); auto: pallas on a GPU
    # `ops.KernelConfig` fields the Pallas LoRA kernels take instead of their defaults (ablations and
    # tuning from a config, e.g. {paged_warps: 4}); unknown names are refused when the engine starts.
    lora_kernel: dict[str, int] = dataclasses.field(default_factory=dict)
    # > 0: a second copy of the running batch's adapters in a dense slab of this many rows (sum of their
    # ranks) per projection, beside the pool (`memory/slab.py`); decode-sized LoRA calls then run as two
    # pipelined GEMMs over it (`ops.lora_linear_slab`) instead of the gathered kernels on pool pages.
    # 0: off. Needs lora_impl "pallas", unified_memory and tp 1.
    lora_slab_rows: int = 0
    layer_loop: str = "unrolled"  # "unrolled" (per-layer weight buffers, a Python loop) | "scan"
    overlap_steps: bool = True  # dispatch step t+1 before reading step t's tokens (host work overlaps device)
    scheduler: str = "fcfs"  # "fcfs" | "early_abort" | "cluster" (engine/scheduler.py)
    slo_first_token_s: float = 6.0  # early_abort: drop requests still waiting after this
    max_adapters_per_batch: int = 8  # cluster: distinct adapters per step
    unified_memory: bool = True  # False: S-LoRA's ablation, fixed adapter slots beside a KV-only pool
    max_loras: int = 8  # unified_memory=False: number of adapter slots
    max_lora_rank: int = 64  # unified_memory=False: every slot's rank
    # unified_memory=False: the projections the slots hold (an adapter of others is refused); (): all seven.
    # The experiment runner sets its random adapters' projections (7B q/k/v/o slots: 42% of all seven's bytes).
    slot_projections: tuple[str, ...] = ()
    host_adapter_budget_bytes: int = 8 << 30
    # Packed-row buffers the host tier dropped, kept (up to this many bytes) to pack adapters into again:
    # packing into fresh host memory stalls on page faults (adapters/spares.py); 0: always fresh memory.
    host_adapter_spare_bytes: int = 2 << 30
    max_resident_adapters: int = 1024
    prefetch_adapters: int = 4  # adapters of the first queued requests staged ahead (packed, copied); 0: off
    adapter_stage_threads: int = 4  # host threads packing and copying adapters (pool loads and prefetch)
    # A step with other rows to run leaves a new request whose adapter is still being staged for a later
    # step, instead of waiting for the staging threads before it dispatches (needs prefetch_adapters > 0).
    # The step schedule then depends on host timing; tokens do not (each request samples from its own seed).
    defer_unstaged_starts: bool = True
    seed: int = 0  # for requests without a seed of their own
    tp: int = 1  # tensor-parallel size (devices of one mesh axis)
    tp_lora_strategy: str = "slora"  # tp > 1: one of TP_LORA_STRATEGIES

    def __post_init__(self):
        for name in ("num_pages", "page_size", "lora_chunk", "max_num_seqs", "max_batch_tokens", "min_batch_tokens",
                     "max_model_len", "tp", "adapter_stage_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prefetch_adapters", "host_adapter_spare_bytes", "lora_slab_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"EngineConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.attention_impl not in ("auto", "pallas", "reference"):
            raise ValueError(
                f"EngineConfig.attention_impl must be 'auto', 'pallas' or 'reference', got {self.attention_impl!r}")
        if self.layer_loop not in ("unrolled", "scan"):
            raise ValueError(f"EngineConfig.layer_loop must be 'unrolled' or 'scan', got {self.layer_loop!r}")
        lora_impls = ("auto", "pallas", "reference", "gather_bmm", "onehot", "ragged_dot", "padded_bmm")
        if self.lora_impl not in lora_impls:  # "loop" needs concrete metadata, not a jitted step
            raise ValueError(f"EngineConfig.lora_impl must be one of {lora_impls}, got {self.lora_impl!r}")
        if self.min_batch_tokens > self.max_batch_tokens:
            raise ValueError(f"EngineConfig.min_batch_tokens ({self.min_batch_tokens}) must be <= max_batch_tokens "
                             f"({self.max_batch_tokens})")
        if not set(self.slot_projections) <= set(PROJECTIONS) or len(set(self.slot_projections)) < len(
                self.slot_projections):
            raise ValueError(f"EngineConfig.slot_projections must be distinct names of {list(PROJECTIONS)}, got "
                             f"{list(self.slot_projections)}")
        if self.tp_lora_strategy not in TP_LORA_STRATEGIES:
            raise ValueError(
                f"EngineConfig.tp_lora_strategy must be one of {TP_LORA_STRATEGIES}, got {self.tp_lora_strategy!r}")
        if self.max_batch_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_num_seqs ({self.max_num_seqs})"
            )

    def replace(self, **overrides) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown engine config field(s) {sorted(unknown)}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


# ---------------------------------------------------------------------------------------------- experiments
# Loaded from YAML with dotted `key=value` overrides by `slora_jax.experiment.config_io` (draccus).

SYSTEMS: tuple[str, ...] = ("slora", "slora_no_unified", "peft_merge", "merged_copies", "hf_peft")
POPULARITY_PATTERNS: tuple[str, ...] = ("distinct", "uniform", "skewed", "identical")


def _check(ok: bool, field: str, value, want: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {want}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """The base model of an experiment."""

    name: str = "tiny"  # a preset in PRESETS (random weights) or a Hugging Face model folder
    dtype: str = "bfloat16"  # "bfloat16" | "float32" | "float16"
    seed: int = 0  # a preset's random weights

    def __post_init__(self):
        _check(self.dtype in ("bfloat16", "float32", "float16"), "model.dtype", self.dtype,
               "'bfloat16', 'float32' or 'float16'")


@dataclasses.dataclass(frozen=True)
class AdapterSetConfig:
    """The experiment's `n` adapters: random ones written as PEFT folders, or given folders."""

    n: int = 8
    ranks: tuple[int, ...] = (8,)  # random weight folder j has rank ranks[j % len(ranks)]
    projections: tuple[str, ...] = ("q", "k", "v", "o")
    folders: tuple[str, ...] = ()  # PEFT folders to serve instead of random adapters (adapter i: folders[i % len])
    # Random adapters: how many distinct weight folders to write (0: one per adapter). Adapter i reads
    # folder i % distinct but is a separate adapter to the system (7B rank-64 adapters are ~270 MB each).
    distinct: int = 0
    dir: str = ""  # where random adapters are written and reused ("": <output_dir>/_adapters)
    # Read each weight folder once and give the system in-memory adapters (every adapter in host memory, as
    # in S-LoRA's experiments; adapters sharing a folder share its arrays), held by the engine systems in the
    # model's dtype with scales folded (`LoraAdapter.folded`). hf_peft loads folders regardless.
    in_memory: bool = False
    seed: int = 0

    def __post_init__(self):
        _check(self.n >= 1, "adapters.n", self.n, ">= 1")
        _check(len(self.ranks) > 0 and all(1 <= r <= 256 for r in self.ranks), "adapters.ranks", self.ranks,
               "a non-empty list of ranks in 1..256")
        _check(len(self.projections) > 0 and set(self.projections) <= set(PROJECTIONS), "adapters.projections",
               self.projections, f"a non-empty subset of {list(PROJECTIONS)}")
        _check(self.distinct >= 0, "adapters.distinct", self.distinct, ">= 0")


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """The request trace (`slora_jax.workload`)."""

    kind: str = "slora"  # "slora" (S-LoRA's generator) | "punica" (popularity patterns) | "file" (a JSONL trace)
    num_requests: int = 64
    alpha: float = 1.0  # slora: adapter popularity power law (1 uniform, smaller more skewed)
    rate: float = 2.0  # slora: mean arrival rate, requests per second
    cv: float = 1.0  # slora: coefficient of variation of inter-arrival times (1: Poisson)
    input_len: tuple[int, int] = (8, 512)  # prompt tokens, uniform in [lo, hi]
    output_len: tuple[int, int] = (8, 512)  # generated tokens, uniform in [lo, hi]
    popularity: str = "distinct"  # punica: one of POPULARITY_PATTERNS
    batch_size: int = 32  # punica: requests per popularity batch
    trace: str = ""  # file: path of a JSONL trace (slora_jax.workload.load_trace), replayed whole
    base_fraction: float = 0.0  # requests (a seeded random subset) on the base model alone, no adapter; 1: all
    seed: int = 0

    def __post_init__(self):
        _check(self.kind in ("slora", "punica", "file"), "workload.kind", self.kind, "'slora', 'punica' or 'file'")
        _check(self.num_requests >= 1, "workload.num_requests", self.num_requests, ">= 1")
        _check(self.alpha > 0, "workload.alpha", self.alpha, "> 0")
        _check(self.rate > 0, "workload.rate", self.rate, "> 0")
        _check(self.cv >= 0, "workload.cv", self.cv, ">= 0")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            _check(1 <= lo <= hi, f"workload.{name}", [lo, hi], "[lo, hi] with 1 <= lo <= hi")
        _check(self.popularity in POPULARITY_PATTERNS, "workload.popularity", self.popularity,
               f"one of {list(POPULARITY_PATTERNS)}")
        _check(self.batch_size >= 1, "workload.batch_size", self.batch_size, ">= 1")
        _check(0.0 <= self.base_fraction <= 1.0, "workload.base_fraction", self.base_fraction, "in [0, 1]")
        _check(self.kind != "file" or bool(self.trace), "workload.trace", self.trace, "a JSONL path when kind is 'file'")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Settings of the baseline systems (`slora_jax.baselines`)."""

    memory_budget_bytes: int = 0  # merged_copies: device bytes the model copies may take (0: the device's limit)
    # Prompts are padded to a power of two from here (cache lengths follow): a larger value, fewer compiles.
    min_prompt_bucket: int = 16

    def __post_init__(self):
        _check(self.memory_budget_bytes >= 0, "baseline.memory_budget_bytes", self.memory_budget_bytes, ">= 0")
        _check(self.min_prompt_bucket >= 1, "baseline.min_prompt_bucket", self.min_prompt_bucket, ">= 1")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: a model, adapters, a workload and the system serving it.

    `sweep` maps dotted keys to lists of values; the runner runs every
    combination (a grid) into `<output_dir>/<name>/<point>`.
    """

    name: str = "experiment"
    system: str = "slora"  # one of SYSTEMS
    impl: str = ""  # slora systems: LoRA impl (EngineConfig.lora_impl); "" keeps the engine's default
    mode: str = "online"  # "online": arrivals honoured in real time | "offline": all at once (max throughput)
    model: ModelSource = dataclasses.field(default_factory=ModelSource)
    adapters: AdapterSetConfig = dataclasses.field(default_factory=AdapterSetConfig)
    workload: WorkloadConfig = dataclasses.field(default_factory=WorkloadConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)  # the engine; baselines use its
    # max_num_seqs (batch size), max_model_len, slo_first_token_s (metrics) and host_adapter_budget_bytes
    baseline: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)
    ignore_eos: bool = True  # generate exactly each request's output_len tokens, as the papers' benchmarks do
    warmup_requests: int = 4  # run (and discard) this many of the trace's requests first, to compile
    # Engine systems: before the clock starts, load every adapter the trace uses (as many as the pool or
    # the slots hold), so the run measures serving with them resident, not their loading.
    preload_adapters: bool = False
    time_limit_s: float = 0.0  # stop the replay after this many seconds (0: none); running requests -> "timeout"
    save_tokens: bool = False  # keep each request's generated token ids in requests.jsonl
    progress: bool = True  # a tqdm progress bar
    output_dir: str = "results"
    sweep: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check(self.system in SYSTEMS, "system", self.system, f"one of {list(SYSTEMS)}")
        _check(self.mode in ("online", "offline"), "mode", self.mode, "'online' or 'offline'")
        _check(not self.impl or self.system in ("slora", "slora_no_unified"), "impl", self.impl,
               "empty unless system is slora or slora_no_unified")
        _check(self.warmup_requests >= 0, "warmup_requests", self.warmup_requests, ">= 0")
        _check(self.time_limit_s >= 0, "time_limit_s", self.time_limit_s, ">= 0 (0: no limit)")
        _check(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        _check(all(isinstance(v, list) and v for v in self.sweep.values()), "sweep", self.sweep,
               "a mapping of dotted keys to non-empty lists of values")
        lo, hi = self.workload.input_len[1], self.workload.output_len[1]
        _check(self.workload.kind == "file" or lo + hi <= self.engine.max_model_len, "engine.max_model_len",
               self.engine.max_model_len, f">= the longest request ({lo} + {hi} tokens)")
