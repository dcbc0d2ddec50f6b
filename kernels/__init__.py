"""
nanoschnack's fused kernels: causal flash attention, RMSNorm and RoPE + QK-norm, in Triton.

    from kernels import flash_attn, rms_norm
    y = flash_attn(q, k, v)      # q (B, H, T, D), k/v (B, H_kv, T, D), causal
    x = rms_norm(x, eps=1e-6)    # over the last dim, no weight
    y = decode_attn(q, k_cache, v_cache, positions)   # one query per row over a static KV cache
    q = rope_norm(q, cos, sin, eps, gain)   # q (B, T, H, D), cos/sin (T, D/2): gain * rms_norm(rotary(q))

They are torch.library custom ops (nanoschnack::flash_attn, nanoschnack::rms_norm,
nanoschnack::rope_norm and their *_backward ops) with autograd registered, so torch.compile traces them
without a graph break. On CUDA tensors flash_attn launches Triton except where
torch's SDPA measured faster (use_triton_attention), rms_norm only where ours
measured faster (use_triton_rms_norm); both call torch's own ops (SDPA, F.rms_norm)
everywhere else. For A/B runs NANOSCHNACK_REFERENCE_KERNELS=1 calls torch's ops on
the GPU too, NANOSCHNACK_TRITON_ATTENTION=1 runs our attention wherever it can, and
NANOSCHNACK_ATTENTION_AUTOTUNE=0 keeps its hand-picked tiles on a Hopper, where
triton.autotune otherwise picks them, and NANOSCHNACK_ATTENTION_TMA=0 leaves out the
candidates that load through TMA (see kernels/dispatch.py, kernels/tiles.py).
rope_norm (nanoschnack::rope_norm and its backward) fuses gpt.py's rotary embedding,
QK-norm and QK gain; it runs its kernel only with NANOSCHNACK_FUSED_ROPE_NORM=1 (an
A/B switch until measured on a GPU), gpt.py's composition otherwise.
"""
from kernels import attention, rmsnorm, ropenorm
from kernels.attention import flash_attn
from kernels.decode import decode_attn, decode_attn_op
from kernels.dispatch import (AUTOTUNE_ENV, FUSED_ROPE_NORM_ENV, RMS_NORM_TRITON_WIDTHS, REFERENCE_ENV, TMA_ENV, TRITON_ATTENTION_ENV,
                              attention_in_training, triton_on_cpu, use_fused_rope_norm, use_triton, use_triton_attention,
                              use_triton_rms_norm)
from kernels.rmsnorm import rms_norm
from kernels.ropenorm import rope_norm


def register_ops() -> None:
    """Make the attention, RMSNorm and RoPE + QK-norm custom ops now; a CPU-only torch makes them on first use
    (kernels/dispatch.py, ops_on_first_use, says why)."""
    attention.register_ops()
    rmsnorm.register_ops()
    ropenorm.register_ops()


def __getattr__(name: str):  # the ops, made on first use on a CPU-only torch
    if name in ("flash_attn_op", "flash_attn_backward_op"):
        return getattr(attention, name)
    if name in ("rms_norm_op", "rms_norm_backward_op"):
        return getattr(rmsnorm, name)
    if name in ("rope_norm_op", "rope_norm_backward_op"):
        return getattr(ropenorm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "flash_attn", "flash_attn_op", "flash_attn_backward_op", "decode_attn", "decode_attn_op",
    "rms_norm", "rms_norm_op", "rms_norm_backward_op", "rope_norm", "rope_norm_op", "rope_norm_backward_op",
    "register_ops", "use_triton", "use_triton_attention", "use_triton_rms_norm", "use_fused_rope_norm",
    "RMS_NORM_TRITON_WIDTHS", "triton_on_cpu",
    "REFERENCE_ENV", "TRITON_ATTENTION_ENV", "AUTOTUNE_ENV", "TMA_ENV", "FUSED_ROPE_NORM_ENV", "attention_in_training",
]
