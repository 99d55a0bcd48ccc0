"""Spare row buffers: handed out again only by exact size and dtype, only once no copy reads them,
oldest dropped first over the byte cap."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from slora_jax.adapters.spares import SpareBuffers


class FakeCopy:
    """A device copy whose completion the test controls (`jax.Array.is_ready`'s contract)."""

    def __init__(self):
        self.done = False

    def is_ready(self) -> bool:
        return self.done


def test_a_given_buffer_comes_back_by_size_and_dtype_reshaped():
    spares = SpareBuffers(1 << 20)
    buf = np.zeros((2, 3, 8), np.float32)
    spares.give(buf)
    assert spares.take((4, 8), np.float16) is None  # other dtype
    assert spares.take((3, 8), np.float32) is None  # other size
    out = spares.take((6, 8), np.float32)
    assert out.shape == (6, 8) and np.shares_memory(out, buf) and spares.bytes == 0 and spares.reuses == 1
    assert spares.take((6, 8), np.float32) is None  # handed out once


def test_a_buffer_a_copy_still_reads_waits_for_the_copy():
    spares = SpareBuffers(1 << 20)
    buf, copy = np.zeros(64, np.float32), FakeCopy()
    spares.copying(buf, copy)
    spares.give(buf)
    assert spares.take((64,), np.float32) is None
    copy.done = True
    assert np.shares_memory(spares.take((64,), np.float32), buf)
    # A copy that finished before the buffer is given back: it is a spare at once.
    buf2, copy2 = np.zeros(64, np.float32), FakeCopy()
    spares.copying(buf2, copy2)
    copy2.done = True
    spares.give(buf2)
    assert np.shares_memory(spares.take((64,), np.float32), buf2)


def test_off_and_unsuitable_buffers_are_not_kept():
    off = SpareBuffers(0)
    off.give(np.zeros(8))
    assert off.take((8,), np.float64) is None
    spares = SpareBuffers(64)
    spares.give(np.zeros(16))  # 128 bytes: over the cap
    spares.give(np.zeros((4, 4))[:, :2])  # not contiguous
    assert spares.bytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        SpareBuffers(-1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["give", "take"]), st.integers(1, 6)), max_size=40),
       st.integers(0, 200))
def test_spares_stay_under_the_cap_and_never_hand_a_buffer_out_twice(ops, cap):
    spares, held = SpareBuffers(cap), []  # held: buffers handed out and not given back
    for op, n in ops:
        if op == "give":
            buf = held.pop() if held and n % 2 else np.zeros(n * 4, np.float32)
            spares.give(buf)
        else:
            out = spares.take((n * 4,), np.float32)
            if out is not None:
                assert out.nbytes == n * 16 and not any(np.shares_memory(out, h) for h in held)
                held.append(out)
        assert 0 <= spares.bytes <= cap
