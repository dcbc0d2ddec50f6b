"""
The tiles the attention kernels (kernels/attention.py) launch with: BLOCK_M x BLOCK_N,
num_warps and num_stages of the forward, dK/dV and dQ kernels (and the delta kernel's
rows). Hand-picked ones, which every GPU but a Hopper runs, and on a Hopper the
candidates triton.autotune chooses among on the user's GPU (HOPPER_SPACES, and
HOPPER_TMA_SPACES: the same kernels loading through TMA), the hand-picked ones first.
Plain data and functions: attention.py makes the autotuners.
"""
import contextlib

import torch

# The hand-picked tiles.
#
# The big tile is a multiple of the small one in every kernel, so the diagonal
# region splits into whole small tiles. The 16-bit configs (every preset trains
# in bf16) compile without a single register spill on sm_90 and sm_80 (the ptxas
# of the triton 3.7.1 wheel; tests/test_kernels_aot.py recompiles them all, see
# kernels/aot.py; 3.6.0 spills in dK/dV with GQA, see the Hopper spaces below): 8 warps wherever a 128-row tile at D = 128, or the dK/dV
# kernel's accumulators, would not fit 4 warps' registers, and dK/dV streams 16
# queries at a time (32 spilled on sm_80). The windowed dK/dV at D = 128 runs a
# third loop (the window's edge) inside the GQA loop: with 128 keys a program it
# spills 20 bytes on sm_80 (255 registers), with 64 none on either target.
# fp32 (exact math, for tests) uses 8 warps in the D = 128 forward, where 4
# spilled 1.2 KB per thread on sm_90 with GQA (2.1 KB with a window), and
# 32-row tiles on 8 warps in the windowed D = 128 dQ (64 rows on 4 or 8 warps
# spilled 0.8-1.7 KB on sm_90); it spills a little elsewhere in the backward
# (see tests/test_kernels_aot.py). None of them
# were timed on a GPU here: bench/gpu.py does that. The interpreter gets small
# tiles so that tests at T ~ 100 still cross several tiles and a ragged end.

def hand_picked(x: torch.Tensor, windowed: bool = False) -> dict:
    """The hand-picked tiles of each attention kernel ("fwd", "dkdv", "dq", "delta") for inputs like x."""
    if x.device.type != "cuda":  # Triton interpreter
        return _through_pointers(dict(fwd=dict(BLOCK_M=32, BLOCK_N=16), dkdv=dict(BLOCK_M=16, BLOCK_N=32),
                                      dq=dict(BLOCK_M=32, BLOCK_N=16), delta=dict(BLOCK_M=32)))
    D = x.shape[-1]
    if x.dtype == torch.float32:  # exact dots on the FMA units keep whole tiles in registers: small tiles
        return _through_pointers(dict(
            fwd=dict(BLOCK_M=32, BLOCK_N=32 if D <= 64 else 16, num_warps=4 if D <= 64 else 8, num_stages=2),
            dkdv=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
            dq=dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2) if windowed and D > 64
            else dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2),
            delta=dict(BLOCK_M=64)))
    return dict(hand_picked_16bit(D, windowed), delta=dict(BLOCK_M=64))


def hand_picked_16bit(head_dim: int, windowed: bool) -> dict:
    """The hand-picked 16-bit tiles of the forward, dK/dV and dQ kernels on CUDA (see above)."""
    stages = 5 if head_dim <= 64 else 3  # shared memory: D = 128 tiles are twice as big
    return _through_pointers(dict(
        fwd=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        dkdv=dict(BLOCK_M=16, BLOCK_N=64 if windowed and head_dim > 64 else 128, num_warps=8, num_stages=stages),
        dq=dict(BLOCK_M=128, BLOCK_N=32, num_warps=4 if head_dim <= 64 else 8, num_stages=stages)))


def _through_pointers(tiles: dict) -> dict:
    """The hand-picked tiles load through pointers: TMA=False in the forward's, dK/dV's and dQ's configs (the
    delta kernel has no TMA variant)."""
    return {which: config if which == "delta" else dict(config, TMA=False) for which, config in tiles.items()}


