"""
bench/gpu.py's normalisation rows: RMSNorm, and RoPE + QK-norm + gain fused
(kernels/ropenorm.py) against the composition gpt.py runs without it, eager and
compiled by Inductor. Correctness against the fp32 references (norm_errors,
rope_norm_errors), speed in GB/s of the bytes each op must move at least.
"""
import torch
import torch.nn.functional as F

import gpt
import kernels
from bench.gpu_runner import case, max_err, timeit
from kernels import rmsnorm, ropenorm

NORM_TOL = {torch.bfloat16: (8e-3, 1.6e-2), torch.float32: (1e-5, 1e-5)}  # as in tests/test_kernels.py


def _checked(got: list, want: list, dtype) -> tuple[list, bool]:
    results = [max_err(a, b, NORM_TOL[dtype]) for a, b in zip(got, want)]
    return [e for e, _ in results], all(ok for _, ok in results)


def norm_errors(fn, shape, dtype, device):
    """Max errors of y and dx of fn(x) against the fp32 RMSNorm reference, and whether both pass."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device, dtype)
    x32 = x.detach().float()
    ref_y, ref_rstd = rmsnorm._reference_fwd(x32, gpt.NORM_EPS)
    ref_dx = rmsnorm._reference_bwd(dy.float(), x32, ref_rstd)
    y = fn(x)
    return _checked([y, *torch.autograd.grad(y, x, dy)], [ref_y, ref_dx], dtype)


def rope_tables(T: int, D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt.py's cos and sin for T positions, as the (T, D/2) views kernels.rope_norm takes."""
    cos, sin = gpt.rotary_tables(T, D, gpt.GPTConfig.rotary_base, device=device)
    return cos[0, :, 0], sin[0, :, 0]


def rope_composition(x, cos, sin, eps, gain):
    """gpt.py's three steps with PyTorch's own ops (gpt.apply_rotary, F.rms_norm, the gain), on (T, D/2) tables:
    the baseline the fused op is timed against."""
    y = F.rms_norm(gpt.apply_rotary(x, cos[None, :, None], sin[None, :, None]), (x.shape[-1],), eps=eps)
    return y * gain


def rope_norm_errors(fn, shape, dtype, device, gain=1.2):
    """Max errors of y and dx of fn(x, cos, sin, gain) for x (B, T, H, D) against the fp32 reference."""
    B, T, H, D = shape
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device, dtype)
    cos, sin = rope_tables(T, D, device)
    x32 = x.detach().float()
    ref_y = ropenorm._reference_fwd(x32, cos, sin, gpt.NORM_EPS, gain)
    ref_dx = ropenorm._reference_bwd(dy.float(), x32, cos, sin, gpt.NORM_EPS, gain)
    y = fn(x, cos, sin, gain)
    return _checked([y, *torch.autograd.grad(y, x, dy)], [ref_y, ref_dx], dtype)


def _gbs_cells(fns: dict, x, dy, nbytes: int, forward_only: bool, smoke: bool) -> dict:
    """{name: GB/s} of each fn(x), forward only or forward+backward with dy."""
    def run(f):
        if forward_only:
            with torch.no_grad():
                return f(x)
        return torch.autograd.grad(f(x), x, dy)
    return {name: nbytes / timeit(lambda f=f: run(f), smoke) / 1e9 for name, f in fns.items()}


def _passes(x) -> list[tuple[str, int, bool]]:
    """(label, bytes moved at least, forward only): forward reads x and writes y; backward reads x and dy, writes dx."""
    n = x.numel() * x.element_size()
    return [("fwd+bwd", 5 * n, False), ("fwd", 2 * n, True)]


