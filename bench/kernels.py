"""
Benchmark nanoschnack's kernels against PyTorch.

    python bench/kernels.py            # full GPU benchmark, or the CPU smoke run when there is no CUDA
    python bench/kernels.py --smoke    # the small, fast run anywhere

Attention: causal, bf16 (fp32 in the CPU smoke run), B*T = 16K tokens and
H = 2048 / D heads, at T = 1024, 2048, 4096 and D = 128, 64. Forward and
forward+backward TFLOP/s of our Triton kernel against torch SDPA: the backend SDPA
picks by itself (named in the table), and each of flash / cuDNN / efficient
forced. FLOPs: forward 4*B*H*T^2*D / 2 (the causal half), backward 2.5x that.
Goal: ours >= 1.0x the best SDPA backend.

RMSNorm: forward+backward GB/s of our Triton kernel against eager F.rms_norm and
torch.compile(F.rms_norm), on the residual-stream and QK-norm shapes of d20-sized
models, bf16. Bytes: forward reads x and writes y, backward reads x and dy and
writes dx: 5 * numel * element size (rstd, 4 bytes a row, is ignored).
Goal: ours >= 1.0x eager and compiled wherever kernels/dispatch.py picks ours
(on an H200 ours was 0.22-0.24x eager F.rms_norm on the residual stream, hence
F.rms_norm there; 1.08x at the QK-norm's width 128).

Launch overhead: host time per call of each op's eager path, on an input so small
that the GPU's own work is negligible: what a call costs before the GPU sees it
(the issue's profile had ~200 us for nanoschnack::rms_norm on an H200). On a GPU,
wall time per call over many calls, synchronised once at the end. Without one,
the Triton launch itself is replaced by a no-op, so the rows show the custom-op,
autograd and launcher Python only (Triton's own launch is not in them).

The CPU smoke run uses the same code at toy sizes (in well under a minute): there
"ours" is the custom op's PyTorch reference path, since Triton needs a GPU.
"""
import contextlib
import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds kernels/

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from bench.gpu_norms import rope_composition, rope_tables
from kernels import attention, dispatch, rmsnorm, ropenorm

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def machine() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch using {threads} thread(s), no GPU (CUDA unavailable), torch {torch.__version__}"


def timeit(fn, smoke: bool) -> float:
    """Seconds per call."""
    if not smoke:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100) / 1e3
    fn(), fn()  # warm-up
    best = float("inf")
    for _ in range(5):  # best of 5: CPU timings of tiny ops are noisy
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def fwd_bwd(attn, q, k, v, dout):
    def run():
        out = attn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    return run


