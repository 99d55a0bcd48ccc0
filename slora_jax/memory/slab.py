"""The running batch's adapters in a dense slab beside the pool, for the decode-sized LoRA kernels.

Why: the gathered kernels that read adapter rows in place from pool pages are latency-bound at
decode (benchmarks/NOTES_lora_kernels.md, sessions 8-13): each program waits on a chain of
table and row loads. `ops.lora_linear_slab` (`pallas_kernels.lora_slab`) instead reads the
batch's adapters from dense operands, as two plain pipelined GEMMs, the second one the base
projection with its K extended by the slab's rows. The pool stays the adapters' home (unified
paging is unchanged); the slab holds a second copy of just the adapters the running requests
use, written when an adapter joins the batch (a device-to-device copy from its pages) and
reused for every step after.

Layout: one pair of arrays per group of projections that share x (`GROUPS`: q/k/v, o,
gate/up, down), made the first time an adapter targets one of them:
  a `[L * G, H_in, P]`  column p of layer l's projection g at index `l * G + g`,
  b `[L * G, P, N_max]` row p of its B (scale folded in, as in the pool).
P = `EngineConfig.lora_slab_rows`. An adapter holds consecutive rows `[start, start + rows)`,
rows = its largest rank (a projection of lower rank, or not targeted, leaves zeros). The
kernels read rows `[0, n_rows)`, `n_rows` = the highest row in use rounded up to the block,
so rows of adapters that left the batch cost bandwidth until they are reused or compacted:
`ensure` keeps only the batch's adapters below the high-water mark and compacts (rewrites all
of them from row 0) when holes would make it read more than `1.25x` what the batch needs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.config import LlamaConfig
from slora_jax.errors import ConfigError
from slora_jax.memory.pool import PROJECTIONS, AdapterTable, PoolLayout, paged_weights
from slora_jax.ops.lora import KernelConfig, lora_linear_slab, slab_counters, slab_fits

WRITE_CHUNK = 8  # adapters copied into the slab by one call of `_write`
GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


@dataclasses.dataclass(frozen=True)
class _Entry:
    start: int
    rows: int


def _round_up(n: int, b: int) -> int:
    return -(-n // b) * b


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "r_max", "groups"), donate_argnums=(0,))
def _write(arrays, pool, table: AdapterTable, cols_AxR, *, cfg: LlamaConfig, layout: PoolLayout, r_max: int,
           groups: tuple[int, ...]):
    """Copy the adapters of `table` from their pool pages into the slab (`arrays`, donated).

    `cols_AxR[s, i]`: the slab row of rank row i of table row s, all distinct; those >= P are dropped.
    """
    L = cfg.num_hidden_layers
    cols = cols_AxR.reshape(-1)
    out = []
    for (a, b), gi in zip(arrays, groups):
        projs = GROUPS[gi]
        G = len(projs)
        a4, b4 = a.reshape(L, G, *a.shape[1:]), b.reshape(L, G, *b.shape[1:])
        for g, proj in enumerate(projs):
            h_in, h_out = cfg.projection_shape(proj)
            read = jax.vmap(lambda layer, proj=proj, h_in=h_in, h_out=h_out: (
                lambda w: (w.read_a(), w.read_b()))(paged_weights(pool, layout, table, proj, h_in, h_out, r_max,
                                                                  layer=layer)))
            a_LxAxIxR, b_LxAxRxO = read(jnp.arange(L))
            # [:, g, :, cols]: g and cols are advanced indices apart, so the indexed dims come first
            a_CxLxI = a_LxAxIxR.transpose(1, 3, 0, 2).reshape(-1, L, h_in)
            a4 = a4.at[:, g, :, cols].set(a_CxLxI.astype(a.dtype), mode="drop", unique_indices=True)
            b4 = b4.at[:, g, cols, :h_out].set(b_LxAxRxO.reshape(L, -1, h_out).astype(b.dtype), mode="drop",
                                               unique_indices=True)
        out.append((a4.reshape(a.shape), b4.reshape(b.shape)))
    return tuple(out)


class LoraSlab:
    """Host bookkeeping of the slab (which adapter holds which rows) and its device arrays."""

    def __init__(self, cfg: LlamaConfig, layout: PoolLayout, rows: int, dtype, *, block: int = 64):
        if rows <= 0 or rows % block:
            raise ConfigError(f"EngineConfig.lora_slab_rows must be a positive multiple of {block}, got {rows}")
        self.cfg, self.layout, self.P, self.dtype, self.block = cfg, layout, rows, jnp.dtype(dtype), block
        self.arrays: dict[int, tuple[jax.Array, jax.Array]] = {}  # group index -> (a, b)
        self.entries: dict[str, _Entry] = {}
        self.stats = collections.Counter()  # adapters_written, compactions, steps_on_pages (batches it could not hold)
        # The kernels' split-K counters: zeroed once, passed to every call (they leave it zero).
        self.counters = slab_counters()

    @property
    def n_rows(self) -> int:
        """Rows the kernels read: the highest row in use, rounded up to the block."""
        return _round_up(max((e.start + e.rows for e in self.entries.values()), default=0), self.block)

    def forget(self, name: str) -> None:
        """Drop `name`'s rows (its weights changed); the next batch with it writes them again."""
        self.entries.pop(name, None)

    def _group_arrays(self, gi: int) -> tuple[jax.Array, jax.Array]:
        projs = GROUPS[gi]
        L, G = self.cfg.num_hidden_layers, len(projs)
        h_in = self.cfg.projection_shape(projs[0])[0]
        n_out = max(self.cfg.projection_shape(p)[1] for p in projs)
        return (jnp.zeros((L * G, h_in, self.P), self.dtype), jnp.zeros((L * G, self.P, n_out), self.dtype))

    def _fit(self, rows: int, taken: list[tuple[int, int]]) -> int | None:
        """First free start for `rows` rows among `taken` (start, end) ranges, or None."""
        at = 0
        for s, e in sorted(taken):
            if s - at >= rows:
                return at
            at = max(at, e)
        return at if self.P - at >= rows else None

    def plan(self, need: dict[str, int]) -> tuple[dict[str, _Entry], list[str]]:
        """Where each adapter of the batch goes (`need`: name -> rows, in batch order), and which to write.

        Adapters already in the slab stay; the others take the first gap that fits; adapters
        not in the batch give their rows up. If one does not fit, or the rows read would pass
        `1.25x` the batch's own plus a block, the slab compacts: adapters lying within the batch's
        own row count stay, the rest move to the first gaps (as requests finish, only the top
        ones are copied); if that still reads too much, all are laid out again from row 0.
        """
        total = sum(need.values())
        if total > self.P:
            raise ConfigError(f"the batch's adapters need {total} slab rows; EngineConfig.lora_slab_rows is {self.P}")
        limit = 1.25 * total + self.block
        kept = {n: e for n, e in self.entries.items() if n in need}
        placed = self._place(need, kept)
        if placed is None or self._high(placed) > limit:
            self.stats["compactions"] += 1
            placed = self._place(need, {n: e for n, e in kept.items() if e.start + e.rows <= total})
            if placed is None or self._high(placed) > limit:
                placed, at = {}, 0
                for n, rows in need.items():
                    placed[n] = _Entry(at, rows)
                    at += rows
        return placed, [n for n in need if kept.get(n) != placed[n]]

    def _place(self, need: dict[str, int], kept: dict[str, _Entry]) -> dict[str, _Entry] | None:
        """`kept` plus the other adapters of `need` at the first gaps that fit (in `need`'s order), or None."""
        placed = dict(kept)
        for n, rows in need.items():
            if n not in placed:
                start = self._fit(rows, [(e.start, e.start + e.rows) for e in placed.values()])
                if start is None:
                    return None
                placed[n] = _Entry(start, rows)
        return {n: placed[n] for n in need}

    @staticmethod
    def _high(placed: dict[str, _Entry]) -> int:
        return max((e.start + e.rows for e in placed.values()), default=0)

    def holds(self, names: list[str], table: AdapterTable) -> bool:
        """Whether the adapters of `names` (the rows of `table`) fit in the slab together (`ensure` can place them)."""
        rank_AxP = np.asarray(table.rank)
        return sum(int(rank_AxP[i].max(initial=0)) for i in range(len(names))) <= self.P

    def ensure(self, names: list[str], table: AdapterTable, pool: jax.Array, r_max: int) -> None:
        """Make every adapter of `names` (the rows of `table`, in order) hold slab rows, writing the missing ones."""
        rank_AxP = np.asarray(table.rank)
        placed, new = self.plan({n: int(rank_AxP[i].max(initial=0)) for i, n in enumerate(names)})
        self.entries = placed
        targeted = {p for i in range(len(names)) for j, p in enumerate(PROJECTIONS) if rank_AxP[i, j] > 0}
        for gi, projs in enumerate(GROUPS):
            if gi not in self.arrays and targeted & set(projs):
                self.arrays[gi] = self._group_arrays(gi)
                new = list(names)  # a new group: every adapter's rows of it
        if not new:
            return
        # Only the joining adapters are read from the pool, `WRITE_CHUNK` table rows a call (one compiled
        # shape); a short chunk repeats one of its rows, whose columns then all fall past P.
        rows_new = [i for i, n in enumerate(names) if n in new]
        groups = tuple(sorted(self.arrays))
        arrays = tuple(self.arrays[g] for g in groups)
        for c in range(0, len(rows_new), WRITE_CHUNK):
            chunk = rows_new[c : c + WRITE_CHUNK]
            pick = np.array(chunk + [chunk[0]] * (WRITE_CHUNK - len(chunk)), np.int32)
            # Every column index is distinct (those past P are dropped): the scatter needs no atomics.
            cols = (self.P + np.arange(WRITE_CHUNK * r_max, dtype=np.int32)).reshape(WRITE_CHUNK, r_max)
            for j, i in enumerate(chunk):
                e = placed[names[i]]
                cols[j, : e.rows] = e.start + np.arange(e.rows)
            sub = AdapterTable(*(jnp.asarray(np.asarray(x)[pick]) for x in table))
            arrays = _write(arrays, pool, sub, jnp.asarray(cols), cfg=self.cfg, layout=self.layout, r_max=r_max,
                            groups=groups)
        self.arrays = dict(zip(groups, arrays))
        self.stats["adapters_written"] += len(new)

    def lora_input(self, paged, names: list[str], slot_T: np.ndarray, kernel: KernelConfig | None) -> "SlabLora":
        """The model's LoRA input: `paged` (a `PagedLora` over the same batch) plus the slab, for `slot_T`."""
        rank_AxP = np.asarray(paged.table.rank)
        T = slot_T.shape[0]
        groups = tuple(sorted(self.arrays))
        los, his = [], []
        has = slot_T >= 0
        s_T = np.where(has, slot_T, 0)
        start_A = np.array([self.entries[n].start for n in names] + [0], np.int32)
        for gi in groups:
            cols = [PROJECTIONS.index(p) for p in GROUPS[gi]]
            lo = np.where(has, start_A[s_T], 0).astype(np.int32)
            r_GxT = np.where(has[None], rank_AxP[s_T][:, cols].T, 0).astype(np.int32)
            los.append(np.broadcast_to(lo, (len(cols), T)).copy())
            his.append(lo[None] + r_GxT)
        return SlabLora(paged, tuple(self.arrays[g][0] for g in groups), tuple(self.arrays[g][1] for g in groups),
                        tuple(los), tuple(his), np.asarray(self.n_rows, np.int32), self.counters, groups,
                        kernel or KernelConfig())

    def memory(self) -> dict[str, float]:
        return {"slab_bytes": sum(a.nbytes + b.nbytes for a, b in self.arrays.values()),
                "slab_rows_used": self.n_rows, "slab_adapters": len(self.entries)}


