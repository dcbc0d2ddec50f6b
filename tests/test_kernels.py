"""
Tests for kernels/: the Triton kernels against float64 PyTorch, and the custom ops.

On a CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton), one kernel at a time at
small shapes. On a GPU machine, `TRITON_INTERPRET=0 pytest tests/test_kernels.py`
runs the same tests on CUDA for real.

The oracle is always an independent PyTorch computation in float64 on the same
(rounded) inputs: F.scaled_dot_product_attention and F.rms_norm with autograd.
Tolerances, per dtype of the kernel's inputs and outputs (atol, rtol):

    attention  fp32 (2e-5, 1e-4)   fp16 (4e-3, 4e-3)   bf16 (3e-2, 3e-2)
    rms_norm   fp32 (1e-5, 1e-5)   fp16 (1e-3, 2e-3)   bf16 (8e-3, 1.6e-2)

fp32 is a few ulps of accumulated rounding; the 16-bit ones are a few ulps of
the output dtype (fp16 eps 1e-3, bf16 eps 8e-3) plus the 16-bit P tile that
flash attention feeds to its second matmul.

bf16 under the interpreter: its `tl.dot` multiplies the raw bf16 bit patterns
(they are stored as uint16), an upstream limitation. The bf16 tests therefore
patch the interpreter's dot to widen bf16 to fp32 first (exactly, by a shift);
every other bf16 operation (loads, casts, stores) runs unpatched.
"""
import contextlib
import dataclasses
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import attention, rmsnorm, tiles
from kernels import dispatch
from kernels.dispatch import REFERENCE_ENV, TRITON_ATTENTION_ENV, triton_on_cpu, use_triton_attention

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

ATTN_TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
NORM_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}


def run_triton():
    """Where the Triton kernels can run: natively on CUDA, else in the interpreter."""
    return contextlib.nullcontext() if DEVICE == "cuda" else triton_on_cpu()


@pytest.fixture
def bf16_dot(monkeypatch):
    """Make the interpreter's tl.dot correct for bf16 (test-only; no-op on CUDA)."""
    if DEVICE == "cuda":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype == tl.bfloat16:  # bf16 is the top half of an fp32: shift the bits up
            return interpreter.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return t

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def assert_close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------
# Attention

