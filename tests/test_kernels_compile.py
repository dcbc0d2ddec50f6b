"""
The kernels under torch.compile with dynamic shapes and recompiles, through Inductor's
own code generation, on a CPU.

Why the kernels do not run here. Inductor cannot trace Triton's interpreter
(torch.library.wrap_triton hands an interpreted kernel back unwrapped, which then
runs on fake tensors: "Cannot access data pointer of Tensor"), and it cannot build a
Triton kernel for a CPU (no triton-cpu backend). So this file runs itself as a
subprocess without TRITON_INTERPRET, in which
  * Triton is told its current target is sm_90 (a stand-in driver; Inductor reads the
    target to lower the user kernels to TTIR for its mutation analysis; nothing runs);
  * Inductor's kernel build (AsyncCompile.triton) is replaced by a recorder, so the
    generated wrapper code runs for real on CPU tensors and records every launch it
    makes: kernel, grid, scalar arguments, constexprs, num_warps and num_stages;
  * the generated wrapper code is captured (torch's "output_code" log).
Each compiled call is compared with the launches the eager launchers make for the same
inputs (wrap_triton swapped for a recorder, as kernels/aot.py does). What the kernels
compute is not checked here: the same kernel with the same launch is what
tests/test_kernels.py checks numerically, in the interpreter.

It also compiles attention as on a Hopper, where the kernels are triton.autotune objects
(kernels/attention.py): every candidate must reach the generated code, each with its own
launch grid.

The fused RoPE + QK-norm (kernels/ropenorm.py) is compiled the same way, as gpt.py calls
it: the (T, D/2) tables sliced to the input's sequence length inside the graph.

The same subprocess compiles RMSNorm's and RoPE-norm's kernels to PTX for sm_90 as Inductor binds
them under dynamic shapes (no divisibility hint on a size), to check that their
memory accesses stay 16 bytes wide.

The bug this guards: rms_norm's launch configuration was computed from the width
with triton.next_power_of_2; under dynamic shapes the width is a symbol, and Inductor
emitted next_power_of_2's bit-twiddling into the launch grid (on CUDA a NameError,
`BitwiseFn_bitwise_or`, in the generated code; H200, torch 2.11). The launchers must
compute every launch configuration from concrete Python ints.

It reads what Inductor generates, which differs between torch versions: it passes with the pinned
torch 2.13.0 and with 2.11.0, the H200 image's (where the bug above was seen).

Time: about a minute on the 2-core CI box (each compile is a few seconds).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-6

# Every dimension that can vary, one change at a time: rows (2-D and 3-D inputs), then the width.
NORM_SIZES = [(7, 64), (9, 64), (9, 100), (2, 3, 100), (5, 3, 100), (5, 3, 128)]
# B, H, H_kv, T, D: batch and sequence length vary (heads and head dim are the model's).
ATTN_SIZES = [(1, 2, 1, 33, 64), (2, 2, 1, 33, 64), (2, 2, 1, 70, 64), (3, 2, 1, 17, 64)]
# B, T, H, D: batch and sequence length vary (heads and head dim are the model's)
ROPE_SIZES = [(2, 33, 3, 64), (3, 33, 3, 64), (3, 70, 3, 64), (2, 17, 3, 64)]
ROPE_TABLE_LEN, GAIN = 128, 1.2
SIZES = {"rms_norm_op": NORM_SIZES, "flash_attn_op": ATTN_SIZES, "rope_norm_op": ROPE_SIZES}
OPS = list(SIZES)
MODES = {"dynamic=True": True, "automatic dynamic (recompiles)": None}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"), TRITON_CACHE_DIR=str(folder / "triton"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    out = folder / "launches.json"
    run = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_launches_equal_eager_launches(compiled, op, mode):
    calls = compiled[op][mode]
    assert len(calls) == len(SIZES[op])
    for call in calls:
        assert call["error"] is None, f"{op} {call['shape']}: {call['error']}"
        assert call["compiled"], f"{op} {call['shape']}: the compiled graph launched no kernel"
        assert call["compiled"] == call["eager"], f"{op} {call['shape']}"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", list(MODES))
def test_generated_launches_hold_no_bit_twiddling(compiled, op, mode):
    """The launch lines of the generated code: sizes, ceiling divisions of sizes, no next_power_of_2 of a symbol."""
    lines = [line for call in compiled[op][mode] for line in call["launch_lines"]]
    assert lines
    bad = [line for line in lines if re.search(r"\||&|\^|<<|>>|Bitwise", line)]
    assert not bad, "\n".join(line[:300] for line in bad)


@pytest.mark.parametrize("mode", list(MODES))
def test_autotuned_attention_compiles_with_every_candidate(compiled, mode):
    """As on a Hopper, where the kernels are triton.autotune objects: Inductor carries every candidate of
    kernels/tiles.py's spaces into the generated kernel (it times them on the GPU itself), in order, each
    with a launch grid that is a ceiling division of the sequence length (no bit-twiddling)."""
    from kernels import tiles
    found = compiled["autotuned"][mode]
    assert found["errors"] == [None] * len(ATTN_SIZES), found["errors"]
    for which in ("fwd", "dkdv", "dq"):
        name = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}[which]
        builds = found["kernels"][name]
        assert builds, name
        for build in builds:
            # the TMA candidates too: the (B, H, T, D) inputs' strides, symbols under dynamic=True, are
            # provably multiples of 16 bytes (attention._tma_aligned)
            assert build["configs"] == tiles.hopper_space(which, 64, False, tma=True), name
            assert len(build["grids"]) == len(build["configs"]), name
            assert not [g for g in build["grids"] if re.search(r"\||&|\^|<<|>>|Bitwise", g)], build["grids"]


def test_inductor_sees_which_tensors_each_kernel_writes(compiled):
    """Inductor reads each user kernel's Triton IR to find the tensors it writes; where that analysis fails it
    assumes every input is written and copies them all before each launch, silently. It must understand ours
    (for an autotuner it reads the first candidate, the hand-picked pointer one: the TMA candidates write the
    same outputs through the same pointer stores)."""
    assert compiled["mutation_analysis_failures"] == []


def test_autotuner_candidates_compile_ahead_on_threads(compiled):
    """On a GPU, the first eager launch of an autotuner on a new tuning key compiles all of its candidates at
    once, on worker threads (kernels/attention.py, _compile_ahead), so its timing of them compiles nothing;
    a second launch of the same key compiles nothing either."""
    found = compiled["compiled_ahead"]
    assert sorted(c[1:] for c in found["first"]) == sorted(found["candidates"])
    assert all(c[0] != "MainThread" for c in found["first"]), found["first"]
    assert found["second"] == [] and found["after"] == [], found
    # a candidate that fails to compile is tried (the other one is compiled already) and not left in the JIT's
    # cache as an unfinished future, which triton 3.6 could not launch: the autotuner meets its error itself
    assert len(found["broken_tried"]) == 1 and found["left_unfinished"] == 0, found


def test_prefill_warm_up_covers_every_compile_of_the_prefill_attention(compiled):
    """session.warm_up_prefill runs prompts of WARM_UP_PROMPT_LENGTHS tokens at load so that no request waits for
    the prefill's attention kernel to compile: every prompt length from 2 to 299 tokens binds to the compile key
    of one of them (Triton specialises the length on whether it divides by 16, and nothing else varies)."""
    import session
    keys = compiled["prefill_compile_keys"]  # the key of a prompt of T tokens at keys[T - 2]
    assert {keys[T - 2] for T in session.WARM_UP_PROMPT_LENGTHS} == set(keys), keys


def test_norm_accesses_stay_16_bytes_wide_with_dynamic_sizes(compiled):
    """Compiled for sm_90 as under dynamic shapes (no divisibility hint on any int argument), bf16, RMSNorm at
    width 768 and RoPE-norm at head dim 128: the loads and stores of x, y, dy, dx (and RoPE's fp32 tables) are
    16-byte vectors. The width being a constexpr is what does it: with the width a runtime argument they were
    2-byte scalar accesses (ld.global.b16)."""
    assert len(compiled["ptx_global_accesses"]) == 4
    for kernel, accesses in compiled["ptx_global_accesses"].items():
        assert "ld.global.v4.b32" in accesses, (kernel, accesses)
        assert not any(a.endswith(".b16") for a in accesses), (kernel, accesses)


def test_rows_stay_dynamic_and_widths_recompile(compiled):
    """dynamic=True: a new row count reuses the graph, a new width compiles one (the width is specialised)."""
    graphs = [call["graphs"] for call in compiled["rms_norm_op"]["dynamic=True"]]
    widths = [shape[-1] for shape in NORM_SIZES]
    for i in range(1, len(NORM_SIZES)):
        new_graph = graphs[i] > graphs[i - 1]
        same_rank = len(NORM_SIZES[i]) == len(NORM_SIZES[i - 1])
        if same_rank:
            assert new_graph == (widths[i] != widths[i - 1]), (NORM_SIZES[i - 1], NORM_SIZES[i], graphs)
    # and the symbolic row count really reached the launch: a grid that is an expression of it
    assert any("s" in line for call in compiled["rms_norm_op"]["dynamic=True"] for line in call["launch_lines"])


@pytest.mark.parametrize("mode", list(MODES))
def test_rope_norm_compiles_to_its_own_kernels_alone(compiled, mode):
    """The compiled forward and backward launch the two RoPE-norm kernels and nothing else: no copy of the
    sliced tables or of x around them. Inductor copies an input before a user kernel's launch (and back
    after) when its analysis finds the kernel may write it; before kernels/ropenorm.py's _tile took no
    pointers, X, COS and SIN counted as written (their loads' helper also made the store's offsets)."""
    calls = compiled["rope_norm_op"][mode]
    assert any(call["launch_lines"] for call in calls)
    assert [line for call in calls for line in call["other_kernels"]] == []


def test_rope_norm_batch_and_sequence_length_stay_dynamic(compiled):
    """dynamic=True: RoPE-norm over new batch sizes and sequence lengths reuses its one graph; the row count
    and T reach the launches as symbols (the head dim, a constexpr, is specialised)."""
    calls = compiled["rope_norm_op"]["dynamic=True"]
    assert [call["graphs"] for call in calls] == [1] * len(ROPE_SIZES)
    assert all(re.search(r"\bs\d+", line) for call in calls for line in call["launch_lines"])


# ----------------------------------------------------------------------------
# The subprocess


def _stand_in_sm90_driver():
    """Make Triton's active driver report an sm_90 target without a GPU."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class StandIn(CudaDriver):
        def __init__(self):  # CudaDriver's would load libcuda
            pass

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):  # asked by a launch, even one that only compiles (warmup)
            return 0

    triton.runtime.driver.set_active(StandIn())


