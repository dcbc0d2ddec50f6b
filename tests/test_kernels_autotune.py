"""
The attention kernels' autotuning on a Hopper (kernels/tiles.py, HOPPER_SPACES; kernels/attention.py), on a CPU.

What the GPU would decide (which candidate is fastest) is not knowable here; what is checked:
  * every candidate tile the autotuner can pick computes attention, forward and backward, with and
    without a window, MHA and GQA, in Triton's interpreter against the float64 oracle, the TMA
    candidates too (the interpreter runs tensor descriptors: bounds and zero padding included);
  * TMA candidates are offered only for 16-byte aligned tiles, and NANOSCHNACK_ATTENTION_TMA=0 drops them;
  * the autotuner itself, run in the interpreter with its timing replaced by made-up times: it times
    every candidate of each kernel once per key, launches the one that timed fastest, keys on the
    rounded sequence length (nearby lengths share a tuning), and autotune_picks() reports the pick;
  * the rule of when to autotune (dispatch.autotune_attention), on fake CUDA tensors.
kernels/aot.py compiles every candidate for sm_90 (tests/test_kernels_aot.py), and
tests/test_kernels_compile.py follows the candidates through Inductor's code generation.
"""
import pytest
import torch

from kernels import attention, dispatch, tiles
from kernels.dispatch import AUTOTUNE_ENV, TMA_ENV, triton_on_cpu
from test_kernels import ATTN_TOL, assert_close, attention_inputs, attention_oracle

WHICH = ("fwd", "dkdv", "dq")
MOST_CANDIDATES = max(len(tiles.hopper_space(w, D, win, tma=True)) for w in WHICH for D in (64, 128) for win in (False, True))


def attention_and_grads(q, k, v, dout, window):
    """out, lse, dq, dk, dv from the Triton launchers (whatever _kernel hands them)."""
    out, lse = attention._triton_fwd(q, k, v, window)
    return (out, lse, *attention._triton_bwd(dout, q, k, v, out, lse, window))


def check_against_oracle(got, q, k, v, dout, window, what):
    want = attention_oracle(q, k, v, dout, None if window < 0 else window)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert_close(g, w, ATTN_TOL[torch.float32], f"{what}: {name}")


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("window", [-1, 45], ids=["causal", "window 45"])
@pytest.mark.parametrize("index", range(MOST_CANDIDATES))
def test_every_hopper_candidate_computes_attention(D, window, index):
    """Candidate `index` of each kernel's space (the last one where a space is shorter), fp32 in the interpreter:
    the tiles are what differs between candidates, and a T of 140 crosses 128-row tiles and ends ragged (200 did
    too, at 1.5 times the interpreter's time: 68 of these cost about 110 s of CPU)."""
    picked = {w: tiles.hopper_space(w, D, window >= 0, tma=True) for w in WHICH}
    picked = {w: space[min(index, len(space) - 1)] for w, space in picked.items()}
    q, k, v, dout = attention_inputs(1, 4, 2, 140, D, torch.float32, layout="bthd")
    with triton_on_cpu(), tiles.forced_tiles(picked):
        got = attention_and_grads(q, k, v, dout, window)
    check_against_oracle(got, q, k, v, dout, window, f"candidates {picked}")


@pytest.mark.parametrize("T", [50, 200])
@pytest.mark.parametrize("H_kv", [4, 2], ids=["MHA", "GQA"])
def test_tma_tiles_find_every_batch_row_and_head(H_kv, T):
    """The candidates above run one batch row; a TMA descriptor is made per batch row and head from the strides
    (_row_tiles), so two rows of the model's transposed views, with a window, show a wrong base. T = 50 is
    shorter than every tile: the descriptor's bounds alone end the sequence."""
    picked = {w: next(c for c in tiles.hopper_space(w, 64, True, tma=True) if c["TMA"]) for w in WHICH}
    q, k, v, dout = attention_inputs(2, 4, H_kv, T, 64, torch.float32, layout="bthd", seed=1)
    with triton_on_cpu(), tiles.forced_tiles(picked):
        got = attention_and_grads(q, k, v, dout, 45)
    check_against_oracle(got, q, k, v, dout, 45, f"TMA tiles {picked}")


