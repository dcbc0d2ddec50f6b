"""
Compile every Triton launch the kernels can make on CUDA, ahead of time, for real
GPUs, on a machine without one; report what ptxas made of it.

    python -m kernels.aot                 # table: kernel, case, target, registers, spills, shared memory
    python -m kernels.aot --json out.json # the same as JSON (tests/test_kernels_aot.py reads it)

Needs TRITON_INTERPRET unset: the interpreter's @triton.jit objects cannot be compiled.

How. The launchers (`_triton_fwd` / `_triton_bwd` of kernels/attention.py,
kernels/rmsnorm.py and kernels/ropenorm.py) run on fake CUDA tensors (FakeTensorMode:
shapes, strides and dtypes, no memory), with `wrap_triton` swapped for a recorder. So every launch
they would make is captured as they make it: kernel, grid, arguments, constexprs,
num_warps and num_stages; a triton.autotune object, as launched on a Hopper, as
one launch per config it can pick, compiled for sm_90 only. A change to a launcher
or to the tiles (kernels/tiles.py) is therefore compiled here too. Each launch is then bound exactly as Triton's JIT binds an
eager launch (same code: pointer dtypes, i32/i64 ints, ints equal to 1 folded,
16-byte divisibility hints; tensors count as 16-byte aligned, as PyTorch's
allocations are) and run through triton.compile for sm_90 and sm_80, down to a
cubin with the ptxas that ships in the triton wheel.

For each compile it reports registers, spills, shared memory, fp64 instructions, and
which Hopper instructions the PTX holds: wgmma for the dots, and cp.async.bulk.tensor
(with the global scratch its descriptors are written to) for the TMA candidates; for
the 16-bit sm_90 ones also what ptxas made of them, counted in the machine code
(cuobjdump -sass, from the triton wheel): HGMMA (wgmma), UTMALDG (a TMA tile load)
and LDGSTS (cp.async, a load through pointers into shared memory). The machine code is
read once per kernel, tile and head dim (the first launch of each, READ_SASS_BY): one
cuobjdump costs 0.7-0.8 s of CPU whatever the kernel (its disassembler's start-up), so
reading all 191 16-bit sm_90 compiles cost 2.5 minutes of the test's CPU, 80 reads cover
every tile; the other launches differ from the one read in the window and the grouping
of the heads, masking and index arithmetic that decide no instruction's kind (their PTX,
read for every launch, says whether they use wgmma and bulk tensor copies).

Float scalars are compiled twice: typed fp32, as an eager launch types a Python
float, and fp64, as torch.compile's Inductor types it (torch 2.13,
torch/_inductor/codegen/triton_utils.py). The kernels must be fp32 either way.
"""
import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

TARGETS = {"sm_90": 90, "sm_80": 80}
# Most dynamic shared memory a block may opt into (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability"): 227 KB on 9.0, 163 KB on 8.0.
SMEM_LIMIT = {90: 232448, 80: 166912}

# What the launchers are asked to do: everything tiles.hand_picked() can tell apart on
# CUDA (dtype, head dim), then, in bf16 for sm_90, every candidate of the Hopper
# autotuner (kernels/tiles.py, HOPPER_SPACES: record_launches expands a triton.autotune
# object into one launch per config); multi-head and grouped-query attention (group
# size 1 is folded to a constant by the JIT, so it compiles differently), and a ragged
# sequence length (not a multiple of 16: no divisibility hint on seq_len and the strides).
# B, H, H_kv, T, D; the model's (B, T, H, D) layout, viewed as (B, H, T, D).
ATTENTION_CASES = [(2, 6, 6, 2048, 64), (1, 4, 2, 1000, 64), (2, 10, 10, 2048, 128), (1, 4, 2, 1000, 128)]
# Each case runs without a window and with one of half the sequence (nanochat's first short
# window): the WINDOWED kernels take it as a runtime int, which the JIT specialises like any int,
# divisible by 16 (1024) or not (500); a window of exactly 1 would be a third, unrecorded variant.
ATTENTION_WINDOWS = [None, "T/2"]
# Two sets are compiled on half of those eight case x window pairs: the Hopper autotuner's candidates
# (about 2 s of compile each; over all eight they cost 551 of the run's 841 s of compiles, two workers on the
# 2-core box) and fp32, the exact path of tests and debugging (2-5 s each: fp32 dots on the FMA units). The
# half is a 2^(3-1) design: four runs in which any two of {head dim, MHA or GQA, window or not} meet in all
# four combinations, so every candidate is compiled at each head dim with and without a window, with MHA
# and GQA; it holds d12's and d20's long layers (head dim 128, MHA, T 2048, no window) exactly, their
# windowed layers as GQA over a ragged length (tests/test_kernels_aot.py checks the design). The hand-picked
# bf16 tiles, what training runs on every GPU but a Hopper and what inference runs everywhere, are compiled
# on all eight, for both targets.
HALF_FRACTION = [(ATTENTION_CASES[2], None), (ATTENTION_CASES[3], "T/2"), (ATTENTION_CASES[1], None),
                 (ATTENTION_CASES[0], "T/2")]
