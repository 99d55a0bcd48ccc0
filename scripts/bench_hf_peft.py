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
request generates exactly its output length.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import transformers
from peft import PeftModel

from slora_jax.baselines.static_batch import StaticBatchServer
from slora_jax.config import PRESETS, ExperimentConfig, LlamaConfig
from slora_jax.engine.request import TokenEvent
from slora_jax.errors import ConfigError
from slora_jax.experiment import load_experiment, run
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


class HFPeftServer(StaticBatchServer):
    """transformers + peft behind the engine's API; FCFS batches that mix adapters."""

    def __init__(self, model: transformers.LlamaForCausalLM, cfg: LlamaConfig, device: str, **kwargs):
        super().__init__(cfg, params=None, **kwargs)
        self.base, self.model, self.device = model, None, device

    def add_adapter(self, name, path) -> None:
        super().add_adapter(name, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)

    def memory_report(self) -> dict[str, float]:
        if self.device != "cuda":
            return {}
        return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated()}

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
        kw = {} if self.model is None else {"adapter_names": [r.adapter or "__base__" for r in batch]}
        with torch.no_grad():
            out = gen.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                               max_new_tokens=max(r.sampling.max_new_tokens for r in batch), pad_token_id=0,
                               logits_processor=transformers.LogitsProcessorList([timer]), **kw)
        out = out[:, S:].cpu().tolist()
        events = []
        for b, r in enumerate(batch):
            for k, tok in enumerate(out[b]):
                r.output.append(tok)
                reason = r.sampling.finish_reason(tok, len(r.output), self.cfg.eos_token_ids)
                events.append(TokenEvent(r.id, tok, reason))
                if reason:
                    break
            r.first_token_time, r.finish_time = timer.times[0], timer.times[len(r.output) - 1]
            r.finish_reason = reason or "length"
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
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def factory(exp, clock):
        model, cfg = load_hf_model(exp, device)
        ec = exp.engine
        return HFPeftServer(model, cfg, device, max_batch_size=ec.max_num_seqs, max_model_len=ec.max_model_len,
                            clock=clock), cfg

    run(exp, system_factory=factory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