class _Recorded:
    """Stands in for the kernel Inductor would build: records each launch of the generated code."""

    def __init__(self, name, source, launches):
        self.name, self.launches = name, launches
        import ast
        constants = ast.literal_eval(re.search(r"'constants': (\{[^}]*\})", source).group(1))
        configs = re.search(r"configs=(\[[^\]]*\])", source).group(1)
        signature = ast.literal_eval(re.search(r"'signature': (\{[^}]*\})", source).group(1))
        # torch 2.13 lists the kernel's declared constexprs; torch 2.11 (the H200 image's) does not: read its def
        declared = re.search(r"'declared_constexpr_names': (\[[^\]]*\])", source)
        declared = (ast.literal_eval(declared.group(1)) if declared else
                    re.findall(r"(\w+)\s*:\s*tl\.constexpr", re.search(rf"def {name}\((.*?)\):", source, re.S).group(1)))
        # 'constants' also lists arguments equal to 1 (Inductor specialises them); keep the declared constexprs
        self.constexprs = {k: v for k, v in constants.items() if k in declared}
        configs = ast.literal_eval(configs) or [{}]
        self.options = configs[0]
        # an autotuned kernel's launch takes the symbols of its per-config grids, not a grid: its candidates and
        # grids are read from the source instead (_autotuned_kernels)
        self.autotuned = len(configs) > 1
        self.arg_names = [k for k in signature if k not in declared]  # the launch's arguments
        # an argument equal to 1, specialised: torch 2.13 still passes it to .run(), torch 2.11 does not
        self.specialised = {k: v for k, v in constants.items() if k in self.arg_names}

    def run(self, *args, stream=None, **kwargs):
        if self.autotuned:
            return
        *args, g0, g1, g2 = args
        if len(args) < len(self.arg_names):  # torch 2.11: fill in the specialised arguments it left out
            passed = iter(args)
            args = [self.specialised[k] if k in self.specialised else next(passed) for k in self.arg_names]
        self.launches.append(_launch_record(self.name, (g0, g1, g2), args, self.constexprs, self.options, self.arg_names))