def bench_attention(smoke: bool, device: str) -> list[str]:
    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = [(T, D) for D in (128, 64) for T in ((128, 256) if smoke else (1024, 2048, 4096))]
    tokens, width = (512, 256) if smoke else (16384, 2048)
    rows = ["| T | D | B x H | pass | ours | SDPA default (picked) | flash | cuDNN | efficient | ours / best SDPA | max abs diff |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for T, D in shapes:
        B, H = max(1, tokens // T), width // D
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        ours = lambda q, k, v: kernels.flash_attn_op(q, k, v, -1)[0]  # our kernel, where kernels.flash_attn may pick SDPA
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        picked = dispatch.sdpa_choice(q, k, v).name.lower()
        with torch.no_grad():
            diff = (ours(q, k, v).float() - sdpa(q, k, v).float()).abs().max().item()

        flops_fwd = 4 * B * H * T * T * D / 2
        for label, flops, make in (("fwd", flops_fwd, lambda f: (lambda: f(q, k, v))),
                                   ("fwd+bwd", 3.5 * flops_fwd, lambda f: fwd_bwd(f, q, k, v, dout))):
            tflops = lambda f: flops / timeit(make(f), smoke) / 1e12
            with torch.no_grad() if label == "fwd" else torch.enable_grad():
                ours_t = tflops(ours)
                default_t = tflops(sdpa)
                forced = {}
                for name, backend in SDPA_BACKENDS.items():
                    try:
                        with sdpa_kernel(backend):
                            forced[name] = tflops(sdpa)
                    except RuntimeError:  # this backend cannot run these inputs on this machine
                        forced[name] = None
            best = max([default_t] + [x for x in forced.values() if x is not None])
            cell = lambda x: "n/a" if x is None else f"{x:.3f}" if smoke else f"{x:.1f}"
            rows.append(f"| {T} | {D} | {B} x {H} | {label} | {cell(ours_t)} | {cell(default_t)} ({picked}) | "
                        f"{cell(forced['flash'])} | {cell(forced['cudnn'])} | {cell(forced['efficient'])} | "
                        f"{ours_t / best:.2f}x | {diff:.1e} |")
    return rows


def bench_rms_norm(smoke: bool, device: str) -> list[str]:
    dtype = torch.float32 if smoke else torch.bfloat16
    # (rows, width): the residual stream of d20 / d32 at 16K tokens, and QK-norm (16K tokens x 10 heads, D = 128)
    shapes = [(512, 256), (2048, 64)] if smoke else [(16384, 1280), (16384, 2048), (163840, 128)]
    eager = lambda x: F.rms_norm(x, (x.shape[-1],), eps=1e-6)
    # ours: our kernel at every width, by kernels.rms_norm's eager path to it (kernels.rms_norm itself
    # would pick F.rms_norm where ours measured slower); in the smoke run the reference path
    ours = (lambda x: kernels.rms_norm(x, 1e-6)) if smoke else (lambda x: rmsnorm._EagerRMSNorm.apply(x, 1e-6))
    fns = {"ours": ours, "eager": eager}
    if not smoke:  # compiling takes longer than the whole smoke run
        fns["compiled"] = torch.compile(eager)
    rows = ["| rows x width | ours GB/s | eager GB/s | compiled GB/s | ours / eager | ours / compiled | max abs diff |",
            "|---|---|---|---|---|---|---|"]
    for M, N in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(M, N, device=device, dtype=dtype, generator=g).requires_grad_()
        dy = torch.randn(M, N, device=device, dtype=dtype, generator=g)
        with torch.no_grad():
            diff = (fns["ours"](x).float() - eager(x).float()).abs().max().item()
        nbytes = 5 * x.numel() * x.element_size()
        gbs = {name: nbytes / timeit(lambda f=f: torch.autograd.grad(f(x), x, dy), smoke) / 1e9 for name, f in fns.items()}
        compiled = gbs.get("compiled")
        compiled_cells = ("n/a", "n/a") if compiled is None else (f"{compiled:.1f}", f"{gbs['ours'] / compiled:.2f}x")
        rows.append(f"| {M} x {N} | {gbs['ours']:.1f} | {gbs['eager']:.1f} | {compiled_cells[0]} | "
                    f"{gbs['ours'] / gbs['eager']:.2f}x | {compiled_cells[1]} | {diff:.1e} |")
    return rows


@contextlib.contextmanager
def _launches_skipped():
    """Our ops take their Triton path on CPU tensors, with every kernel launch a no-op (no GPU to launch on)."""
    class Skip:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    kernels.register_ops()  # the Triton path calls the custom ops, which a CPU-only torch makes on first use
    saved = rmsnorm.wrap_triton, attention.wrap_triton, ropenorm.wrap_triton, dispatch._triton_on_cpu
    rmsnorm.wrap_triton = attention.wrap_triton = ropenorm.wrap_triton = Skip
    dispatch._triton_on_cpu = True
    try:
        yield
    finally:
        rmsnorm.wrap_triton, attention.wrap_triton, ropenorm.wrap_triton, dispatch._triton_on_cpu = saved


def launch_overhead(device, smoke: bool) -> list[str]:
    """Rows: microseconds of host time per call of each op's eager path (see the top of this file)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    calls, repeats = (20, 3) if smoke else (200, 5)
    x = torch.randn(64, 128, device=device, requires_grad=True)  # 64 rows of a QK-norm: a few us of GPU work
    dy = torch.randn_like(x)
    q = torch.randn(1, 2, 16, 64, device=device, requires_grad=True)
    dout = torch.randn_like(q)
    q16 = q.detach().to(torch.bfloat16).requires_grad_()
    dout16 = dout.to(torch.bfloat16)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    heads = x.detach().view(1, 16, 4, 128).requires_grad_()  # the same 64 rows as 16 positions of 4 heads
    cos, sin = rope_tables(16, 128, device)
    paths = {  # name: (op, its input, the output's gradient)
        "F.rms_norm": (lambda t: F.rms_norm(t, (128,), eps=1e-6), x, dy),
        "ours via kernels.rms_norm (autograd.Function)": (lambda t: rmsnorm._EagerRMSNorm.apply(t, 1e-6), x, dy),
        "ours via kernels.rms_norm_op (custom op)": (lambda t: kernels.rms_norm_op(t, 1e-6)[0], x, dy),
        "gpt.py's RoPE + QK-norm + gain": (lambda t: rope_composition(t, cos, sin, 1e-6, 1.2), heads, dy.view_as(heads)),
        "ours via kernels.rope_norm_op (custom op)": (
            lambda t: kernels.rope_norm_op(t, cos, sin, 1e-6, 1.2), heads, dy.view_as(heads)),
        "F.scaled_dot_product_attention": (lambda t: sdpa(t, t, t), q, dout),
        "ours via kernels.flash_attn (custom op)": (lambda t: kernels.flash_attn(t, t, t), q, dout),
        # bf16: on a Hopper the launches go through triton.autotune (its key looked up per launch)
        "ours via kernels.flash_attn_op, bf16": (lambda t: kernels.flash_attn_op(t, t, t, -1)[0], q16, dout16),
    }

    def per_call(fn) -> float:
        fn()  # warm-up (and the JIT compiles on a GPU)
        best = float("inf")
        for _ in range(repeats):
            if on_gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            if on_gpu:
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t) / calls)
        return best * 1e6

    where = ("wall time per call over %d calls, tiny inputs (host-bound)" % calls if on_gpu else
             "CPU, our Triton launches replaced by a no-op: custom-op, autograd and launcher Python only; "
             "PyTorch's rows include their (tiny) CPU compute")
    rows = [f"Microseconds per call, best of {repeats}; {where}. RMSNorm 64 x 128 (as RoPE + QK-norm: 16 positions of 4 heads), attention (1, 2, 16, 64).", "",
            "| path | forward | forward+backward |", "|---|---:|---:|"]
    with contextlib.nullcontext() if on_gpu else _launches_skipped():
        for name, (op, t, grad) in paths.items():
            fwd = per_call(lambda: op(t))
            fwd_bwd = per_call(lambda: torch.autograd.grad(op(t), t, grad))
            rows.append(f"| {name} | {fwd:.0f} | {fwd_bwd:.0f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes (automatic when CUDA is unavailable)")
    args = parser.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    print(f"# nanoschnack kernel benchmark ({'CPU smoke run' if smoke else 'GPU'})\n")
    print(f"Machine: {machine()}")
    path = "Triton" if kernels.use_triton(torch.empty(0, device=device)) else "PyTorch reference path"
    print(f"Our ops run: {path}" + (f" ({kernels.REFERENCE_ENV}=1)" if os.environ.get(kernels.REFERENCE_ENV) == "1" else ""))
    print(f"\n## Causal attention, TFLOP/s ({'fp32' if smoke else 'bf16'})\n")
    print("\n".join(bench_attention(smoke, device)))
    print(f"\n## RMSNorm forward+backward, GB/s ({'fp32' if smoke else 'bf16'})\n")
    print("\n".join(bench_rms_norm(smoke, device)))
    print("\n## Launch overhead, microseconds per call\n")
    print("\n".join(launch_overhead(device, smoke)))
    print(f"\n({time.time() - started:.1f} s)")


if __name__ == "__main__":
    main()
