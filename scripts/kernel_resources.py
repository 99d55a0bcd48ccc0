"""What the Pallas LoRA kernels cost an SM, without a GPU: registers, spills, shared memory, occupancy, SASS.

Each case is lowered for CUDA on this machine (`.lower(lowering_platforms=("cuda",))`, Pallas'
`debug=True` prints every kernel's Triton module), and each kernel's module is compiled for sm_90
(H100/H200) by the `triton` package's own compiler with the launch's `num_warps` / `num_stages`
(read from the lowered call). `cuobjdump` (shipped with `triton`) then gives the registers a thread,
the stack (spill) bytes and the SASS. Needs `pip install triton` (the compiler only; no GPU, no
CUDA driver). Rows (JSON under `--out`, and a table) per kernel:

- `regs`, `stack_bytes` (local memory: spills), `spill_stores` / `spill_loads` (STL / LDL in the SASS);
- `shared_bytes` (Triton's dynamic shared memory), `grid`, `programs`;
- `occupancy`: programs an SM holds by registers, by shared memory and by the 32-block limit, and
  the resulting warps of 64 (registers allocated per warp in units of 256; 1 KiB reserved a block);
- `sass`: counts of global loads/stores, tensor-core MMAs, barriers, atomics;
- `round_trips` and `chain`: the longest chain of dependent global-memory accesses a program waits
  through (`dependent_round_trips`, from the Triton module: no compile needed), and the kernel
  arguments it reads on the way.

What it is not: XLA compiles the same module with its own pinned Triton and pass pipeline, and the
GPU image's JAX may lower a kernel slightly differently from this machine's. So the numbers are
those of the same kernel code under another Triton build. Checked against `ncu` (session 8's
profile of the 7B decode step's kernels, `--step7b` at tree 68fe84a, recorded in
benchmarks/results/kernel_resources_cpu/): see that folder's README for how close they came.
Nothing here times anything; it says where to look, and a GPU run says what it costs.

Cases: the kernel grid's (`bench_kernels.py`: `--tokens --projections --ranks --pops --impls`,
1000 adapters resident in pool pages as there), or `--step7b`: the Llama-7B decode step's two
LoRA calls as `scripts/ncu_lora.py` runs them (q/k/v grouped and o; 64 tokens, 47 distinct
rank-16 adapters, pool rows of 128). `--tree DIR` runs either against another checkout (its
`slora_jax`, `pallas_kernels` and `scripts/bench_kernels.py`), e.g. the tree a recorded GPU profile
was taken on.

    python scripts/kernel_resources.py --tokens 1 --ranks 16,128 --projections 4096x4096 \\
        --impls pallas_paged 'pallas_paged[paged_k_steps=4,paged_small_k_steps=0]'
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sm_90 (H100 / H200) per-SM limits
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024
N_SMS = 132  # H100 SXM / H200

SASS_OPS = {"LDG": r"\bLDG\b", "STG": r"\bSTG\b", "HMMA": r"\bHMMA\b", "BAR": r"\bBAR\b",
            "ATOM": r"\b(?:ATOM|ATOMG|RED|REDG)\b", "STL": r"\bSTL\b", "LDL": r"\bLDL\b"}


@dataclasses.dataclass
class Kernel:
    """One Triton launch of a lowered function: its module (text) and launch parameters."""
    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


_CALL_RE = re.compile(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32, ir = \"[^\"]*\", "
                      r"name = \"([^\"]+)\", num_stages = (\d+) : i32, num_warps = (\d+) : i32")
_MODULE_HEAD = "The Triton module for pallas_call "


def lower_kernels(fn, *args) -> list[Kernel]:
    """The Triton launches of `jax.jit(fn)(*args)` lowered for CUDA, in program order.

    Pallas prints each kernel's module when `debug=True`; the launch parameters come from the
    lowered custom calls, matched to the printed modules by kernel name and order."""
    import jax
    from jax.experimental import pallas as pl

    orig = pl.pallas_call

    def debug_call(*a, **kw):
        kw["debug"] = True
        return orig(*a, **kw)

    out = io.StringIO()
    pl.pallas_call = debug_call
    try:
        with contextlib.redirect_stdout(out):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        pl.pallas_call = orig
    modules: dict[str, list[str]] = {}
    for part in out.getvalue().split(_MODULE_HEAD)[1:]:
        name = part.split()[0]
        modules.setdefault(name, []).append(part[part.index("module"):])
    kernels, seen = [], {}
    for m in _CALL_RE.finditer(text):
        gx, gy, gz, name, stages, warps = m.groups()
        mods = modules.get(name)
        if not mods:
            raise RuntimeError(f"no printed Triton module for launch {name!r}")
        i = seen.get(name, 0)
        seen[name] = i + 1
        # a lowering reused for an identical call prints once: later launches share the last module
        kernels.append(Kernel(name, clean_ttir(mods[min(i, len(mods) - 1)]), int(warps), int(stages),
                              (int(gx), int(gy), int(gz))))
    if not kernels:
        raise RuntimeError("the function lowered to no Triton launch (no Pallas kernel in it?)")
    return kernels


def clean_ttir(printed: str) -> str:
    """A printed module (with Pallas' debug locations) as plain MLIR text that another Triton parses."""
    text = re.sub(r" \[[^\]\n]*\]", "", printed)  # [unknown] and other inline locations
    text = re.sub(r' "[^"\n]*"\(#loc\d*\)', "", text)  # "name:"(#locN)
    text = re.sub(r" loc\([^\n]*\)$", "", text, flags=re.M)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))
    end = re.search(r"^}$", text, flags=re.M)  # the module's closing brace; the print goes on after it
    return text[:end.end()] + "\n" if end else text + "\n"