def rms_norm_speed(args, device):
    dtype = torch.float32 if args.smoke else torch.bfloat16
    # d12/d20's residual stream and QK-norm (heads of 128) at 64K tokens (their micro-batch),
    # and a QK-norm at 8K tokens: the rows kernels/dispatch.py's rule rests on, and those it lacks
    shapes = ([(64, 256), (256, 64)] if args.smoke else [(65536, 768), (655360, 128), (81920, 128)] if args.quick
              else [(65536, 768), (65536, 1280), (655360, 128), (393216, 128), (81920, 128)])
    eps = gpt.NORM_EPS
    eager = lambda x: F.rms_norm(x, (x.shape[-1],), eps=eps)
    # ours: kernels.rms_norm's eager path to our kernel, at every width (in the smoke run kernels.rms_norm
    # itself, which is F.rms_norm there: the smoke run checks that the code runs, not the interpreter's speed)
    fns = {"ours": kernels.rms_norm if args.smoke else lambda x: rmsnorm._EagerRMSNorm.apply(x, eps),
           "ours (custom op)": lambda x: kernels.rms_norm_op(x, eps)[0],
           "eager F.rms_norm": eager}
    if not args.smoke:
        fns["ours compiled"] = torch.compile(lambda x: kernels.rms_norm_op(x, eps)[0])
        fns["compiled F.rms_norm"] = torch.compile(eager)
    yield ("Bytes: forward reads x and writes y (2 x numel x element size); forward+backward also reads x "
           "and dy and writes dx (5 x). \"ours\" is what kernels.rms_norm runs where it picks our kernel.")
    yield ""
    yield "| rows x width | pass | " + " | ".join(f"{n} GB/s" for n in fns) + " | ours / best PyTorch |"
    yield "|---|---|" + "---:|" * (len(fns) + 1)
    for M, N in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(M, N, device=device, dtype=dtype, generator=g).requires_grad_()
        dy = torch.randn(M, N, device=device, dtype=dtype, generator=g)
        for label, nbytes, forward_only in _passes(x):
            def measure():
                gbs = _gbs_cells(fns, x, dy, nbytes, forward_only, args.smoke)
                best = max(v for n, v in gbs.items() if "F.rms_norm" in n)
                return [f"{v:.1f}" for v in gbs.values()] + [f"{gbs['ours'] / best:.2f}x"]
            yield case(args, [f"{M} x {N}", label], measure)


def rope_norm_speed(args, device):
    dtype = torch.float32 if args.smoke else torch.bfloat16
    # q of d20 (10 heads) and d12 (6 heads) at train.py's micro-batch, 32 x 2048 tokens, heads of 128;
    # and GQA's k at D 64 (2 heads)
    shapes = ([(2, 16, 2, 64)] if args.smoke else [(32, 2048, 10, 128)] if args.quick
              else [(32, 2048, 10, 128), (32, 2048, 6, 128), (32, 2048, 2, 64)])
    eps = gpt.NORM_EPS
    composition = lambda x, cos, sin, gain: rope_composition(x, cos, sin, eps, gain)
    fns = {"ours": lambda x, cos, sin, gain: kernels.rope_norm_op(x, cos, sin, eps, gain),
           "eager composition": composition}
    if not args.smoke:
        fns["ours compiled"] = torch.compile(fns["ours"])
        fns["compiled composition"] = torch.compile(composition)
    yield ("gain * RMSNorm(RoPE(x)) over heads of x (B, T, H, D): our fused op (kernels/ropenorm.py, what gpt.py runs "
           f"with {kernels.FUSED_ROPE_NORM_ENV}=1) against gpt.py's composition (gpt.apply_rotary, F.rms_norm, the gain), "
           "eager and compiled by Inductor. Bytes: at least 2 x numel x element size forward, 5 x forward+backward.")
    yield ""
    yield "| B x T x H x D | pass | " + " | ".join(f"{n} GB/s" for n in fns) + " | ours / best PyTorch |"
    yield "|---|---|" + "---:|" * (len(fns) + 1)
    for B, T, H, D in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
        dy = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
        cos, sin = rope_tables(T, D, device)
        bound = {name: (lambda x, f=f: f(x, cos, sin, 1.2)) for name, f in fns.items()}
        for label, nbytes, forward_only in _passes(x):
            def measure():
                gbs = _gbs_cells(bound, x, dy, nbytes, forward_only, args.smoke)
                best = max(v for n, v in gbs.items() if "composition" in n)
                ours = max(v for n, v in gbs.items() if n.startswith("ours"))
                return [f"{v:.1f}" for v in gbs.values()] + [f"{ours / best:.2f}x"]
            yield case(args, [f"{B} x {T} x {H} x {D}", label], measure)
