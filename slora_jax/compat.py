"""The one place in `slora_jax` that knows about JAX-version differences (Pallas ones: `pallas_kernels/compat.py`).

The CPU machines run JAX 0.10.x and the GPU image 0.11.x; both have
`jax.shard_map` (with `check_vma`) and `Mesh(..., axis_types=...)`. Older
releases only had `jax.experimental.shard_map.shard_map` (with `check_rep`),
kept working here so that no other module version-checks.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

try:
    from jax.sharding import AxisType
except ImportError:  # before JAX 0.5: every mesh axis behaves as Auto
    AxisType = None


def shard_map(f, *, mesh: Mesh, in_specs, out_specs, check_vma: bool = True):
    """`jax.shard_map` (JAX >= 0.6) or the experimental one before it."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    from jax.experimental.shard_map import shard_map as _shard_map

    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def auto_mesh_1d(devices: Sequence[jax.Device], axis_name: str) -> Mesh:
    """A 1-D `Mesh` whose axis is `Auto` (GSPMD propagation outside `shard_map`), stated
    explicitly: `jax.make_mesh` defaults to `Explicit` axes in recent versions."""
    devs = np.asarray(devices)
    if AxisType is None:
        return Mesh(devs, (axis_name,))
    return Mesh(devs, (axis_name,), axis_types=(AxisType.Auto,))


def on_gpu_stream(f, stream: int):
    """`f` lowered as a call that XLA may run on GPU stream `stream` beside the main one
    (`jax.experimental.compute_on.compute_on2`, compute type `gpu_stream:N`; outputs in device
    memory). XLA's `--xla_gpu_experimental_stream_annotation` turns the annotation on or off."""
    import inspect

    from jax.experimental import compute_on as co

    kind = f"gpu_stream:{stream}"
    # JAX 0.10 has the function form as `compute_on2` beside the context manager `compute_on`;
    # 0.11 gives the function form the name `compute_on`; older releases have the manager alone.
    if "out_memory_spaces" in inspect.signature(co.compute_on).parameters:
        wrap = co.compute_on
    elif hasattr(co, "compute_on2"):
        wrap = co.compute_on2
    else:
        def run_legacy(*args):
            with co.compute_on(kind):
                return jax.jit(f)(*args)

        return run_legacy
    from jax._src import core

    def run(*args):
        device = jax.tree.map(lambda _: core.MemorySpace.Device, jax.eval_shape(f, *args))
        return wrap(f, compute_type=kind, out_memory_spaces=device)(*args)

    return run
