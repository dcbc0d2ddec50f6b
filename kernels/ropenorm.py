"""
Rotary embedding, QK-norm and the QK gain in one Triton kernel, forward and backward.

For one head's row x of D = 2 * HALF elements at position t (cos, sin: the (T, HALF)
fp32 tables; the pairs are (x[i], x[i + HALF]), as gpt.apply_rotary pairs them):

    r1 = x1 * cos_t + x2 * sin_t,   r2 = x2 * cos_t - x1 * sin_t      (rotate)
    y  = gain * r * rstd,           rstd = 1 / sqrt(mean(r^2) + eps)  (RMSNorm over D, no weight)

Why. Inductor compiles gpt.py's three steps (apply_rotary, norm, * qk_gain) into
kernels that write the rotated r and read it again for the norm: 8 bytes moved per
bf16 element forward, where reading x and writing y is 4. Here everything between
the load of x and the store of y stays in registers, in fp32 (the composition rounds
r to x's dtype in between; this kernel does not, so its outputs are the fp32 math
rounded once).

Backward. Nothing is saved but x (and the tables): the backward recomputes r and
rstd from x, one more reduction over D on data it loads anyway, where saving r
would cost a tensor the size of x written and read, and rstd one fp32 per row.

    r_hat = r * rstd,   dr = gain * rstd * (dy - r_hat * mean(dy * r_hat))
    dx1 = dr1 * cos_t - dr2 * sin_t,   dx2 = dr1 * sin_t + dr2 * cos_t   (the rotation's transpose)

Layout. x is (B, T, H, D), viewed as contiguous rows (B*T*H, D), so row r is at
position t = (r // H) % T. H and T are runtime ints (T changes under dynamic shapes);
the width is a constexpr, as in kernels/rmsnorm.py (which says why: 16-byte accesses).

Custom ops `nanoschnack::rope_norm(x, cos, sin, eps, gain) -> y` and
`nanoschnack::rope_norm_backward(dy, x, cos, sin, eps, gain) -> dx`: Triton where
use_triton(x), the PyTorch reference (the tests' oracle) elsewhere. rope_norm()
runs them only with NANOSCHNACK_FUSED_ROPE_NORM=1 (kernels/dispatch.py,
use_fused_rope_norm: not yet measured on a GPU), gpt.py's composition otherwise.
"""
import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from kernels.dispatch import ops_on_first_use, use_fused_rope_norm, use_triton
from kernels.rmsnorm import rms_norm, whole_rows

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tile(n_rows, n_heads, seq_len, HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """This program's row mask, its x1 offsets (x2 is HALF further) and its rows' offsets into the tables.

    No pointer goes in: Inductor finds the tensors a kernel writes by following each store's address back
    through the ops that made it, and a pointer handed to the helper that made the offsets would count as
    written (it then copies such inputs before every launch, and back after)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, HALF)
    mask = (rows < n_rows)[:, None]  # whole rows: HALF is the exact width of a half, no column mask
    offs = rows[:, None].to(tl.int64) * (2 * HALF) + cols[None, :]
    # (r // H) % T is in [0, T) for every row, the masked ones too: the table loads need no mask
    t_offs = ((rows // n_heads) % seq_len)[:, None] * HALF + cols[None, :]
    return mask, offs, t_offs


@triton.jit
def _rotated(X, COS, SIN, mask, offs, t_offs, HALF: tl.constexpr):
    """x's tile rotated, (r1, r2) in fp32, and the tables' (cos, sin) for its rows.

    The tables are loaded a row at a time, as many bytes again as a bf16 x, but from cache, not HBM: the H
    rows of one position, neighbours in a tile, read the same table row, and the whole tables (T x D/2 x 2
    x 4 bytes: 1 MB at d20's T 2048) sit in L2 (50 MB on an H100) for every program."""
    c = tl.load(COS + t_offs)
    s = tl.load(SIN + t_offs)
    x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * c + x2 * s, x2 * c - x1 * s, c, s


@triton.jit
def _rstd(r1, r2, eps, HALF: tl.constexpr):
    # eps cast to fp32: Inductor passes a Python float as fp64, which would pull rstd into fp64
    return tl.math.rsqrt((tl.sum(r1 * r1, 1) + tl.sum(r2 * r2, 1)) / (2 * HALF) + tl.cast(eps, tl.float32))


@triton.jit
def _rope_norm_fwd_kernel(X, COS, SIN, Y, n_rows, n_heads, seq_len, eps, gain,
                          HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    mask, offs, t_offs = _tile(n_rows, n_heads, seq_len, HALF, BLOCK_ROWS)
    r1, r2, c, s = _rotated(X, COS, SIN, mask, offs, t_offs, HALF)
    scale = (_rstd(r1, r2, eps, HALF) * tl.cast(gain, tl.float32))[:, None]
    tl.store(Y + offs, (r1 * scale).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + offs + HALF, (r2 * scale).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_norm_bwd_kernel(DY, X, COS, SIN, DX, n_rows, n_heads, seq_len, eps, gain,
                          HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    mask, offs, t_offs = _tile(n_rows, n_heads, seq_len, HALF, BLOCK_ROWS)
    r1, r2, c, s = _rotated(X, COS, SIN, mask, offs, t_offs, HALF)
    rstd = _rstd(r1, r2, eps, HALF)[:, None]
    dy1 = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    dy2 = tl.load(DY + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    h1, h2 = r1 * rstd, r2 * rstd
    m = ((tl.sum(dy1 * h1, 1) + tl.sum(dy2 * h2, 1)) / (2 * HALF))[:, None]
    g = tl.cast(gain, tl.float32) * rstd
    dr1, dr2 = g * (dy1 - h1 * m), g * (dy2 - h2 * m)
    tl.store(DX + offs, (dr1 * c - dr2 * s).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + offs + HALF, (dr1 * s + dr2 * c).to(DX.dtype.element_ty), mask=mask)


@functools.cache
def _launch_config(head_dim: int, device_type: str) -> dict:
    """Whole rows per program; from Python ints only, cached per (D, device type).

    On the GPU about 4K elements per program (32 rows of 128, 64 of 64), as rmsnorm's: a bf16 tile of
    8 KB in, 8 KB out, enough bytes in flight per program for a memory-bound kernel, and few enough
    registers that the backward's six fp32 tiles (x, dy, cos, sin halves) do not spill (kernels/aot.py).
    num_warps = elements / 512: 8 warps, each thread holding 8 elements of each half, one 16-byte
    bf16 vector. In the interpreter (tests) small tiles of 512 elements, so that tests cross tile edges
    and the positions inside one tile differ.
    """
    return dict(HALF=head_dim // 2, **whole_rows(head_dim, device_type, interpreter_elements=512))


def _launch(kernel, x, tensors, scalars):
    """Launch `kernel` over the rows of x (B, T, H, D): its tensors, then the sizes, then its scalars."""
    B, T, H, D = x.shape
    cfg = _launch_config(int(D), x.device.type)  # int(): a guard on the width; rows, H and T stay symbols
    n_rows = B * T * H
    grid = ((n_rows + cfg["BLOCK_ROWS"] - 1) // cfg["BLOCK_ROWS"],)  # a ceiling division: no bit-twiddling
    wrap_triton(kernel)[grid](*tensors, n_rows, H, T, *scalars, **cfg)


def _triton_fwd(x, cos, sin, eps, gain):
    x = x.contiguous()  # no copy for gpt.py's q and k (views of a Linear's output)
    y = torch.empty_like(x)
    _launch(_rope_norm_fwd_kernel, x, (x, cos.contiguous(), sin.contiguous(), y), (eps, gain))
    return y


def _triton_bwd(dy, x, cos, sin, eps, gain):
    x = x.contiguous()
    dx = torch.empty_like(x)
    _launch(_rope_norm_bwd_kernel, x, (dy.contiguous(), x, cos.contiguous(), sin.contiguous(), dx), (eps, gain))
    return dx


def _rotate(x, cos, sin, inverse=False):
    """gpt.apply_rotary's arithmetic for x (B, T, H, D) and (T, D/2) tables (the products promote a 16-bit x
    to the tables' fp32, as there); inverse: the rotation's transpose."""
    c, s = cos[:, None, :], sin[:, None, :]
    s = -s if inverse else s
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)


def _reference_fwd(x, cos, sin, eps, gain):
    compute = torch.promote_types(x.dtype, torch.float32)
    r = _rotate(x.to(compute), cos, sin)
    return (gain * r * torch.rsqrt(r.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def _reference_bwd(dy, x, cos, sin, eps, gain):
    compute = torch.promote_types(x.dtype, torch.float32)
    r = _rotate(x.to(compute), cos, sin)
    rstd = torch.rsqrt(r.square().mean(-1, keepdim=True) + eps)
    r_hat, dy = r * rstd, dy.to(compute)
    dr = gain * rstd * (dy - r_hat * (dy * r_hat).mean(-1, keepdim=True))
    return _rotate(dr, cos, sin, inverse=True).to(x.dtype)


def _rope_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, gain: float) -> torch.Tensor:
    """gain * RMSNorm(RoPE(x)) for x (B, T, H, D), cos/sin (T, D/2) fp32."""
    if use_triton(x):
        torch._check(x.dtype in DTYPES, lambda: f"the Triton kernel takes fp16, bf16 or fp32, got {x.dtype}")
        return _triton_fwd(x, cos, sin, eps, gain)
    return _reference_fwd(x, cos, sin, eps, gain)


def _rope_norm_backward(dy: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        eps: float, gain: float) -> torch.Tensor:
    """Gradient dx of rope_norm, given dy and its inputs (r and rstd are recomputed)."""
    if use_triton(x):
        return _triton_bwd(dy, x, cos, sin, eps, gain)
    return _reference_bwd(dy, x, cos, sin, eps, gain)


def _setup_context(ctx, inputs, output):
    x, cos, sin, ctx.eps, ctx.gain = inputs
    ctx.save_for_backward(x, cos, sin)


def _backward(ctx, dy):
    x, cos, sin = ctx.saved_tensors
    return rope_norm_backward_op(dy, x, cos, sin, ctx.eps, ctx.gain), None, None, None, None


# rope_norm_op and rope_norm_backward_op: made at import on a CUDA build, on first use on a CPU-only one
register_ops, __getattr__ = ops_on_first_use(
    globals(), {"rope_norm_op": _rope_norm, "rope_norm_backward_op": _rope_norm_backward}, _backward, _setup_context)


def _check_inputs(x, cos, sin) -> None:
    if x.dim() != 4:
        raise ValueError(f"rope_norm takes x of shape (B, T, H, D), got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"rope_norm takes fp16, bf16 or fp32, got {x.dtype}")
    T, D = x.shape[1], int(x.shape[-1])
    if D < 2 or D % 2 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"rope_norm needs a head dim D with D/2 a power of two (64, 128, ...), got D={D}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (T, D // 2) or table.dtype != torch.float32 or table.device != x.device:
            raise ValueError(f"rope_norm takes {name} as fp32 (T, D/2) = ({T}, {D // 2}) on {x.device}, got "
                             f"{table.dtype} {tuple(table.shape)} on {table.device}")


def rope_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, gain: float = 1.0) -> torch.Tensor:
    """gain * RMSNorm(RoPE(x)) over the head dim, differentiable in x: x (B, T, H, D), cos/sin (T, D/2) fp32.

    The fused op where use_fused_rope_norm(x) (under torch.compile too: one opaque node, where Inductor
    would fuse less); elsewhere gpt.py's composition, with its numbers: the rotation in x's dtype, then
    kernels.rms_norm, then the gain.
    """
    _check_inputs(x, cos, sin)
    if use_fused_rope_norm(x):
        return rope_norm_op(x, cos, sin, eps, gain)  # noqa: F821 (made by ops_on_first_use before use_triton says yes)
    y = rms_norm(_rotate(x, cos, sin).to(x.dtype), eps)
    return y * gain if gain != 1.0 else y
