"""
Attention of one new token per row over a static KV cache: the decode step's attention.

    y = decode_attn(q, k_cache, v_cache, positions, window=None)
    # q (B, H, 1, D): row b's new query, at position positions[b]
    # k_cache, v_cache (B, H_kv, S, D): row b's keys and values in slots 0..S-1, the new one
    #   already written at slot positions[b]
    # row b's query sees the keys j with  positions[b] - window <= j <= positions[b]  (window None: 0 <= j)

Why an op of its own. The decode step (kvcache.KVCache, GPT.decode) must keep the same tensor
shapes from token to token, so that it is compiled once and, on CUDA, captured as one
CUDA graph: its inputs are always the whole cache (S slots) and the positions, on the
device. What each row really needs is only its first positions[b] + 1 keys. This op
takes the fixed shapes and reads only what is needed, out of sight of the compiler
(`torch.library.custom_op`, opaque to torch.compile, so the graph stays the same):

    CUDA  -> a Triton kernel (FlashDecoding): one program per query head and piece of the
             cache, each reading only the keys its row sees, then a second kernel that
             merges the pieces' softmaxes. Its grid depends on the shapes only, so it runs
             inside a CUDA graph; the bytes it reads follow the rows' lengths.
    CPU   -> the keys up to the longest row only (`_sliced`): one read of the positions
             (free on the CPU), then SDPA over that many keys. Over the whole cache
             instead, one layer's attention took 1.3x as long in a 258-slot chat cache
             holding 60 tokens, and 14x in a 513-slot cache of 8 server rows holding 40
             (tiny preset, development CPU).
    CUDA with NANOSCHNACK_REFERENCE_KERNELS=1 (or a head dim Triton cannot tile) -> every
             slot with a mask (`_full_span`): SDPA, no host read, for A/B runs against the
             kernel. It reads the whole cache of every row: at 32 rows of a 2,048-token d20
             cache that is 6.7 GB a step, seven times the model's bf16 weights.

The query heads of one key/value head (grouped-query attention) read the same keys: the
reference lays them out as that head's query rows, (B, H_kv, H / H_kv, D); the kernel
gives each query head its own program, and the group's repeated reads of a tile come
from L2 (the presets have no GQA: n_kv_head = n_head).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import wrap_triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.dispatch import TRITON_HEAD_DIMS, use_triton

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E)


def _grouped(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, D) as (B, H_kv, H / H_kv, D): the query heads that share a key/value head are its rows."""
    B, H, _, D = q.shape
    return q.reshape(B, k.shape[1], H // k.shape[1], D)


def _visible(positions: torch.Tensor, lo: int, hi: int, window: int | None) -> torch.Tensor:
    """(B, 1, 1, hi - lo) bool: which of the slots lo..hi-1 each row's query sees."""
    j = torch.arange(lo, hi, device=positions.device)
    p = positions[:, None]
    seen = j <= p
    if window is not None:
        seen &= j >= p - window
    return seen[:, None, None]


def slice_plan(positions: torch.Tensor, window: int | None, span: tuple[int, int] | None = None):
    """What `_sliced` reads: (lo, hi, mask), the slots from the earliest window start to the longest row and
    which of them each row sees (None: all, when the rows sit at one position; one row always does).
    span: the positions' (min, max) where the caller knows them, else they are read from `positions`."""
    p_min, p_max = span or (int(p) for p in torch.aminmax(positions))
    lo = 0 if window is None else max(0, p_min - window)
    hi = p_max + 1
    return lo, hi, None if p_min == p_max else _visible(positions, lo, hi, window)


def _sliced(q, k, v, positions, window, plan=None):
    """Over the slots that some row sees only (slice_plan; `plan` if the caller made it already)."""
    lo, hi, mask = plan or slice_plan(positions, window)
    y = F.scaled_dot_product_attention(_grouped(q, k), k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask)
    return y.reshape(q.shape)


def _full_span(q, k, v, positions, window):
    """Over all S slots with a mask: shapes and work never depend on the positions, nothing is read on the host.
    cuDNN is left out: it builds a plan per shape, and this op must also run inside a CUDA graph's capture."""
    mask = _visible(positions, 0, k.shape[2], window)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        y = F.scaled_dot_product_attention(_grouped(q, k), k, v, attn_mask=mask)
    return y.reshape(q.shape)


# ----------------------------------------------------------------------------
# Triton: FlashDecoding


@triton.jit
def _decode_split_kernel(Q, K, V, POS, O_PART, M_PART, L_PART,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                         n_heads, group_size, window, num_splits,
                         QK_SCALE: tl.constexpr, SPLIT_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """One query head of one row, over one piece of its cache (slots split*SPLIT_LEN ...): the unnormalised
    output, running max and sum of its softmax (base 2). A piece outside the row's keys stores max -inf, sum 0."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    kv_head = h // group_size
    p = tl.load(POS + b)
    lo = tl.where(window >= 0, tl.maximum(p - window, 0), 0)  # window -1: none
    start = tl.maximum(split * SPLIT_LEN, lo)
    end = tl.minimum((split + 1) * SPLIT_LEN, p + 1)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32) * QK_SCALE  # scores in log2 units
    k_base = K + b * stride_kb + kv_head * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + kv_head * stride_vh + offs_d[None, :]
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        valid = cols < end
        k = tl.load(k_base + cols[:, None] * stride_kt, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max (0 at the start)
        prob = tl.math.exp2(s - m_new)
        v = tl.load(v_base + cols[:, None] * stride_vt, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(prob[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(prob, axis=0)
        m_i = m_new
    part = bh * num_splits + split
    tl.store(O_PART + part * HEAD_DIM + offs_d, acc)
    tl.store(M_PART + part, m_i)
    tl.store(L_PART + part, l_i)


@triton.jit
def _decode_merge_kernel(O_PART, M_PART, L_PART, OUT, stride_ob, stride_oh, n_heads, num_splits,
                         SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge the pieces' softmaxes of one query head: rescale each to the largest max, sum, normalise."""
    bh = tl.program_id(0)
    b, h = bh // n_heads, bh % n_heads
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    parts = bh * num_splits + offs_s
    m = tl.load(M_PART + parts, mask=offs_s < num_splits, other=float("-inf"))
    l = tl.load(L_PART + parts, mask=offs_s < num_splits, other=0.0)
    seen = m > float("-inf")  # the piece holding the row's own position always is
    m_max = tl.max(m, axis=0)
    w = tl.where(seen, tl.math.exp2(m - m_max), 0.0)
    acc = tl.load(O_PART + parts[:, None] * HEAD_DIM + offs_d[None, :], mask=seen[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


# Block sizes. A program streams BLOCK_N keys and values of one head at a time: 64 x 128 x 2 bytes
# each for bf16 d12/d20, held in registers as fp32 over 4 warps (64 values a thread per tile), and
# scores by multiply-and-sum on the FMA units: one query row per head leaves nothing for the tensor
# cores (a dot needs 16 rows). The cache is cut into at most MAX_SPLITS pieces so that a batch-1 step
# of d20 (10 heads) at the full context still has ~170 programs for H100/H200's 132 SMs; pieces past
# a row's position exit at once, so a short row reads only its own keys. Not timed on a GPU here:
# bench/gpu_serving.py's decode rows do, and NANOSCHNACK_REFERENCE_KERNELS=1 gives the SDPA baseline.
# The interpreter gets 16-key tiles so that small tests cross several tiles and pieces.
MAX_SPLITS = 32


def _configs(x: torch.Tensor) -> dict:
    if x.device.type != "cuda":
        return dict(BLOCK_N=16)
    return dict(BLOCK_N=64, num_warps=4)


def triton_supports(q: torch.Tensor) -> bool:
    D = q.shape[-1]
    return D in TRITON_HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _triton_decode(q, k, v, positions, window):
    out = torch.empty_like(q)  # what the op promises (its fake tensor): q's layout
    # the kernels step along the head dim at stride 1, as it lies in the model's tensors; any other layout is copied
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, _, D = q.shape
    S = k.shape[2]
    cfg = _configs(q)
    block_n = cfg["BLOCK_N"]
    split_len = block_n * triton.cdiv(triton.cdiv(S, block_n), MAX_SPLITS)
    num_splits = triton.cdiv(S, split_len)
    o_part = torch.empty(B * H * num_splits, D, device=q.device, dtype=torch.float32)
    m_part = torch.empty(B * H * num_splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    wrap_triton(_decode_split_kernel)[(B * H, num_splits)](
        q, k, v, positions, o_part, m_part, l_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        H, H // k.shape[1], -1 if window is None else window, num_splits,
        QK_SCALE=LOG2E.value / math.sqrt(D), SPLIT_LEN=split_len, HEAD_DIM=D, **cfg)
    merged = out if out.stride(-1) == 1 else torch.empty_like(q)
    wrap_triton(_decode_merge_kernel)[(B * H,)](
        o_part, m_part, l_part, merged, merged.stride(0), merged.stride(1), H, num_splits,
        SPLITS=triton.next_power_of_2(num_splits), HEAD_DIM=D, **{k: v for k, v in cfg.items() if k != "BLOCK_N"})
    return out if merged is out else out.copy_(merged)


# ----------------------------------------------------------------------------
# The op


def _check(q, k, v, positions):
    B, H, T, D = q.shape
    torch._check(T == 1, lambda: f"decode_attn takes one query per row, got {T}")
    torch._check(k.shape == v.shape and k.shape[0] == B and k.shape[3] == D,
                 lambda: f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    torch._check(H % k.shape[1] == 0, lambda: f"{H} query heads are not a multiple of {k.shape[1]} key/value heads")
    torch._check(positions.shape == (B,), lambda: f"positions must be (B,) = ({B},), got {tuple(positions.shape)}")


@torch.library.custom_op("nanoschnack::decode_attn", mutates_args=())
def decode_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   window: int | None) -> torch.Tensor:
    """One query per row over its cached keys (see the module's docstring); the same shape as q."""
    _check(q, k, v, positions)
    if use_triton(q) and triton_supports(q):
        return _triton_decode(q, k, v, positions, window)
    if q.device.type == "cpu":
        return _sliced(q, k, v, positions, window)
    return _full_span(q, k, v, positions, window)


@decode_attn_op.register_fake
def _(q, k, v, positions, window):
    return torch.empty_like(q)


def decode_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                window: int | None = None, plan: tuple | None = None) -> torch.Tensor:
    """Attention of q (B, H, 1, D) at `positions` (B,) over the cache slots k, v (B, H_kv, S, D) (module docstring).

    plan: slice_plan(...) where an eager caller made it from what the host knows (kvcache.KVCache does, once a
    step for all layers): on the CPU that saves reading the positions back from the tensor and rebuilding
    the mask in every layer (three ops and four, each as long as a tenth of a 512-token attention, tiny
    preset). Never given inside a compiled graph, where it would be a constant."""
    if q.device.type == "cpu" and not use_triton(q) and not torch.compiler.is_compiling():
        return _sliced(q, k, v, positions, window, plan)  # eager on the CPU: the same function without the op's dispatch
    return decode_attn_op(q, k, v, positions, window)