_VALUE = re.compile(r"%[\w.]+(?:#\d+)?")
_RESULTS = re.compile(r"((?:%[\w.]+(?::\d+)?(?:, )?)+) = (.*)")


def dependent_round_trips(ttir: str) -> dict:
    """The longest chain of dependent global-memory accesses in one kernel, read off its Triton module.

    A load or atomic whose address, mask or enclosing `scf.if` / loop bound depends on an earlier load
    must wait for that load's round trip; the count is the longest such chain that ends in a store or
    atomic (the program's results), loop bodies counted once. Loads whose results are unused are not
    counted (the compiler drops them: Pallas' masked store reads the old block). A release atomic comes
    after the stores before it, and an acquire atomic before every later access on its path. An acquire
    atomic in a wait loop returns after the release atomics before it in the module: in the one launch
    the shrink's signal, so the expand's accesses after its wait count from the shrink's chain.
    Returns `round_trips` and `chain`: the kernel arguments (`%argN`, in the pallas_call's operand order)
    read along that chain.
    """
    lines = [line.strip() for line in ttir.splitlines()]
    used = collections.Counter(t.split("#")[0] for line in lines
                               for t in _VALUE.findall(line.split(" = ", 1)[-1] if " = " in line else line))
    depth: dict[str, tuple[int, tuple]] = {}  # value -> (round trips before it is known, the chain's pointers)
    base: dict[str, str] = {}  # pointer value -> the kernel argument it offsets
    stack: list[dict] = []  # open regions: the op's results, its control dependence, its yields
    # the latest acquire atomic and store on this path (a release atomic waits on the stores), and the
    # latest release atomic anywhere before (what a wait loop's polls return on)
    fence = writes = released = (0, ())
    ends = [(0, ())]

    def dep(tok):
        return depth.get(tok, depth.get(tok.split("#")[0], (0, ())))

    for line in lines:
        if not line or line.startswith(("//", "^bb", "module", "tt.func", "tt.return")):
            continue
        if line.startswith("}"):
            region = stack.pop() if stack else dict(op="", results=[], ctl=(0, ()), yields=[], saved=None)
            if "{" in line:  # "} else {", "} do {": the same op's next region
                if region["op"] == "scf.if":  # the other branch does not follow this one's accesses
                    fence, writes = region["saved"]
                stack.append(region)
                continue
            for r in region["results"]:
                depth[r] = max([region["ctl"]] + region["yields"])
            if region["op"] == "scf.if":
                fence, writes = region["saved"]
            continue
        m = _RESULTS.match(line)
        results, body = ([x.split(":")[0] for x in m.group(1).split(", ")], m.group(2)) if m else ([], line)
        op = body.split()[0]
        srcs = _VALUE.findall(body.split("{", 1)[0] if op.startswith("scf.") else body)
        here = max([stack[-1]["ctl"] if stack else (0, ())] + [dep(t) for t in srcs])
        if op in ("tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims") and srcs:
            base.update({r: base.get(srcs[0], srcs[0]) for r in results})
        if op == "tt.load" and any(used[r] for r in results) or op.startswith("tt.atomic"):
            start = max(here, fence, writes) if "rel" in body else max(here, fence)
            if op.startswith("tt.atomic") and "acq" in body and any(r["op"] == "scf.while" for r in stack):
                start = max(start, released)  # a wait loop: it returns once the signal it polls is raised
            here = (start[0] + 1, start[1] + (base.get(srcs[0], srcs[0]),))
            if op.startswith("tt.atomic"):
                ends.append(here)
                if "acq" in body:
                    fence = max(fence, here)
                if "rel" in body and not any(r["op"] == "scf.while" for r in stack):
                    released = max(released, here)
        elif op == "tt.store":
            ends.append(max(here, fence))
            writes = max(writes, ends[-1])
        for r in results:
            depth[r] = here
        if op in ("scf.yield", "scf.condition") and stack:
            stack[-1]["yields"].append(here)
        if body.endswith("{"):
            for arg, init in re.findall(r"(%[\w.]+) = (%[\w.#]+)", body):  # loop variables and carried values
                depth[arg] = max(here, dep(init)) if op == "scf.for" else dep(init)
            stack.append(dict(op=op, results=[r.split("#")[0] for r in results], ctl=here, yields=[],
                              saved=(fence, writes)))
    trips, chain = max(ends)
    return {"round_trips": trips, "chain": list(chain)}


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s+/\* (0x[0-9a-f]{16}) \*/")
_SASS_HI = re.compile(r"^\s+/\* (0x[0-9a-f]{16}) \*/\s*$")
_SASS_GLOBAL = re.compile(r"^(?:@!?U?P[T\d]+\s+)?(?:LDG|LD|ATOMG|ATOM)[.\s]")