def _launch_record(name, grid, args, constexprs, options, arg_names) -> dict:
    """The launch as compared: the attention kernels' tune_len left out, the autotuner's key, which the eager
    launchers round up to a power of two and compiled code passes as the sequence length itself when that is
    a symbol (kernels/attention.py, _tune_len): Inductor ignores the key and tunes once itself."""
    import torch
    from triton.backends.nvidia.compiler import CUDAOptions  # what a launch that names no num_warps/num_stages gets
    options = {k: options.get(k, getattr(CUDAOptions, k)) for k in ("num_warps", "num_stages")}
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    assert len(arg_names) == len(args), (name, arg_names, len(args))
    args = [a for a, arg_name in zip(args, arg_names) if arg_name != "tune_len"]
    scalars = [a for a in args if not isinstance(a, torch.Tensor)]
    tensors = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
    return dict(kernel=name.strip("_"), grid=list(grid), scalars=scalars, tensors=tensors,
                constexprs={k: constexprs[k] for k in sorted(constexprs)}, options=options)


def _eager_launches(module, launcher, *args) -> list:
    """The launches `launcher(*args)` makes eagerly, recorded instead of run."""
    launches = []

    class Launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*a, **kw):
                constexprs = {k: v for k, v in kw.items() if not k.startswith("num_")}
                options = {k: v for k, v in kw.items() if k.startswith("num_")}
                at = grid(kw) if callable(grid) else grid  # a grid of the config's tiles, as Triton calls it
                arg_names = [n for n in self.kernel.arg_names if n not in kw]  # the rest go by position
                launches.append(_launch_record(self.kernel.__name__, at, a, constexprs, options, arg_names))
            return launch

    saved = module.wrap_triton
    module.wrap_triton = Launch
    try:
        launcher(*args)
    finally:
        module.wrap_triton = saved
    return launches