# RMSNorm widths of gpt.py's presets: residual stream n_embd, QK-norm head_dim
# (nano 64/32, tiny 256/64, d12 768/128, d20 1280/128), over a ragged row count.
NORM_WIDTHS = [32, 64, 128, 256, 768, 1280]
# The fused RoPE + QK-norm (kernels/ropenorm.py) on q and on k, as gpt.py calls it: d20's heads of 128 with
# grouped-query k (H 10, H_kv 5), heads of 64 over a ragged length (999: no divisibility hint on the sizes)
# with one k head (the JIT folds an int equal to 1: a variant of its own). B, T, H, H_kv, D.
ROPE_NORM_CASES = [(2, 2048, 10, 5, 128), (1, 999, 4, 1, 64)]
# The decode step's attention (kernels/decode.py) over caches as the engines make them: d20's chat
# session (one row, 2,048 + 2 slots), d12's batch engine (32 rows), a grouped-query D = 64 cache;
# with and without a sliding window (an int argument the JIT specialises differently). B, H, H_kv, S, D.
DECODE_CASES = [(1, 10, 10, 2050, 128), (32, 6, 6, 2049, 128), (4, 4, 2, 1000, 64)]
# The dtypes the project runs on CUDA: bf16 (every training and serving path, gpt.default_dtype) and
# fp32 (the exact path of tests and debugging, its own small-tile configs). The launchers also take
# fp16, but it gets bf16's configs and code and differs only in the dot's element type (its register
# and spill counts matched bf16's: bench/RESULTS.md), so its 104 of 312 compiles checked nothing new
# and cost about a minute of two cores (bf16 attention jobs compile in 1.6-3.1 s each here).
DTYPES = [torch.bfloat16, torch.float32]


@dataclass
class Launch:
    kernel: object  # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict
    case: str = ""
    dtype: torch.dtype = None
    archs: tuple = tuple(TARGETS.values())  # the targets it is compiled for


@dataclass
class Job:
    launch: Launch
    arch: int
    float_type: str  # how float scalars are typed: "fp32" (eager) or "fp64" (Inductor)
    float_args: list = field(default_factory=list)  # the float scalar arguments' names
    signature: dict = field(default_factory=dict)
    constexprs: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    read_sass: bool = False  # count SASS_OPS in its machine code (see READ_SASS_BY)


# ----------------------------------------------------------------------------
# 1. Record what the launchers launch


