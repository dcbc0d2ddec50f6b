"""
Fused causal flash attention (FlashAttention-2) in Triton, forward and backward.

Layout. q is (B, H, T, D); k and v are (B, H_kv, T, D) with H a multiple of H_kv
(grouped-query attention: query head h reads key/value head h // (H // H_kv)).
Any strides work as long as the last dim is contiguous, so the model can pass
`x.view(B, T, H, D).transpose(1, 2)` without a copy; outputs take q's strides.
The Triton path takes D = 16, 32, 64 or 128 (dispatch.TRITON_HEAD_DIMS; flash_attn sends any other D to SDPA); the reference any D.
Attention is always causal with scale 1/sqrt(D).

Sliding window. With a window w >= 0, query i attends keys i - w .. i only
(FlashAttention's window_size=(w, 0), what nanochat's short "S" layers use);
w >= T - 1 is the same as no window. The kernels get w as a plain int and a
constexpr WINDOWED = (w >= 0): two compiled variants, not one per window. Key
tiles wholly left of a query tile's window are never loaded (and the query
tiles below a key tile's window never visited in dK/dV), so a layer with a
window of T/2 does about 3/4 of a causal layer's work, and a short window's
cost grows with T, not T^2. Tiles crossing the window's edge are masked; the
ones wholly inside it, like those left of the diagonal, are not.

Forward. Each program owns BLOCK_M query rows and streams the key/value tiles
left of (and on) the diagonal and inside the window through SRAM, keeping a
running max m and running sum l of the softmax ("online softmax"), so the
T x T score matrix never exists. Exponentials are taken in base 2 (exp2 is a
single instruction) with log2(e) folded into the softmax scale, and the row max
is taken before scaling (the Triton tutorial's way), so a score costs one fused
multiply-add on its way into exp2: in the PTX of the bf16 forward for sm_90, 60
fewer mul.f32 and 32 fewer sub.f32 for 32 more fma.rn.f32 (D = 64 and 128; with a
window 90 and 64 fewer, 64 more), no spills, and no register count that changes
how many blocks an SM holds (kernels/aot.py). Besides the output it stores the
per-row log-sum-exp LSE = log(sum_j exp(s_ij)): with it the backward recomputes
any probability tile directly as p = exp(s - LSE) instead of saving the T x T
probabilities.

Backward. delta_i = rowsum(dO_i * O_i) first (a tiny kernel), then two kernels
that need no atomics:
  * dK/dV: one program per key tile; loops over the query tiles at or below the
    diagonal (and inside the window), for every query head of its group (so
    GQA's sum over the group happens in registers).
  * dQ: one program per query tile; loops over the key tiles the forward visits.
Both use dS = P * (dP - delta), dP = dO V^T.

Precision. bf16/fp16 inputs feed the tensor cores and accumulate in fp32; fp32
inputs use full-precision ("ieee") dots, not tf32. LSE is always fp32.

Tiles. On a Hopper (16-bit, outside inference mode: dispatch.autotune_attention)
triton.autotune picks each kernel's tiles among tiles.HOPPER_SPACES on the user's
GPU; everywhere else the launchers pass hand-picked ones (kernels/tiles.py). The kernels'
`tune_len` argument is only the autotuner's key: the sequence length rounded up to
a power of two, so that nearby lengths share one tuning.

TMA. With the constexpr TMA (only among a Hopper's candidates, tiles.HOPPER_TMA_SPACES)
a kernel loads the tiles it streams through tensor descriptors made in the kernel
(tl.make_tensor_descriptor: _row_tiles), which the Hopper's tensor memory accelerator
copies to shared memory whole: the pointer arithmetic of every row leaves the loop
(registers of the D = 128 forward's 128 x 64 tile: 188 -> 147 a thread on sm_90). Made
in the kernel, not on the host, so that no per-config pre_hook has to set their tile
shape (torch.compile rejects pre_hooks on user kernels, pytorch issue #139059); each
program writes its two descriptors to 256 bytes of global scratch that Triton asks its
allocator for at launch (_tma_scratch; Inductor sets its own).

Scalars. The kernels take no float arguments: the softmax scale 1/sqrt(D) is a
constexpr (SM_SCALE, one value per HEAD_DIM, so no extra compiles). A Python float
argument is typed fp32 by an eager Triton launch but fp64 by torch.compile's
Inductor (torch 2.13), which would turn the scores into fp64 and break the fp32
accumulating dot. kernels/aot.py compiles every launch both ways to keep it so.
The window is an int argument, like the sequence length.

Custom ops. `nanoschnack::flash_attn(q, k, v, window=-1) -> (out, lse)` and
`nanoschnack::flash_attn_backward(dout, q, k, v, out, lse, window=-1) -> (dq, dk, dv)` are
`torch.library.triton_op`s, so torch.compile(fullgraph=True) sees straight
through them (made at import on a CUDA build, on first use on a CPU-only one:
dispatch.ops_on_first_use says why). Which path runs is decided in
kernels/dispatch.py: on CUDA the model's flash_attn() launches Triton, except where
torch's SDPA measured faster (training's full causal attention on a Hopper, where
SDPA picks cuDNN: use_triton_attention); elsewhere (or with
NANOSCHNACK_REFERENCE_KERNELS=1) it calls torch's SDPA, whose CPU flash
kernel is about twice as fast as the reference (for a window shorter than
the sequence it gets the boolean mask `visible_keys`). The ops themselves, off the Triton path, run the
reference of kernels/attention_reference.py: the textbook math in fp32 (fp64 for fp64 inputs)
with T x T scores, the exact oracle the kernel tests compare Triton against.
"""
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner

