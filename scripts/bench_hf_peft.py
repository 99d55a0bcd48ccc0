"""The real peer: `transformers` + `peft` serving the same workload, results in the same format.

    python scripts/bench_hf_peft.py CONFIG.yaml [key=value ...]     # the config's system is set to hf_peft

The model (a Hugging Face folder, or a preset's shape with random weights),
the adapters (the same PEFT folders) and the trace come from the experiment
config exactly as for `slora-jax run`. Requests are served FCFS in batches of
up to `engine.max_num_seqs` waiting requests of any adapters, one
`generate(..., adapter_names=[...])` call per batch (peft's mixed-adapter
batch), left-padded, greedy. Each token's time comes from a logits processor
called once per decoding step; a request's first token and finish are the
times of its first and last steps. With `ignore_eos` (the default) every
request generates exactly its output length. Past the run's time limit a
batch stops generating; its requests are recorded as cut off, with the tokens
they got. The model, and each adapter loaded into it, is reused by later
points of a sweep (`HFModelCache`).
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
import warnings

import torch
import transformers
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from slora_jax.baselines.static_batch import StaticBatchServer
from slora_jax.config import PRESETS, ExperimentConfig, LlamaConfig
from slora_jax.engine.request import TokenEvent
from slora_jax.errors import ConfigError
from slora_jax.experiment import load_experiment, run
from slora_jax.experiment.runner import adapter_folders, serve_requests
from slora_jax.model import read_config

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def hf_config(cfg: LlamaConfig) -> transformers.LlamaConfig:
    """A transformers LlamaConfig of the same shape as ours (`rope_theta`/`rope_scaling`: 4.x and 5.x read them)."""
    scaling = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        scaling = dict(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                       high_freq_factor=rs.high_freq_factor,
                       original_max_position_embeddings=rs.original_max_position_embeddings)
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta, rope_scaling=scaling, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids),
    )


def load_hf_model(exp: ExperimentConfig, device: str) -> tuple[transformers.LlamaForCausalLM, LlamaConfig]:
    dtype = TORCH_DTYPES[exp.model.dtype]
    if os.path.isdir(exp.model.name):
        model = transformers.LlamaForCausalLM.from_pretrained(exp.model.name, dtype=dtype)
        cfg = read_config(exp.model.name)
    elif exp.model.name in PRESETS:
        cfg = PRESETS[exp.model.name]
        torch.manual_seed(exp.model.seed)
        with torch.device(device):
            model = transformers.LlamaForCausalLM._from_config(hf_config(cfg), dtype=dtype)
    else:
        raise ConfigError(f"model.name {exp.model.name!r} is neither a model folder nor a preset ({sorted(PRESETS)})")
    return model.to(device).eval(), cfg


class _StepTimes(transformers.LogitsProcessor):
    """Records the clock at each decoding step (the logits of token k are processed at step k)."""

    def __init__(self, clock):
        self.clock, self.times = clock, []

    def __call__(self, input_ids, scores):
        self.times.append(self.clock())
        return scores


class _Deadline(transformers.StoppingCriteria):
    """Stops generation once the clock passes the run's time limit."""

    def __init__(self, clock, deadline: float):
        self.clock, self.deadline = clock, deadline

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.clock() >= self.deadline, dtype=torch.bool,
                          device=input_ids.device)


def _peft_name(name: str, path: str) -> str:
    return f"{name}_{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]}"


class HFModelCache:
    """The transformers model of the last `ModelSource` and the PEFT adapters loaded into it: a point
    whose adapters include all those loaded reuses them; otherwise the model is built afresh.

    Each weight folder is loaded through peft once; further adapters reading the same folder are
    registered as aliases: in every LoRA layer the alias names the same weight modules, through peft's
    own lists of per-adapter attributes (`adapter_layer_names`, `other_param_names`), so a mixed batch
    still runs one sub-batch per adapter name, as for distinct adapters. (peft's own loading walks every
    module of the model, which grows with each adapter: on a Llama-7B shape, 1.3 s for the first adapter
    and 4.4 s for the 41st on a CPU of this project's, minutes for 100.) If aliasing fails on a peft
    version, folders are loaded again by peft for each name (`alias_error` says why).
    """

    def __init__(self, device: str | None = None, alias: bool = True):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.key = self.base = self.peft = self.cfg = None
        self.loaded: set[str] = set()
        self.alias, self.alias_error = alias, None
        self.by_folder: dict[str, str] = {}  # folder -> the peft name it was loaded under
        self._lora_layers: list = []

    def model(self, exp: ExperimentConfig, adapters: list[tuple[str, str]] = ()) -> tuple[
            transformers.LlamaForCausalLM, LlamaConfig]:
        """The model of `exp.model`, holding no adapters beyond `adapters` ((name, folder) pairs)."""
        if self.key != exp.model or not self.loaded <= {_peft_name(n, p) for n, p in adapters}:
            self.base = self.peft = None
            self._lora_layers, self.by_folder = [], {}
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self.base, self.cfg = load_hf_model(exp, self.device)
            self.key, self.loaded = exp.model, set()
        return self.base, self.cfg

    def load(self, name: str, path: str) -> str:
        """The peft adapter name of folder `path` served as `name` (loaded or aliased now if not yet)."""
        key = _peft_name(name, path)
        if key in self.loaded:
            return key
        src = self.by_folder.get(os.path.abspath(path))
        if src is not None and self.alias:
            try:
                self._add_alias(src, key)
                self.loaded.add(key)
                return key
            except Exception as e:  # noqa: BLE001 - an unknown peft version: load for real instead
                self.alias, self.alias_error = False, f"{type(e).__name__}: {e}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # low_cpu_mem_usage: the adapter's weights are not initialised before they are loaded
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=key, low_cpu_mem_usage=True).eval()
            else:
                self.peft.load_adapter(path, adapter_name=key, low_cpu_mem_usage=True)
        self.loaded.add(key)
        self.by_folder.setdefault(os.path.abspath(path), key)
        self._lora_layers = [m for m in self.peft.modules() if isinstance(m, LoraLayer)]
        return key

    def _add_alias(self, src: str, alias: str) -> None:
        layers = [m for m in self._lora_layers if src in m.lora_A]
        if not layers:
            raise RuntimeError(f"no LoRA layer holds adapter {src!r}")
        for m in layers:
            for attr in (*m.adapter_layer_names, *m.other_param_names):
                d = getattr(m, attr, None)
                if isinstance(d, (dict, torch.nn.ModuleDict, torch.nn.ParameterDict)) and src in d:
                    d[alias] = d[src]
        self.peft.peft_config[alias] = self.peft.peft_config[src]

    def factory(self, exp: ExperimentConfig, clock):
        """The runner's system factory: an `HFPeftServer` on the cached model."""
        src = exp.model.name
        cfg = PRESETS[src] if src in PRESETS else read_config(src) if os.path.isdir(src) else None
        adapters = [] if cfg is None else adapter_folders(exp.adapters, cfg, os.path.join(exp.output_dir, "_adapters"))
        _, cfg = self.model(exp, adapters)  # (an unknown model raises here)
        ec = exp.engine
        return HFPeftServer(self, cfg, self.device, max_batch_size=ec.max_num_seqs, max_model_len=ec.max_model_len,
                            clock=clock), cfg