def record_launches() -> list[Launch]:
    """Run the real launchers on fake CUDA tensors and capture every kernel launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels import attention, decode, rmsnorm, ropenorm

    launches = []

    def fake_wrap_triton(kernel):  # stands in for torch.library.wrap_triton: kernel[grid](*args, **kwargs)
        return _Indexable(lambda grid: lambda *args, **kwargs: launches.extend(_each_config(kernel, grid, args, kwargs)))

    def attention_launches(dtype, hopper: bool):
        """The attention cases (HALF_FRACTION for fp32); with hopper, the HALF_FRACTION as launched on a Hopper:
        each candidate of triton.autotune (kernels/tiles.py, HOPPER_SPACES), compiled for sm_90 only."""
        attention.autotune_attention = lambda x: hopper
        half = hopper or dtype == torch.float32
        for (B, H, H_kv, T, D), window in HALF_FRACTION if half else itertools.product(ATTENTION_CASES, ATTENTION_WINDOWS):
            window = -1 if window is None else T // 2
            case = f"B{B} H{H} Hkv{H_kv} T{T} D{D}" + (f" W{window}" if window >= 0 else "")
            q = torch.empty(B, T, H, D, device="cuda", dtype=dtype).transpose(1, 2)
            k, v = (torch.empty(B, T, H_kv, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in "kv")
            start = len(launches)
            out, lse = attention._triton_fwd(q, k, v, window)
            attention._triton_bwd(torch.empty_like(out), q, k, v, out, lse, window)
            _label(launches[start:], case, dtype, (TARGETS["sm_90"],) if hopper else None)

    saved = attention.wrap_triton, rmsnorm.wrap_triton, decode.wrap_triton, ropenorm.wrap_triton, attention.autotune_attention
    attention.wrap_triton = rmsnorm.wrap_triton = decode.wrap_triton = ropenorm.wrap_triton = fake_wrap_triton
    try:
        with FakeTensorMode():
            attention_launches(torch.bfloat16, hopper=True)
            for dtype in DTYPES:
                attention_launches(dtype, hopper=False)
                for B, H, H_kv, S, D in DECODE_CASES:
                    q = torch.empty(B, 1, H, D, device="cuda", dtype=dtype).transpose(1, 2)
                    k, v = (torch.empty(B, H_kv, S, D, device="cuda", dtype=dtype) for _ in "kv")  # a layer of the cache
                    positions = torch.empty(B, device="cuda", dtype=torch.long)
                    for window in (None, 256):
                        start = len(launches)
                        decode._triton_decode(q, k, v, positions, window)
                        _label(launches[start:], f"B{B} H{H} Hkv{H_kv} S{S} D{D} window {window}", dtype)
                for width in NORM_WIDTHS:
                    x = torch.empty(999, width, device="cuda", dtype=dtype)
                    start = len(launches)
                    y, rstd = rmsnorm._triton_fwd(x, 1e-6)
                    rmsnorm._triton_bwd(torch.empty_like(y), x, rstd)
                    _label(launches[start:], f"rows 999 N{width}", dtype)
                for B, T, H, H_kv, D in ROPE_NORM_CASES:
                    cos = torch.empty(T, D // 2, device="cuda")  # the (T, D/2) fp32 tables
                    for heads in (H, H_kv):
                        x = torch.empty(B, T, heads, D, device="cuda", dtype=dtype)
                        start = len(launches)
                        y = ropenorm._triton_fwd(x, cos, cos, 1e-6, 1.2)
                        ropenorm._triton_bwd(torch.empty_like(y), x, cos, cos, 1e-6, 1.2)
                        _label(launches[start:], f"B{B} T{T} H{heads} D{D}", dtype)
    finally:
        attention.wrap_triton, rmsnorm.wrap_triton, decode.wrap_triton, ropenorm.wrap_triton, attention.autotune_attention = saved
    return launches


def _each_config(kernel, grid, args, kwargs) -> list[Launch]:
    """The launch, or for a triton.autotune object one launch per config it can pick."""
    configs = getattr(kernel, "configs", None)
    if configs is None:
        return [Launch(kernel, grid, args, kwargs)]
    return [Launch(kernel.fn, grid, args, dict(kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
            for c in configs]


class _Indexable:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn(grid)


def _label(launches, case, dtype, archs=None):
    for launch in launches:
        launch.case, launch.dtype = case, dtype
        launch.archs = archs or launch.archs


# ----------------------------------------------------------------------------
# 2. Bind each launch as the JIT would, per target and float typing


def _stand_in(arg):
    """What the JIT's specialisation needs from a tensor: its dtype and a 16-byte aligned pointer."""
    from triton.runtime.jit import MockTensor
    return MockTensor(arg.dtype, list(arg.shape)) if isinstance(arg, torch.Tensor) else arg


