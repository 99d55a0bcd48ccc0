"""Dense KV cache layouts on a GPU: the library's `DenseKVCache` ([L, B, K, S, D], heads before positions)
against the positions-first [L, B, S, K, D] it had until session 28, whose compiled step held a transpose
of the whole cache (the static-batch baselines' out-of-memory on an H100).

For each layout, layer loop (scan over stacked weights, as the baselines run, or unrolled) and call
(decode: 1 token a row; prefill: 128): compile `model.forward_jit` on 7B-shaped layers at batch 64 x 1024
positions, count the compiled ops whose result is cache-shaped (by op and layout), XLA's temp bytes, and
the median call time.

    python scripts/probe_dense_cache.py --layers 8 --out DIR   # writes DIR/dense_cache_probe.json
"""
import argparse
import dataclasses
import json
import os
import re
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.config import preset
from slora_jax.model import llama
from slora_jax.model.cache import DenseKVCache
from slora_jax.ops.attention import attention_reference



class PositionsFirstCache(NamedTuple):
    """The layout before session 28: `[L, B, S_max, K, D]`."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def create(cls, cfg, batch, max_len, dtype=jnp.bfloat16):
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self):
        return self.k.shape[2]

    def write(self, layer, k_BxSxKxD, v_BxSxKxD, pos_BxS):
        B, S = pos_BxS.shape
        b_BxS = jnp.broadcast_to(jnp.arange(B)[:, None], (B, S))
        t_BxS = jnp.where(pos_BxS >= 0, pos_BxS, self.max_len)
        k = self.k.at[layer, b_BxS, t_BxS].set(k_BxSxKxD.astype(self.k.dtype), mode="drop")
        v = self.v.at[layer, b_BxS, t_BxS].set(v_BxSxKxD.astype(self.v.dtype), mode="drop")
        return PositionsFirstCache(k, v)

    def attend(self, layer, q_BxSxNxD, pos_BxS):
        return attention_reference(q_BxSxNxD, self.k[layer], self.v[layer], pos_BxS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8, help="7B-shaped layers (32: the whole model)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--model", default="llama-7b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    B, T, dtype = args.batch, args.max_len, jnp.dtype(args.dtype)
    cfg = dataclasses.replace(preset(args.model), num_hidden_layers=args.layers)
    params = llama.init_random_params(cfg, jax.random.key(0), dtype)
    rows = []
    for loop in ("scan", "unrolled"):
        p_ = params if loop == "scan" else llama.unstack_layers(params)
        for name, C in (("L,B,K,S,D (DenseKVCache)", DenseKVCache), ("L,B,S,K,D (before)", PositionsFirstCache)):
            for kind, S in (("decode", 1), ("prefill", 128)):
                cache = C.create(cfg, B, T, dtype)
                tok = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S)), jnp.int32)
                pos = np.arange(S)[None] + (T // 2 if kind == "decode" else 0)
                pos = jnp.asarray(np.broadcast_to(pos, (B, S)), jnp.int32)
                t0 = time.perf_counter()
                comp = llama.forward_jit.lower(p_, cfg, tok, pos, cache).compile()
                compile_s = time.perf_counter() - t0
                shape = "%s[%s]" % (jnp.dtype(dtype).name.replace("bfloat16", "bf16").replace("float", "f"),
                                    ",".join(map(str, cache.k.shape)))
                ops, transposes = {}, 0  # "op{layout}" -> count, of the ops whose result is cache-shaped
                for line in comp.as_text().splitlines():
                    m = re.search(r"%%([\w.\-]+) = %s\{([0-9,]+)\} ([a-z\-]+)\(" % re.escape(shape), line)
                    if m:
                        key = f"{m.group(3)}{{{m.group(2)}}}"
                        ops[key] = ops.get(key, 0) + 1
                        transposes += "transpose" in m.group(1) or m.group(3) in ("transpose", "copy")
                temp = getattr(comp.memory_analysis(), "temp_size_in_bytes", -1)
                ts = []
                for _ in range(args.reps):
                    t1 = time.perf_counter()
                    logits, cache = comp(p_, tok, pos, cache)
                    logits.block_until_ready()
                    ts.append(time.perf_counter() - t1)
                row = dict(loop=loop, cache=name, call=kind, tokens=S, compile_s=round(compile_s, 1),
                           transposes=transposes,  # of the whole cache: each moves 2x its bytes
                           cache_shaped_ops=ops, temp_GiB=round(temp / 2**30, 2),
                           median_ms=round(1e3 * float(np.median(ts[2:] or ts)), 3))
                print(json.dumps(row), flush=True)
                rows.append(row)
                del cache, logits
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dense_cache_probe.json"), "w") as f:
        json.dump({"benchmark": "dense_cache_probe", "device": jax.devices()[0].device_kind,
                   "jax_version": jax.__version__, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
