"""scripts/kernel_resources.py: the Triton launches of a lowered call, occupancy, and (with `triton`) a compile."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.ops import KernelConfig, PagedWeights, add_lora, build_lora_meta, random_slot_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def kr():
    spec = importlib.util.spec_from_file_location("kernel_resources", os.path.join(ROOT, "scripts/kernel_resources.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def small_call(T=4, rank=16, h=256, **over):
    w = random_slot_weights(jax.random.key(0), np.full(8, rank, np.int32), h, h, dtype=jnp.bfloat16)
    pw = PagedWeights.from_slots(w, chunk=64, rows_per_page=256)
    meta = build_lora_meta(np.arange(T) % 8, static_tiles=True)
    x, y = jnp.zeros((T, h), jnp.bfloat16), jnp.zeros((T, h), jnp.bfloat16)
    cfg = KernelConfig(interpret=False, **over)
    return (lambda y, x, w, m: add_lora(y, x, w, m, config=cfg)), (y, x, pw, meta)


@pytest.mark.parametrize("regs,warps,shared,fraction", [
    (88, 4, 4096, 0.3125),  # session 8's ncu: sgmv_shrink_paged_x3, theoretical occupancy 31%
    (48, 4, 6144, 0.625),  # sgmv_expand_paged_x3, 63%
    (80, 4, 4096, 0.375),  # sgmv_shrink_paged_x1, 38%
    (40, 4, 6144, 0.75),  # sgmv_expand_paged_x1, 75%
    (255, 4, 32768, 0.125),  # the loads-first shrink: "2 programs fit an SM (12.5%)"
])
def test_occupancy_matches_ncu(kr, regs, warps, shared, fraction):
    """The occupancy rule gives the theoretical occupancy `ncu` reported for these kernels
    (benchmarks/results/kernels_s8_h200/ncu_run2.txt)."""
    assert kr.occupancy(regs, warps, shared)["fraction"] == fraction


def test_occupancy_limits(kr):
    assert kr.occupancy(32, 1, 0)["blocks"] == 32  # the block limit, not registers (64 blocks' worth)
    assert kr.occupancy(32, 4, 100 * 1024)["blocks"] == 2  # shared memory: 2 x (100 KiB + 1 KiB) <= 228 KiB


def test_lower_kernels_pairs_modules_with_launches(kr):
    """The split pair lowers to two launches whose warps, stages and grid are the call's, each with a module
    cleaned of Pallas' debug locations; the one launch is one kernel."""
    fn, args = small_call(paged_one_launch_max_rank=0, paged_warps=1, paged_k_steps=2)
    ks = kr.lower_kernels(fn, *args)
    assert [k.name for k in ks] == ["sgmv_shrink_paged_x1", "sgmv_expand_paged_x1"]
    assert all(k.num_warps == 1 and k.num_stages == 1 for k in ks)
    assert ks[0].grid == (2, 4, 1)  # 4 chunks of 64 in H_in = 256, 2 a program; 4 tiles (the bound)
    for k in ks:
        assert k.ttir.startswith("module @" + k.name) and k.ttir.rstrip().endswith("}")
        assert "#loc" not in k.ttir and "[unknown]" not in k.ttir and "tt.dot" in k.ttir
    fn, args = small_call(T=1)
    one = kr.lower_kernels(fn, *args)
    assert [k.name for k in one] == ["sgmv_paged_one_launch_x1"]


def test_clean_ttir_cuts_after_the_module(kr):
    printed = ('module @k {\n  tt.func @k() {\n    %0 = arith.constant 0 : i32 "c:"(#loc1) [unknown]\n'
               '    tt.return\n  }\n}\n at #loc3\n#loc1 = loc("x")\n')
    assert kr.clean_ttir(printed) == "module @k {\n  tt.func @k() {\n    %0 = arith.constant 0 : i32\n" \
                                     "    tt.return\n  }\n}\n"


def _have_triton():
    return importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not _have_triton(), reason="needs the triton package (the dev extra has it on Linux)")
def test_compile_reports_spills_of_long_shrink_programs(kr):
    """Compiled for sm_90: a rank-128 shrink of 8 unrolled K chunks at 2 warps (the 64-token default) holds
    more than 255 registers' worth of loads and spills; 1 chunk at 4 warps does not."""
    long_fn, long_args = small_call(T=64, rank=128, h=512, paged_k_steps=8, paged_warps=2)
    short_fn, short_args = small_call(T=64, rank=128, h=512, paged_k_steps=1, paged_warps=4)
    long_k = kr.lower_kernels(long_fn, *long_args)[0]
    short_k = kr.lower_kernels(short_fn, *short_args)[0]
    assert long_k.name == short_k.name == "sgmv_shrink_paged_x1"
    spilled, clean = kr.compile_kernel(long_k), kr.compile_kernel(short_k)
    assert spilled["regs"] == 255 and spilled["stack_bytes"] > 0 and spilled["spill_stores"] > 0
    assert clean["stack_bytes"] == 0 and clean["spill_stores"] == clean["spill_loads"] == 0
    assert clean["regs"] < 128 and clean["occupancy"]["fraction"] > spilled["occupancy"]["fraction"]
    assert spilled["sass"]["HMMA"] > clean["sass"]["HMMA"] > 0 and clean["sass"]["LDG"] > 0