def test_autotuner_times_every_candidate_once_per_key_and_launches_the_fastest(monkeypatch):
    monkeypatch.setattr(attention, "_AUTOTUNERS", {})
    monkeypatch.setattr(attention, "autotune_attention", lambda x: True)
    timed = {w: [] for w in WHICH}
    fastest = {"fwd": 3, "dkdv": 2, "dq": 0}  # made-up timings: candidate i of kernel w takes 1 ms, but this one 0.5

    for which in WHICH:
        tuner = attention._autotuned(which, 64, True, tma=True)  # the interpreter's tensors are aligned

        def made_up_timing(kernel_call, quantiles, which=which):
            kernel_call()  # the candidate really runs (in the interpreter)
            i = len(timed[which]) % len(tiles.hopper_space(which, 64, True, tma=True))
            timed[which].append(i)
            ms = 0.5 if i == fastest[which] else 1.0
            return [ms, ms, ms]
        monkeypatch.setattr(tuner, "_do_bench", made_up_timing)

    with triton_on_cpu():
        for T in (150, 200, 300):  # 150 and 200 round to the same tune_len (256): one tuning for both
            q, k, v, dout = attention_inputs(1, 2, 2, T, 64, torch.float32, layout="bthd", seed=T)
            got = attention_and_grads(q, k, v, dout, 40)
            check_against_oracle(got, q, k, v, dout, 40, f"T {T}")

    for which in WHICH:
        n = len(tiles.hopper_space(which, 64, True, tma=True))
        assert timed[which] == list(range(n)) * 2, which  # every candidate once, for tune_len 256 and 512
        tuner = attention._AUTOTUNERS[(which, 64, True, True)]
        assert sorted(key[0] for key in tuner.cache) == [256, 512]
        want = tiles.hopper_space(which, 64, True, tma=True)[fastest[which]]
        for config in tuner.cache.values():
            assert dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages) == want, which
    picks = attention.autotune_picks()
    assert len(picks) == 6
    want = tiles.hopper_space("fwd", 64, True, tma=True)[fastest["fwd"]]
    assert f"fwd, D 64, windowed, tune_len 256, group 1, float32: BLOCK_M {want['BLOCK_M']}, BLOCK_N {want['BLOCK_N']}" in picks[0]


def test_hopper_spaces_start_with_the_hand_picked_tiles():
    """So the autotuner's pick is never one that timed slower than the tiles every other GPU runs; and the first
    config loads through pointers: Inductor analyses the first config's IR (attention._autotuned says why)."""
    for which in WHICH:
        for D in (64, 128):
            for windowed in (False, True):
                space = tiles.hopper_space(which, D, windowed, tma=True)
                assert space[0] == tiles.hand_picked_16bit(D, windowed)[which] and not space[0]["TMA"]
                assert len(space) == len({tuple(sorted(c.items())) for c in space}), "a candidate twice"
                assert tiles.hopper_space(which, D, windowed, tma=False) == [c for c in space if not c["TMA"]]


