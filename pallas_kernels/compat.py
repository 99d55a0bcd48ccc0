"""The one place that knows about JAX-version differences in Pallas.

The CPU machines run JAX 0.10.x and the GPU image 0.11.x. Kernels import Pallas
names from here, never version-check themselves; `slora_jax` may import this too.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Renamed from `TritonCompilerParams` in JAX 0.7; keep the old name working.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def compiler_params(*, num_warps: int, num_stages: int):
    """Triton `CompilerParams`; both fields always explicit (never the defaults)."""
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dotted_cache_modifiers() -> None:
    """Let `plgpu.load(cache_modifier=".cg")` lower. JAX's Triton lowering (0.10.2 at least) accepts only
    ".ca"/".cg" but looks them up in a table keyed "ca"/"cg" (a KeyError); add the dotted keys where missing."""
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:  # no Triton lowering in this JAX: nothing to fix
        return
    table = getattr(lowering, "_STR_TO_CACHE_MODIFIER", None)
    if isinstance(table, dict):
        for key in ("ca", "cg"):
            if key in table:
                table.setdefault("." + key, table[key])


_dotted_cache_modifiers()


def default_interpret() -> bool:
    """Interpret mode everywhere except an NVIDIA GPU backend (the Triton lowering needs one)."""
    return jax.default_backend() != "gpu"


__all__ = ["pl", "plgpu", "compiler_params", "default_interpret"]