def attention_inputs(B, H, H_kv, T, D, dtype, layout="bhtd", seed=0):
    """q, k, v, dout on DEVICE. layout 'bthd' gives the model's transposed (B, T, H, D) views."""
    g = torch.Generator().manual_seed(seed)

    def make(heads):
        if layout == "bthd":
            return torch.randn(B, T, heads, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
        return torch.randn(B, heads, T, D, generator=g).to(DEVICE, dtype)

    return make(H), make(H_kv), make(H_kv), make(H)


def oracle_mask(T, window=None):
    """(T, T) bool, True where query i sees key j: the lower triangle, less the one below the window's band."""
    ones = torch.ones(T, T, dtype=torch.bool)
    return ones.tril() if window is None else ones.tril() & ~ones.tril(-window - 1)


def attention_oracle(q, k, v, dout, window=None):
    """out, lse, dq, dk, dv in float64 from PyTorch's SDPA and autograd, on the CPU."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    T, D = q.shape[2], q.shape[3]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=oracle_mask(T, window), enable_gqa=True)
    out.backward(dout.cpu().double())
    s = q.detach() @ k.detach().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-2, -1) / math.sqrt(D)
    lse = s.masked_fill(~oracle_mask(T, window), float("-inf")).logsumexp(-1)
    return out.detach(), lse, q.grad, k.grad, v.grad


ATTN_SHAPES = [  # B, H, H_kv, T, D
    (1, 2, 2, 1, 64),  # a single token
    (2, 2, 2, 17, 64),  # shorter than one tile, ragged
    (1, 4, 2, 100, 64),  # GQA, several tiles, ragged end
    (1, 2, 1, 64, 128),  # MQA, a whole number of tiles
    (2, 2, 2, 45, 128),  # ragged, D = 128
]


def check_attention_kernels(shape, dtype, layout="bhtd", window=None):
    q, k, v, dout = attention_inputs(*shape, dtype, layout)
    w = -1 if window is None else window
    with run_triton():
        out, lse = attention._triton_fwd(q, k, v, w)
        dq, dk, dv = attention._triton_bwd(dout, q, k, v, out, lse, w)
    ref = attention_oracle(q, k, v, dout, window)
    tol = ATTN_TOL[dtype]
    assert out.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and lse.dtype == torch.float32
    assert out.stride() == q.stride(), "out should take q's layout"
    assert_close(out, ref[0], tol, "out")
    assert_close(lse, ref[1], ATTN_TOL[torch.float32], "lse")  # always accumulated in fp32
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:]):
        assert_close(got, want, tol, name)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_kernels_match_sdpa(shape, dtype):
    check_attention_kernels(shape, dtype)


@pytest.mark.parametrize("shape", [(2, 4, 2, 33, 64), (1, 2, 2, 40, 128)], ids=lambda s: "B{}H{}Hkv{}T{}D{}".format(*s))
def test_attention_kernels_on_strided_model_layout(shape):
    check_attention_kernels(shape, torch.float32, layout="bthd")


@pytest.mark.parametrize("shape", [(1, 4, 2, 50, 64), (1, 2, 2, 33, 128)], ids=lambda s: "B{}H{}Hkv{}T{}D{}".format(*s))
def test_attention_kernels_bf16(shape, bf16_dot):
    check_attention_kernels(shape, torch.bfloat16)


# Sliding windows against the interpreter's tiles (forward BLOCK_M 32 / BLOCK_N 16, dK/dV 16 / 32,
# dQ 32 / 16): a window of 0 (only the diagonal), smaller than a tile, a whole tile, not a multiple
# of one, crossing several tiles with a ragged end, and wider than the sequence.
WINDOW_CASES = [  # (B, H, H_kv, T, D), window
    ((1, 2, 2, 40, 32), 0),
    ((1, 4, 2, 100, 32), 5),  # GQA
    ((2, 2, 1, 64, 32), 16),  # MQA, whole tiles
    ((1, 2, 2, 97, 32), 33),
    ((1, 4, 2, 70, 64), 40),  # GQA
    ((1, 2, 1, 80, 32), 46),  # query 47 just misses key 0: dK/dV's query tile 32..47 crosses the window's edge
    ((1, 2, 2, 30, 32), 500),
    ((1, 2, 2, 40, 32), 2**31 - 1),  # a "no window" sentinel: the kernels' int32 start + window must not overflow
]


@pytest.mark.parametrize("shape,window", WINDOW_CASES, ids=lambda c: str(c))
def test_attention_kernels_sliding_window(shape, window):
    check_attention_kernels(shape, torch.float32, window=window)


def test_attention_kernels_sliding_window_16bit(bf16_dot):
    check_attention_kernels((1, 4, 2, 50, 64), torch.float16, layout="bthd", window=20)
    check_attention_kernels((1, 2, 1, 45, 32), torch.bfloat16, window=7)


def test_attention_kernels_skip_tiles_outside_the_window(monkeypatch):
    """Key/value tiles wholly outside every row's window are never computed: count the dots.

    Expected: a query tile of the forward / dQ kernels touches the key tiles overlapping
    [first query - window, last query], a key tile of dK/dV the query tiles overlapping
    [first key, last key + window] (queries and keys cut at T); 2 dots per tile in the
    forward, 4 in dK/dV (per query head of the group), 3 in dQ."""
    if DEVICE == "cuda":
        pytest.skip("counts tl.dot calls in Triton's interpreter, which runs on the CPU only")
    from triton.runtime import interpreter
    dots = []
    original = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", lambda self, *a: dots.append(1) or original(self, *a))

    def overlapping(lo, hi, size):  # tiles of `size` overlapping the positions [lo, hi]
        return hi // size - max(lo, 0) // size + 1

    B, H, H_kv, T, D, window = 1, 2, 1, 150, 16, 20
    q, k, v, dout = attention_inputs(B, H, H_kv, T, D, torch.float32)
    cfg = tiles.hand_picked(q)
    counts = {}
    with run_triton():
        for w in (window, -1):
            dots.clear()
            out, lse = attention._triton_fwd(q, k, v, w)
            counts["fwd", w] = len(dots)
            dots.clear()
            attention._triton_bwd(dout, q, k, v, out, lse, w)
            counts["bwd", w] = len(dots)
    for w in (window, -1):
        reach = w if w >= 0 else T  # no window: every key up to the query
        fm, fn = cfg["fwd"]["BLOCK_M"], cfg["fwd"]["BLOCK_N"]
        km, kn = cfg["dkdv"]["BLOCK_M"], cfg["dkdv"]["BLOCK_N"]
        qm, qn = cfg["dq"]["BLOCK_M"], cfg["dq"]["BLOCK_N"]
        fwd = sum(overlapping(m - reach, min(m + fm, T) - 1, fn) for m in range(0, T, fm))
        dkdv = sum(overlapping(n, min(n + kn - 1 + reach, T - 1), km) for n in range(0, T, kn))
        dq = sum(overlapping(m - reach, min(m + qm, T) - 1, qn) for m in range(0, T, qm))
        assert counts["fwd", w] == 2 * B * H * fwd, (w, counts)
        assert counts["bwd", w] == B * H * (4 * dkdv + 3 * dq), (w, counts)
    assert counts["fwd", window] < counts["fwd", -1] and counts["bwd", window] < counts["bwd", -1]


def test_bf16_dot_patch_is_exact(bf16_dot):
    """The patched interpreter dot must give the true bf16 product (else the bf16 tests prove nothing)."""
    a = torch.randn(16, 16).bfloat16()
    b = torch.randn(16, 16).bfloat16()
    expected = a.double() @ b.double()

    import triton
    import triton.language as tl

    @triton.jit
    def matmul(A, B, C, N: tl.constexpr):
        r = tl.arange(0, N)
        x = tl.load(A + r[:, None] * N + r[None, :])
        y = tl.load(B + r[:, None] * N + r[None, :])
        tl.store(C + r[:, None] * N + r[None, :], tl.dot(x, y))

    c = torch.empty(16, 16, device=DEVICE)
    matmul[(1,)](a.to(DEVICE), b.to(DEVICE), c, N=16)
    torch.testing.assert_close(c.double().cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 9])
def test_attention_op_launches_triton_and_backprops(window, monkeypatch):
    """Through the custom op and autograd, inside triton_on_cpu(), the Triton path runs and is right."""
    calls = []
    for name in ("_triton_fwd", "_triton_bwd"):
        fn = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _fn=fn, _name=name: calls.append((_name, a[-1])) or _fn(*a))
    q, k, v, dout = attention_inputs(1, 4, 2, 40, 32, torch.float32, layout="bthd")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with run_triton():
        kernels.flash_attn(q, k, v, window=window).backward(dout)
    w = -1 if window is None else window
    assert calls == [("_triton_fwd", w), ("_triton_bwd", w)]  # the window reaches both kernels
    ref = attention_oracle(q, k, v, dout, window)
    tol = ATTN_TOL[torch.float32]
    for name, t, want in zip("qkv", (q, k, v), ref[2:]):
        assert_close(t.grad, want, tol, f"d{name}")


@pytest.mark.parametrize("window", [None, 0, 6, 36])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_attention_reference_path_matches_sdpa(dtype, window, monkeypatch):
    """On a CPU, outside triton_on_cpu(), the op takes the PyTorch reference path."""
    monkeypatch.setattr(attention, "_triton_fwd", None)  # would raise if called
    monkeypatch.setattr(attention, "_triton_bwd", None)
    q, k, v, dout = attention_inputs(2, 4, 2, 37, 32, dtype)
    q, k, v = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    out, lse = kernels.flash_attn_op(q, k, v, -1 if window is None else window)
    out.backward(dout.cpu())
    ref = attention_oracle(q, k, v, dout, window)
    tol = (1e-12, 1e-10) if dtype == torch.float64 else ATTN_TOL[torch.float32]
    assert_close(out, ref[0], tol, "out")
    assert_close(lse, ref[1], tol, "lse")
    for name, t, want in zip("qkv", (q, k, v), ref[2:]):
        assert_close(t.grad, want, tol, f"d{name}")


@pytest.mark.parametrize("window", [None, 0, 5, 16, 40, 41])
def test_flash_attn_off_triton_path_matches_sdpa(window, monkeypatch):
    """On a CPU flash_attn calls torch's SDPA (an explicit mask for a window shorter than the sequence)."""
    monkeypatch.setattr(attention, "flash_attn_op", None)  # would raise if called
    q, k, v, dout = attention_inputs(2, 4, 2, 41, 32, torch.float32, layout="bthd")
    q, k, v = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    kernels.flash_attn(q, k, v, window=window).backward(dout.cpu())
    ref = attention_oracle(q, k, v, dout, window)
    tol = ATTN_TOL[torch.float32]
    for name, t, want in zip("qkv", (q, k, v), ref[2:]):
        assert_close(t.grad, want, tol, f"d{name}")


def test_dispatch_rule(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    assert not kernels.use_triton(cpu)
    with triton_on_cpu():
        assert kernels.use_triton(cpu)
        monkeypatch.setenv(REFERENCE_ENV, "1")  # forces the reference path, even where Triton could run
        assert not kernels.use_triton(cpu)
    assert not kernels.use_triton(torch.zeros(1, device="meta"))


def test_a_head_dim_the_kernel_cannot_take_goes_to_sdpa():
    """Where Triton runs, flash_attn sent a head dim of 96 to our kernel, which refused it (a RuntimeError in
    training and prefill); decode already fell back."""
    q, k, v = (torch.randn(1, 2, 8, 96) for _ in "qkv")
    with triton_on_cpu():
        out = kernels.flash_attn(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_attention_dispatch_follows_the_gpu_measurements(monkeypatch):
    """On a Hopper GPU where SDPA picks cuDNN, training's causal MHA attention at head dim 128 calls SDPA,
    which measured faster there (kernels/dispatch.py); ours keeps every case that was not measured."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    monkeypatch.delenv(TRITON_ATTENTION_ENV, raising=False)
    asked = []  # the probe runs on a GPU: here it answers "a Hopper, SDPA picks cuDNN" and records the question
    monkeypatch.setattr(dispatch, "sdpa_wins_on", lambda *question: asked.append(question) or True)

    def q_k(H=8, H_kv=8, T=256, D=128, dtype=torch.bfloat16, grad=True):
        return (torch.empty(2, H, T, D, device="cuda:1", dtype=dtype, requires_grad=grad),
                torch.empty(2, H_kv, T, D, device="cuda:1", dtype=dtype))

    with FakeTensorMode():  # CUDA tensors without a GPU: only their metadata is read
        q, k = q_k()
        assert not use_triton_attention(q, k, None)  # fwd+bwd at T 2048: SDPA's cuDNN 422 TFLOP/s, ours 256
        assert asked == [(1, torch.bfloat16, 128)]
        assert not use_triton_attention(q, k, 255)  # a window that holds the whole row is no window
        assert not use_triton_attention(*q_k(dtype=torch.float16), None)
        assert use_triton_attention(q, k, 254)  # sliding windows: SDPA would need a T x T mask
        assert use_triton_attention(*q_k(H_kv=2), None)  # GQA: not measured
        assert use_triton_attention(*q_k(D=64), None)  # head dim 64: not measured
        assert not use_triton_attention(*q_k(D=96), 254)  # a head dim our kernel cannot take: SDPA (it crashed)
        assert use_triton_attention(*q_k(dtype=torch.float32), None)
        assert use_triton_attention(*q_k(grad=False), None)  # forward only (prefill): not measured
        with torch.no_grad():
            assert use_triton_attention(q, k, None)
        monkeypatch.setenv(TRITON_ATTENTION_ENV, "1")  # ours wherever it can run, for A/B runs
        assert use_triton_attention(q, k, None)
        monkeypatch.delenv(TRITON_ATTENTION_ENV)
        monkeypatch.setattr(dispatch, "sdpa_wins_on", lambda *question: False)  # not a Hopper, or SDPA would pick flash
        assert use_triton_attention(q, k, None)
        monkeypatch.setenv(REFERENCE_ENV, "1")
        assert not use_triton_attention(*q_k(D=64), 100)
    monkeypatch.delenv(REFERENCE_ENV)
    cpu_q, cpu_k = torch.zeros(1, 2, 8, 128, requires_grad=True), torch.zeros(1, 2, 8, 128)
    assert not use_triton_attention(cpu_q, cpu_k, None)  # CPU: torch's own
    with triton_on_cpu():
        assert use_triton_attention(cpu_q, cpu_k, None)  # the interpreter (tests): every case


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_attention_dispatch_rule_compiles_into_one_graph(monkeypatch, dynamic):
    """Under torch.compile(fullgraph=True) the rule is decided at trace time, with static or symbolic
    sizes: the GPU probe's answer (cached here, as after its first run) is a constant of the graph."""
    monkeypatch.setitem(dispatch._SDPA_WINS, (0, torch.bfloat16, 128), True)

    def scale(q, k):
        wins = dispatch.sdpa_measured_faster(q, k, None, lambda: dispatch.sdpa_wins_on(0, q.dtype, 128))
        return q * 2 if wins else q * 3

    torch._dynamo.reset()
    compiled = torch.compile(scale, fullgraph=True, dynamic=dynamic, backend="eager")
    for (H_kv, D), factor in (((4, 128), 2), ((4, 64), 3), ((2, 128), 3), ((4, 128), 2)):
        q = torch.ones(1, 4, 8, D, dtype=torch.bfloat16, requires_grad=True)
        k = torch.ones(1, H_kv, 8, D, dtype=torch.bfloat16)
        assert torch.equal(compiled(q, k), torch.full_like(q, factor)), (H_kv, D)


def test_training_logs_which_attention_runs(monkeypatch):
    """train.py and sft.py log the rule's answer for the model's own head shapes (kernels.attention_in_training)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import gpt
    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    monkeypatch.delenv(TRITON_ATTENTION_ENV, raising=False)
    monkeypatch.setattr(dispatch, "sdpa_wins_on", lambda *question: True)
    monkeypatch.setattr(dispatch, "capability_major", lambda device: 8)  # an A100: hand-picked tiles
    d12 = gpt.preset("d12", 1024, 2048)  # MHA, heads of 128
    windows = dataclasses.replace(d12, window_pattern="SSSL")
    assert kernels.attention_in_training(d12, "cpu", torch.float32) == "attention: torch's SDPA"
    with FakeTensorMode():
        said = kernels.attention_in_training(d12, "cuda", torch.bfloat16)
        assert said.startswith("attention: torch's SDPA, which measured faster") and "window" not in said
        said = kernels.attention_in_training(windows, "cuda", torch.bfloat16)
        assert said.endswith("; sliding-window layers: our Triton kernel")
        monkeypatch.setattr(dispatch, "sdpa_wins_on", lambda *question: False)
        assert kernels.attention_in_training(d12, "cuda", torch.bfloat16) == "attention: our Triton kernel"
        monkeypatch.setattr(dispatch, "capability_major", lambda device: 9)  # a Hopper: autotuned tiles where ours runs
        assert kernels.attention_in_training(d12, "cuda", torch.bfloat16).endswith("triton.autotune's pick on this GPU, timed at its first steps (kernels/tiles.py)")
        assert kernels.attention_in_training(d12, "cuda", torch.float32) == "attention: our Triton kernel"
        monkeypatch.setattr(dispatch, "sdpa_wins_on", lambda *question: True)
        assert "autotune" not in kernels.attention_in_training(d12, "cuda", torch.bfloat16)  # SDPA everywhere
        assert "autotune" in kernels.attention_in_training(windows, "cuda", torch.bfloat16)  # ours in the window layers
        monkeypatch.setenv(REFERENCE_ENV, "1")
        assert kernels.attention_in_training(d12, "cuda", torch.bfloat16).endswith(f"({REFERENCE_ENV}=1)")


def test_flash_attn_asks_the_dispatch_rule(monkeypatch):
    """kernels.flash_attn calls SDPA wherever use_triton_attention says so, even where Triton could run."""
    asked = []
    monkeypatch.setattr(attention, "use_triton_attention", lambda q, k, window: asked.append((k.shape, window)) and False)
    monkeypatch.setattr(attention, "flash_attn_op", None)  # would raise if called
    q, k, v, _ = attention_inputs(1, 4, 2, 19, 32, torch.float32)
    q, k, v = (t.detach().cpu() for t in (q, k, v))
    with triton_on_cpu():
        out = kernels.flash_attn(q, k, v, window=7)
    assert asked == [(k.shape, 7)]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attention.visible_keys(19, 7, "cpu"), enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("window", [None, 2])
def test_attention_gradcheck_reference_float64(window):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = -1 if window is None else window
    assert torch.autograd.gradcheck(lambda q, k, v: kernels.flash_attn_op(q, k, v, w)[0], (q, k, v))


def test_attention_opcheck_reference():
    window = 3  # an int argument like any other for the op machinery (no window is -1)
    q, k, v, dout = attention_inputs(1, 4, 2, 9, 16, torch.float32)
    q, k, v, dout = (t.detach().cpu() for t in (q, k, v, dout))
    torch.library.opcheck(kernels.flash_attn_op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), window))
    out, lse = kernels.flash_attn_op(q.detach(), k.detach(), v.detach(), window)
    torch.library.opcheck(kernels.flash_attn_backward_op, (dout, q.detach(), k.detach(), v.detach(), out, lse, window))


def test_attention_opcheck_triton():
    """Schema (no input mutated) and autograd registration, with the Triton path launched."""
    q, k, v, dout = attention_inputs(1, 2, 1, 20, 16, torch.float32)
    with run_triton():
        torch.library.opcheck(kernels.flash_attn_op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 4),
                              test_utils=("test_schema", "test_autograd_registration"))
        out, lse = kernels.flash_attn_op(q.detach(), k.detach(), v.detach(), 4)
        torch.library.opcheck(kernels.flash_attn_backward_op, (dout, q.detach(), k.detach(), v.detach(), out, lse, 4),
                              test_utils=("test_schema",))


def test_attention_rejects_bad_shapes_and_windows():
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(RuntimeError, match="not a multiple"):
        kernels.flash_attn(q, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    q = torch.zeros(1, 2, 4, 8)
    for window in (-1, 2.5):
        with pytest.raises(ValueError, match="window must be None or an int >= 0"):
            kernels.flash_attn(q, q, q, window=window)
    with pytest.raises(RuntimeError, match="window must be >= 0, or -1 for none"):
        kernels.flash_attn_op(q, q, q, -2)
    with pytest.raises(RuntimeError, match="head dims"), run_triton():  # flash_attn sends it to SDPA (test above)
        attention._triton_fwd(*(torch.zeros(1, 2, 4, 24, device=DEVICE) for _ in "qkv"))


# ----------------------------------------------------------------------------
# RMSNorm

NORM_SHAPES = [(1, 64), (7, 64), (3, 5, 100), (33, 1280), (2, 10, 4, 128)]


def norm_oracle(x, dy, eps):
    x = x.detach().cpu().double().requires_grad_()
    y = F.rms_norm(x, (x.shape[-1],), eps=eps)
    y.backward(dy.cpu().double())
    rstd = torch.rsqrt(x.detach().square().mean(-1) + eps)
    return y.detach(), rstd, x.grad


def check_norm_kernels(shape, dtype, transposed=False, eps=1e-6):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    if transposed:  # a non-contiguous input, e.g. a view from a transpose
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    with run_triton():
        y, rstd = rmsnorm._triton_fwd(x, eps)
        dx = rmsnorm._triton_bwd(dy, x, rstd)
    ref_y, ref_rstd, ref_dx = norm_oracle(x, dy, eps)
    assert y.shape == x.shape and y.dtype == dtype and dx.dtype == dtype and rstd.dtype == torch.float32
    assert_close(y, ref_y, NORM_TOL[dtype], "y")
    assert_close(rstd, ref_rstd, NORM_TOL[torch.float32], "rstd")
    assert_close(dx, ref_dx, NORM_TOL[dtype], "dx")


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rms_norm_kernels_match_pytorch(shape, dtype):
    check_norm_kernels(shape, dtype)


def test_rms_norm_kernels_non_contiguous_input():
    check_norm_kernels((6, 9, 64), torch.float32, transposed=True)


def test_rms_norm_op_launches_triton_and_backprops(monkeypatch):
    calls = []
    for name in ("_triton_fwd", "_triton_bwd"):
        fn = getattr(rmsnorm, name)
        monkeypatch.setattr(rmsnorm, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 64, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(5, 3, 64, generator=g).to(DEVICE)
    with run_triton():
        kernels.rms_norm(x, 1e-5).backward(dy)
    assert calls == ["_triton_fwd", "_triton_bwd"]
    _, _, ref_dx = norm_oracle(x, dy, 1e-5)
    assert_close(x.grad, ref_dx, NORM_TOL[torch.float32], "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rms_norm_op_reference_path_matches_pytorch(dtype, monkeypatch):
    """The custom op off the Triton path runs rmsnorm's PyTorch reference (the oracle bench/gpu_norms.py checks
    the GPU kernels against); kernels.rms_norm on a CPU never reaches it (it calls F.rms_norm), so call the op."""
    monkeypatch.setattr(rmsnorm, "_triton_fwd", None)  # would raise if called
    monkeypatch.setattr(rmsnorm, "_triton_bwd", None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 48, generator=g, dtype=dtype, requires_grad=True)
    dy = torch.randn(4, 7, 48, generator=g, dtype=dtype)
    y, rstd = kernels.rms_norm_op(x, 1e-6)
    y.backward(dy)
    ref_y, ref_rstd, ref_dx = norm_oracle(x, dy, 1e-6)
    tol = (1e-12, 1e-10) if dtype == torch.float64 else NORM_TOL[torch.float32]
    assert_close(y, ref_y, tol, "y")
    assert_close(rstd, ref_rstd.to(rstd.dtype), tol, "rstd")
    assert_close(x.grad, ref_dx, tol, "dx")


def test_rms_norm_op_gradcheck_reference_float64():
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: kernels.rms_norm_op(t, 1e-6)[0], (x,))


def test_rms_norm_opcheck_reference():
    x = torch.randn(4, 3, 32)
    torch.library.opcheck(kernels.rms_norm_op, (x.clone().requires_grad_(), 1e-6))
    y, rstd = kernels.rms_norm_op(x, 1e-6)
    torch.library.opcheck(kernels.rms_norm_backward_op, (torch.randn_like(x), x, rstd))


def test_rms_norm_opcheck_triton():
    x = torch.randn(4, 3, 32, device=DEVICE)
    with run_triton():
        torch.library.opcheck(kernels.rms_norm_op, (x.clone().requires_grad_(), 1e-6),
                              test_utils=("test_schema", "test_autograd_registration"))
        y, rstd = kernels.rms_norm_op(x, 1e-6)
        torch.library.opcheck(kernels.rms_norm_backward_op, (torch.randn_like(x), x, rstd), test_utils=("test_schema",))


def test_rms_norm_rejects_bad_input():
    with run_triton():
        with pytest.raises(ValueError, match="last dim of at least 1"):
            kernels.rms_norm(torch.zeros(3, 0, device=DEVICE))
        with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
            kernels.rms_norm(torch.zeros(3, 8, dtype=torch.float64, device=DEVICE))


# ----------------------------------------------------------------------------
# RMSNorm: which path runs, and how it launches


def test_rms_norm_dispatch_follows_the_gpu_measurements(monkeypatch):
    """On CUDA, kernels.rms_norm takes our kernel only where it measured faster (kernels/dispatch.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    with FakeTensorMode():  # CUDA tensors without a GPU: only their metadata is read
        qk = torch.empty(64, 128, device="cuda", requires_grad=True)
        residual = torch.empty(64, 768, device="cuda", requires_grad=True)
        assert kernels.use_triton_rms_norm(qk)  # 655360 x 128 fwd+bwd: ours 1,193 GB/s vs 1,036 / 1,102
        assert not kernels.use_triton_rms_norm(residual)  # 65536 x 768: ours 583 GB/s vs eager 2,693
        assert not kernels.use_triton_rms_norm(torch.empty(64, 1280, device="cuda", requires_grad=True))
        assert not kernels.use_triton_rms_norm(qk.detach())  # forward only: not measured
        with torch.no_grad():
            assert not kernels.use_triton_rms_norm(qk)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not kernels.use_triton_rms_norm(qk)  # under torch.compile Inductor fuses F.rms_norm
        monkeypatch.undo()
        monkeypatch.setenv(REFERENCE_ENV, "1")
        assert not kernels.use_triton_rms_norm(qk)
    assert not kernels.use_triton_rms_norm(torch.zeros(4, 128, requires_grad=True))  # CPU: torch's own
    with triton_on_cpu():
        monkeypatch.delenv(REFERENCE_ENV)
        assert kernels.use_triton_rms_norm(torch.zeros(4, 768))  # the interpreter (tests): every width


def test_rms_norm_under_compile_is_torchs_own(monkeypatch):
    """kernels.rms_norm traced by torch.compile becomes F.rms_norm (fusable), even where Triton could run."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with run_triton():
        x = torch.randn(4, 128, device=DEVICE, requires_grad=True)
        torch.compile(lambda t: kernels.rms_norm(t, 1e-6), backend=capture, fullgraph=True)(x)
    code = graphs[0].code
    assert "rms_norm" in code and "nanoschnack" not in code, code


def test_rms_norm_launch_config_is_concrete_under_symbolic_shapes(monkeypatch):
    """Every launch configuration is a Python int, also when rows and width are symbols (as under torch.compile)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    launches, sizes = [], {}

    class Record:  # stands in for wrap_triton: records kernel[grid](*args, **kwargs)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel.__name__, grid, kwargs))

    def fwd_bwd(x):
        sizes["x"] = x.shape
        y, rstd = rmsnorm._triton_fwd(x, 1e-6)
        return rmsnorm._triton_bwd(torch.empty_like(y), x, rstd)

    monkeypatch.setattr(rmsnorm, "wrap_triton", Record)
    gm = make_fx(fwd_bwd, tracing_mode="symbolic")(torch.empty(6, 5, 100))  # every size a symbol
    rows = set().union(*(s.node.expr.free_symbols for s in sizes["x"][:-1]))  # the row count's symbols
    assert [name for name, *_ in launches] == ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"]
    for name, grid, kwargs in launches:
        assert kwargs["N_COLS"] == 100 and kwargs["BLOCK_COLS"] == 128
        assert all(type(v) is int for v in kwargs.values()), (name, kwargs)  # no SymInt reached the launch
        assert isinstance(grid[0], torch.SymInt) and grid[0].node.expr.free_symbols == rows, (name, grid)
    # the width was specialised to 100 with a guard (a new width compiles anew); the row counts stay symbols
    assert sizes["x"][-1] == 100 and any("100" in str(g.expr) for g in gm.shape_env.guards)
    assert rows and not rows & set(gm.shape_env.replacements)


def test_rms_norm_launch_config_is_cached():
    assert rmsnorm._launch_config(768, "cuda") is rmsnorm._launch_config(768, "cuda")
    assert rmsnorm._launch_config(768, "cuda") == dict(N_COLS=768, BLOCK_ROWS=4, BLOCK_COLS=1024, num_warps=8)
    assert rmsnorm._launch_config(128, "cuda") == dict(N_COLS=128, BLOCK_ROWS=32, BLOCK_COLS=128, num_warps=8)
    assert rmsnorm._launch_config(1, "cuda")["BLOCK_COLS"] == 1


def test_flash_attn_off_triton_path_window_just_short_of_the_sequence(monkeypatch):
    """A window of T - 2 still cuts a key off (T - 1 is the first that does not): SDPA must get the mask."""
    window = 39
    monkeypatch.setattr(attention, "flash_attn_op", None)  # would raise if called
    q, k, v, dout = attention_inputs(2, 4, 2, 41, 32, torch.float32, layout="bthd")
    q, k, v = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    out = kernels.flash_attn(q, k, v, window=window)
    out.backward(dout.cpu())
    ref = attention_oracle(q, k, v, dout, window)
    tol = ATTN_TOL[torch.float32]
    assert_close(out, ref[0], tol, "out")
    for name, t, want in zip("qkv", (q, k, v), ref[2:]):
        assert_close(t.grad, want, tol, f"d{name}")


def test_attention_op_refuses_mixed_dtypes():
    """q, k and v of different dtypes are refused with the reason (the Triton kernel would not compile them)."""
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernels.flash_attn_op(q, q.double(), q.double(), -1)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernels.flash_attn_op(q, q, q.half(), -1)


def test_attention_kernels_take_any_layout():
    """The kernels read the head dim at stride 1; q, k, v or dout laid out otherwise (e.g. a gradient that
    autograd hands back transposed) are copied, not misread."""
    q, k, v, dout = attention_inputs(1, 2, 2, 20, 16, torch.float32)
    head_dim_outer = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) = T
    with run_triton():
        out, lse = attention._triton_fwd(head_dim_outer(q), head_dim_outer(k), head_dim_outer(v), -1)
        dq, dk, dv = attention._triton_bwd(head_dim_outer(dout), head_dim_outer(q), head_dim_outer(k),
                                           head_dim_outer(v), head_dim_outer(out), lse, -1)
    ref = attention_oracle(q, k, v, dout)
    tol = ATTN_TOL[torch.float32]
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref[0], *ref[2:])):
        assert_close(got, want, tol, name)
