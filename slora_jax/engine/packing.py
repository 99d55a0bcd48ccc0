"""One host-to-device transfer per engine step: a pytree's numpy leaves packed into one int32 buffer.

A step's inputs are a dozen or more small arrays (tokens, positions, page
tables, LoRA metadata, sampling parameters). Passed one by one, each becomes its
own host-to-device copy at dispatch. `pack` lays all numpy leaves (4-byte
dtypes and bools, any shape) end to end in one int32 buffer; `unpack`, inside
the jitted step, slices and bitcasts them back into the same pytree. Leaves
that already live on the device (`jax.Array`) pass through untouched.

    buf, dev, spec = pack(tree)           # host
    tree = unpack(buf, dev, spec)         # under jit; `spec` is a static argument
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_PACKABLE = {np.dtype(t) for t in (np.int32, np.uint32, np.float32, np.bool_)}


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Static (hashable) description of a packed pytree."""

    treedef: Any
    # per leaf: (offset, shape, dtype name) for a packed numpy leaf, None for a device leaf
    leaves: tuple[tuple[int, tuple[int, ...], str] | None, ...]
    size: int  # int32 words in the buffer


def pack(tree) -> tuple[np.ndarray, list[jax.Array], PackSpec]:
    """Numpy leaves of `tree` into one int32 buffer; returns (buffer, device leaves, spec)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    parts, dev, spec, off = [], [], [], 0
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            dev.append(leaf)
            spec.append(None)
            continue
        a = np.asarray(leaf)
        if a.dtype not in _PACKABLE:
            raise TypeError(f"cannot pack a {a.dtype} leaf {leaf!r:.80} (int32, uint32, float32 or bool only)")
        flat = a.astype(np.int32) if a.dtype == np.bool_ else a.reshape(-1).view(np.int32)
        parts.append(flat.reshape(-1))
        spec.append((off, a.shape, a.dtype.name))
        off += a.size
    buf = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return buf, dev, PackSpec(treedef, tuple(spec), off)


def unpack(buf_N: jax.Array, dev: list[jax.Array], spec: PackSpec):
    """The pytree `pack` was given, rebuilt from its buffer (jittable; `spec` static)."""
    dev_it = iter(dev)
    leaves = []
    for entry in spec.leaves:
        if entry is None:
            leaves.append(next(dev_it))
            continue
        off, shape, name = entry
        words = lax.slice(buf_N, (off,), (off + int(np.prod(shape, dtype=np.int64)),)).reshape(shape)
        dtype = np.dtype(name)
        if dtype == np.bool_:
            leaves.append(words != 0)
        elif dtype == np.int32:
            leaves.append(words)
        else:
            leaves.append(lax.bitcast_convert_type(words, jnp.dtype(dtype)))
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)


__all__ = ["PackSpec", "pack", "unpack"]
