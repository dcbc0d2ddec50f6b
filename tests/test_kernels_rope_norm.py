"""
Tests for kernels/ropenorm.py: RoPE + QK-norm + QK gain as one Triton op.

As in tests/test_kernels.py: on a CPU the kernels run in Triton's interpreter at small
shapes (its tiles of 512 elements: 8 rows of 64, 4 of 128, so every shape below crosses
tile edges, ends on a ragged tile and puts several positions into one tile). The oracle
is gpt.py's own composition (apply_rotary, F.rms_norm, * gain) with autograd in float64
on the same rounded inputs; the kernels are also compared with the op's fp32 PyTorch
reference. Tolerances: RMSNorm's (tests/test_kernels.py, NORM_TOL): the outputs are
rounded once to the input's dtype, from fp32 math.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gpt
import kernels
from kernels import dispatch, ropenorm
from kernels.dispatch import FUSED_ROPE_NORM_ENV, REFERENCE_ENV, triton_on_cpu, use_fused_rope_norm
from test_kernels import DEVICE, NORM_TOL, assert_close, bf16_dot, run_triton  # noqa: F401 (a fixture)

EPS = gpt.NORM_EPS
# (B, T, H, D): q's 6 and k's 3 heads at one T (GQA), one head, other widths; every row count ragged
SHAPES = [(2, 7, 3, 64), (1, 9, 6, 128), (1, 9, 3, 128), (1, 5, 1, 64), (3, 3, 5, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tables(T, D, device=DEVICE):
    """gpt.py's rotary tables for T positions, as (T, D/2) fp32 views of its (1, T, 1, D/2) ones."""
    cos, sin = gpt.rotary_tables(T, D, gpt.GPTConfig.rotary_base, device=device)
    return cos[0, :, 0], sin[0, :, 0]


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return x, dy, *tables(shape[1], shape[-1])


def composition(x, cos, sin, gain):
    """gpt.py's CausalSelfAttention before this op: apply_rotary, RMSNorm over D, the gain."""
    y = F.rms_norm(gpt.apply_rotary(x, cos[None, :, None], sin[None, :, None]), (x.shape[-1],), eps=EPS)
    return y * gain if gain != 1.0 else y


def oracle(x, dy, cos, sin, gain):
    """The composition's output and dx by autograd, in float64."""
    x = x.detach().cpu().double().requires_grad_()
    y = composition(x, cos.cpu().double(), sin.cpu().double(), gain)
    y.backward(dy.cpu().double())
    return y.detach(), x.grad