from kernels import tiles
from kernels.attention_reference import reference_bwd, reference_fwd, visible_keys
from kernels.dispatch import (TRITON_HEAD_DIMS, autotune_attention, ops_on_first_use, tma_allowed, use_triton,
                              use_triton_attention)

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)

# ----------------------------------------------------------------------------
# Triton kernels
#
# Masks. A tile of scores needs masking only where it crosses the causal diagonal
# (CAUSAL_MASK) or the window's edge (WINDOW_MASK); the loops are split so that
# every other tile takes the plain path, with no compare or select per score.


@triton.jit
def _keep(rows, cols, window, CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr):
    """Which (query row, key column) pairs a masked tile keeps: col <= row (causal) and/or
    row - col <= window (sliding window). rows and cols come broadcast to the tile's shape."""
    if CAUSAL_MASK and WINDOW_MASK:
        return (cols <= rows) & (cols >= rows - window)  # rows - window: on the row vector, before broadcasting
    elif CAUSAL_MASK:
        return cols <= rows
    else:
        return cols >= rows - window


@triton.jit
def _key_bounds(start_m, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query tile [start_m, start_m + BLOCK_M) of a windowed kernel: the first key tile that
    holds a key of some row's window, and the first one inside every row's window (the last row's
    window starts latest). Key tiles left of the first are skipped; between the two they are masked."""
    first = tl.maximum(start_m - window, 0) // BLOCK_N * BLOCK_N
    full = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 - window, 0), BLOCK_N) * BLOCK_N
    return first, tl.minimum(tl.maximum(full, first), start_m)


@triton.jit
def _row_tiles(X, b, h, stride_xb, stride_xh, stride_xt, seq_len, offs_rows, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TMA: tl.constexpr):
    """Where the tiles of BLOCK rows of head h's (T, D) matrix in batch b are loaded from (_load_rows). With
    TMA a tensor descriptor: the Hopper's tensor memory accelerator copies a whole tile into shared memory
    from it, with no address arithmetic in registers, and reads rows past seq_len as zeros; it asks for 16-byte
    aligned rows (the launcher checks: _tma_aligned). Else the pointers of the tile at row 0."""
    base = X + b * stride_xb + h * stride_xh
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[seq_len, HEAD_DIM], strides=[stride_xt, 1],
                                         block_shape=[BLOCK, HEAD_DIM])
    else:
        return base + offs_rows[:, None] * stride_xt + offs_d[None, :]


@triton.jit
def _load_rows(row_tiles, start, stride_xt, rows_exist, MASKED: tl.constexpr, TMA: tl.constexpr):
    """The BLOCK rows from row start on of a _row_tiles source. MASKED: some may lie past the end of the
    sequence (not rows_exist) and read as zeros, which TMA's bounds do by themselves."""
    if TMA:
        return row_tiles.load([start, 0])
    elif MASKED:
        return tl.load(row_tiles + start * stride_xt, mask=rows_exist[:, None], other=0.0)
    else:
        return tl.load(row_tiles + start * stride_xt)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_tiles, v_tiles, stride_kt, stride_vt,
               offs_m, offs_n, lo, hi, seq_len, window,
               QK_SCALE: tl.constexpr, CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Accumulate key/value tiles [lo, hi) into the running softmax of one query tile."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        # Only the diagonal tiles may cross the end of the sequence; left of it every key exists: no load masks.
        k = _load_rows(k_tiles, start_n, stride_kt, cols < seq_len, CAUSAL_MASK, TMA)
        v = _load_rows(v_tiles, start_n, stride_vt, cols < seq_len, CAUSAL_MASK, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # unscaled scores
        if CAUSAL_MASK or WINDOW_MASK:
            qk = tl.where(_keep(offs_m[:, None], cols[None, :], window, CAUSAL_MASK, WINDOW_MASK), qk, float("-inf"))
        # The row max is taken unscaled and scaled once per row (QK_SCALE > 0), so each score costs
        # one fused multiply-add, qk * QK_SCALE - m, on its way into exp2 (in log2 units).
        m_new = tl.maximum(m_i, tl.max(qk, 1) * QK_SCALE)
        if WINDOW_MASK:  # a row may have no key in its window yet: subtract 0, not -inf (-inf - -inf is NaN)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # causal only: every row has seen key 0 after the first tile
            m_sub = m_new
        p = tl.math.exp2(qk * QK_SCALE - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile(n_heads, group_size, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For a program over a block of queries: its first query, batch x head index, batch, head, KV head
    (GQA) and the query, key and feature offsets."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return start_m, bh, b, h, h // group_size, offs_m, tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM)


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     stride_qb, stride_qh, stride_qt,
                     stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt,
                     stride_ob, stride_oh, stride_ot,
                     n_heads, group_size, seq_len, window, tune_len,
                     SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    start_m, bh, b, h, h_kv, offs_m, offs_n, offs_d = _query_tile(n_heads, group_size, HEAD_DIM, BLOCK_M, BLOCK_N)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    k_tiles = _row_tiles(K, b, h_kv, stride_kb, stride_kh, stride_kt, seq_len, offs_n, offs_d, HEAD_DIM, BLOCK_N, TMA)
    v_tiles = _row_tiles(V, b, h_kv, stride_vb, stride_vh, stride_vt, seq_len, offs_n, offs_d, HEAD_DIM, BLOCK_N, TMA)
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_len, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Up to three passes: the tiles crossing the window's left edge (masked), the tiles wholly
    # inside every row's window and left of the diagonal (unmasked), the diagonal tiles (masked).
    full = 0
    if WINDOWED:
        first, full = _key_bounds(start_m, window, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_tiles, v_tiles, stride_kt, stride_vt,
                                   offs_m, offs_n, first, full, seq_len, window,
                                   SM_SCALE * LOG2E, False, True, BLOCK_N, DOT_PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_tiles, v_tiles, stride_kt, stride_vt,
                               offs_m, offs_n, full, start_m, seq_len, window,
                               SM_SCALE * LOG2E, False, False, BLOCK_N, DOT_PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_tiles, v_tiles, stride_kt, stride_vt,
                               offs_m, offs_n, start_m, tl.minimum(start_m + BLOCK_M, seq_len), seq_len, window,
                               SM_SCALE * LOG2E, True, WINDOWED, BLOCK_N, DOT_PRECISION, TMA)

    if WINDOWED:  # rows past the end of the sequence may have no key in their window: l = 0, not stored
        l_i = tl.where(offs_m < seq_len, l_i, 1.0)
    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < seq_len)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back from log2 to natural-log units
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, lse, mask=offs_m < seq_len)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA,
                           stride_ob, stride_oh, stride_ot,
                           stride_dob, stride_doh, stride_dot,
                           n_heads, seq_len,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the row term of dS = P * (dP - delta)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < seq_len
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_tiles, do_tiles, lse_ptr, delta_ptr, stride_qt, stride_dot,
                    offs_n, offs_m, lo, hi, seq_len, window,
                    QK_SCALE: tl.constexpr, CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr,
                    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dK and dV of one key tile over the query tiles [lo, hi).

    Works on transposed tiles (keys x queries) so that dK and dV come out as
    plain dots. Rows past the end of the sequence load q = dO = 0 and LSE = +inf,
    so their probability is 0 and they add nothing.
    """
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seq_len
        q = _load_rows(q_tiles, start_m, stride_qt, row_ok, True, TMA)
        do = _load_rows(do_tiles, start_m, stride_dot, row_ok, True, TMA)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * QK_SCALE
        p_t = tl.math.exp2(s_t - lse[None, :])
        if CAUSAL_MASK or WINDOW_MASK:
            p_t = tl.where(_keep(rows[None, :], offs_n[:, None], window, CAUSAL_MASK, WINDOW_MASK), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                          stride_qb, stride_qh, stride_qt,
                          stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt,
                          stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt,
                          stride_dvb, stride_dvh, stride_dvt,
                          n_kv_heads, group_size, seq_len, window, tune_len,
                          SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)
    b = (bh_kv // n_kv_heads).to(tl.int64)
    h_kv = (bh_kv % n_kv_heads).to(tl.int64)
    n_heads = n_kv_heads * group_size

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < seq_len
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # The query tiles that read this key tile: the diagonal ones (masked), those below the
    # diagonal inside every key's window (unmasked, up to `full`), then, with a window, the ones
    # crossing its edge (masked, up to `last`; the window of key j ends at query j + window).
    below = start_n + BLOCK_N
    if WINDOWED:
        full = tl.minimum(tl.maximum((start_n + window + 1) // BLOCK_M * BLOCK_M, below), seq_len)
        last = tl.minimum(below + window, seq_len)
    else:
        full = seq_len
        last = seq_len
    for g in range(group_size):  # every query head that reads this key/value head
        h = h_kv * group_size + g
        q_tiles = _row_tiles(Q, b, h, stride_qb, stride_qh, stride_qt, seq_len, offs_m, offs_d, HEAD_DIM, BLOCK_M, TMA)
        do_tiles = _row_tiles(DO, b, h, stride_dob, stride_doh, stride_dot, seq_len, offs_m, offs_d, HEAD_DIM, BLOCK_M, TMA)
        row_base = (b * n_heads + h) * seq_len
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_tiles, do_tiles, LSE + row_base, DELTA + row_base,
                                 stride_qt, stride_dot, offs_n, offs_m,
                                 start_n, tl.minimum(below, seq_len), seq_len, window,
                                 SM_SCALE * LOG2E, True, WINDOWED, BLOCK_M, DOT_PRECISION, TMA)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_tiles, do_tiles, LSE + row_base, DELTA + row_base,
                                 stride_qt, stride_dot, offs_n, offs_m,
                                 below, full, seq_len, window,
                                 SM_SCALE * LOG2E, False, False, BLOCK_M, DOT_PRECISION, TMA)
        if WINDOWED:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_tiles, do_tiles, LSE + row_base, DELTA + row_base,
                                     stride_qt, stride_dot, offs_n, offs_m,
                                     full, last, seq_len, window,
                                     SM_SCALE * LOG2E, False, True, BLOCK_M, DOT_PRECISION, TMA)

    dk = dk * SM_SCALE  # s = sm_scale * q.k, so dK carries the scale once
    tl.store(DK + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_tiles, v_tiles, stride_kt, stride_vt,
                  offs_m, offs_n, lo, hi, seq_len, window,
                  QK_SCALE: tl.constexpr, CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ of one query tile over the key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_tiles, start_n, stride_kt, cols < seq_len, CAUSAL_MASK, TMA)
        v = _load_rows(v_tiles, start_n, stride_vt, cols < seq_len, CAUSAL_MASK, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
        p = tl.math.exp2(s - lse[:, None])
        if CAUSAL_MASK or WINDOW_MASK:
            p = tl.where(_keep(offs_m[:, None], cols[None, :], window, CAUSAL_MASK, WINDOW_MASK), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                        stride_qb, stride_qh, stride_qt,
                        stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt,
                        stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt,
                        n_heads, group_size, seq_len, window, tune_len,
                        SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    start_m, bh, b, h, h_kv, offs_m, offs_n, offs_d = _query_tile(n_heads, group_size, HEAD_DIM, BLOCK_M, BLOCK_N)
    row_ok = offs_m < seq_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    row_base = bh.to(tl.int64) * seq_len
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    k_tiles = _row_tiles(K, b, h_kv, stride_kb, stride_kh, stride_kt, seq_len, offs_n, offs_d, HEAD_DIM, BLOCK_N, TMA)
    v_tiles = _row_tiles(V, b, h_kv, stride_vb, stride_vh, stride_vt, seq_len, offs_n, offs_d, HEAD_DIM, BLOCK_N, TMA)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # The forward's passes: window edge (masked), inside the window (unmasked), diagonal (masked).
    full = 0
    if WINDOWED:
        first, full = _key_bounds(start_m, window, BLOCK_M, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_tiles, v_tiles, stride_kt, stride_vt,
                           offs_m, offs_n, first, full, seq_len, window,
                           SM_SCALE * LOG2E, False, True, BLOCK_N, DOT_PRECISION, TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_tiles, v_tiles, stride_kt, stride_vt,
                       offs_m, offs_n, full, start_m, seq_len, window,
                       SM_SCALE * LOG2E, False, False, BLOCK_N, DOT_PRECISION, TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_tiles, v_tiles, stride_kt, stride_vt,
                       offs_m, offs_n, start_m, tl.minimum(start_m + BLOCK_M, seq_len), seq_len, window,
                       SM_SCALE * LOG2E, True, WINDOWED, BLOCK_N, DOT_PRECISION, TMA)
    dq = dq * SM_SCALE
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------
# Which tiles a launch takes: kernels/tiles.py holds the hand-picked ones and the Hopper autotuner's
# candidates; the autotuners are made here, over the kernels above.

_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


_AUTOTUNERS: dict = {}  # (which, head dim, windowed, tma) -> its triton.autotune object


def _autotuned(which: str, head_dim: int, windowed: bool, tma: bool):
    """triton.autotune over tiles.hopper_space(which, head_dim, windowed, tma), made on first use. Its first
    config is the hand-picked pointer one, and must stay a pointer one: Inductor reads the first config's IR to
    learn which tensors the kernel writes, and torch 2.11's analysis (the H200 image's) knows no descriptor ops."""
    key = (which, head_dim, windowed, tma)
    if key not in _AUTOTUNERS:
        configs = [triton.Config(dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], TMA=c["TMA"]),
                                 num_warps=c["num_warps"], num_stages=c["num_stages"])
                   for c in tiles.hopper_space(which, head_dim, windowed, tma)]
        _AUTOTUNERS[key] = triton.autotune(configs, key=["tune_len", "group_size"], cache_results=True)(_KERNELS[which])
    return _AUTOTUNERS[key]


def autotune_picks() -> list[str]:
    """What the autotuners picked so far in this process, a line each (bench/gpu.py reports them)."""
    return [f"{which}, D {head_dim}{', windowed' if windowed else ''}, tune_len {key[0]}, group {key[1]}, "
            f"{key[2].removeprefix('torch.')}: BLOCK_M {c.kwargs['BLOCK_M']}, BLOCK_N {c.kwargs['BLOCK_N']}, "
            f"{c.num_warps} warps, {c.num_stages} stages{', TMA' if c.kwargs['TMA'] else ''}"
            for (which, head_dim, windowed, _), tuner in _AUTOTUNERS.items() for key, c in tuner.cache.items()]


def _sm_scale(head_dim: int) -> float:
    """The softmax scale 1/sqrt(D), passed as a constexpr (see "Scalars" at the top)."""
    return 1.0 / math.sqrt(head_dim)


def _dot_precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> None:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "flash_attn wants (B, H, T, D) tensors")
    torch._check(k.shape == v.shape, lambda: f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    torch._check(q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:], lambda: f"q {tuple(q.shape)} does not match k {tuple(k.shape)}")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    torch._check(q.dtype == k.dtype == v.dtype, lambda: f"dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check(window >= -1, lambda: f"window must be >= 0, or -1 for none, got {window}")


def _tune_len(T) -> int:
    """The autotuner's key for sequence length T: T rounded up to a power of two (at least 128), so that the
    lengths of serving's prefills share a handful of tunings rather than one each. Under torch.compile T may
    be a symbolic size; Inductor then autotunes the kernel once itself and ignores Triton's key, so T goes
    through unrounded (rounding a symbol is the bit-twiddling tests/test_kernels_compile.py guards against)."""
    return max(128, 1 << (T - 1).bit_length()) if isinstance(T, int) else T


def _kernel(which: str, x: torch.Tensor, windowed: bool, streamed: tuple):
    """The kernel to launch for pass `which` ("fwd", "dkdv" or "dq") on inputs like x, and the tiles to pass
    it: triton.autotune's pick among tiles.HOPPER_SPACES where dispatch.autotune_attention says so (the tiles
    are then its to choose; TMA candidates among them if the `streamed` tensors allow, _tma_aligned, and
    dispatch.tma_allowed), else the hand-picked ones; inside tiles.forced_tiles(), the tiles it was given."""
    forced = tiles.forced()
    if forced is not None:
        torch._check(not forced[which]["TMA"] or _tma_aligned(*streamed), lambda: "TMA tiles forced on unaligned tensors")
        return _KERNELS[which], forced[which]
    if autotune_attention(x):  # int(): under torch.compile(dynamic=True) the head dim is a symbol; a constexpr anyway
        return _autotuned(which, int(x.shape[-1]), windowed, tma_allowed() and _tma_aligned(*streamed)), {}
    return _KERNELS[which], tiles.hand_picked(x, windowed)[which]


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """Whether TMA may copy tiles of these (B, H, T, D) tensors: the tensor memory accelerator wants each
    tile's first row 16-byte aligned and the row stride a multiple of 16 bytes, so the tensor's start and its
    batch, head and row strides, in bytes, must be multiples of 16; and rows that do not overlap (a gradient
    expanded along T has a row stride of 0, which pointers read fine and a descriptor cannot describe). The
    model's views of its (B, T, H, D) activations qualify, at 16 bits and head dims of 8 or more. Decided
    without a guard under torch.compile: a stride that is a symbol counts only if it provably qualifies."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true  # here: sympy, 0.6 s at every start
    offsets = [o * t.element_size() for t in tensors for o in (t.storage_offset(), *t.stride()[:3])]
    if not all(statically_known_true(o % 16 == 0) for o in offsets):
        return False
    if not all(statically_known_true(t.stride(2) >= t.shape[3]) for t in tensors):
        return False
    return not _launches_now(tensors[0]) or all(t.data_ptr() % 16 == 0 for t in tensors)  # storage starts too


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's allocator (triton.set_allocator) for the global memory a kernel asks for at launch: on a Hopper,
    128 bytes a program for each TMA tensor descriptor it makes (_row_tiles), which it writes there before
    using it. Inductor sets its own for the kernels it launches."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _rows_grid(T, n_programs, rows: str):
    """A launch grid of one program per `rows` tile of the sequence (BLOCK_M or BLOCK_N, read from the
    config the launch ends up with: the autotuner's or the hand-picked one) and per batch x head."""
    return lambda meta: ((T + meta[rows] - 1) // meta[rows], n_programs)


def _launch(kernel, grid):
    """wrap_triton(kernel)[grid]; for an autotuner, first every candidate compiled at once (_compile_ahead).
    Triton's allocator is set for each CUDA launch that may load through TMA: a ContextVar, which a thread
    starts without. Also while torch.compile traces the op: it then stays set in this thread for the compiled
    graph's launches, should an Inductor not set its own (2.11's and 2.13's do, in CachingAutotuner.run)."""
    def launch(*args, **kwargs):
        if isinstance(kernel, Autotuner):
            _compile_ahead(kernel, grid, args, kwargs)
        if (isinstance(kernel, Autotuner) or kwargs["TMA"]) and args[0].device.type == "cuda":
            triton.set_allocator(_tma_scratch)
        wrap_triton(kernel)[grid](*args, **kwargs)
    return launch


_COMPILED_AHEAD: set = set()  # (autotuner, tune_len, group size, dtype): the tuning keys compiled ahead


def _compile_ahead(tuner, grid, args: tuple, kwargs: dict) -> None:
    """Compile every candidate of `tuner` for these arguments at once, on threads, the first time it meets
    their tuning key: it would compile them one after another as it times them. Triton's compile releases
    the GIL: 8 of the sm_90 forward candidates at D = 128 compiled in 5.7-7.2 s on one thread and 3.4-3.8 s
    on two, on the 2-core development CPU, so a GPU machine's cores cut the first call of a shape from about
    20 compiles in a row to a few rounds. Not while torch.compile traces: Inductor compiles the candidates
    itself, in parallel. A failing candidate is left to the autotuner, which skips it when it times it."""
    q = args[0]
    if not _launches_now(q):
        return
    named = dict(zip(tuner.fn.arg_names, args))
    key = (tuner, named["tune_len"], named["group_size"], q.dtype)
    if key in _COMPILED_AHEAD:
        return
    _COMPILED_AHEAD.add(key)
    try:
        from triton.runtime._async_compile import AsyncCompileMode, FutureKernel  # Triton's own, in 3.6 and 3.7
    except ImportError:  # another Triton: the autotuner compiles each candidate itself
        return
    try:
        with (ThreadPoolExecutor(min(len(tuner.configs), os.cpu_count() or 1)) as pool,
              AsyncCompileMode(pool, ignore_errors=True)):
            for config in tuner.configs:
                tuner.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
    except Exception as e:  # the autotuner compiles each candidate itself, as without this
        warnings.warn(f"compiling the attention autotuner's candidates ahead failed ({type(e).__name__}: {e}); "
                      "it compiles them one by one")
    finally:
        # A candidate whose compile failed stays in the JIT's cache as an unfinished future, which triton 3.6
        # cannot launch: drop it, so the autotuner compiles it again itself and meets the error as it would have.
        cache = tuner.fn.device_caches[triton.runtime.driver.active.get_current_device()][0]
        for failed in [k for k, kernel in cache.items() if isinstance(kernel, FutureKernel) and kernel.kernel is None]:
            del cache[failed]


def _launches_now(q: torch.Tensor) -> bool:
    """Whether a launch on q is a real one on a GPU (not traced by torch.compile, not on fake tensors)."""
    return q.device.type == "cuda" and not torch.compiler.is_compiling() and not is_fake(q)


def _fit_window(window: int, T: int):
    """A window past the sequence sees what T does; capped at T, the kernels' int32 sums with it (start + window)
    cannot overflow (a window near 2**31 skipped dK/dV's window-edge blocks). sym_min: no guard on a dynamic T."""
    return torch.sym_min(window, T) if window >= 0 else window


def _triton_fwd(q, k, v, window=-1):
    B, H, T, D = q.shape
    torch._check(D in TRITON_HEAD_DIMS, lambda: f"the Triton kernel supports head dims {TRITON_HEAD_DIMS}, got {D}")
    torch._check(q.dtype in (torch.float16, torch.bfloat16, torch.float32), lambda: f"the Triton kernel takes fp16, bf16 or fp32, got {q.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    window = _fit_window(window, T)
    out = torch.empty_like(q)  # keeps q's strides: the model's transposed view comes back ready to reshape
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    kernel, cfg = _kernel("fwd", q, window >= 0, (k, v))
    _launch(kernel, _rows_grid(T, B * H, "BLOCK_M"))(
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, H // k.shape[1], T, window, _tune_len(T),
        SM_SCALE=_sm_scale(D), HEAD_DIM=D, WINDOWED=window >= 0, DOT_PRECISION=_dot_precision(q), **cfg)
    return out, lse


def _triton_bwd(dout, q, k, v, out, lse, window=-1):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    dout, q, k, v, out = (t if t.stride(-1) == 1 else t.contiguous() for t in (dout, q, k, v, out))
    window = _fit_window(window, T)

    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    delta_rows = tiles.hand_picked(q, window >= 0)["delta"]["BLOCK_M"]
    wrap_triton(_attn_bwd_delta_kernel)[((T + delta_rows - 1) // delta_rows, B * H)](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        H, T, HEAD_DIM=D, BLOCK_M=delta_rows)

    dk, dv = torch.empty_like(k), torch.empty_like(v)
    kernel, cfg = _kernel("dkdv", q, window >= 0, (q, dout))
    _launch(kernel, _rows_grid(T, B * H_kv, "BLOCK_N"))(
        q, k, v, dout, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        H_kv, H // H_kv, T, window, _tune_len(T),
        SM_SCALE=_sm_scale(D), HEAD_DIM=D, WINDOWED=window >= 0, DOT_PRECISION=_dot_precision(q), **cfg)

    dq = torch.empty_like(q)
    kernel, cfg = _kernel("dq", q, window >= 0, (k, v))
    _launch(kernel, _rows_grid(T, B * H, "BLOCK_M"))(
        q, k, v, dout, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, H // H_kv, T, window, _tune_len(T),
        SM_SCALE=_sm_scale(D), HEAD_DIM=D, WINDOWED=window >= 0, DOT_PRECISION=_dot_precision(q), **cfg)
    return dq, dk, dv


# ----------------------------------------------------------------------------
# Custom ops. The window is a plain int, -1 for none: an op schema has no
# Optional[int] that torch.compile would carry as cheaply, and the kernels take
# it as a runtime int (WINDOWED, a constexpr, tells the two kernels apart).


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention, query i seeing keys i - window .. i (all keys up to i for window -1).
    q (B, H, T, D), k/v (B, H_kv, T, D) -> out (B, H, T, D), lse (B, H, T) fp32."""
    _check(q, k, v, window)
    if use_triton(q):
        return _triton_fwd(q, k, v, window)
    return reference_fwd(q, k, v, window)


def _flash_attn_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, window: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of flash_attn, given its inputs, output, LSE and window."""
    if use_triton(q):
        return _triton_bwd(dout, q, k, v, out, lse, window)
    return reference_bwd(dout, q, k, v, out, lse, window)


def _setup_context(ctx, inputs, output):
    q, k, v, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.window = window
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return *flash_attn_backward_op(dout, q, k, v, out, lse, ctx.window), None


# flash_attn_op and flash_attn_backward_op: made at import on a CUDA build, on first use on a CPU-only one
register_ops, __getattr__ = ops_on_first_use(
    globals(), {"flash_attn_op": _flash_attn, "flash_attn_backward_op": _flash_attn_backward}, _backward, _setup_context)


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal self-attention, differentiable: q (B, H, T, D), k/v (B, H_kv, T, D) -> (B, H, T, D).

    window: query i attends keys i - window .. i (FlashAttention's window_size=(window, 0));
    None attends every key up to i."""
    if window is not None and (not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be None or an int >= 0 (keys a query sees to its left), got {window!r}")
    if not use_triton_attention(q, k, window):  # torch's own fused attention and its backward (kernels/dispatch.py)
        if q.shape[1] % k.shape[1]:  # SDPA checks the rest itself
            raise RuntimeError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
        gqa = q.shape[1] != k.shape[1]
        if window is None or window >= q.shape[2] - 1:  # the window holds the whole causal row
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible_keys(q.shape[2], window, q.device), enable_gqa=gqa)
    out, _ = flash_attn_op(q, k, v, -1 if window is None else window)
    return out
