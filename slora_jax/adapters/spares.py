"""Host buffers of packed adapter rows, kept after the host tier drops them, to pack into again.

Why: the first write to a fresh host array faults its pages in, and on a Linux host
with transparent huge pages (numpy asks for them on large arrays) a fault can stall in
the kernel's memory compaction. On the development CPU, packing a rank-64 Llama-7B
adapter (134 MB of rows) took 0.22-0.41 s into a fresh array and 0.07 s into one
packed before; a 134 MB `fill` took 0.32 s fresh against 7 ms recycled (session 12).
The store's host tier keeps every packed array until its byte budget drops it, so
without recycling every first load of an adapter writes fresh memory.

A buffer is handed out again only once the host-to-device copy that read it has
finished (`jax.Array.is_ready` of the copy's result): `jax.device_put` of a numpy
array reads it asynchronously.
"""

from __future__ import annotations

import collections
import threading

import jax
import numpy as np


class SpareBuffers:
    """Dropped row buffers by (bytes, dtype), oldest dropped first out when over `max_bytes`.

    Thread-safe: staging threads `take` while the engine thread `give`s.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"SpareBuffers.max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._free: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()  # id -> buffer, oldest first
        self._copies: dict[int, tuple[np.ndarray, jax.Array]] = {}  # id(buffer) -> (buffer, its copy's result)
        self._waiting: dict[int, np.ndarray] = {}  # given back while their copy was still reading them
        self.bytes = 0  # held in `_free`
        self.reuses = 0  # `take`s answered with a spare

    def copying(self, buf: np.ndarray, copy: jax.Array) -> None:
        """Record that `copy` (the result of a `device_put` of `buf`) may still be reading `buf`."""
        if self.max_bytes:
            with self._lock:
                self._copies[id(buf)] = (buf, copy)

    def give(self, buf: np.ndarray) -> None:
        """`buf` is no longer used by the host tier: keep it to pack into (once no copy reads it)."""
        if not self.max_bytes or buf.nbytes > self.max_bytes or not buf.flags.c_contiguous:
            return
        with self._lock:
            self._settle()
            if id(buf) in self._copies:
                self._waiting[id(buf)] = buf
            else:
                self._keep(buf)

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray | None:
        """A spare buffer reshaped to `shape` (contents arbitrary), or None if none fits exactly."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            self._settle()
            for key, buf in self._free.items():
                if buf.nbytes == nbytes and buf.dtype == dtype:
                    del self._free[key]
                    self.bytes -= nbytes
                    self.reuses += 1
                    return buf.reshape(shape)
        return None

    def _settle(self) -> None:
        """Forget finished copies; waiting buffers whose copy finished become spares (lock held)."""
        for key in [k for k, (_, copy) in self._copies.items() if copy.is_ready()]:
            del self._copies[key]
            buf = self._waiting.pop(key, None)
            if buf is not None:
                self._keep(buf)

    def _keep(self, buf: np.ndarray) -> None:
        self._free[id(buf)] = buf
        self.bytes += buf.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._free.popitem(last=False)
            self.bytes -= old.nbytes
