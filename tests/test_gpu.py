"""The compiled Pallas LoRA kernels inside the model, on a real GPU (skipped on CPU).

Interpret mode runs a kernel's programs one after another, so it cannot catch what only a GPU
shows: programs that race (session 10's one-launch pair read partials before the shrink had
stored them) or an XLA stream annotation that changes what runs. Run on a GPU machine with
`JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")]


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("kernel", [
    dict(),  # the defaults: <= 16 tokens at these ranks (<= 16) take the one launch, phased
    dict(paged_one_launch_max_rank=0),  # <= 16 tokens on the pair: 1 K chunk a shrink program, 4 warps
    dict(paged_one_launch_max_tokens=0),          # the split pair
    dict(paged_one_launch_max_tokens=1 << 30, paged_one_launch_max_rank=1 << 30),  # one launch
    dict(lora_stream=1),                          # deltas annotated for GPU stream 1
    dict(group_projections=False, paged_one_launch_max_tokens=0),
    dict(paged_one_launch_max_tokens=0, paged_flat_programs=5),  # the split pair's tile loop flattened
    dict(paged_one_launch_max_tokens=0, paged_flat_programs=5, paged_run_time_splits=4),  # splits at run time
    dict(paged_one_launch_max_tokens=0, paged_phased_loads=True),  # every load before the dots
    dict(paged_one_launch_max_tokens=1 << 30, paged_one_launch_max_rank=1 << 30, paged_phased_loads=True),
    dict(paged_wait_loads="block"),  # the one launch's partials read in [KG, M, R] blocks after the wait
    dict(paged_one_launch_max_tokens=1 << 30, paged_one_launch_max_rank=1 << 30, paged_wait_loads="block"),
    dict(linear_max_tokens=256, linear_block_n=16, linear_block_k=16),  # base matmul and LoRA in one launch
    dict(linear_max_tokens=256, linear_block_n=16, linear_block_k=16, linear_shrink_launch=True),
], ids=lambda kernel: ",".join(f"{k}={v}" for k, v in kernel.items()) or "defaults")  # -k "phased" selects by field
@pytest.mark.parametrize("T", [1, 4, 24])
def test_model_lora_kernels_on_gpu_equal_reference(kernel, T):
    """Mixed adapters and no-adapter rows, in pages: the compiled kernels give the jnp logits."""
    from test_pool import CFG, paged_lora_case

    from slora_jax.model import forward

    slots = np.random.default_rng(T).integers(-1, 3, (3, T)).astype(np.int32)  # 3 adapters, -1 none
    params, toks, pos, cache, lora = paged_lora_case(slots)
    run = jax.jit(forward, static_argnums=1)
    want, _ = run(params, CFG, toks, pos, cache, lora("reference"))
    got, _ = run(params, CFG, toks, pos, cache, lora("pallas", **kernel))
    # fp32 inputs reach the tensor cores as TF32 (10-bit mantissa): ~1e-3 relative error.
    assert rel_err(got, want) < 5e-3


# (shrink, base GEMM) K splits (0: the heuristic), and the shrink in the GEMM's launch then the expand alone
@pytest.mark.parametrize("splits", [(1, 1, False), (2, 2, False), (4, 0, False), (4, 0, True)])
@pytest.mark.parametrize("T", [1, 24])
def test_model_on_the_slab_on_gpu_equals_reference(splits, T):
    """The slab kernels compiled (the shrink's last program of a block sums the split partials; the
    base GEMM's K split over W then the slab's rows) inside the model give the jnp logits."""
    from test_pool import CFG
    from test_slab import KERNEL, slab_lora_case

    from slora_jax.model import forward

    slots = np.random.default_rng(T).integers(-1, 3, (3, T)).astype(np.int32)
    params, toks, pos, cache, ref, slab = slab_lora_case(slots, slab_shrink_splits=splits[0],
                                                         slab_linear_splits=splits[1],
                                                         slab_shrink_with_base=splits[2], **KERNEL)
    run = jax.jit(forward, static_argnums=1)
    want, _ = run(params, CFG, toks, pos, cache, ref)
    got, _ = run(params, CFG, toks, pos, cache, slab)
    assert rel_err(got, want) < 5e-3


@pytest.mark.parametrize("outs", [(4096, 1024, 1024), (4096,)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("T", [64, 256])
def test_slab_at_default_blocks_on_gpu_equals_reference(T, with_base, outs):
    """7B q/k/v shapes (GQA) and o, bf16, the default blocks: 256 tokens fit in shared memory (fewer
    stages). With and without a shared counter workspace: calls on one workspace give the same
    outputs, one after another, and leave it zero (every split block's last program resets it)."""
    from test_lora_slab import _ranges

    from pallas_kernels.lora_slab import linear_slab_reference, slab_shrink_reference
    from slora_jax.ops import KernelConfig, lora_linear_slab, slab_counters

    rng = np.random.default_rng(T)
    G, H, P, n_rows = len(outs), 4096, 768, 752
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16)
    ws = tuple(jnp.asarray(rng.standard_normal((H, o)) / 64, jnp.bfloat16) for o in outs)
    a = jnp.asarray(rng.standard_normal((G, H, P)) / 64, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((G, P, 4096)) / 4, jnp.bfloat16)
    lo, hi = _ranges(rng, G, T, n_rows)
    cfg = KernelConfig(slab_shrink_with_base=with_base)
    want = linear_slab_reference(x, ws, slab_shrink_reference(x, a, lo, hi), b)
    got = lora_linear_slab(x, ws, a, b, lo, hi, n_rows, config=cfg)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-2
    counters = slab_counters()
    step = jax.jit(lambda x, c: [lora_linear_slab(x, ws, a, b, lo, hi, n_rows, config=cfg, counters=c)
                                 for _ in range(3)])  # three calls on one workspace, in one program
    for _ in range(2):  # and two programs
        for ys in step(x, counters):
            for y, g in zip(ys, got):
                assert rel_err(y, g) < 1e-6
    assert not np.asarray(counters).any()
