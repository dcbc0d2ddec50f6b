"""
One command for a person with one H100/H200: are the kernels right on the
hardware, how fast are they, and what do they buy a training run?

    python bench/gpu.py              # the full run (not yet timed; its time limits add up to 2 hours 15 minutes)
    python bench/gpu.py --quick      # every section at reduced sizes (not yet timed on a GPU: issue 25 asks
                                     # for under 5 minutes, which its compiles alone may exceed)
    python bench/gpu.py --smoke      # CPU smoke run: toy sizes, no GPU (tests/test_kernels_bench_gpu.py)
    python bench/gpu.py --sections correctness,speed --out report.md

It always reports (bench/gpu_runner.py). Each section runs in its own process,
with its own time limit (SECTIONS). The rows go to stdout and are appended to the
report file the moment they exist: --out, else $OUT/gpu_report.md when $OUT is
set, else bench/RESULTS.md (the smoke run writes no file unless --out is given).
A case that fails is one row with the first line of its error (the traceback
on stderr), and the section goes on; a section that crashes is one row; a
section past its time limit is killed, with a row saying so, and the next
section starts. The exit status is 1 if any row failed, timed out or was wrong.

Sections (each a function section_<name> and a time limit in SECTIONS):

  device       the GPU, the versions, which path our ops take.
  correctness  every op on the GPU against the fp32 PyTorch reference, bf16:
               kernels.flash_attn and kernels.rms_norm (the model's calls: ours or
               torch's per kernels/dispatch.py), flash_attn_op, rms_norm_op and
               rope_norm_op (our kernels at every shape); D 64/128, MHA/GQA, ragged T; eager, torch.compile
               (fullgraph) and torch.compile(dynamic=True), over shapes that vary
               batch, sequence, rows and width, so the compiled ones recompile or
               run dynamic. Tolerances are tests/test_kernels.py's for bf16.
  candidates   on a Hopper, every tile the attention autotuner can pick (TMA ones
               too), forced one at a time, forward+backward against the fp32
               reference: D 128 MHA, and D 64 GQA with a sliding window (--quick:
               D 128 MHA only; kernels/tiles.py).
  speed        attention forward and forward+backward TFLOP/s, causal, bf16: D 128 at
               T 2048 and 4096, D 64, and GQA (4 query heads a key/value head) at T
               2048 (--quick: T 2048 at D 128, MHA and GQA): our Triton kernel (on a
               Hopper with the tiles triton.autotune picks, with and without its TMA
               candidates, and with the hand-picked ones; the picks are listed), and
               the model's call (ours or SDPA,
               kernels/dispatch.py) against every SDPA backend that runs (flash,
               cuDNN, efficient) and the flash_attn package if installed.
  rms_norm_speed  RMSNorm GB/s, forward+backward and forward only: our kernel
               (eager, and as the custom op inside torch.compile) against eager
               and compiled F.rms_norm, at the model's widths.
  rope_norm_speed  RoPE + QK-norm + gain fused (kernels/ropenorm.py) against gpt.py's
               composition, eager and compiled, GB/s at d12/d20's q (bench/gpu_norms.py).
  launch       host time per call of each op's eager path (bench/kernels.py).
  train        d12 and d20 at train.py's defaults (T 2048, 32 sequences a device),
               compiled, one GPU: tokens/s, MFU and peak memory over --train-steps
               steps after warm-up, with the kernels kernels/dispatch.py picks, with
               our Triton attention wherever it runs (NANOSCHNACK_TRITON_ATTENTION=1,
               autotuned and hand-picked tiles; not in --quick), with the fused RoPE +
               QK-norm (NANOSCHNACK_FUSED_ROPE_NORM=1) and with PyTorch's own
               (SDPA + F.rms_norm: NANOSCHNACK_REFERENCE_KERNELS=1); then where each
               one's GPU time goes, by kernel group (--profile-steps, bench/gpu_profile.py).
  run          a short real d12 run whose loss must fall: counting sequences
               (token t+1 = token t + 1 mod 1024, a fresh random start per row and
               step), so there is something to learn and no data files are needed.
  decode       chat and serving (bench/gpu_serving.py): d12 and d20 loaded as chat.py
               and serve.py load them (the decode step compiled and captured at load):
               load time, first token, batch-1 greedy tokens/s compiled and eager,
               compiled = eager greedy tokens, the batched engine at 32 streams
               against one at a time, and its answers against one-at-a-time ones.
  pipeline     the stage scripts on local data as a user runs them (torchrun train.py
               d12 -> sft.py -> evaluation.py -> chat.py -> serve.py with 4 streams),
               one row per stage with its wall time and result (bench/gpu_serving.py).

--quick, estimated on an H100/H200 (not timed yet): correctness 2 attention and
3 RMSNorm and 3 RoPE + QK-norm shapes in 3 modes (about 24 compiles of a few seconds
each), speed T 2048 only (MHA and GQA), RMSNorm 3 shapes, RoPE + QK-norm d20's q, train
d12 only for 10 steps (three compiles of the model and of NorMuon's step, about a
minute each), run as in the full run (seconds, and NorMuon's compile), decode d12 only (a
compile of the decode step per batch size, 1 to 32), the pipeline at 20 steps of d12, plus a
start-up of about 10 s (the imports) and a CUDA initialisation per section. On a Hopper
the attention kernels autotune at the first call of each shape in the speed section
(about 35 candidates, half loading through TMA, compiled at once on threads, then timed;
kernels/aot.py compiles 359 kernels in about 5 minutes on the 2-core development CPU);
the correctness section runs the hand-picked tiles in --quick, the candidates section
the others. The quick time limits (SECTIONS) add up to 21.7 minutes, so even a hung
section cannot stretch the run much past that; where one command may run at most 10
minutes, run `--sections device,correctness,candidates,speed --quick` first and the
other sections as a second command.

In --smoke the same code runs on the CPU at toy sizes: the nano model, fp32, no
torch.compile (Inductor cannot trace Triton's interpreter), SDPA backends and
flash_attn reported as n/a. The correctness section runs Triton through its
interpreter when TRITON_INTERPRET=1, the other sections the ops' reference path.
"""
import argparse
import math
import os
import platform
import queue
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: the repo root holds kernels/ and gpt.py