def bind(launch: Launch, arch: int, float_type: str) -> Job:
    """Signature, constexprs, attributes and options of an eager launch (triton.runtime.jit's own binder)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [_stand_in(a) for a in launch.args]
    bound, specialization, options = binder(*args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    float_args = [name for name, ty in signature.items() if ty == "fp32" and isinstance(bound[name], float)]
    signature.update({name: float_type for name in float_args})  # Inductor types them fp64
    return Job(launch, arch, float_type, float_args, signature, constexprs, attrs, options.__dict__)


# What decides the machine code's kinds of instruction, for the 16-bit sm_90 compiles: the first of each is read.
READ_SASS_BY = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "TMA", "HEAD_DIM")


def sass_key(launch: Launch) -> tuple:
    return (launch.kernel.__name__, *(launch.kwargs.get(k) for k in READ_SASS_BY))


def jobs(launches: list[Launch]) -> list[Job]:
    """One job per launch, target and float typing; launches that bind identically are compiled once."""
    out, seen, sass_read = [], set(), set()
    for launch in launches:
        for arch in launch.archs:
            eager = bind(launch, arch, "fp32")
            for job in [eager, bind(launch, arch, "fp64")] if eager.float_args else [eager]:
                key = (launch.kernel.__name__, arch, repr(job.signature), repr(job.constexprs),
                       repr(job.attrs), repr(sorted(job.options.items())))
                if key not in seen:
                    seen.add(key)
                    out.append(job)
                    if arch == 90 and launch.dtype != torch.float32:  # the 16-bit Hopper compiles: the first of each tile
                        tile = sass_key(launch)
                        job.read_sass = tile not in sass_read
                        sass_read.add(tile)
    return out


# ----------------------------------------------------------------------------
# 3. Compile and measure


SASS_OPS = ("HGMMA", "UTMALDG", "LDGSTS")  # counted in the machine code of 16-bit sm_90 compiles (see above)
PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS_LINE = re.compile(r"Used (\d+) registers")
# fp64 arithmetic in PTX: any instruction on .f64 operands, except reading an fp64
# parameter and narrowing it to fp32 once (what `.to(tl.float32)` costs an fp64 scalar).
F64_ALLOWED = re.compile(r"^\s*(ld\.param\.f64|cvt\.rn\.f32\.f64)\b")


def compile_job(job: Job) -> dict:
    """Compile one job to a cubin; return its metrics."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    launch = job.launch
    result = dict(kernel=launch.kernel.__name__.strip("_"), case=launch.case,
                  dtype=str(launch.dtype).removeprefix("torch."), target=f"sm_{job.arch}",
                  float_type=job.float_type, float_args=job.float_args,
                  config={k: v for k, v in launch.kwargs.items() if k.isupper() or k.startswith("num_")})
    src = triton.compiler.ASTSource(launch.kernel, job.signature, job.constexprs, job.attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # triton prints ptxas -v's report; catch it
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    try:
        # A throwaway cache for each compile: always_compile skips reading Triton's cache,
        # not writing it, and the whole set would leave 384 MB there (0.8 MB a launch),
        # more than a nearly full disk has room for; everything used below is in memory.
        with tempfile.TemporaryDirectory(prefix="nanoschnack-aot-") as cache, contextlib.redirect_stdout(log):
            knobs.cache.dir = cache
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
        return dict(result, error=None, **_metrics(job, compiled, log.getvalue()))
    except Exception as e:  # one failed launch is one failed row, reported (and failed) by the caller
        return dict(result, error=f"{type(e).__name__}: {e}"[:2000])


def _metrics(job: Job, compiled, report: str) -> dict:
    """What a compiled launch costs: ptxas's report, and what its PTX and machine code contain."""
    ptx = compiled.asm["ptx"]
    stack, spill_stores, spill_loads = map(int, PTXAS_LINE.search(report).groups())
    f64 = [line.strip() for line in ptx.splitlines()
           if re.search(r"\.f64\b", line) and not line.lstrip().startswith(("//", ".param", ".visible", ".entry"))
           and not F64_ALLOWED.match(line)]
    return dict(
        regs=int(REGS_LINE.search(report).group(1)), stack=stack, spill_stores=spill_stores, spill_loads=spill_loads,
        shared=compiled.metadata.shared, smem_limit=SMEM_LIMIT[job.arch],
        f64_instructions=f64[:5], n_f64=len(f64),
        wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx, has_dot="tt.dot" in compiled.asm["ttir"],
        tma_loads="cp.async.bulk.tensor" in ptx, global_scratch=compiled.metadata.global_scratch_size,
        sass=_sass_counts(compiled.asm["cubin"]) if job.read_sass else None,
    )


def _sass_counts(cubin: bytes) -> dict:
    """How often each of SASS_OPS stands in a cubin's machine code."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True)
    if dump.returncode:
        raise RuntimeError(f"{knobs.nvidia.cuobjdump.path} -sass failed ({dump.returncode}): {dump.stderr.strip()[-500:]}")
    return {op: len(re.findall(rf"\b{op}\b", dump.stdout)) for op in SASS_OPS}


_JOBS: list[Job] = []  # what the forked workers compile, by index


def _compile_index(i: int) -> dict:
    return compile_job(_JOBS[i])


def compile_all(workers: int = 2) -> list[dict]:
    """Record, bind and compile everything, on `workers` processes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels.aot compiles for real GPUs: run it with TRITON_INTERPRET unset")
    _JOBS[:] = jobs(record_launches())
    if workers <= 1:
        return [compile_job(job) for job in _JOBS]
    # fork: the workers inherit the bound jobs (Triton kernels do not pickle)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_index, range(len(_JOBS)), chunksize=1))


def table(results: list[dict]) -> str:
    rows = ["| kernel | case | dtype | target | floats | config | regs | spill st/ld B | stack B | smem KB | fp64 ops | wgmma | TMA loads |",
            "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        if r["error"]:
            rows.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['target']} | {r['float_type']} | "
                        f"FAILED: {r['error'].splitlines()[0][:80]} |")
            continue
        config = " ".join(f"{k.removeprefix('BLOCK_').removeprefix('num_')}={v}" for k, v in r["config"].items()
                          if k not in ("HEAD_DIM", "DOT_PRECISION", "SM_SCALE"))
        rows.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['target']} | {r['float_type'] if r['float_args'] else '-'} "
                    f"| {config} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} "
                    f"| {r['shared'] / 1024:.0f} | {r['n_f64']} | {'yes' if r['wgmma'] else '-'} | {'yes' if r['tma_loads'] else '-'} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(argv)
    results = compile_all(args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    else:
        print(table(results))


if __name__ == "__main__":
    sys.exit(main())
