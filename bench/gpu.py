"""
One command for a person with one H100/H200: are the kernels right on the
hardware, how fast are they, and what do they buy a training run?

    python bench/gpu.py              # the full run (meant to finish in under 8 minutes), appended to bench/RESULTS.md
    python bench/gpu.py --smoke      # CPU smoke run: tiny shapes, seconds, nothing appended (tests/test_bench_gpu.py)
    python bench/gpu.py --sections correctness,speed   # a subset

Sections (each catches its own failure and reports it, so the others' numbers survive):

  correctness  our attention (forward and backward) and RMSNorm on the GPU against
               the fp32 PyTorch reference, bf16, D 64/128, MHA/GQA, ragged T,
               eagerly and inside torch.compile(fullgraph=True). Tolerances are
               tests/test_kernels.py's for bf16.
  speed        attention forward and forward+backward TFLOP/s, causal, bf16, D 128,
               T 2048 and 4096, against every SDPA backend that runs (flash, cuDNN,
               efficient) and the flash_attn package if installed; RMSNorm
               forward+backward GB/s against eager and compiled F.rms_norm.
  train        d12 and d20 at train.py's defaults (T 2048, 32 sequences a device),
               compiled, one GPU: tokens/s, MFU and peak memory over --train-steps
               steps after warm-up, with our kernels and with PyTorch's own
               (F.scaled_dot_product_attention + F.rms_norm, both fused by
               torch.compile: what NANOSCHNACK_REFERENCE_KERNELS=1 selects).
  run          a short real d12 run whose loss must fall: counting sequences
               (token t+1 = token t + 1 mod 1024, a fresh random start per row and
               step), so there is something to learn and no data files are needed.
  decode       KV-cache generation tokens/s (gpt.GPT.generate), d12, bf16 autocast.

In --smoke the same code runs on the CPU at toy sizes: the nano model, fp32, no
torch.compile, SDPA backends and flash_attn reported as n/a. The correctness
section runs Triton through its interpreter when TRITON_INTERPRET=1, the other
sections (where the interpreter would only be slow) the ops' reference path.
"""
import argparse
import math
import os
import platform
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: the repo root holds kernels/ and gpt.py

import torch
import torch.nn.functional as F

import common
import gpt
import kernels
import train
from kernels import attention, rmsnorm

SECTIONS = ["correctness", "speed", "train", "run", "decode"]
ATTN_TOL = {torch.bfloat16: (3e-2, 3e-2), torch.float32: (2e-5, 1e-4)}  # as in tests/test_kernels.py
NORM_TOL = {torch.bfloat16: (8e-3, 1.6e-2), torch.float32: (1e-5, 1e-5)}


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


def timeit(fn, smoke: bool) -> float:
    """Seconds per call: CUDA-event timing via triton.testing.do_bench on the GPU, one call on the CPU."""
    if not smoke:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100) / 1e3
    fn()  # warm-up; then one timed call, the smoke run only checks that the code runs
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------
# correctness


def max_err(got, want, tol) -> tuple[float, bool]:
    """Largest |got - want| and whether every element is within atol + rtol * |want|."""
    got, want = got.double().cpu(), want.double().cpu()
    diff = (got - want).abs()
    atol, rtol = tol
    return diff.max().item(), bool((diff <= atol + rtol * want.abs()).all())


def attention_errors(fn, B, H, H_kv, T, D, dtype, device):
    """Max errors of out, dq, dk, dv of fn(q, k, v) against the fp32 reference, and whether all pass."""
    g = torch.Generator().manual_seed(0)
    make = lambda h: torch.randn(B, T, h, D, generator=g).to(device, dtype).transpose(1, 2)  # the model's layout
    q, k, v, dout = make(H), make(H_kv), make(H_kv), make(H)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention._reference_fwd(q32, k32, v32)
    ref = (ref_out, *attention._reference_bwd(dout.float(), q32, k32, v32, ref_out, ref_lse))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    got = (out, *torch.autograd.grad(out, (q, k, v), dout))
    results = [max_err(a, b, ATTN_TOL[dtype]) for a, b in zip(got, ref)]
    return [e for e, _ in results], all(ok for _, ok in results)


def norm_errors(fn, shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device, dtype)
    x32 = x.detach().float()
    ref_y, ref_rstd = rmsnorm._reference_fwd(x32, gpt.NORM_EPS)
    ref_dx = rmsnorm._reference_bwd(dy.float(), x32, ref_rstd)
    y = fn(x)
    dx, = torch.autograd.grad(y, x, dy)
    results = [max_err(y, ref_y, NORM_TOL[dtype]), max_err(dx, ref_dx, NORM_TOL[dtype])]
    return [e for e, _ in results], all(ok for _, ok in results)