def _prefill_compile_keys(attention) -> list[int]:
    """For prompts of 2 to 299 tokens: which compile of the prefill's attention forward each one needs, as an
    index into the distinct keys (signature, constexprs, specialisation attributes) Triton's JIT binds the
    launch to on sm_90 (kernels/aot.py's bind). As chat and serving prefill: the model's layout, d20's heads,
    bf16, inference mode's hand-picked tiles."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels import aot

    launches, keys, found = [], [], []
    saved = attention.wrap_triton, attention.autotune_attention
    attention.wrap_triton = lambda kernel: aot._Indexable(
        lambda grid: lambda *args, **kwargs: launches.append(aot.Launch(kernel, grid, args, kwargs)))
    attention.autotune_attention = lambda x: False  # inference mode
    try:
        with FakeTensorMode():
            for T in range(2, 300):
                q = torch.empty(1, T, 10, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                launches.clear()
                attention._triton_fwd(q, q, q)
                job = aot.bind(launches[0], 90, "fp32")
                key = repr((job.signature, job.constexprs, job.attrs))
                if key not in keys:
                    keys.append(key)
                found.append(keys.index(key))
    finally:
        attention.wrap_triton, attention.autotune_attention = saved
    return found


def _global_accesses_with_dynamic_sizes() -> dict:
    """PTX global loads/stores of RMSNorm's kernels (bf16, width 768) and RoPE-norm's (bf16, head dim 128), sm_90, bound as Inductor binds
    dynamic sizes: pointers 16-byte aligned, no divisibility hint on any int argument."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import aot

    found = {}
    for launch in aot.record_launches():
        name = launch.kernel.__name__
        wanted = (name.startswith("_rms_norm") and launch.case.endswith("N768")
                  or name.startswith("_rope_norm") and launch.case == "B2 T2048 H10 D128")
        if wanted and launch.dtype == torch.bfloat16:
            job = aot.bind(launch, 90, "fp32")
            pointers = {i for i, ty in enumerate(job.signature.values()) if ty.startswith("*")}
            attrs = {k: v for k, v in job.attrs.items() if k[0] in pointers}
            source = triton.compiler.ASTSource(launch.kernel, job.signature, job.constexprs, attrs)
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=job.options).asm["ptx"]
            found[name] = sorted(set(re.findall(r"(?:ld|st)\.global(?:\.\w+)*", ptx)))
    return found