import torch
import torch.nn.functional as F

import gpt
import kernels
import optim
import train
from bench import gpu_norms, gpu_profile
from bench.gpu_runner import Report, case, max_err, ok_cell, one_line, run_sections, sync, timeit
from bench.kernels import launch_overhead
from kernels import attention, attention_reference, dispatch, tiles

# (name, seconds in a full run, seconds in a --quick run): section_<name> runs in its own
# process and is killed at its limit, counted from its first line (bench/gpu_runner.py).
# To add a section: write section_<name>(args, device), a generator of report lines (its
# first line a description, its title the docstring's first line), and add a line here.
SECTIONS = [
    ("device", 60, 10),
    ("correctness", 900, 110),  # on a Hopper the first call of each attention shape autotunes (not in --quick)
    ("candidates", 400, 200),  # about 85 compiles, 40 in --quick, one after another (estimates, not yet timed)
    ("speed", 600, 150),  # tunings: about 35 candidates to compile and time a shape (kernels/tiles.py)
    ("rms_norm_speed", 300, 25),
    ("rope_norm_speed", 300, 25),
    ("launch", 120, 10),
    ("train", 2100, 260),  # d12 and d20 in five variants (--quick: d12 in three), each compiling NorMuon's step too
    ("run", 600, 90),  # NorMuon's step compiles on CUDA (optim.normuon_update)
    ("decode", 900, 120),
    ("pipeline", 1800, 300),
]
PRELOAD = ["torch", "torch.nn.functional", "triton", "common", "gpt", "kernels", "train", "bench.kernels",
           "bench.gpu_runner"]  # what every section's process starts with, imported once
TEST_HANG_LIMIT = 3  # the --test-hang section's limit (tests only)
ATTN_TOL = {torch.bfloat16: (3e-2, 3e-2), torch.float32: (2e-5, 1e-4)}  # as in tests/test_kernels.py


# ----------------------------------------------------------------------------
# Where we run


def machine() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return (f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}), CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}, triton {_version('triton')}")
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, torch {torch.__version__}"


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return "not installed"


def our_path(smoke: bool):
    """A context for checking our Triton kernels: native on CUDA; in the smoke run Triton's interpreter,
    if TRITON_INTERPRET=1 was set before `kernels` was imported (else the reference path)."""
    if smoke and os.environ.get("TRITON_INTERPRET") == "1":
        return kernels.triton_on_cpu()
    return nullcontext()


