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
ops (kernels/dispatch.py): Triton on CUDA, the PyTorch reference (the tests'
oracle) elsewhere; torch.compile traces them as one opaque node each. Like those,
they are made at import on a CUDA build and on first use on a CPU-only one. The
model's rms_norm() is pickier: it runs our kernel only where it measured faster than
PyTorch's own RMSNorm on the GPU (dispatch.py, use_triton_rms_norm), through a
plain autograd.Function (cheaper to launch eagerly than the custom op), and
F.rms_norm everywhere else, including under torch.compile.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import wrap_triton

from kernels.dispatch import ops_on_first_use, use_triton, use_triton_rms_norm

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _row_tile(n_rows, N_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """This program's rows, the in-bounds mask of its tile, and the tile's element offsets."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < N_COLS)
    offs = rows[:, None].to(tl.int64) * N_COLS + cols[None, :]
    return rows, mask, offs


# The width N_COLS is a constexpr, and the row stride is N_COLS (the launchers pass
# contiguous rows): so the compiler knows every row starts 16-byte aligned whenever
# N_COLS * element size is a multiple of 16, and vectorises the accesses whatever the
# number of rows, also under torch.compile with dynamic shapes, where a runtime width
# is a symbolic size without a divisibility hint. PTX for sm_90, bf16, width 768, sizes
# without hints: 16-byte ld/st.global.v4 with N_COLS a constexpr, 2-byte ld/st.global.b16
# with the width a runtime argument (tests/test_kernels_compile.py).
@triton.jit
def _rms_norm_fwd_kernel(X, Y, RSTD, n_rows, eps,
                         N_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows, mask, offs = _row_tile(n_rows, N_COLS, BLOCK_ROWS, BLOCK_COLS)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    # eps cast to fp32: torch.compile's Inductor passes a Python float as fp64, which
    # would pull the whole rstd computation into fp64 (an eager launch passes fp32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / N_COLS + tl.cast(eps, tl.float32))
    tl.store(Y + offs, (x * rstd[:, None]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, RSTD, DX, n_rows,
                         N_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows, mask, offs = _row_tile(n_rows, N_COLS, BLOCK_ROWS, BLOCK_COLS)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
    x_hat = x * rstd[:, None]
    c = tl.sum(dy * x_hat, 1) / N_COLS
    dx = rstd[:, None] * (dy - x_hat * c[:, None])
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _width(x: torch.Tensor) -> int:
    """x's last dim as a Python int: the one size a launch configuration depends on.

    Under torch.compile the width may be a symbolic size (dynamic=True, or Dynamo's
    automatic dynamic shapes after a recompile). int() specialises it: a guard on its
    value, so a new width compiles a new graph. Without this, the configuration below
    was computed on the symbol and Inductor emitted next_power_of_2's bit-twiddling
    as the launch grid (`BitwiseFn_bitwise_or` on CUDA, a NameError in the generated
    code; pytorch issue #136504). The row count stays dynamic: it only enters the grid
    as a ceiling division, which Inductor prints fine.
    """
    n_cols = int(x.shape[-1])
    if n_cols < 1:
        raise ValueError(f"rms_norm needs a last dim of at least 1, got shape {tuple(x.shape)}")
    return n_cols


@functools.cache
def _launch_config(n_cols: int, device_type: str) -> dict:
    """Whole rows per program, about 4K elements (16 KB of fp32) per program on the GPU.

    Cached per width: the eager launch path does no configuration work after the first
    call (triton.next_power_of_2 and triton.cdiv are ConstexprFunctions in triton 3.7,
    several microseconds of Python a call, so neither is called per launch).
    """
    block_cols = 1 << (n_cols - 1).bit_length()  # the next power of two >= n_cols
    # the interpreter: small tiles, so tests cross tile edges
    return dict(N_COLS=n_cols, BLOCK_COLS=block_cols, **whole_rows(block_cols, device_type, interpreter_elements=256))


def whole_rows(block_cols: int, device_type: str, interpreter_elements: int) -> dict:
    """BLOCK_ROWS (and on the GPU num_warps) of a program that handles whole rows of block_cols elements:
    about 4K elements a program on the GPU (16 KB of fp32), one warp per 512 of them (8 a thread), at most
    16 warps; in the interpreter `interpreter_elements`. Also kernels/ropenorm.py's."""
    block_rows = max(1, (4096 if device_type == "cuda" else interpreter_elements) // block_cols)
    if device_type != "cuda":
        return dict(BLOCK_ROWS=block_rows)
    return dict(BLOCK_ROWS=block_rows, num_warps=max(1, min(16, block_rows * block_cols // 512)))


def _triton_fwd(x, eps):
    n_cols = _width(x)
    x2d = x.reshape(-1, n_cols).contiguous()  # a view, and no copy, for the usual contiguous input
    n_rows = x2d.shape[0]
    y = torch.empty_like(x2d)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    cfg = _launch_config(n_cols, x.device.type)
    grid = ((n_rows + cfg["BLOCK_ROWS"] - 1) // cfg["BLOCK_ROWS"],)
    wrap_triton(_rms_norm_fwd_kernel)[grid](x2d, y, rstd, n_rows, eps, **cfg)
    return y.view(x.shape), rstd


def _triton_bwd(dy, x, rstd):
    n_cols = _width(x)
    x2d = x.reshape(-1, n_cols).contiguous()
    dy2d = dy.reshape(-1, n_cols).contiguous()
    n_rows = x2d.shape[0]
    dx = torch.empty_like(x2d)
    cfg = _launch_config(n_cols, x.device.type)
    grid = ((n_rows + cfg["BLOCK_ROWS"] - 1) // cfg["BLOCK_ROWS"],)
    wrap_triton(_rms_norm_bwd_kernel)[grid](dy2d, x2d, rstd.contiguous(), dx, n_rows, **cfg)
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


def _rms_norm(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, no weight: x (..., N) -> y (..., N), rstd (...) in fp32."""
    if use_triton(x):
        torch._check(x.dtype in DTYPES, lambda: f"the Triton kernel takes fp16, bf16 or fp32, got {x.dtype}")
        return _triton_fwd(x, eps)
    return _reference_fwd(x, eps)


def _rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
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


# rms_norm_op and rms_norm_backward_op: made at import on a CUDA build, on first use on a CPU-only one
register_ops, __getattr__ = ops_on_first_use(
    globals(), {"rms_norm_op": _rms_norm, "rms_norm_backward_op": _rms_norm_backward}, _backward, _setup_context)


class _EagerRMSNorm(torch.autograd.Function):
    """The eager launch path: our kernels under a plain autograd.Function.

    The custom op above is what torch.compile traces (one opaque node, no graph
    break); in eager mode its Python dispatch and autograd layers are overhead an
    eager call does not need. Host time per call with the Triton launch skipped
    (bench/kernels.py, "launch overhead"; the 2-core development CPU at load ~12):
    forward 205-330 us here against 744-997 us through the custom op, forward+
    backward 839-1,216 against 2,008-2,604. Same kernels, same launchers.
    """

    @staticmethod
    def forward(ctx, x, eps):
        if x.dtype not in DTYPES:
            raise TypeError(f"the Triton RMSNorm takes fp16, bf16 or fp32, got {x.dtype}")
        y, rstd = _triton_fwd(x, eps)
        ctx.save_for_backward(x, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd = ctx.saved_tensors
        return _triton_bwd(dy, x, rstd), None


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable RMSNorm over the last dim, without a learnable weight.

    Our Triton kernel where it measured faster than PyTorch's, F.rms_norm everywhere
    else, including under torch.compile (kernels/dispatch.py, use_triton_rms_norm).
    """
    if use_triton_rms_norm(x):
        return _EagerRMSNorm.apply(x, eps)
    return F.rms_norm(x, (x.shape[-1],), eps=eps)