def _autotuned_kernels(attention, sources) -> dict:
    """As on a Hopper (kernels/attention.py autotunes there): per mode, each call's error and, per kernel
    Inductor built, the candidate configs and the launch grids (Python) it generated for them."""
    import ast

    import torch
    saved, attention.autotune_attention = attention.autotune_attention, lambda x: True
    found = {}
    for mode, dynamic in MODES.items():
        torch._dynamo.reset()
        start = len(sources)
        attn = torch.compile(lambda q, k, v: attention.flash_attn_op(q, k, v)[0], fullgraph=True, dynamic=dynamic)
        errors = []
        for B, H, H_kv, T, D in ATTN_SIZES:
            q = torch.randn(B, H, T, D, dtype=torch.bfloat16).requires_grad_()
            k, v = (torch.randn(B, H_kv, T, D, dtype=torch.bfloat16).requires_grad_() for _ in "kv")
            try:
                attn(q, k, v).backward(torch.randn_like(q))
                errors.append(None)
            except Exception as e:  # reported per call
                errors.append(f"{type(e).__name__}: {str(e)[:1500]}")
        kernels = {}
        for name, source in sources[start:]:
            configs = ast.literal_eval(re.search(r"configs=(\[[^\]]*\])", source).group(1))
            grids = re.findall(r"'python': (\[[^\]]*\])", source)
            kernels.setdefault(re.sub(r"_\d+$", "", name), []).append(dict(configs=configs, grids=grids))
        found[mode] = dict(errors=errors, kernels=kernels)
    attention.autotune_attention = saved
    return found