def sass_instructions(sass: str) -> list[tuple[int, str, int]]:
    """(address, text, control bits) of each instruction in `cuobjdump -sass` output (Volta and later: the
    second 64-bit word of an instruction holds its control bits, from bit 41: stall 4, yield 1, write
    scoreboard 3, read scoreboard 3, wait mask 6, reuse 4; scoreboard 7 = none)."""
    lines = sass.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        m, hi = _SASS_LINE.match(line), _SASS_HI.match(lines[i + 1])
        if m and hi:
            out.append((int(m.group(1), 16), m.group(2).strip(), int(hi.group(1), 16) >> 41))
    return out


def sass_global_waits(sass: str) -> dict:
    """How many global-memory latencies one warp waits through in turn, read off the machine code.

    The GPU issues a warp's instructions in order. A load sets a scoreboard; an instruction that needs its
    result names the scoreboard in its wait mask and stalls there. Walking the SASS in address order (a
    loop body once, both sides of a branch), a wait is a new latency when it waits on a global load
    (`LDG`, `LD`, `ATOMG`, `ATOM`) issued after the previous such wait: that load could not overlap the
    earlier latency. `dependent_round_trips` counts what the program's data dependences force; this counts
    what the compiled schedule does, where a load issued after an unrelated wait also pays its own latency.
    Returns `sass_waits` and `sass_wait_at` (the waiting instructions' addresses)."""
    rnd, at = 0, []
    pending: dict[int, int] = {}  # scoreboard -> latest round a global load set it in
    for addr, text, ctl in sass_instructions(sass):
        write_sb, wait_mask = (ctl >> 5) & 7, (ctl >> 11) & 0x3F
        waited = [sb for sb in range(6) if wait_mask >> sb & 1]
        if any(pending.get(sb) == rnd for sb in waited):
            rnd += 1
            at.append(addr)
        for sb in waited:
            pending.pop(sb, None)
        if write_sb != 7 and _SASS_GLOBAL.match(text):
            pending[write_sb] = rnd
    return {"sass_waits": rnd, "sass_wait_at": at}


def occupancy(regs: int, warps: int, shared_bytes: int) -> dict:
    """Programs (blocks) an sm_90 SM holds, by each limit, and the warps that gives (of 64)."""
    warp_regs = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // warp_regs) // warps
    by_shared = SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK)
    by_warps = MAX_WARPS_PER_SM // warps
    blocks = min(by_regs, by_shared, by_warps, MAX_BLOCKS_PER_SM)
    return {"blocks_by_regs": by_regs, "blocks_by_shared": by_shared, "blocks": blocks,
            "warps": blocks * warps, "fraction": blocks * warps / MAX_WARPS_PER_SM}


