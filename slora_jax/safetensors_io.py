"""Memory-mapped reading of `.safetensors` files into numpy (bf16 included).

The `safetensors` package's numpy reader rejects bfloat16, and its flax reader
copies every tensor onto the default device. Checkpoints and adapters are read
here instead: the file's JSON header is parsed and each tensor is a read-only
`numpy.memmap` view (bf16 through `ml_dtypes`), so nothing is copied until a
caller converts or transposes it.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """Lazily memory-mapped tensors of one `.safetensors` file.

    Raises `error_cls(message)` (message naming the file) on any malformed input.
    """

    def __init__(self, path: str | os.PathLike, error_cls: Callable[[str], Exception] = ValueError):
        self.path = os.fspath(path)
        self._error_cls = error_cls
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._error("file is shorter than the 8-byte safetensors header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise self._error(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._error(f"unreadable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = np.dtype(_DTYPES[e["dtype"]])
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._error(f"tensor {name!r}: bad header entry {e!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape)) or end > self._data_size or begin < 0:
                raise self._error(f"tensor {name!r}: data offsets {begin}..{end} do not match its shape {shape}")
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap: np.memmap | None = None

    def _error(self, msg: str) -> Exception:
        return self._error_cls(f"{self.path}: {msg}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """Read-only memory-mapped view of tensor `name` (no copy)."""
        dtype, shape, begin, end = self._entries[name]
        if self._mmap is None:
            if self._data_size == 0:
                return np.zeros(shape, dtype)
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        return self._mmap[begin:end].view(dtype).reshape(shape)
