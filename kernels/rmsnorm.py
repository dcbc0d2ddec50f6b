"""
Fused RMSNorm in Triton, forward and backward, without a learnable weight.

    y = x * rstd,   rstd = 1 / sqrt(mean(x^2) + eps)      (over the last dim)

Forward reads x once and writes y, and saves rstd (one fp32 per row) for the
backward, which then needs no second reduction over x^2:

    dx = rstd * (dy - x_hat * mean(dy * x_hat)),   x_hat = x * rstd

Every row is independent (no weight means no gradient summed over rows), so one
program handles a block of whole rows: several short rows per program for the
QK-norm over a head dim of 64/128, one long row for the residual stream.
Math is fp32 whatever the input dtype; outputs take the input dtype.

Custom ops `nanoschnack::rms_norm(x, eps) -> (y, rstd)` and
`nanoschnack::rms_norm_backward(dy, x, rstd) -> dx` dispatch like the attention
ops (kernels/dispatch.py): Triton on CUDA; elsewhere the model's rms_norm() calls
torch's F.rms_norm, and the ops themselves run the PyTorch reference (the tests' oracle).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kernels.dispatch import use_triton


@triton.jit
def _row_tile(n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """This program's rows, the in-bounds mask of its tile, and the tile's element offsets."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    return rows, mask, offs


@triton.jit
def _rms_norm_fwd_kernel(X, Y, RSTD, n_rows, n_cols, eps,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows, mask, offs = _row_tile(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    # eps cast to fp32: torch.compile's Inductor passes a Python float as fp64, which
    # would pull the whole rstd computation into fp64 (an eager launch passes fp32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / n_cols + tl.cast(eps, tl.float32))
    tl.store(Y + offs, (x * rstd[:, None]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, RSTD, DX, n_rows, n_cols,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows, mask, offs = _row_tile(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
    x_hat = x * rstd[:, None]
    c = tl.sum(dy * x_hat, 1) / n_cols
    dx = rstd[:, None] * (dy - x_hat * c[:, None])
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _launch_config(n_cols: int, device: torch.device) -> dict:
    """Whole rows per program, about 4K elements (16 KB of fp32) per program on the GPU."""
    block_cols = triton.next_power_of_2(n_cols)
    budget = 4096 if device.type == "cuda" else 256  # the interpreter: small tiles, so tests cross tile edges
    block_rows = max(1, budget // block_cols)
    cfg = dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    if device.type == "cuda":
        cfg["num_warps"] = max(1, min(16, block_rows * block_cols // 512))
    return cfg


def _triton_fwd(x, eps):
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    n_rows, n_cols = x2d.shape
    y = torch.empty_like(x2d)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    cfg = _launch_config(n_cols, x.device)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_ROWS"]),)
    wrap_triton(_rms_norm_fwd_kernel)[grid](x2d, y, rstd, n_rows, n_cols, eps, **cfg)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def _triton_bwd(dy, x, rstd):
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    dy2d = dy.reshape(-1, dy.shape[-1]).contiguous()
    n_rows, n_cols = x2d.shape
    dx = torch.empty_like(x2d)
    cfg = _launch_config(n_cols, x.device)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_ROWS"]),)
    wrap_triton(_rms_norm_bwd_kernel)[grid](dy2d, x2d, rstd.contiguous(), dx, n_rows, n_cols, **cfg)
    return dx.view(x.shape)


def _reference_fwd(x, eps):
    compute = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(compute)
    rstd = torch.rsqrt(x32.square().mean(-1) + eps)
    return (x32 * rstd.unsqueeze(-1)).to(x.dtype), rstd


def _reference_bwd(dy, x, rstd):
    compute = rstd.dtype
    x_hat = x.to(compute) * rstd.unsqueeze(-1)
    dy32 = dy.to(compute)
    c = (dy32 * x_hat).mean(-1, keepdim=True)
    return (rstd.unsqueeze(-1) * (dy32 - x_hat * c)).to(x.dtype)


@triton_op("nanoschnack::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, no weight: x (..., N) -> y (..., N), rstd (...) in fp32."""
    if use_triton(x):
        torch._check(x.dtype in (torch.float16, torch.bfloat16, torch.float32), lambda: f"the Triton kernel takes fp16, bf16 or fp32, got {x.dtype}")
        return _triton_fwd(x, eps)
    return _reference_fwd(x, eps)


@triton_op("nanoschnack::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Gradient dx of rms_norm, given dy, its input x and the saved rstd."""
    if use_triton(x):
        return _triton_bwd(dy, x, rstd)
    return _reference_bwd(dy, x, rstd)


def _setup_context(ctx, inputs, output):
    x, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, rstd)
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, dy, drstd):
    x, rstd = ctx.saved_tensors
    return rms_norm_backward_op(dy, x, rstd), None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable RMSNorm over the last dim, without a learnable weight."""
    if not use_triton(x):  # torch's own (kernels/dispatch.py)
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    y, _ = rms_norm_op(x, eps)
    return y