@flax.struct.dataclass
class SlabLora:
    """`PagedLora` plus the slab: decode-sized calls of the slab's groups run `ops.lora_linear_slab`."""

    paged: object  # PagedLora over the same batch: longer calls (prefill), and what the slab has not
    a: tuple  # per group in `groups`: [L * G, H_in, P]
    b: tuple  # [L * G, P, N_max]
    lo: tuple  # [G, T] int32: slab rows [lo, hi) of each token's adapter, per projection
    hi: tuple
    n_rows: np.ndarray  # int32 scalar
    counters: jax.Array  # int32 split-K counter workspace of the slab kernels (all zero; they leave it so)
    groups: tuple[int, ...] = flax.struct.field(pytree_node=False)
    kernel: KernelConfig = flax.struct.field(pytree_node=False, default=KernelConfig())

    def per_layer(self):
        return self.paged.per_layer()

    def prepare(self) -> "SlabLora":
        return self.replace(paged=self.paged.prepare())

    def layer_fn(self, layer, layer_weights, cache_now):
        return self.paged.layer_fn(layer, layer_weights, cache_now)

    def layer_group_fn(self, layer, layer_weights, cache_now):
        return self.paged.layer_group_fn(layer, layer_weights, cache_now)

    def layer_linear_fn(self, layer, layer_weights, cache_now):
        inner = self.paged.layer_linear_fn(layer, layer_weights, cache_now)

        def linear(projs: tuple[str, ...], x_TxI: jax.Array, ws_IxO: tuple[jax.Array, ...]):
            gi = GROUPS.index(projs) if projs in GROUPS else -1
            if gi in self.groups and slab_fits(x_TxI.shape[0], x_TxI.shape[1], [w.shape[1] for w in ws_IxO],
                                               self.kernel):
                j = self.groups.index(gi)
                return lora_linear_slab(x_TxI, ws_IxO, self.a[j], self.b[j], self.lo[j], self.hi[j], self.n_rows,
                                        layer * len(projs), config=self.kernel, counters=self.counters)
            return None if inner is None else inner(projs, x_TxI, ws_IxO)

        return linear


__all__ = ["GROUPS", "LoraSlab", "SlabLora"]