def section_correctness(args, device) -> list[str]:
    dtype = torch.float32 if args.smoke else torch.bfloat16
    attn_shapes = ([(1, 2, 2, 33, 64), (1, 4, 2, 40, 128)] if args.smoke else
                   [(2, 8, 8, 1000, 64), (2, 8, 2, 1000, 64), (2, 10, 10, 2048, 128), (1, 8, 2, 4093, 128)])
    norm_shapes = [(7, 64), (3, 5, 100)] if args.smoke else [(4096, 768), (4096, 1280), (2, 2048, 10, 128), (999, 64)]
    flash = lambda q, k, v: kernels.flash_attn(q, k, v)
    norm = lambda x: kernels.rms_norm(x, gpt.NORM_EPS)
    modes = {"eager": (flash, norm)}
    if not args.smoke:  # compiling takes longer than the whole smoke run
        modes["compiled"] = (torch.compile(flash, fullgraph=True), torch.compile(norm, fullgraph=True))
    rows = [f"Against the fp32 PyTorch reference; {str(dtype)[6:]} inputs; tolerances (atol, rtol) "
            f"attention {ATTN_TOL[dtype]}, RMSNorm {NORM_TOL[dtype]}.", "",
            "| op | shape | mode | max abs err | ok |", "|---|---|---|---|---|"]
    with our_path(args.smoke):
        for mode, (attn_fn, norm_fn) in modes.items():
            for B, H, H_kv, T, D in attn_shapes:
                errs, ok = attention_errors(attn_fn, B, H, H_kv, T, D, dtype, device)
                shape = f"B{B} H{H} Hkv{H_kv} T{T} D{D}"
                rows.append(f"| attention out/dq/dk/dv | {shape} | {mode} | {' / '.join(f'{e:.1e}' for e in errs)} | {_ok(ok)} |")
            for shape in norm_shapes:
                errs, ok = norm_errors(norm_fn, shape, dtype, device)
                rows.append(f"| rms_norm y/dx | {'x'.join(map(str, shape))} | {mode} | {' / '.join(f'{e:.1e}' for e in errs)} | {_ok(ok)} |")
    return rows


def _ok(ok: bool) -> str:
    return "yes" if ok else "**NO**"


# ----------------------------------------------------------------------------
# speed