def torch_facts() -> dict[str, str]:
    facts = {"torch_version": torch.__version__, "transformers_version": transformers.__version__}
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name()
    return facts


class HFPeftServer(StaticBatchServer):
    """transformers + peft behind the engine's API; FCFS batches that mix adapters."""

    def __init__(self, models: HFModelCache, cfg: LlamaConfig, device: str, **kwargs):
        super().__init__(cfg, params=None, **kwargs)
        self.models, self.device = models, device
        self.base = models.base
        self._peft_names: dict[str, str] = {}

    @property
    def model(self):
        """The PEFT model once any adapter is loaded (it holds the base model's layers, adapted in place)."""
        return self.models.peft

    def add_adapter(self, name, path) -> None:
        super().add_adapter(name, path)
        self._peft_names[name] = self.models.load(name, os.fspath(path))

    def warm(self, input_len, output_len) -> int:
        """One short batch (the longest prompt, two tokens, on up to two adapters): CUDA and peft set up."""
        serve_requests(self, [(input_len[1], a) for a in list(self._peft_names)[:2] or [None]], max_new_tokens=2)
        return 1

    def memory_report(self) -> dict[str, float]:
        report = {"peft_adapters": len(self.models.loaded), "peft_folders_loaded": len(self.models.by_folder),
                  "peft_aliasing": float(self.models.alias)}
        if self.device == "cuda":
            report["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return report

    def step(self) -> list[TokenEvent]:
        waiting = sorted((r for r in self._requests.values() if r.finish_reason is None),
                         key=lambda r: (r.arrival_time, r.id))
        batch = waiting[: self.max_batch_size]
        if not batch:
            return []
        S = max(len(r.prompt) for r in batch)
        ids = torch.zeros((len(batch), S), dtype=torch.long)
        mask = torch.zeros((len(batch), S), dtype=torch.long)
        for b, r in enumerate(batch):  # left padding
            ids[b, S - len(r.prompt):] = torch.tensor(r.prompt)
            mask[b, S - len(r.prompt):] = 1
        ignore_eos = all(r.sampling.ignore_eos for r in batch)
        gen = self.model if self.model is not None else self.base
        self.base.generation_config.eos_token_id = None if ignore_eos else list(self.cfg.eos_token_ids)
        timer = _StepTimes(self.clock)
        kw = {} if self.model is None else {
            "adapter_names": [self._peft_names[r.adapter] if r.adapter else "__base__" for r in batch]}
        if self.deadline != float("inf"):
            kw["stopping_criteria"] = transformers.StoppingCriteriaList([_Deadline(self.clock, self.deadline)])
        with torch.no_grad():
            out = gen.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                               max_new_tokens=max(r.sampling.max_new_tokens for r in batch), pad_token_id=0,
                               logits_processor=transformers.LogitsProcessorList([timer]), **kw)
        out = out[:, S:].cpu().tolist()
        events = []
        for b, r in enumerate(batch):
            reason = None
            for tok in out[b][: len(timer.times)]:
                r.output.append(tok)
                reason = r.sampling.finish_reason(tok, len(r.output), self.cfg.eos_token_ids)
                events.append(TokenEvent(r.id, tok, reason))
                if reason:
                    break
            if r.output:
                r.first_token_time = timer.times[0]
            if reason:  # else generation stopped at the deadline: the caller aborts it
                r.finish_reason, r.finish_time = reason, timer.times[len(r.output) - 1]
        self.num_steps += 1
        return events


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        exp = load_experiment(argv[0], [*argv[1:], "system=hf_peft"])
    except ConfigError as e:
        print(f"bench_hf_peft: config error: {e}", file=sys.stderr)
        return 2
    run(exp, system_factory=HFModelCache().factory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