def _compiled_ahead(attention) -> dict:
    """attention._compile_ahead as on a GPU, for the forward's autotuner at D 64 (CPU tensors stand in for a
    GPU's: only compiling happens, for the faked sm_90): the compiles of a first launch (thread, warps,
    stages), of a second launch of the same tuning key, and of the autotuner compiling each candidate after."""
    import threading

    import torch
    saved = attention.autotune_attention, attention._launches_now, attention.wrap_triton
    attention.autotune_attention = lambda x: True
    attention._launches_now = lambda q: True
    tuner = attention._autotuned("fwd", 64, False, tma=True)
    compiled, launched = [], []
    tuner.fn.device_caches[0]  # the JIT sets up its compile function with the device's cache, on first use
    original = tuner.fn.compile

    def recording_compile(src, target=None, options=None, **kwargs):
        compiled.append([threading.current_thread().name, options["num_warps"], options["num_stages"]])
        return original(src, target=target, options=options, **kwargs)
    tuner.fn.compile = recording_compile

    class Launch:  # wrap_triton's stand-in: records the launch, runs nothing
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, args, kwargs))
    attention.wrap_triton = Launch
    try:
        q, k, v = (torch.randn(1, 2, 200, 64, dtype=torch.bfloat16) for _ in "qkv")
        attention._triton_fwd(q, k, v)
        first = list(compiled)
        attention._triton_fwd(q, k, v)
        second = compiled[len(first):]
        grid, args, kwargs = launched[0]
        for config in tuner.configs:  # what the autotuner's first launch of each candidate compiles now
            tuner.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
        after = compiled[len(first) + len(second):]
        # a candidate that cannot compile (a key tile of 48: not a power of two) beside one that can
        import triton
        broken = triton.autotune([tuner.configs[0], triton.Config(dict(BLOCK_M=128, BLOCK_N=48, TMA=False), num_warps=8, num_stages=3)],
                                 key=["tune_len", "group_size"])(tuner.fn)
        start = len(compiled)
        attention._compile_ahead(broken, grid, args, kwargs)
        broken_tried = compiled[start:]
        from triton.runtime._async_compile import FutureKernel
        left_unfinished = sum(isinstance(kernel, FutureKernel) for kernel in tuner.fn.device_caches[0][0].values())
    finally:
        attention.autotune_attention, attention._launches_now, attention.wrap_triton = saved
    return dict(candidates=[[c.num_warps, c.num_stages] for c in tuner.configs], first=first, second=second, after=after,
                broken_tried=broken_tried, left_unfinished=left_unfinished)


