"""
The PyTorch reference of kernels/attention.py: causal attention (with an optional
sliding window and grouped-query heads) written out as textbook math on the whole
T x T score matrix, in fp32 (fp64 for fp64 inputs). It is the oracle every Triton
kernel test compares against, and what the custom ops run off the Triton path.
"""
import math

import torch


def visible_keys(T: int, window: int, device) -> torch.Tensor:
    """(T, T) bool: query i sees key j iff j <= i and, with a window (>= 0), i - j <= window."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j <= window) if window >= 0 else j <= i


def reference_probs(q, k, lse=None, window=-1):
    """Softmax probabilities P (B, H, T, T) in fp32 (fp64 for fp64 inputs), and the LSE."""
    group = q.shape[1] // k.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    k = k.repeat_interleave(group, dim=1).to(compute)
    s = (q.to(compute) @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~visible_keys(q.shape[2], window, q.device), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.to(compute).unsqueeze(-1)), lse


def reference_fwd(q, k, v, window=-1):
    p, lse = reference_probs(q, k, window=window)
    v = v.repeat_interleave(q.shape[1] // k.shape[1], dim=1).to(p.dtype)
    out = (p @ v).to(q.dtype)
    return out, lse.to(torch.float32) if q.dtype != torch.float64 else lse


def reference_bwd(dout, q, k, v, out, lse, window=-1):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    group = H // H_kv
    p, _ = reference_probs(q, k, lse, window)
    compute = p.dtype
    dout32, q32 = dout.to(compute), q.to(compute)
    k32 = k.repeat_interleave(group, dim=1).to(compute)
    v32 = v.repeat_interleave(group, dim=1).to(compute)
    delta = (dout32 * out.to(compute)).sum(-1, keepdim=True)
    dv = p.transpose(-2, -1) @ dout32
    ds = p * (dout32 @ v32.transpose(-2, -1) - delta)
    scale = 1.0 / math.sqrt(D)
    dq = (ds @ k32) * scale
    dk = (ds.transpose(-2, -1) @ q32) * scale
    # GQA: a key/value head's gradient is the sum over the query heads that read it
    dk = dk.view(B, H_kv, group, T, D).sum(2)
    dv = dv.view(B, H_kv, group, T, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