@pytest.mark.parametrize("gain", [1.0, 1.2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_the_reference_and_autograd(shape, dtype, gain):
    x, dy, cos, sin = inputs(shape, dtype)
    with run_triton():
        y = ropenorm._triton_fwd(x, cos, sin, EPS, gain)
        dx = ropenorm._triton_bwd(dy, x, cos, sin, EPS, gain)
    assert y.shape == dx.shape == x.shape and y.dtype == dx.dtype == dtype
    want_y, want_dx = oracle(x, dy, cos, sin, gain)
    ref_y, ref_dx = ropenorm._reference_fwd(x, cos, sin, EPS, gain), ropenorm._reference_bwd(dy, x, cos, sin, EPS, gain)
    for name, got, ref, want in (("y", y, ref_y, want_y), ("dx", dx, ref_dx, want_dx)):
        assert_close(got, ref, NORM_TOL[dtype], f"{name} against the fp32 reference")
        assert_close(got, want, NORM_TOL[dtype], f"{name} against float64 autograd")
        assert_close(ref, want, NORM_TOL[dtype], f"reference {name} against float64 autograd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_is_the_gradient_of_the_composition(dtype):
    """The backward's algebra (dr = gain * rstd * (dy - r_hat * mean(dy * r_hat)), then the rotation's
    transpose) against autograd of gpt.py's composition, in the same dtype."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 3, 64, generator=g, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 6, 3, 64, generator=g, dtype=dtype)
    cos, sin = tables(6, 64, "cpu")
    y = composition(x, cos.to(dtype), sin.to(dtype), 1.2)
    y.backward(dy)
    tol = (1e-12, 1e-10) if dtype == torch.float64 else NORM_TOL[torch.float32]
    assert_close(ropenorm._reference_fwd(x.detach(), cos, sin, EPS, 1.2), y, tol, "y")
    assert_close(ropenorm._reference_bwd(dy, x.detach(), cos, sin, EPS, 1.2), x.grad, tol, "dx")


def test_gradcheck_reference_float64():
    x = torch.randn(2, 3, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    cos, sin = tables(3, 16, "cpu")
    assert torch.autograd.gradcheck(lambda t: kernels.rope_norm_op(t, cos, sin, EPS, 1.2), (x,))


def test_opcheck_reference():
    x, dy, cos, sin = (t.cpu() for t in inputs((2, 5, 3, 32), torch.float32))
    torch.library.opcheck(kernels.rope_norm_op, (x.clone().requires_grad_(), cos, sin, EPS, 1.2))
    torch.library.opcheck(kernels.rope_norm_backward_op, (dy, x, cos, sin, EPS, 1.2))


def test_opcheck_triton():
    x, dy, cos, sin = inputs((2, 5, 3, 32), torch.float32)
    with run_triton():
        torch.library.opcheck(kernels.rope_norm_op, (x.clone().requires_grad_(), cos, sin, EPS, 1.2),
                              test_utils=("test_schema", "test_autograd_registration"))
        torch.library.opcheck(kernels.rope_norm_backward_op, (dy, x, cos, sin, EPS, 1.2), test_utils=("test_schema",))


def test_rope_norm_launches_triton_under_the_switch_and_backprops(monkeypatch):
    calls = []
    for name in ("_triton_fwd", "_triton_bwd"):
        fn = getattr(ropenorm, name)
        monkeypatch.setattr(ropenorm, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    monkeypatch.setenv(FUSED_ROPE_NORM_ENV, "1")
    x, dy, cos, sin = inputs((2, 7, 3, 64), torch.float32)
    x.requires_grad_()
    with run_triton():
        kernels.rope_norm(x, cos, sin, EPS, 1.2).backward(dy)
    assert calls == ["_triton_fwd", "_triton_bwd"]
    assert_close(x.grad, oracle(x, dy, cos, sin, 1.2)[1], NORM_TOL[torch.float32], "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gain", [1.0, 1.2])
def test_without_the_switch_it_is_gpts_composition_exactly(dtype, gain, monkeypatch):
    """Off (the default), or on where Triton does not run (a CPU tensor): gpt.py's numbers, bit for bit."""
    monkeypatch.setattr(ropenorm, "_triton_fwd", None)
    x, _, cos, sin = inputs((2, 7, 3, 64), dtype)
    want = gpt.norm(gpt.apply_rotary(x, cos[None, :, None], sin[None, :, None]))
    want = want * gain if gain != 1.0 else want
    monkeypatch.delenv(FUSED_ROPE_NORM_ENV, raising=False)
    assert torch.equal(kernels.rope_norm(x, cos, sin, EPS, gain), want)
    monkeypatch.setenv(FUSED_ROPE_NORM_ENV, "1")
    if DEVICE == "cpu":
        assert torch.equal(kernels.rope_norm(x, cos, sin, EPS, gain), want)


def test_switch_is_off_by_default_and_needs_triton(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.delenv(FUSED_ROPE_NORM_ENV, raising=False)
    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    with FakeTensorMode():  # a CUDA tensor without a GPU: only its metadata is read
        q = torch.empty(2, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
        assert not use_fused_rope_norm(q)  # not measured on a GPU yet: off unless asked for
        monkeypatch.setenv(FUSED_ROPE_NORM_ENV, "1")
        assert use_fused_rope_norm(q)
        monkeypatch.setenv(REFERENCE_ENV, "1")
        assert not use_fused_rope_norm(q)
    monkeypatch.delenv(REFERENCE_ENV)
    assert not use_fused_rope_norm(torch.zeros(1, 2, 1, 64))  # CPU: torch's own
    with triton_on_cpu():
        assert use_fused_rope_norm(torch.zeros(1, 2, 1, 64))


def test_under_torch_compile_it_is_one_op(monkeypatch):
    """With the switch on, torch.compile traces the fused op (one opaque node), not the composition: the gate
    is not turned off under torch.compile, as kernels.rms_norm's is. (The gate is told Triton runs, as on
    CUDA; the op's body takes its reference path: the interpreter cannot be traced.)"""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    kernels.register_ops()
    monkeypatch.setenv(FUSED_ROPE_NORM_ENV, "1")
    monkeypatch.setattr(dispatch, "use_triton", lambda x: True)  # what use_fused_rope_norm asks; not the op's body
    torch._dynamo.reset()
    x, _, cos, sin = (t.cpu() for t in inputs((2, 7, 3, 64), torch.float32))
    compiled = torch.compile(lambda t: kernels.rope_norm(t, cos, sin, EPS, 1.2), backend=capture, fullgraph=True)
    y = compiled(x.requires_grad_())
    code = graphs[0].code
    assert "nanoschnack.rope_norm" in code and "rms_norm" not in code and "cat" not in code, code
    assert_close(y, oracle(x, x, cos, sin, 1.2)[0], NORM_TOL[torch.float32], "y")
    torch._dynamo.reset()


def test_rejects_bad_input():
    x, _, cos, sin = inputs((1, 4, 2, 64), torch.float32)
    with pytest.raises(ValueError, match=r"shape \(B, T, H, D\)"):
        kernels.rope_norm(x[0], cos, sin, EPS)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        kernels.rope_norm(x.double(), cos, sin, EPS)
    for D in (48, 63):
        c, s = tables(4, D)
        with pytest.raises(ValueError, match="D/2 a power of two"):
            kernels.rope_norm(torch.zeros(1, 4, 2, D, device=DEVICE), c, s, EPS)
    with pytest.raises(ValueError, match=r"cos as fp32 \(T, D/2\) = \(4, 32\)"):
        kernels.rope_norm(x, cos[:3], sin, EPS)
    with pytest.raises(ValueError, match=r"sin as fp32 \(T, D/2\)"):
        kernels.rope_norm(x, cos, sin.bfloat16(), EPS)


def test_launch_config_is_cached_and_concrete():
    assert ropenorm._launch_config(128, "cuda") is ropenorm._launch_config(128, "cuda")
    assert ropenorm._launch_config(128, "cuda") == dict(HALF=64, BLOCK_ROWS=32, num_warps=8)
    assert ropenorm._launch_config(64, "cuda") == dict(HALF=32, BLOCK_ROWS=64, num_warps=8)
    assert ropenorm._launch_config(128, "cpu") == dict(HALF=64, BLOCK_ROWS=4)


def test_launch_config_is_concrete_under_symbolic_shapes(monkeypatch):
    """Every constexpr a Python int, also when B, T and H are symbols (as under torch.compile); the grid a
    ceiling division of the symbolic row count, T and H passed through as symbols."""
    from torch.fx.experimental.proxy_tensor import make_fx

    launches = []

    class Record:  # stands in for wrap_triton: records kernel[grid](*args, **kwargs)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel.__name__, grid, args, kwargs))

    def fwd_bwd(x, cos, sin):
        y = ropenorm._triton_fwd(x, cos, sin, EPS, 1.2)
        return ropenorm._triton_bwd(torch.empty_like(y), x, cos, sin, EPS, 1.2)

    monkeypatch.setattr(ropenorm, "wrap_triton", Record)
    make_fx(fwd_bwd, tracing_mode="symbolic")(torch.empty(2, 5, 3, 128), *tables(5, 128, "cpu"))
    assert [name for name, *_ in launches] == ["_rope_norm_fwd_kernel", "_rope_norm_bwd_kernel"]
    for name, grid, args, kwargs in launches:
        assert kwargs == ropenorm._launch_config(128, "cpu") and all(type(v) is int for v in kwargs.values())
        assert isinstance(grid[0], torch.SymInt), (name, grid)
        n_rows, n_heads, seq_len = args[-5:-2]
        assert all(isinstance(n, torch.SymInt) for n in (n_rows, n_heads, seq_len)), (name, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_with_the_fused_op_matches_the_composition(dtype, monkeypatch, bf16_dot):
    """A GPT's forward and backward with the switch on (every kernel by Triton, interpreted on a CPU) against
    the plain PyTorch model: the same loss and gradients, tightly in fp32; in bf16 (autocast, as training runs)
    within bf16's rounding of q and k, which the composition rounds once more than the fused op."""
    calls = []
    fwd = ropenorm._triton_fwd
    monkeypatch.setattr(ropenorm, "_triton_fwd", lambda *a: calls.append(a[0].shape) or fwd(*a))
    cfg = dict(sequence_len=32, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, qk_gain=1.2)  # D 64
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # the zero-initialised projections and lm_head: gradients would be vacuous
                p.normal_(0.0, 0.05)
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, 96, (2, 12), generator=g) for _ in "it")
    autocast = gpt.autocast("cpu", dtype)

    def loss_and_grads():
        with autocast:
            loss = model(idx, targets)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    ref_loss, ref_grads = loss_and_grads()
    monkeypatch.setenv(FUSED_ROPE_NORM_ENV, "1")
    with triton_on_cpu():
        loss, grads = loss_and_grads()
    assert calls == [(2, 12, 4, 64), (2, 12, 2, 64)] * 2  # q and k of both layers
    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (3e-2, 5e-2)
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        scale = want.abs().max().item()  # bf16: compare relative to the tensor's largest gradient
        torch.testing.assert_close(got, want, atol=atol * (1 if dtype == torch.float32 else scale), rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")


def test_model_compiles_into_one_graph_with_the_fused_op(monkeypatch):
    """gpt.py under torch.compile(fullgraph=True, dynamic=True) with the switch on, as on CUDA: no graph break,
    no recompile for a new length, the fused op on q and k of every layer, and eager's loss and gradients. (The gates are told yes, as on CUDA;
    the ops' bodies take their PyTorch reference: the interpreter cannot be traced.)"""
    from torch._dynamo.backends.registry import lookup_backend
    kernels.register_ops()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(sequence_len=32, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                                  qk_gain=1.2))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    batches = [[torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(s)) for s in (0, 1)] for T in (12, 17)]
    wants = []
    for idx, targets in batches:  # eager, the switch off: the composition
        loss = model(idx, targets)
        wants.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    for module in (gpt, ropenorm):
        monkeypatch.setattr(module, "use_fused_rope_norm", lambda x: True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    made = []
    for (idx, targets), (want, want_grads) in zip(batches, wants):
        loss = compiled(idx, targets)
        made.append(len(graphs))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
        for (name, _), got, ref in zip(model.named_parameters(), grads, want_grads):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # the second length compiles nothing new (Dynamo may trace the first call twice: it restarts its analysis,
    # with the switch off too); every graph it made calls the op on q and k of both layers, in place of the composition
    assert made[1] == made[0] and all(g.count("nanoschnack.rope_norm.default") == 4 for g in graphs), made
    assert not any("torch.cat" in g for g in graphs)  # apply_rotary's
    torch._dynamo.reset()


def test_generation_with_a_kv_cache_keeps_the_composition(monkeypatch):
    """The KV-cache path (per-row positions) never takes the fused op, switch or not."""
    monkeypatch.setattr(gpt, "rope_norm", lambda *a: pytest.fail("the fused op ran with a KV cache"))
    monkeypatch.setenv(FUSED_ROPE_NORM_ENV, "1")
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=64))
    idx = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    want = model(idx)  # CPU tensors outside triton_on_cpu: the switch is off, the composition runs
    cache = model.new_kv_cache(batch_size=1, max_len=8)
    with triton_on_cpu():
        got = model(idx, kv_cache=cache)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(bool(torch.version.cuda or torch.version.hip), reason="a GPU build makes them at import anyway")
def test_a_gpu_build_makes_the_ops_at_import():
    """gpt.py calls rope_norm_op under torch.compile: a CUDA build must have made it at import (kernels/dispatch.py,
    ops_on_first_use); a CPU-only one makes it on first use (triton_on_cpu registers every op)."""
    probe = ("import torch; torch.version.cuda = '13.0'; import kernels.ropenorm as r; "
             "print(*(n in vars(r) for n in ('rope_norm_op', 'rope_norm_backward_op')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}).stdout.split()
    assert out == ["True", "True"], out