# Autotuning on a Hopper (training and evaluation; see dispatch.autotune_attention for where not). There
# triton.autotune times every candidate below on the user's GPU (compiled at once, on threads, first:
# attention._compile_ahead), at the first launch of each key (tune_len: the sequence length rounded up to a power of two; group size; dtype; one
# autotuner per kernel, head dim and windowing), and launches the fastest from then on; the timings are
# kept in Triton's cache directory (cache_results), so a later run starts without re-timing. The first of
# each space is the hand-picked config above, so the pick never timed slower than it.
# The spaces (BLOCK_M, BLOCK_N, num_warps, num_stages) span what a Hopper rewards: 128-row tiles on two
# warpgroups (wgmma works a warpgroup of 4 warps at a time on 64 rows), 64-row tiles on one, key tiles of
# 32 to 128, and 2 to 4 stages of cp.async pipelining, up to the 227 KB of shared memory a block may use
# (D = 128, 128 x 128 tiles: 224 KB at 3 stages, 288 at 4). Every candidate compiled for sm_90 without a
# register spill at D = 64 and 128, MHA and GQA, with and without a window (kernels/aot.py;
# tests/test_kernels_aot.py keeps it so with triton 3.7.1, and it was so with 3.6.0, what the H200 image of
# issue 25 ships), which is what ruled out, e.g., the forward's 128 x 64 and 128 x 128 tiles on 4 warps
# (1.2-5.7 KB spilled a thread at D = 128), dK/dV's 64 x 128 tiles (92-208 B on 8 warps at D = 128) and, with
# 3.6.0 and GQA, its 64 x 64 and 32 x 128 at 3 stages (24-232 B at D = 64). With 3.6.0 the hand-picked dK/dV
# tiles themselves spill with GQA (stores and loads together: D = 64 with a window 248 B on sm_90 and 364 on sm_80,
# without one 60 on sm_80; D = 128 112 on sm_80, with a window 24).
# dK/dV's BLOCK_M is its query tile, the K of two of its three dots: 16 is one wgmma step, 32 and 64
# are two and four, the tutorial's choice being 32 with 128 keys. None of these were timed here: which
# wins on an H100/H200 is the autotuner's measurement (bench/gpu.py reports its picks). Other GPUs keep
# the hand-picked tiles, the only ones kernels/aot.py checks on sm_80. The tutorial's host-side tensor
# descriptors are not used: they need a per-config pre_hook to set their block shape, and torch.compile
# rejects pre_hooks on user kernels (pytorch issue #139059); the TMA candidates below make theirs in the kernel.
HOPPER_SPACES = {
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
            (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4)],
    "dkdv": [(16, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3), (16, 64, 4, 3)],
    # dK/dV at D = 128 holds two 128-wide fp32 accumulators a key: with GQA (its loop over the group) the
    # tiles above spilled 12-292 B a thread, and so did 16 x 128 at 3 stages and 16 x 64 at 4, 32 x 64 at
    # 2 or 3 with a window with triton 3.6.0
    "dkdv D128": [(16, 128, 8, 2), (16, 64, 8, 2), (16, 64, 8, 3)],
    "dq": [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 16, 8, 3),
           (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3)],
}

# TMA candidates (tiles.hopper_space with tma: where the tensors allow it, attention._tma_aligned, and unless
# NANOSCHNACK_ATTENTION_TMA=0). These load
# the tiles each program streams (the forward's and dQ's keys and values, dK/dV's queries and output gradients)
# through tensor descriptors: the Hopper's tensor memory accelerator copies a whole tile into shared memory,
# from one descriptor instead of a pointer a row, so the loop holds no address arithmetic (the Triton
# tutorial's Hopper forward loads K and V so). Compiled for sm_90 (bf16, no window, MHA) this cut the
# registers a thread, against the same tiles through pointers: forward 128 x 64 on 8 warps, 3 stages, from 188
# to 147 at D = 128 and 125 to 112 at D = 64; dQ 128 x 64 at D = 128 from 210 to 176 (kernels/aot.py). The
# lists are what a compile sweep of 58 tiles x 4 cases (D = 64 and 128, MHA and GQA, with and without a
# window) left spill-free with triton 3.7.1 and then 3.6.0, drawn from the pointer spaces above: the forward's
# 128 x 128 tiles (24 B spilled at D = 128 with a window), dK/dV's 16 x 128 at D = 128 (72-80 B with GQA) and
# its 32 x 64 on 4 warps fell out with 3.7.1; with 3.6.0, GQA with a window, dK/dV's 32 x 128 at 3 stages
# (D = 64: 120 B) and 32 x 64 (D = 128: 192 B). Not among them: the tutorial's warp specialisation, which
# upstream Triton does on Blackwell only: the forward's key loop as tl.range(..., warp_specialize=True)
# compiled for sm_90 to the very same PTX as without (3.7.1 and 3.6.0; bench/RESULTS.md).
HOPPER_TMA_SPACES = {
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3)],
    "dkdv": [(16, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3), (16, 64, 4, 3)],
    "dkdv D128": [(16, 64, 8, 2), (16, 64, 8, 3)],
    "dq": [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
}


def hopper_space(which: str, head_dim: int, windowed: bool, tma: bool) -> list[dict]:
    """The candidate tiles of kernel `which` on a Hopper, as config dicts: the hand-picked one first; with
    tma, then the candidates that load their streamed tiles through TMA tensor descriptors."""
    first = hand_picked_16bit(head_dim, windowed)[which]
    key = "dkdv D128" if which == "dkdv" and head_dim > 64 else which
    tables = [(HOPPER_SPACES, False)] + [(HOPPER_TMA_SPACES, True)] * tma
    space = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, TMA=loads_through_tma)
             for table, loads_through_tma in tables for m, n, w, s in table[key]]
    return [first] + [c for c in space if c != first]


_forced = None  # {which: config} inside forced_tiles()


@contextlib.contextmanager
def forced_tiles(tiles: dict):
    """Launch the forward, dK/dV and dQ kernels with these tiles ({"fwd": config, "dkdv": ..., "dq": ...}, configs
    as hopper_space gives them) instead of the autotuner's pick or the hand-picked ones: to check each candidate
    on its own (tests/test_kernels_autotune.py in the interpreter, bench/gpu.py's candidates section on a GPU)."""
    global _forced
    previous, _forced = _forced, tiles
    try:
        yield
    finally:
        _forced = previous


def forced() -> dict | None:
    """The tiles forced_tiles() was given, inside it; None outside."""
    return _forced