@pytest.mark.skipif(not _have_triton(), reason="needs the triton package (the dev extra has it on Linux)")
def test_main_writes_rows(kr, tmp_path):
    out = tmp_path / "r.json"
    rows = kr.main(["--tokens", "1", "--projections", "1024x1024", "--ranks", "16", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["arch"] == "sm_90" and len(result["rows"]) == len(rows) == 1
    row = result["rows"][0]
    assert row["kernel"] == "sgmv_paged_one_launch_x1" and row["case"]["tokens"] == 1 and row["regs"] > 0


@pytest.mark.skipif(not _have_triton(), reason="needs the triton package (the dev extra has it on Linux)")
@pytest.mark.parametrize("rank,kernels", [(16, ["sgmv_paged_one_launch_x1"]),
                                          (128, ["sgmv_shrink_paged_x1", "sgmv_expand_paged_x1"])])
def test_decode_defaults_do_not_spill(kr, rank, kernels):
    """The default launch shapes of a one-token call on the grid's 4096->4096 shapes compile without spills
    (session 22's decode rules: 1 K chunk a shrink program at 4 warps over rank 32; session 23's table,
    benchmarks/results/kernel_resources_cpu/). A change that makes decode kernels spill fails here."""
    rows = kr.main(["--tokens", "1", "--projections", "4096x4096", "--ranks", str(rank)])
    assert [r["kernel"] for r in rows] == kernels
    for r in rows:
        assert r["stack_bytes"] == 0 and r["spill_stores"] == r["spill_loads"] == 0, r


HAND_MODULE = """module @k {
  tt.func public @k(%arg0: !tt.ptr<i32>, %arg1: !tt.ptr<i32>, %arg2: !tt.ptr<f32>, %arg3: !tt.ptr<i32>) {
    %0 = tt.load %arg0 : !tt.ptr<i32>
    %1 = tt.addptr %arg1, %0 : !tt.ptr<i32>, i32
    %2 = tt.load %1 : !tt.ptr<i32>
    %3 = tt.load %arg3 : !tt.ptr<i32>
    %c0 = arith.constant 0 : i32
    %4 = arith.cmpi sgt, %2, %c0 : i32
    scf.if %4 {
      %5 = tt.load %arg2 : !tt.ptr<f32>
      tt.store %arg2, %5 : !tt.ptr<f32>
    }
    tt.return
  }
}
"""


def test_round_trips_of_a_hand_written_module(kr):
    """arg0 -> arg1 (address from the first load) -> the if on it -> arg2, stored: 3 round trips; the load of
    arg3 has no use and is not counted; a store-only module has 0."""
    got = kr.dependent_round_trips(HAND_MODULE)
    assert got == {"round_trips": 3, "chain": ["%arg0", "%arg1", "%arg2"]}
    flat = HAND_MODULE.replace("scf.if %4 {", "scf.if %c0 {")  # the if no longer waits on a load
    assert kr.dependent_round_trips(flat)["round_trips"] == 1
    assert kr.dependent_round_trips("module @k {\n  tt.store %arg2, %c0 : !tt.ptr<f32>\n}\n")["round_trips"] == 0


@pytest.mark.parametrize("over,trips", [
    # the tile loop: used tiles -> tile's adapter -> its rank -> (rank test) its first row -> page -> A rows
    (dict(paged_small_tile_programs=None), 6),
    (dict(), 5),  # small calls' default (`paged_small_tile_programs=0`): one program per tile, no used-tile count
    (dict(paged_phased_loads=1), 4),  # the first row read beside the rank
])
def test_round_trips_of_the_paged_pair(kr, over, trips):
    """The split pair's shrink at one token waits through these chains of dependent loads (session 23's
    reading of the decode kernels); the expand's chain has the same length."""
    fn, args = small_call(T=1, rank=64, paged_one_launch_max_rank=0, **over)
    shrink, expand = kr.lower_kernels(fn, *args)
    assert kr.dependent_round_trips(shrink.ttir)["round_trips"] == trips
    assert kr.dependent_round_trips(expand.ttir)["round_trips"] == trips


def test_round_trips_of_the_one_launch(kr):
    """The one launch: the shrink's chain (adapter -> first row -> page -> A rows; phased, so the rank test
    is beside it), its partial stored and signalled, the expand's poll, its partials read: 7."""
    fn, args = small_call(T=1)
    (k,) = kr.lower_kernels(fn, *args)
    got = kr.dependent_round_trips(k.ttir)
    assert got["round_trips"] == 7 and len(got["chain"]) == 7


def _sass(*instrs):
    """`cuobjdump -sass` text for (opcode text, write scoreboard, wait mask) instructions (7: no scoreboard)."""
    out = []
    for i, (text, write_sb, wait_mask) in enumerate(instrs):
        ctl = 1 | write_sb << 5 | 7 << 8 | wait_mask << 11  # stall 1, no read scoreboard
        out.append(f"        /*{16 * i:04x}*/                   {text} ;        /* 0x{i:016x} */")
        out.append(f"                                                          /* 0x{ctl << 41:016x} */")
    return "\n".join(["        code for sm_90", *out])


def test_sass_global_waits_follow_the_schedule(kr):
    """Loads issued together pay one latency; a load issued after a wait pays its own, dependent or not;
    waits on shared memory and loads already waited for add none."""
    together = _sass(("LDG.E R2, desc[UR4][R2.64]", 0, 0), ("@P1 LDG.E.128 R4, desc[UR4][R6.64]", 1, 0),
                     ("IADD3 R8, R2, R4, RZ", 7, 0b11), ("STG.E desc[UR4][R10.64], R8", 7, 0))
    assert kr.sass_global_waits(together) == {"sass_waits": 1, "sass_wait_at": [0x20]}
    in_turn = _sass(("LDG.E R2, desc[UR4][R2.64]", 0, 0), ("ISETP.GE.AND P0, PT, R2, 0x1, PT", 7, 0b1),
                    ("LDG.E R4, desc[UR4][R6.64]", 1, 0),  # independent of R2, but issued after its wait
                    ("LDS R9, [R3]", 2, 0), ("IADD3 R8, R9, RZ, RZ", 7, 0b100),  # shared memory: no latency
                    ("IADD3 R8, R4, R8, RZ", 7, 0b10), ("IADD3 R8, R2, R8, RZ", 7, 0b1))
    assert kr.sass_global_waits(in_turn) == {"sass_waits": 2, "sass_wait_at": [0x10, 0x50]}
    early = _sass(("LDG.E R2, desc[UR4][R2.64]", 0, 0), ("LDG.E R4, desc[UR4][R6.64]", 1, 0),
                  ("ISETP.GE.AND P0, PT, R2, 0x1, PT", 7, 0b1), ("IADD3 R8, R4, RZ, RZ", 7, 0b10))
    assert kr.sass_global_waits(early)["sass_waits"] == 1  # R4 arrived during R2's latency


@pytest.mark.skipif(not _have_triton(), reason="needs the triton package (the dev extra has it on Linux)")
def test_compiled_kernels_report_their_waits(kr):
    """On a real compile every kernel waits at least once per round trip its module forces (the schedule
    can only add waits), and the count is in the row."""
    fn, args = small_call(T=4, rank=16, paged_one_launch_max_rank=0, paged_k_steps=2)
    for k in kr.lower_kernels(fn, *args):
        row = {**kr.compile_kernel(k), **kr.dependent_round_trips(k.ttir)}
        assert row["sass_waits"] >= row["round_trips"] >= 4, row
        assert len(row["sass_wait_at"]) == row["sass_waits"]


def test_tree_must_be_a_checkout(kr, tmp_path):
    with pytest.raises(SystemExit):
        kr.main(["--tree", str(tmp_path), "--tokens", "1"])


@pytest.mark.skipif(not _have_triton(), reason="needs the triton package (the dev extra has it on Linux)")
def test_block_partial_loads_take_the_one_launch_waits_down(kr):
    """The one launch at one token reads its 16 K splits' partials one by one, each converted through shared
    memory before the next load (a wait each); `paged_wait_loads="block"` loads them together (session 24:
    33 -> 17 waits at 4096 -> 4096, 60 -> 17 at 11008 -> 4096)."""
    rows = kr.main(["--tokens", "1", "--projections", "4096x4096", "--ranks", "16", "--impls",
                    "pallas_paged[paged_wait_loads=volatile]", "pallas_paged"])  # "block" is the default now
    assert [r["kernel"] for r in rows] == ["sgmv_paged_one_launch_x1"] * 2
    default, block = rows
    assert block["sass_waits"] <= default["sass_waits"] - 12, (default["sass_waits"], block["sass_waits"])
    assert block["stack_bytes"] == 0