def attention_contenders(smoke: bool) -> dict:
    """name -> (context, fn(q, k, v)) for every implementation to time; some may not run here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    contenders = {"ours": (nullcontext, kernels.flash_attn)}
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


def section_attention_speed(args, device) -> list[str]:
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = [(64, 64)] if args.smoke else [(2048, 128), (4096, 128)]
    tokens, width = (64, 128) if args.smoke else (16384, 2048)  # B*T tokens, H*D width (as bench/kernels.py)
    contenders = attention_contenders(args.smoke)
    rows = [f"Causal, {str(dtype)[6:]}, B*T = {tokens} tokens, H = {width} / D heads. FLOPs: forward "
            "4*B*H*T^2*D / 2 (the causal half), backward 2.5x that.", "",
            "| T | D | pass | " + " | ".join(contenders) + " | ours / best other |",
            "|---|---|---|" + "---:|" * (len(contenders) + 1)]
    for T, D in shapes:
        B, H = max(1, tokens // T), width // D
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        flops_fwd = 4 * B * H * T * T * D / 2
        for label, flops in (("fwd", flops_fwd), ("fwd+bwd", 3.5 * flops_fwd)):
            speed = {}
            for name, contender in contenders.items():
                speed[name] = None if contender is None else _tflops(contender, label, flops, q, k, v, dout, args.smoke)
            others = [s for n, s in speed.items() if n != "ours" and s is not None]
            ratio = f"{speed['ours'] / max(others):.2f}x" if others and speed["ours"] else "n/a"
            rows.append(f"| {T} | {D} | {label} | " + " | ".join(_cell(s, args.smoke) for s in speed.values()) + f" | {ratio} |")
    return rows


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


def section_rms_norm_speed(args, device) -> list[str]:
    dtype = torch.float32 if args.smoke else torch.bfloat16
    # the residual stream of d12 and d20, and QK-norm (heads of 128), at 64K tokens (d12/d20's micro-batch)
    shapes = [(64, 256), (256, 64)] if args.smoke else [(65536, 768), (65536, 1280), (655360, 128)]
    eager = lambda x: F.rms_norm(x, (x.shape[-1],), eps=gpt.NORM_EPS)
    fns = {"ours": lambda x: kernels.rms_norm(x, gpt.NORM_EPS), "eager F.rms_norm": eager}
    if not args.smoke:
        fns["compiled F.rms_norm"] = torch.compile(eager)
    rows = ["Forward+backward; bytes: x read twice, y written, dy read, dx written = 5 x numel x element size.", "",
            "| rows x width | " + " | ".join(f"{n} GB/s" for n in fns) + " | ours / best other |",
            "|---|" + "---:|" * (len(fns) + 1)]
    for M, N in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(M, N, device=device, dtype=dtype, generator=g).requires_grad_()
        dy = torch.randn(M, N, device=device, dtype=dtype, generator=g)
        nbytes = 5 * x.numel() * x.element_size()
        gbs = {name: nbytes / timeit(lambda f=f: torch.autograd.grad(f(x), x, dy), args.smoke) / 1e9
               for name, f in fns.items()}
        best_other = max(v for n, v in gbs.items() if n != "ours")
        rows.append(f"| {M} x {N} | " + " | ".join(f"{v:.1f}" for v in gbs.values()) + f" | {gbs['ours'] / best_other:.2f}x |")
    return rows


# ----------------------------------------------------------------------------
# training


def train_api():
    """train.py's configuration and step, common.py's optimizer recipe."""
    return train.TrainConfig(), common.build_optimizers, train.train_step, train.PEAK_FLOPS


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


def variant_context(variant: str):
    """ours: Triton; pytorch: gpt.py's flash_attn/rms_norm call torch's SDPA and F.rms_norm (kernels/dispatch.py)."""
    return nullcontext() if variant == "ours" else _env(kernels.REFERENCE_ENV, "1")


class _env:
    def __init__(self, key, value):
        self.key, self.value = key, value

    def __enter__(self):
        self.saved = os.environ.get(self.key)
        os.environ[self.key] = self.value

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(self.key, None)
        else:
            os.environ[self.key] = self.saved


def measure_training(preset: str, variant: str, args, device) -> dict:
    """tokens/s, MFU and peak memory of `steps` compiled train steps after `warmup` ones."""
    cfg, build_optimizers, train_step, peak_flops = train_api()
    seq_len, batch = (64, 2) if args.smoke else (cfg.seq_len, cfg.device_batch_size)
    torch._dynamo.reset()  # a fresh graph: the ops' path is baked in at trace time
    model = build(preset, seq_len, device)
    optimizers = build_optimizers(model, cfg)
    compiled = model if args.smoke else torch.compile(model)
    g = torch.Generator().manual_seed(0)
    with variant_context(variant):
        for _ in range(args.warmup):
            train_step(compiled, optimizers, [counting_batch(batch, seq_len, device, model.config.vocab_size, g)], 1.0, device)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.train_steps):
            loss = train_step(compiled, optimizers, [counting_batch(batch, seq_len, device, model.config.vocab_size, g)],
                              1.0, device)
        sync(device)
        seconds = time.perf_counter() - t
    tokens_per_s = args.train_steps * batch * seq_len / seconds
    peak = next((v for k, v in peak_flops.items() if k in torch.cuda.get_device_name(0)), None) if device.type == "cuda" else None
    result = dict(tokens_per_s=tokens_per_s, seq_len=seq_len, batch=batch, loss=loss,
                  mfu=model.flops_per_token() * tokens_per_s / peak if peak else None,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
    del model, compiled, optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def section_train(args, device) -> list[str]:
    presets = ["nano"] if args.smoke else args.train_presets.split(",")
    variants = ["ours", "pytorch"]
    rows = [f"{args.train_steps} steps after {args.warmup} warm-up steps, one micro-batch per step, "
            f"{'no torch.compile (smoke)' if args.smoke else 'torch.compile, bf16 autocast'}; counting-sequence data. "
            "Baseline: torch's SDPA + F.rms_norm.", "",
            "| model | T x batch | kernels | tokens/s | MFU | peak memory GiB | ours / baseline |",
            "|---|---|---|---:|---:|---:|---:|"]
    for preset in presets:
        results = {}
        for variant in variants:
            try:
                results[variant] = measure_training(preset, variant, args, device)
            except Exception as e:  # e.g. out of memory: report it, keep the other rows
                rows.append(f"| {preset} | | {variant} | FAILED: {_one_line(e)} | | | |")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for variant, r in results.items():
            ratio = (f"{results['ours']['tokens_per_s'] / r['tokens_per_s']:.2f}x"
                     if variant != "ours" and "ours" in results else "")
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            rows.append(f"| {preset} | {r['seq_len']} x {r['batch']} | {variant} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} | {ratio} |")
    return rows


def section_run(args, device) -> list[str]:
    """A short real run: loss must fall on counting sequences."""
    cfg, build_optimizers, train_step, _ = train_api()
    preset, seq_len, batch, steps = ("nano", 64, 4, 30) if args.smoke else ("d12", 512, 16, args.run_steps)
    model = build(preset, seq_len, device)
    optimizers = build_optimizers(model, cfg)
    g = torch.Generator().manual_seed(1)
    losses = []
    t = time.perf_counter()
    for step in range(steps):
        lr_mult = min(1.0, 2 * (steps - step) / steps)  # flat, then a linear warmdown over the second half
        batches = [counting_batch(batch, seq_len, device, model.config.vocab_size, g)]
        losses.append(train_step(model, optimizers, batches, lr_mult, device))
    seconds = time.perf_counter() - t
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    falls = last < 0.5 * first
    rows = [f"{preset}, {steps} steps of {batch} x {seq_len} counting-sequence tokens "
            f"(period {min(1024, model.config.vocab_size)}), eager, our kernels, "
            f"{seconds:.0f} s. Loss starts at ln(vocab) = {math.log(model.config.vocab_size):.2f} "
            "(zero-initialised lm_head); it must fall below half of that.", "",
            "| steps 1-5 mean loss | last 5 mean loss | losses every 10% | falls |", "|---:|---:|---|---|",
            f"| {first:.3f} | {last:.3f} | {' '.join(f'{l:.2f}' for l in losses[::max(1, steps // 10)])} | {_ok(falls)} |"]
    return rows


def section_decode(args, device) -> list[str]:
    preset, prompt_len, new = ("nano", 8, 16) if args.smoke else ("d12", 16, 256)
    model = build(preset, 2048, device).eval()
    with torch.no_grad():  # random weights instead of init_weights' zero lm_head, so the tokens vary
        model.lm_head.weight.normal_(0, 0.02)
    prompt = list(range(1, prompt_len + 1))
    rows = ["| model | prompt | new tokens | decode tokens/s (after prefill) |", "|---|---:|---:|---:|"]
    for _ in model.generate(prompt, 4, temperature=0.0):  # warm-up
        pass
    stream = model.generate(prompt, new, temperature=0.0)
    next(stream)  # prefill and the first token
    sync(device)
    t = time.perf_counter()
    n = sum(1 for _ in stream)
    sync(device)
    rows.append(f"| {preset} | {prompt_len} | {n} | {n / (time.perf_counter() - t):,.0f} |")
    return rows


# ----------------------------------------------------------------------------
# the report


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def run_section(title: str, fn, args, device) -> list[str]:
    """The section's markdown; on failure, the error instead, so the other sections still report."""
    started = time.time()
    try:
        body = fn(args, device)
    except Exception as e:
        traceback.print_exc()
        body = [f"**FAILED**: `{_one_line(e)}` (traceback on stderr)"]
    return [f"### {title}", "", *body, "", f"({time.time() - started:.0f} s)", ""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run at toy sizes (seconds)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--train-presets", default="d12,d20")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="train steps before timing (the first compiles)")
    parser.add_argument("--run-steps", type=int, default=300, help="steps of the short real d12 run")
    parser.add_argument("--append", action=argparse.BooleanOptionalAction, default=None,
                        help="append the report to bench/RESULTS.md (default: yes, except with --smoke)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_steps, args.warmup = min(args.train_steps, 2), min(args.warmup, 1)
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU smoke run")
    device = torch.device("cpu" if args.smoke else "cuda")
    wanted = args.sections.split(",")
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    started = time.time()
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = [f"## GPU check (`{command.strip()}`){' — CPU smoke run' if args.smoke else ''}", "",
              f"Device: {machine()}. Our ops run: {path_name(device, args.smoke)} in the correctness section, "
              f"{path_name(device, False)} elsewhere. {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    sections = {"correctness": ("Correctness on the device", section_correctness),
                "speed": ("Attention speed, TFLOP/s", section_attention_speed),
                "train": ("Training throughput, one GPU", section_train),
                "run": ("A short real run", section_run),
                "decode": ("KV-cache decode", section_decode)}
    for key in SECTIONS:
        if key in wanted:
            title, fn = sections[key]
            report += run_section(title, fn, args, device)
            if key == "speed":
                report += run_section("RMSNorm speed, GB/s", section_rms_norm_speed, args, device)
    report.append(f"Total {time.time() - started:.0f} s.")
    text = "\n".join(report)
    print(text)
    if args.append if args.append is not None else not args.smoke:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")
        print(f"\n(appended to {args.results})")


if __name__ == "__main__":
    main()