def triton_tools():
    """(triton module, folder of its cuobjdump), or a clear error when the package is missing."""
    try:
        import triton
    except ImportError as e:
        raise SystemExit("kernel_resources.py needs the `triton` package (pip install triton): its compiler "
                         "and cuobjdump run without a GPU") from e
    return triton, os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(k: Kernel, arch: int = 90, keep: str | None = None) -> dict:
    """Compile one kernel's module for sm_`arch` with `triton`; registers, spills, shared memory, SASS counts."""
    triton, bin_dir = triton_tools()
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set to silence its warning
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{k.name}.ttir")
        with open(src, "w") as f:
            f.write(k.ttir)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=k.num_warps, num_stages=k.num_stages))
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True, check=True).stdout
    if keep:
        os.makedirs(keep, exist_ok=True)
        for ext, body in (("ttir", k.ttir), ("ptx", compiled.asm["ptx"]), ("sass", sass)):
            with open(os.path.join(keep, f"{k.name}.w{k.num_warps}.{ext}"), "w") as f:
                f.write(body)
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    shared = int(compiled.metadata.shared)
    instr = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    counts = {op: sum(1 for line in instr if re.search(pat, line)) for op, pat in SASS_OPS.items()}
    return {"kernel": k.name, "grid": list(k.grid), "programs": k.programs, "num_warps": k.num_warps,
            "num_stages": k.num_stages, "regs": regs, "stack_bytes": stack, "spill_stores": counts.pop("STL"),
            "spill_loads": counts.pop("LDL"), "shared_bytes": shared, "sass": {"instructions": len(instr), **counts},
            "occupancy": occupancy(regs, k.num_warps, shared), "waves": k.programs / N_SMS, **sass_global_waits(sass)}


# ----------------------------------------------------------------------------- cases


def grid_cases(args):
    """(label, fn, args) for the kernel grid's cases (`bench_kernels.py`'s workload and page layout; with
    `--tree`, that checkout's `bench_kernels.py`, on `sys.path` from `main`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench_kernels as bk
    from slora_jax.ops import add_lora, build_lora_meta

    chunk = 64
    for T in args.tokens:
        for proj in args.projections:
            h_in, h_out = (int(v) for v in proj.split("x"))
            for rank in args.ranks:
                ranks_S = bk.slot_ranks(rank)
                w = bk.paged_abstract(ranks_S, h_in, h_out, chunk)
                x = jax.ShapeDtypeStruct((T, h_in), jnp.bfloat16)
                y = jax.ShapeDtypeStruct((T, h_out), jnp.bfloat16)
                for pop in args.pops:
                    slot_T = bk.slot_draw(pop, T, np.random.default_rng(0))
                    meta = bk.static_tiles(build_lora_meta(slot_T))
                    for spec in args.impls:
                        name, cfg, paged = bk.parse_impl(spec)
                        if name != "pallas" or not paged:
                            raise SystemExit(f"{spec!r}: only pallas_paged[...] impls are reported")
                        cfg = dataclasses.replace(cfg, interpret=False)
                        case = dict(tokens=T, h_in=h_in, h_out=h_out, rank=rank, popularity=pop, impl=spec)
                        yield case, (lambda y, x, w, m, cfg=cfg: add_lora(y, x, w, m, config=cfg)), (y, x, w, meta)


def step7b_cases(args):
    """The 7B decode step's LoRA calls as `ncu_lora.py` builds them: q/k/v grouped, then o."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from slora_jax.ops import KernelConfig, PagedWeights, add_lora, add_lora_group, build_lora_meta
    from slora_jax.ops import random_slot_weights

    H, r, T, C, S = 4096, 16, 64, 128, 256
    rng = np.random.default_rng(0)
    dense = [random_slot_weights(jax.random.key(g), np.full(S, r, np.int32), H, H) for g in range(4)]
    paged = PagedWeights.group_from_slots(dense, chunk=C, rows_per_page=1024, page_ids=rng.permutation(4 * S))
    ids = rng.choice(S, args.adapters, replace=False)
    slot_T = rng.permutation(ids[np.arange(T) % args.adapters]).astype(np.int32)
    meta = build_lora_meta(slot_T, max_segments=64, static_tiles=True)
    x = jnp.zeros((T, H), jnp.bfloat16)
    ys = tuple(jnp.zeros((T, H), jnp.bfloat16) for _ in range(3))
    for spec in args.configs:
        kw = dict(item.split("=") for item in filter(None, spec.split(",")))
        cfg = KernelConfig(interpret=False, **{k: int(v) for k, v in kw.items()})
        case = dict(step="7b_decode", tokens=T, adapters=args.adapters, rank=r, chunk=C, config=spec or "default")
        yield ({**case, "call": "qkv"},
               lambda ys, x, w, m, cfg=cfg: add_lora_group(ys, x, w, m, config=cfg), (ys, x, paged[:3], meta))
        yield ({**case, "call": "o"},
               lambda y, x, w, m, cfg=cfg: add_lora(y, x, w, m, config=cfg), (ys[0], x, paged[3], meta))