def path_name(device, smoke: bool) -> str:
    with our_path(smoke):
        return "Triton" if kernels.use_triton(torch.empty(0, device=device)) else "the PyTorch reference path"


# ----------------------------------------------------------------------------
# device and correctness


def section_device(args, device):
    """Device"""
    yield f"{machine()}. Our ops run: {path_name(device, args.smoke)} in the correctness section, {path_name(device, False)} elsewhere."
    yield (f"kernels.rms_norm takes our kernel at widths {sorted(kernels.RMS_NORM_TRITON_WIDTHS)} in eager training, "
           "F.rms_norm everywhere else (kernels/dispatch.py).")
    if device.type == "cuda":
        q = torch.empty(1, 1, 128, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
        yield (f"kernels.flash_attn in training (causal, MHA, D 128, bf16) runs "
               f"{'our Triton kernel' if kernels.use_triton_attention(q, q, None) else 'SDPA'}; "
               f"SDPA would pick {dispatch.sdpa_choice(q, q, q).name.lower()} (kernels/dispatch.py).")
        yield (f"Our attention kernels {'let triton.autotune pick their tiles' if dispatch.autotune_attention(q) else 'run their hand-picked tiles'} "
               f"on this GPU in bf16 (kernels/tiles.py; {kernels.AUTOTUNE_ENV}=0 keeps the hand-picked ones).")


def attention_errors(fn, B, H, H_kv, T, D, dtype, device, window=-1):
    """Max errors of out, dq, dk, dv of fn(q, k, v) against the fp32 reference (with this window), and whether
    all pass."""
    g = torch.Generator().manual_seed(0)
    make = lambda h: torch.randn(B, T, h, D, generator=g).to(device, dtype).transpose(1, 2)  # the model's layout
    q, k, v, dout = make(H), make(H_kv), make(H_kv), make(H)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_reference.reference_fwd(q32, k32, v32, window)
    ref = (ref_out, *attention_reference.reference_bwd(dout.float(), q32, k32, v32, ref_out, ref_lse, window))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    got = (out, *torch.autograd.grad(out, (q, k, v), dout))
    results = [max_err(a, b, ATTN_TOL[dtype]) for a, b in zip(got, ref)]
    return [e for e, _ in results], all(ok for _, ok in results)


def _errors_cells(errors_and_ok) -> list:
    errs, ok = errors_and_ok
    return [" / ".join(f"{e:.1e}" for e in errs), ok_cell(ok)]


def section_correctness(args, device):
    """Correctness on the device"""
    dtype = torch.float32 if args.smoke else torch.bfloat16
    # B, H, H_kv, T, D; and RMSNorm shapes. In a row the sizes change one dimension at a time
    # (batch, sequence; rows, width), so the compiled modes recompile or run dynamic.
    # RoPE + QK-norm: B, T, H, D (batch, then sequence).
    if args.smoke:
        attn_shapes, norm_shapes = [(1, 2, 2, 33, 64), (1, 4, 2, 40, 128)], [(7, 64), (3, 5, 100)]
        rope_shapes = [(1, 9, 2, 64), (2, 9, 2, 64), (2, 13, 2, 64)]
    elif args.quick:
        attn_shapes = [(2, 8, 8, 1000, 128), (1, 8, 2, 2048, 128)]  # MHA (SDPA on a Hopper in training), GQA (ours)
        norm_shapes = [(4096, 768), (2, 512, 10, 128), (999, 128)]
        rope_shapes = [(2, 1000, 10, 128), (3, 1000, 10, 128), (3, 777, 10, 128)]
    else:
        attn_shapes = [(2, 8, 8, 1000, 64), (2, 8, 2, 1000, 64), (1, 8, 2, 1500, 64), (2, 10, 10, 2048, 128),
                       (1, 8, 2, 4093, 128)]
        norm_shapes = [(4096, 768), (4096, 1280), (2, 2048, 10, 128), (3000, 128), (999, 64)]
        rope_shapes = [(2, 1000, 10, 128), (3, 1000, 10, 128), (3, 777, 10, 128), (3, 777, 2, 64), (1, 2048, 2, 64)]
    ops = {"flash_attn": lambda q, k, v: kernels.flash_attn(q, k, v),  # the model's call: ours or SDPA
           "flash_attn_op": lambda q, k, v: kernels.flash_attn_op(q, k, v, -1)[0],  # our kernel at every shape
           "rms_norm": lambda x: kernels.rms_norm(x, gpt.NORM_EPS),  # the model's call: ours or F.rms_norm
           "rms_norm_op": lambda x: kernels.rms_norm_op(x, gpt.NORM_EPS)[0],  # our kernel at every width
           "rope_norm_op": lambda x, cos, sin, gain: kernels.rope_norm_op(x, cos, sin, gpt.NORM_EPS, gain)}
    checks = {  # op without _op: its shapes, a shape's label, the errors of a function on a shape
        "flash_attn": (attn_shapes, "B{} H{} Hkv{} T{} D{}", lambda fn, shape: attention_errors(fn, *shape, dtype, device)),
        "rms_norm": (norm_shapes, None, lambda fn, shape: gpu_norms.norm_errors(fn, shape, dtype, device)),
        "rope_norm": (rope_shapes, "B{} T{} H{} D{}", lambda fn, shape: gpu_norms.rope_norm_errors(fn, shape, dtype, device))}
    modes = {"eager": lambda fn: fn}
    if not args.smoke:  # Inductor cannot trace the interpreter (tests/test_kernels_compile.py)
        modes["compiled"] = lambda fn: torch.compile(fn, fullgraph=True)
        modes["compiled dynamic"] = lambda fn: torch.compile(fn, fullgraph=True, dynamic=True)
    # --quick: our attention with its hand-picked tiles, as on every GPU but a Hopper; there the candidates
    # section checks each tile the autotuner can pick, without the compile and timing of a tuning run a shape
    hand_picked = _env(kernels.AUTOTUNE_ENV, "0") if args.quick else nullcontext()
    yield (f"Against the fp32 PyTorch reference; {str(dtype)[6:]} inputs; tolerances (atol, rtol) "
           f"attention {ATTN_TOL[dtype]}, RMSNorm and RoPE + QK-norm {gpu_norms.NORM_TOL[dtype]}; {', '.join(modes)}"
           f"{' (no torch.compile in the smoke run)' if args.smoke else ''}"
           f"{'; attention with its hand-picked tiles (--quick)' if args.quick else ''}.")
    yield ""
    yield "| op | shape | mode | max abs err (out/dq/dk/dv; y/dx) | ok |"
    yield "|---|---|---|---|---|"
    with our_path(args.smoke), hand_picked:
        for mode, wrap in modes.items():
            for op, fn in ops.items():
                torch._dynamo.reset()
                compiled = wrap(fn)  # one compiled function per op and mode, across the shapes
                shapes, label, errors = checks[op.removesuffix("_op")]
                for shape in shapes:
                    cell = label.format(*shape) if label else "x".join(map(str, shape))
                    yield case(args, [op, cell, mode], lambda: _errors_cells(errors(compiled, shape)))


def section_candidates(args, device):
    """Every tile the Hopper autotuner can pick"""
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if not (args.smoke or dispatch.autotune_attention(torch.empty(0, device=device, dtype=dtype))):
        yield "Our attention does not autotune on this device: it runs the hand-picked tiles the correctness section checked."
        return
    # B, H, H_kv, T, D, window: training's MHA at D 128 (SDPA in a model on a Hopper, ours in the op), and GQA at
    # D 64 with a sliding window; ragged lengths, so the last tiles are partial
    shapes = ([(1, 4, 2, 100, 64, 30)] if args.smoke else [(2, 8, 8, 1000, 128, -1)] if args.quick
              else [(2, 8, 8, 1000, 128, -1), (2, 8, 2, 1000, 64, 300)])
    yield (f"Our attention op, forward+backward, with each kernel's candidate i forced (kernels/tiles.py, "
           f"HOPPER_SPACES; the last one where a kernel has fewer), against the fp32 reference; {str(dtype)[6:]}, "
           f"tolerances {ATTN_TOL[dtype]}.")
    yield ""
    yield "| shape | i | fwd / dK,dV / dQ tiles (BLOCK_M x BLOCK_N, warps, stages, TMA loads) | max abs err (out/dq/dk/dv) | ok |"
    yield "|---|---|---|---|---|"
    op = lambda window: lambda q, k, v: kernels.flash_attn_op(q, k, v, window)[0]
    with our_path(args.smoke):
        for B, H, H_kv, T, D, window in shapes:
            spaces = {w: tiles.hopper_space(w, D, window >= 0, tma=True) for w in ("fwd", "dkdv", "dq")}
            label = f"B{B} H{H} Hkv{H_kv} T{T} D{D}" + (f" W{window}" if window >= 0 else "")
            for i in range(max(map(len, spaces.values()))):
                picked = {w: space[min(i, len(space) - 1)] for w, space in spaces.items()}
                named = " / ".join(f"{c['BLOCK_M']}x{c['BLOCK_N']}, {c['num_warps']}, {c['num_stages']}{', TMA' * c['TMA']}"
                                   for c in picked.values())

                def measure(picked=picked, shape=(B, H, H_kv, T, D), window=window):
                    with tiles.forced_tiles(picked):
                        return _errors_cells(attention_errors(op(window), *shape, dtype, device, window))
                yield case(args, [label, i, named], measure)


# ----------------------------------------------------------------------------
# speed


def attention_contenders(smoke: bool) -> dict:
    """name -> (context, fn(q, k, v)) for every implementation to time; some may not run here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    ours = lambda q, k, v: kernels.flash_attn_op(q, k, v, -1)[0]  # our Triton kernel
    contenders = {"ours": (nullcontext, ours),  # on a Hopper with the tiles triton.autotune picked there
                  "ours, no TMA": (lambda: _env(kernels.TMA_ENV, "0"), ours),  # the autotuner's pick among pointer loads
                  "ours, hand-picked tiles": (lambda: _env(kernels.AUTOTUNE_ENV, "0"), ours),  # as on other GPUs
                  "model's call": (nullcontext, kernels.flash_attn)}  # ours or SDPA (kernels/dispatch.py)
    for name, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                          ("SDPA efficient", SDPBackend.EFFICIENT_ATTENTION)):
        contenders[name] = (lambda b=backend: sdpa_kernel(b), sdpa)
    try:
        from flash_attn import flash_attn_func  # wants (B, T, H, D)
        fa = lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
        contenders["flash_attn " + _version("flash_attn")] = (nullcontext, fa)
    except ImportError:
        contenders["flash_attn (not installed)"] = None
    return contenders


OURS = ("ours", "ours, no TMA", "ours, hand-picked tiles", "model's call")  # the columns "ours / best other" does not count as others


def section_speed(args, device):
    """Attention speed, TFLOP/s"""
    dtype = torch.float32 if args.smoke else torch.bfloat16
    # (T, D, query heads per key/value head): MHA at D 128, what d12/d20 train and kernels/dispatch.py's rule
    # is measured on; in the full run also D 64 (the tiny preset) and GQA, where the rule keeps ours unmeasured
    shapes = ([(64, 64, 1)] if args.smoke else [(2048, 128, 1), (2048, 128, 4)] if args.quick
              else [(2048, 128, 1), (4096, 128, 1), (2048, 64, 1), (2048, 128, 4)])
    tokens, width = (64, 128) if args.smoke else (16384, 2048)  # B*T tokens, H*D width (as bench/kernels.py)
    contenders = attention_contenders(args.smoke)
    yield (f"Causal, {str(dtype)[6:]}, B*T = {tokens} tokens, H = {width} / D query heads, H / group key/value "
           "heads. FLOPs: forward 4*B*H*T^2*D / 2 (the causal half), backward 2.5x that.")
    yield ""
    yield "| T | D | group | pass | " + " | ".join(contenders) + " | ours / best other |"
    yield "|---|---|---|---|" + "---:|" * (len(contenders) + 1)
    for T, D, group in shapes:
        B, H = max(1, tokens // T), width // D
        g = torch.Generator(device=device).manual_seed(0)
        q, dout = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(2))
        k, v = (torch.randn(B, H // group, T, D, device=device, dtype=dtype, generator=g) for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        flops_fwd = 4 * B * H * T * T * D / 2
        for label, flops in (("fwd", flops_fwd), ("fwd+bwd", 3.5 * flops_fwd)):
            def measure():
                speed = {name: None if c is None else _tflops(c, label, flops, q, k, v, dout, args.smoke)
                         for name, c in contenders.items()}
                others = [s for n, s in speed.items() if n not in OURS and s is not None]
                ratio = f"{speed['ours'] / max(others):.2f}x" if others and speed["ours"] else "n/a"
                return [_cell(s, args.smoke) for s in speed.values()] + [ratio]
            yield case(args, [T, D, group, label], measure)
    picks = attention.autotune_picks()
    yield ""
    yield ("triton.autotune's picks for \"ours\" and \"ours, no TMA\" (kernels/tiles.py, HOPPER_SPACES and "
           "HOPPER_TMA_SPACES; the first candidate of each is the hand-picked one):" if picks else "Our attention ran its hand-picked tiles (no autotuning on this device).")
    yield from (f"- {pick}" for pick in picks)


def _tflops(contender, label, flops, q, k, v, dout, smoke):
    context, fn = contender
    if label == "fwd":
        run = lambda: fn(q, k, v)
    else:
        run = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    try:
        with context(), (torch.no_grad() if label == "fwd" else nullcontext()):
            return flops / timeit(run, smoke) / 1e12
    except RuntimeError:  # this backend cannot run these inputs on this machine
        return None


def _cell(x, smoke) -> str:
    return "n/a" if x is None else f"{x:.3f}" if smoke else f"{x:.1f}"


def section_rms_norm_speed(args, device):
    """RMSNorm speed, GB/s"""
    yield from gpu_norms.rms_norm_speed(args, device)


def section_rope_norm_speed(args, device):
    """RoPE + QK-norm speed, GB/s"""
    yield from gpu_norms.rope_norm_speed(args, device)


def section_launch(args, device):
    """Launch overhead, microseconds per call"""
    yield from launch_overhead(device, args.smoke)


# ----------------------------------------------------------------------------
# training


FLAT = dict(lr_mult=1.0)  # train.train_step's settings for a step at the full learning rate


def train_api():
    """train.py's configuration and step, optim.py's optimizer recipe."""
    return train.TrainConfig(), optim.build_optimizers, train.train_step, train.PEAK_FLOPS


def build(preset: str, seq_len: int, device, seed: int = 0) -> gpt.GPT:
    config = gpt.preset(preset, vocab_size=65536 if preset.startswith("d") else 512, sequence_len=seq_len)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model


def counting_batch(B: int, T: int, device, vocab_size: int, generator=None):
    """(inputs, targets) of counting sequences: token t+1 = token t + 1 (mod 1024), random starts."""
    period = min(1024, vocab_size)
    start = torch.randint(0, period, (B, 1), generator=generator)
    seq = (start + torch.arange(T + 1)) % period
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


TRAIN_VARIANTS = {  # name -> the environment variables kernels/dispatch.py reads
    "pytorch": {kernels.REFERENCE_ENV: "1"},  # torch's SDPA + F.rms_norm, the baseline
    "ours": {},  # what the model runs: our kernels where they measured faster (or were not measured)
    "ours + fused RoPE/QK-norm": {kernels.FUSED_ROPE_NORM_ENV: "1"},  # kernels/ropenorm.py, an A/B until measured
    "triton attention": {kernels.TRITON_ATTENTION_ENV: "1"},  # our attention wherever it can run
    "triton attention, hand-picked tiles": {kernels.TRITON_ATTENTION_ENV: "1", kernels.AUTOTUNE_ENV: "0"},
}


def _env(key: str, value: str):
    """A context in which os.environ[key] is value, restored after."""
    return mock.patch.dict(os.environ, {key: value})


def measure_training(preset: str, variant: str, args, device) -> dict:
    """tokens/s, MFU and peak memory of `steps` compiled train steps after `warmup` ones."""
    cfg, build_optimizers, train_step, peak_flops = train_api()
    seq_len, batch = (64, 2) if args.smoke else (cfg.seq_len, cfg.device_batch_size)
    torch._dynamo.reset()  # a fresh graph: the ops' path is baked in at trace time
    model = build(preset, seq_len, device)
    optimizers = build_optimizers(model, cfg)
    compiled = model if args.smoke else torch.compile(model)
    g = torch.Generator().manual_seed(0)
    step = lambda: train_step(compiled, optimizers, [counting_batch(batch, seq_len, device, model.config.vocab_size, g)],
                              FLAT, device)
    with mock.patch.dict(os.environ, TRAIN_VARIANTS[variant]):
        for _ in range(args.warmup):
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.train_steps):
            loss = step()
        sync(device)
        seconds = time.perf_counter() - t
        profile = gpu_profile.profile_steps(step, args.profile_steps, device) if args.profile_steps else None
    tokens_per_s = args.train_steps * batch * seq_len / seconds
    peak = next((v for k, v in peak_flops.items() if k in torch.cuda.get_device_name(0)), None) if device.type == "cuda" else None
    result = dict(tokens_per_s=tokens_per_s, seq_len=seq_len, batch=batch, loss=loss,
                  mfu=model.flops_per_token() * tokens_per_s / peak if peak else None,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                  step_seconds=seconds / args.train_steps, profile=profile, profile_steps=args.profile_steps)
    del model, compiled, optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def section_train(args, device):
    """Training throughput, one GPU"""
    presets = ["nano"] if args.smoke else ["d12"] if args.quick else args.train_presets.split(",")
    yield (f"{args.train_steps} steps after {args.warmup} warm-up steps, one micro-batch per step, "
           f"{'no torch.compile (smoke)' if args.smoke else 'torch.compile, bf16 autocast'}; counting-sequence data. "
           "pytorch: torch's SDPA + F.rms_norm. ours: attention and RMSNorm as kernels/dispatch.py picks them "
           "(F.rms_norm under torch.compile; SDPA for MHA at D 128 on a Hopper where SDPA picks cuDNN); with "
           f"RoPE + QK-norm fused as one op ({kernels.FUSED_ROPE_NORM_ENV}=1, kernels/ropenorm.py). "
           "triton attention: our attention kernel wherever it can run, its tiles on a Hopper picked by the "
           "autotuner (Inductor's, under torch.compile); the same with its hand-picked tiles "
           f"({kernels.AUTOTUNE_ENV}=0). Neither in --quick.")
    yield ""
    yield "| model | kernels | T x batch | tokens/s | MFU | peak memory GiB | / pytorch |"
    yield "|---|---|---|---:|---:|---:|---:|"
    variants = [v for v in TRAIN_VARIANTS if not (args.quick and v.startswith("triton attention"))]
    for preset in presets:
        results = {}

        def measure(variant):
            r = results[variant] = measure_training(preset, variant, args, device)
            ratio = (f"{r['tokens_per_s'] / results['pytorch']['tokens_per_s']:.2f}x"
                     if variant != "pytorch" and "pytorch" in results else "")
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            return [f"{r['seq_len']} x {r['batch']}", f"{r['tokens_per_s']:,.0f}", mfu, peak, ratio]

        for variant in variants:
            yield case(args, [preset, variant], lambda: measure(variant))
        yield from gpu_profile.report_lines(preset, results)


def section_run(args, device):
    """A short real run"""
    cfg, build_optimizers, train_step, _ = train_api()
    preset, seq_len, batch, steps = ("nano", 64, 4, 30) if args.smoke else ("d12", 512, 16, args.run_steps)
    yield (f"{preset}, {steps} steps of {batch} x {seq_len} counting-sequence tokens (period 1024 or the vocabulary), "
           "eager, our kernels. Loss starts at ln(vocab) (zero-initialised lm_head); it must fall below half of that.")
    yield ""
    yield "| model | seconds | steps 1-5 mean loss | last 5 mean loss | losses every 10% | falls |"
    yield "|---|---:|---:|---:|---|---|"

    def measure():
        model = build(preset, seq_len, device)
        optimizers = build_optimizers(model, cfg)
        g = torch.Generator().manual_seed(1)
        losses = []
        t = time.perf_counter()
        for step in range(steps):
            lr_mult = min(1.0, 2 * (steps - step) / steps)  # flat, then a linear warmdown over the second half
            batches = [counting_batch(batch, seq_len, device, model.config.vocab_size, g)]
            losses.append(train_step(model, optimizers, batches, dict(lr_mult=lr_mult), device))
        seconds = time.perf_counter() - t
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        falls = last < 0.5 * math.log(model.config.vocab_size)
        return [f"{seconds:.0f}", f"{first:.3f}", f"{last:.3f}",
                " ".join(f"{l:.2f}" for l in losses[::max(1, steps // 10)]), ok_cell(falls)]

    yield case(args, [preset], measure)


def _rows_of(fn, *fn_args):
    """Run one of bench/gpu_serving.py's sections (which report through gpu_serving.emit) in a thread and yield its
    lines as they come; an exception outside its cases is raised here, so the runner reports it as a row."""
    from bench import gpu_serving
    lines, done, failure = queue.Queue(), object(), []
    gpu_serving.emit = lines.put

    def run():
        try:
            fn(*fn_args)
        except BaseException as e:  # SystemExit too: gpu_serving says "no CUDA device" that way
            failure.append(e)
        finally:
            lines.put(done)

    threading.Thread(target=run, daemon=True).start()
    while (line := lines.get()) is not done:
        yield line
    if failure:
        raise RuntimeError(one_line(failure[0])) from failure[0]


def section_decode(args, device):
    """Chat and serving decode"""
    yield ("Loaded as chat.py and serve.py load a model (session.load_session: the decode step compiled and "
           "captured at load on CUDA); random weights, vocabulary 65,536, context 2,048 (bench/gpu_serving.py).")
    yield ""
    from bench import gpu_serving
    yield from _rows_of(gpu_serving.decode_section, args.quick, args.smoke)


def section_pipeline(args, device):
    """The pipeline on local data"""
    yield ("The stage scripts as a user runs them, on $NANOSCHNACK_DATA (default ../shared/data; the GPU machine "
           "needs datasets, fastapi and uvicorn besides torch and triton: bench/gpu_serving.py's docstring).")
    yield ""
    from bench import gpu_serving
    yield from _rows_of(gpu_serving.pipeline_section, args.quick, args.smoke)


def section_hang(args, device):
    """Test hook: a section that hangs"""
    yield "| this row was printed before the section hung |"
    threading.Event().wait()  # forever: the runner must end it at its limit


def default_out(smoke: bool):
    if smoke:  # a CPU check writes nothing unless asked: not even into the GPU machine's $OUT report
        return None
    if os.environ.get("OUT"):
        return str(Path(os.environ["OUT"]) / "gpu_report.md")
    return str(ROOT / "bench" / "RESULTS.md")


def main(argv=None):
    names = [name for name, *_ in SECTIONS]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="CPU smoke run at toy sizes")
    mode.add_argument("--quick", action="store_true", help="every section at reduced sizes (not yet timed on a GPU)")
    parser.add_argument("--sections", default=",".join(names), help=f"comma-separated subset of {names}")
    parser.add_argument("--out", default=None, help="append the report here as it comes (default: $OUT/gpu_report.md "
                        "if $OUT is set, else bench/RESULTS.md; none with --smoke)")
    parser.add_argument("--train-presets", default="d12,d20")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="train steps before timing (the first compiles)")
    parser.add_argument("--profile-steps", type=int, default=2, help="train steps profiled after timing (0: none)")
    parser.add_argument("--run-steps", type=int, default=300, help="steps of the short real d12 run")
    parser.add_argument("--test-fail-case", default=None, help=argparse.SUPPRESS)  # tests: fail this case
    parser.add_argument("--test-hang", action="store_true", help=argparse.SUPPRESS)  # tests: add a hanging section
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_steps, args.warmup = min(args.train_steps, 2), min(args.warmup, 1)
    elif args.quick:
        args.train_steps, args.warmup = min(args.train_steps, 10), min(args.warmup, 2)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU smoke run")
    wanted = args.sections.split(",")
    unknown = set(wanted) - set(names)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {names}")
    # the smoke run gets the full limits: it runs on loaded CI machines, and only a hang should reach them
    sections = [(name, quick if args.quick else full) for name, full, quick in SECTIONS if name in wanted]
    if args.test_hang:
        sections.insert(1, ("hang", TEST_HANG_LIMIT))
    out = args.out or default_out(args.smoke)

    report = Report(out)
    started = time.time()
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report(f"## GPU check (`{command.strip()}`){' — CPU smoke run' if args.smoke else ''}, {time.strftime('%Y-%m-%d %H:%M')}")
    report()
    run_sections([(globals()[f"section_{name}"], limit) for name, limit in sections], args, report, PRELOAD, ROOT)
    report(f"Total {time.time() - started:.0f} s; {report.bad} failed, wrong or timed-out rows.")
    if out:
        print(f"\n(appended to {out})")
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