def test_autotuning_rule(monkeypatch):
    """bf16/fp16 on a compute capability 9 GPU autotune, outside inference mode, unless
    NANOSCHNACK_ATTENTION_AUTOTUNE=0; fp32, other GPUs and CPU tensors keep the hand-picked tiles."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    major = {"cuda:0": 9}
    monkeypatch.setattr(dispatch, "capability_major", lambda device: major[str(device)])
    with FakeTensorMode():
        bf16, fp16, fp32 = (torch.empty(2, 4, 64, 128, device="cuda:0", dtype=t)
                            for t in (torch.bfloat16, torch.float16, torch.float32))
        assert dispatch.autotune_attention(bf16) and dispatch.autotune_attention(fp16)
        assert not dispatch.autotune_attention(fp32)
        with torch.no_grad():  # evaluation: autotunes
            assert dispatch.autotune_attention(bf16)
        with torch.inference_mode():  # chat's and serving's prefill: no tuning run before a first token
            assert not dispatch.autotune_attention(bf16)
        monkeypatch.setenv(AUTOTUNE_ENV, "0")
        assert not dispatch.autotune_attention(bf16)
        monkeypatch.delenv(AUTOTUNE_ENV)
        major["cuda:0"] = 8  # an A100: only the hand-picked tiles are compiled and checked for sm_80
        assert not dispatch.autotune_attention(bf16)
    assert not dispatch.autotune_attention(torch.empty(1, dtype=torch.bfloat16))


def test_tma_candidates_only_where_tiles_are_16_byte_aligned(monkeypatch):
    """TMA copies tiles whose rows start 16-byte aligned: the model's (B, T, H, D) views qualify; a tensor that
    starts mid-way through 16 bytes, whose rows are 8 bytes apart, or whose rows overlap (a stride of 0 along
    T) gets an autotuner without TMA candidates, and forcing TMA tiles on it is an error, not a misaligned
    copy. NANOSCHNACK_ATTENTION_TMA=0 leaves them out."""
    model_view = torch.empty(2, 100, 6, 64, dtype=torch.bfloat16).transpose(1, 2)
    shifted = torch.empty(2 * 100 * 6 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 100, 6, 64).transpose(1, 2)
    narrow = torch.empty(2, 100, 1, 4, dtype=torch.bfloat16).transpose(1, 2)
    expanded = torch.empty(2, 6, 1, 64, dtype=torch.bfloat16).expand(2, 6, 100, 64)  # e.g. the gradient of a sum over T
    assert attention._tma_aligned(model_view, model_view)
    assert not attention._tma_aligned(model_view, shifted) and not attention._tma_aligned(narrow)
    assert not attention._tma_aligned(expanded)

    monkeypatch.setattr(attention, "_AUTOTUNERS", {})
    monkeypatch.setattr(attention, "autotune_attention", lambda x: True)
    for streamed, tma, env in (((model_view, model_view), True, "1"), ((shifted, model_view), False, "1"),
                               ((model_view, model_view), False, "0")):
        monkeypatch.setenv(TMA_ENV, env)
        tuner, _ = attention._kernel("fwd", model_view, False, streamed)
        assert [c.kwargs["TMA"] for c in tuner.configs] == [c["TMA"] for c in tiles.hopper_space("fwd", 64, False, tma)]
        assert any(c.kwargs["TMA"] for c in tuner.configs) == tma
    forced = {w: next(c for c in tiles.hopper_space(w, 64, False, tma=True) if c["TMA"]) for w in WHICH}
    with tiles.forced_tiles(forced), pytest.raises(RuntimeError, match="TMA tiles forced on unaligned tensors"):
        attention._kernel("fwd", model_view, False, (shifted, shifted))


def test_cuda_launches_that_may_load_through_tma_set_the_allocator(monkeypatch):
    """At a launch Triton asks its allocator for the global scratch the TMA descriptors are written to, and raises
    without one: a CUDA launch that may load through TMA (a TMA tile, or an autotuner) sets ours first, in this
    thread (the allocator is a ContextVar); other launches leave it alone."""
    from collections import defaultdict

    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime import _allocation
    launched = []
    monkeypatch.setattr(attention, "wrap_triton", lambda kernel: defaultdict(lambda: lambda *a, **k: launched.append(k)))
    token = _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
    try:
        with FakeTensorMode():
            x = torch.empty(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
            attention._launch(attention._KERNELS["fwd"], None)(x, TMA=False)
            assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
            attention._launch(attention._KERNELS["fwd"], None)(x, TMA=True)
            assert _allocation._allocator.get() is attention._tma_scratch
        assert len(launched) == 2
    finally:
        _allocation._allocator.reset(token)
