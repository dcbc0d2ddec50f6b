"""
Attention of one new token per row over a static KV cache: the decode step's attention.

    y = decode_attn(q, k_cache, v_cache, positions, window=None)
    # q (B, H, 1, D): row b's new query, at position positions[b]
    # k_cache, v_cache (B, H_kv, S, D): row b's keys and values in slots 0..S-1, the new one
    #   already written at slot positions[b]
    # row b's query sees the keys j with  positions[b] - window <= j <= positions[b]  (window None: 0 <= j)

Why an op of its own. The decode step (gpt.KVCache, GPT.decode) must keep the same tensor
shapes from token to token, so that it is compiled once and, on CUDA, captured as one
CUDA graph: its inputs are always the whole cache (S slots) and the positions, on the
device. What each row really needs is only its first positions[b] + 1 keys. This op
takes the fixed shapes and reads only what is needed, out of sight of the compiler
(`torch.library.custom_op`, opaque to torch.compile, so the graph stays the same):

    CPU   -> the keys up to the longest row only (`_sliced`): one read of the positions
             (free on the CPU), then SDPA over that many keys. Over the whole cache
             instead, one layer's attention took 1.3x as long in a 258-slot chat cache
             holding 60 tokens, and 14x in a 513-slot cache of 8 server rows holding 40
             (tiny preset, development CPU).
    CUDA  -> every slot with a mask (`_full_span`): no host read, so it runs inside a CUDA
             graph. It reads the whole cache of every row (see below).

The query heads of one key/value head (grouped-query attention) are laid out as that
head's query rows, (B, H_kv, H / H_kv, D), so no key or value is ever repeated.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


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


def _sliced(q, k, v, positions, window, span=None):
    """Over the slots that some row sees: from the earliest window start to the longest row. span: the
    positions' (min, max) if the caller knows them, else they are read from `positions`."""
    p_min, p_max = span or (int(p) for p in torch.aminmax(positions))
    lo = 0 if window is None else max(0, p_min - window)
    hi = p_max + 1
    # Rows at one position (one row, always) see exactly the slots lo..hi-1: no mask needed.
    mask = None if p_min == p_max else _visible(positions, lo, hi, window)
    y = F.scaled_dot_product_attention(_grouped(q, k), k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask)
    return y.reshape(q.shape)


def _full_span(q, k, v, positions, window):
    """Over all S slots with a mask: shapes and work never depend on the positions, nothing is read on the host.
    cuDNN is left out: it builds a plan per shape, and this op must also run inside a CUDA graph's capture."""
    mask = _visible(positions, 0, k.shape[2], window)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        y = F.scaled_dot_product_attention(_grouped(q, k), k, v, attn_mask=mask)
    return y.reshape(q.shape)


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
    if q.device.type == "cpu":
        return _sliced(q, k, v, positions, window)
    return _full_span(q, k, v, positions, window)


@decode_attn_op.register_fake
def _(q, k, v, positions, window):
    return torch.empty_like(q)


def decode_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                window: int | None = None, span: tuple[int, int] | None = None) -> torch.Tensor:
    """Attention of q (B, H, 1, D) at `positions` (B,) over the cache slots k, v (B, H_kv, S, D) (module docstring).

    span: (min, max) of the positions, where an eager caller knows them on the host (gpt.KVCache does):
    on the CPU that saves reading them from the tensor (three ops per layer, a fifth of an attention's
    time at 512 cached tokens, tiny preset). Never given inside a compiled graph, where it would be a constant."""
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return _sliced(q, k, v, positions, window, span)  # eager on the CPU: the same function without the op's dispatch
    return decode_attn_op(q, k, v, positions, window)