def child(out_path: str) -> None:
    import logging

    import torch

    _stand_in_sm90_driver()
    from torch._inductor import async_compile
    from torch._inductor.codecache import output_code_log

    from kernels import attention, attention_reference, dispatch, register_ops, rmsnorm, ropenorm

    register_ops()  # a CPU-only torch makes them on first use
    dispatch._triton_on_cpu = True  # the custom ops take their Triton path on CPU tensors
    gpu_config = rmsnorm._launch_config
    rmsnorm._launch_config = lambda n_cols, device_type: gpu_config(n_cols, "cuda")  # the CUDA configuration
    rope_config = ropenorm._launch_config
    ropenorm._launch_config = lambda head_dim, device_type: rope_config(head_dim, "cuda")

    launches, graphs, wrappers, sources = [], [0], [], []
    def build(self, kernel_name, source_code, device_str="cuda"):
        graphs[0] += kernel_name.startswith(("_rms_norm_fwd", "_attn_fwd", "_rope_norm_fwd"))
        sources.append((kernel_name, source_code))
        return _Recorded(kernel_name, source_code, launches)
    async_compile.AsyncCompile.triton = build

    class Capture(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Output code:"):
                wrappers.append(message)
    torch._logging.set_logs(output_code=True)
    output_code_log.addHandler(Capture())
    output_code_log.propagate = False  # keep the code off stderr

    mutation_analysis_failures = []  # Inductor's analysis of which tensors a user kernel writes, where it gave up

    class AnalysisFailure(logging.Handler):
        def emit(self, record):
            if "assuming every input is mutated" in record.getMessage():
                mutation_analysis_failures.append(record.getMessage())
    logging.getLogger("torch._dynamo").addHandler(AnalysisFailure())

    def call(op, shape, fn, eager):
        g = torch.Generator().manual_seed(0)
        start, start_wrappers = len(launches), len(wrappers)
        result = dict(shape=list(shape), error=None, compiled=[], eager=[], launch_lines=[], graphs=0)
        try:
            fn(g)
        except Exception as e:  # reported per call, with the first lines of the error
            result["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        result["compiled"] = launches[start:]
        result["eager"] = eager()
        result["graphs"] = graphs[0]
        result["launch_lines"] = [line.strip() for code in wrappers[start_wrappers:] for line in code.splitlines()
                                  if re.search(r"_(rms_norm|attn|rope_norm)\w*_kernel\w*\.run\(", line)]
        result["other_kernels"] = [line.strip() for code in wrappers[start_wrappers:] for line in code.splitlines()
                                   if re.match(r"\s*cpp_fused\w*\(", line)]  # Inductor's own kernels (CPU: C++)
        return result

    results = {op: {} for op in OPS}
    for mode, dynamic in MODES.items():
        torch._dynamo.reset()
        graphs[0] = 0
        norm = torch.compile(lambda x: rmsnorm.rms_norm_op(x, EPS)[0], fullgraph=True, dynamic=dynamic)
        rows = []
        for shape in NORM_SIZES:
            x = torch.randn(shape).requires_grad_()
            dy = torch.randn(shape)
            fwd_bwd = lambda g, x=x, dy=dy: norm(x).backward(dy)
            def eager(x=x, dy=dy):
                y, rstd = rmsnorm._reference_fwd(x.detach(), EPS)
                return (_eager_launches(rmsnorm, rmsnorm._triton_fwd, x.detach(), EPS)
                        + _eager_launches(rmsnorm, rmsnorm._triton_bwd, dy, x.detach(), rstd))
            rows.append(call("rms_norm_op", shape, fwd_bwd, eager))
        results["rms_norm_op"][mode] = rows

        torch._dynamo.reset()
        graphs[0] = 0
        attn = torch.compile(lambda q, k, v: attention.flash_attn_op(q, k, v)[0], fullgraph=True, dynamic=dynamic)
        rows = []
        for B, H, H_kv, T, D in ATTN_SIZES:
            q = torch.randn(B, H, T, D).requires_grad_()
            k, v = (torch.randn(B, H_kv, T, D).requires_grad_() for _ in "kv")
            dout = torch.randn(B, H, T, D)
            fwd_bwd = lambda g, q=q, k=k, v=v, dout=dout: attn(q, k, v).backward(dout)
            def eager(q=q, k=k, v=v, dout=dout):
                q_, k_, v_ = q.detach(), k.detach(), v.detach()
                out, lse = attention_reference.reference_fwd(q_, k_, v_)
                return (_eager_launches(attention, attention._triton_fwd, q_, k_, v_)
                        + _eager_launches(attention, attention._triton_bwd, dout, q_, k_, v_, out.contiguous(), lse))
            rows.append(call("flash_attn_op", (B, H, H_kv, T, D), fwd_bwd, eager))
        results["flash_attn_op"][mode] = rows

        torch._dynamo.reset()
        graphs[0] = 0
        # as gpt.py calls it: the model's tables sliced to the input's length inside the graph
        rope = torch.compile(lambda x, cos, sin: ropenorm.rope_norm_op(x, cos[:x.shape[1]], sin[:x.shape[1]], EPS, GAIN),
                             fullgraph=True, dynamic=dynamic)
        rows = []
        for B, T, H, D in ROPE_SIZES:
            x = torch.randn(B, T, H, D).requires_grad_()
            cos, sin = torch.randn(ROPE_TABLE_LEN, D // 2), torch.randn(ROPE_TABLE_LEN, D // 2)
            dy = torch.randn(B, T, H, D)
            fwd_bwd = lambda g, x=x, cos=cos, sin=sin, dy=dy: rope(x, cos, sin).backward(dy)
            def eager(x=x, cos=cos[:T], sin=sin[:T], dy=dy):
                return (_eager_launches(ropenorm, ropenorm._triton_fwd, x.detach(), cos, sin, EPS, GAIN)
                        + _eager_launches(ropenorm, ropenorm._triton_bwd, dy, x.detach(), cos, sin, EPS, GAIN))
            rows.append(call("rope_norm_op", (B, T, H, D), fwd_bwd, eager))
        results["rope_norm_op"][mode] = rows
    results["autotuned"] = _autotuned_kernels(attention, sources)
    results["mutation_analysis_failures"] = mutation_analysis_failures
    results["compiled_ahead"] = _compiled_ahead(attention)
    results["ptx_global_accesses"] = _global_accesses_with_dynamic_sizes()
    results["prefill_compile_keys"] = _prefill_compile_keys(attention)
    Path(out_path).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: the kernels must be real @triton.jit functions for Inductor")
    sys.path.insert(0, str(REPO_ROOT))
    child(sys.argv[1])