def table(rows: list[dict]) -> str:
    head = ("case", "kernel", "grid", "warps", "stages", "regs", "stack", "STL/LDL", "shared", "occ", "LDG", "HMMA",
            "trips")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        c = r["case"]
        label = (f"{c['call']} {c['config']}" if "call" in c else
                 f"{c['tokens']} tok {c['h_in']}x{c['h_out']} r{c['rank']} {c['popularity']} {c['impl']}")
        lines.append(" | ".join(str(v) for v in (
            label, r["kernel"], "x".join(map(str, r["grid"])), r["num_warps"], r["num_stages"], r["regs"],
            r["stack_bytes"], f"{r['spill_stores']}/{r['spill_loads']}", r["shared_bytes"],
            f"{r['occupancy']['fraction']:.0%}", r["sass"]["LDG"], r["sass"]["HMMA"], r["round_trips"])))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", nargs="*", default=["1"])
    p.add_argument("--projections", nargs="*", default=["4096x4096"])
    p.add_argument("--ranks", nargs="*", default=["16"], help="ranks, or 'mixed' (bench_kernels.py's)")
    p.add_argument("--pops", nargs="*", default=["identical"])
    p.add_argument("--impls", nargs="*", default=["pallas_paged"], help="pallas_paged[KernelConfig overrides]")
    p.add_argument("--step7b", action="store_true", help="the 7B decode step's q/k/v and o calls instead")
    p.add_argument("--configs", nargs="*", default=[""],
                   help="--step7b: KernelConfig overrides, 'paged_warps=2,paged_k_steps=4' ('' = defaults)")
    p.add_argument("--adapters", type=int, default=47, help="--step7b: distinct adapters of the 64 tokens")
    p.add_argument("--tree", help="import slora_jax, pallas_kernels and scripts/bench_kernels.py from this checkout")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--keep", help="also write each kernel's TTIR, PTX and SASS under this folder")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    tree = os.path.abspath(args.tree) if args.tree else ROOT
    if not os.path.isfile(os.path.join(tree, "slora_jax", "ops", "lora.py")):
        p.error(f"--tree {args.tree}: not a slora-jax checkout (no slora_jax/ops/lora.py)")
    # The tree's packages and its bench_kernels.py come first (a module imported once stays: nothing of this
    # checkout's slora_jax or bench_kernels may be imported before).
    sys.path[:0] = [tree, os.path.join(tree, "scripts")]
    import numpy as np  # noqa: F401  (after the path: the tree's own modules import it)
    if args.step7b:
        cases = step7b_cases(args)
    else:
        from bench_kernels import split_list
        args.tokens = [int(t) for t in split_list(args.tokens)]
        args.projections, args.ranks, args.pops = (split_list(v) for v in (args.projections, args.ranks, args.pops))
        args.impls = split_list(args.impls)
        cases = grid_cases(args)
    triton_tools()  # fail before any lowering when triton is missing
    rows = []
    for case, fn, fn_args in cases:
        for i, k in enumerate(lower_kernels(fn, *fn_args)):
            keep = os.path.join(args.keep, f"case{len(rows):03d}") if args.keep else None
            rows.append({"case": case, "launch": i, **compile_kernel(k, args.arch, keep),
                         **dependent_round_trips(k.ttir)})
    print(table(rows))
    if args.out:
        import triton
        import jax
        result = {"benchmark": "kernel_resources", "arch": f"sm_{args.arch}", "triton_version": triton.__version__,
                  "jax_version": jax.__version__, "tree": tree,
                  "git_commit": _git_commit(args.tree), "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return rows


def _git_commit(tree: str | None) -> str | None:
    """`slora_jax.provenance.git_commit`, loaded from this checkout's file: importing the `slora_jax` package
    here would shadow the one of `--tree`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_provenance", os.path.join(ROOT, "slora_jax", "provenance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.git_commit(os.path.abspath(tree) if tree else None)


if __name__ == "__main__":
    main()
