"""
When do flash_attn, rms_norm and rope_norm launch Triton, and when do they use torch's own ops?

    CUDA tensor                                  -> Triton, where ours measured faster (below)
    CUDA tensor, NANOSCHNACK_REFERENCE_KERNELS=1 -> torch's ops (for A/B comparisons)
    CUDA tensor, NANOSCHNACK_TRITON_ATTENTION=1  -> flash_attn: Triton wherever it can run (A/B)
    CUDA tensor, NANOSCHNACK_ATTENTION_AUTOTUNE=0 -> our attention keeps its hand-picked tiles on a
                                                    Hopper too (A/B against triton.autotune's pick;
                                                    see autotune_attention)
    CUDA tensor, NANOSCHNACK_ATTENTION_TMA=0      -> the Hopper autotuner leaves out its TMA candidates
                                                    (A/B of TMA loads against pointer loads; tma_allowed)
    CUDA tensor, NANOSCHNACK_FUSED_ROPE_NORM=1   -> gpt.py's RoPE + QK-norm + gain as one Triton op
                                                    (kernels/ropenorm.py; off by default, see use_fused_rope_norm)
    CPU tensor                                   -> torch's ops
    CPU tensor inside `triton_on_cpu()`          -> Triton, run by Triton's interpreter (tests only)

"torch's ops" are F.scaled_dot_product_attention and F.rms_norm with torch's own
autograd (on CPU, SDPA's flash kernel). The custom ops called directly off the
Triton path run their textbook PyTorch reference instead: the exact oracle the
kernel tests compare Triton against.

The rule is read on every call, so a test (or a notebook) can flip the environment
variable without re-importing anything. Under torch.compile the op's body is traced
once per compiled graph, so the choice is baked into that graph.
"""
import contextlib
import functools
import os

import torch
from torch.library import triton_op

REFERENCE_ENV = "NANOSCHNACK_REFERENCE_KERNELS"
TRITON_ATTENTION_ENV = "NANOSCHNACK_TRITON_ATTENTION"
AUTOTUNE_ENV = "NANOSCHNACK_ATTENTION_AUTOTUNE"
TMA_ENV = "NANOSCHNACK_ATTENTION_TMA"
FUSED_ROPE_NORM_ENV = "NANOSCHNACK_FUSED_ROPE_NORM"

_triton_on_cpu = False

# RMSNorm widths at which our Triton kernel beat PyTorch's own RMSNorm, forward+backward,
# measured by bench/gpu.py on one H200 (torch 2.11.0+cu130, triton 3.6.0, bf16, GB/s):
#
#     rows x width     ours    eager F.rms_norm   compiled F.rms_norm
#     65536 x 768       583         2,693               1,059      ours 0.22x: PyTorch's
#     65536 x 1280      837         3,467               1,506      ours 0.24x: PyTorch's
#     655360 x 128    1,193         1,036               1,102      ours 1.08x: ours
#
# So ours runs only at width 128 (QK-norm over d12/d20's heads of 128), in eager mode,
# with autograd recording (what was measured: forward+backward). Everywhere else
# F.rms_norm: wider rows; forward only and other widths (not measured); and under
# torch.compile, where Inductor fuses F.rms_norm with the pointwise work around it
# (RoPE before the QK-norm, the residual add), which an opaque custom op prevents.
# Move a width in or out of this set only with a bench/gpu.py measurement.
RMS_NORM_TRITON_WIDTHS = frozenset({128})


def use_triton(x: torch.Tensor) -> bool:
    """True if an op called on tensor `x` should launch its Triton kernel."""
    if os.environ.get(REFERENCE_ENV) == "1":
        return False
    if x.device.type == "cuda":
        return True
    return _triton_on_cpu and x.device.type == "cpu"


def use_triton_rms_norm(x: torch.Tensor) -> bool:
    """True if kernels.rms_norm(x) should run our Triton kernel rather than F.rms_norm (see above)."""
    if torch.compiler.is_compiling() or not use_triton(x):
        return False
    if x.device.type != "cuda":  # triton_on_cpu(): the tests run our kernel at every width
        return True
    return x.shape[-1] in RMS_NORM_TRITON_WIDTHS and x.requires_grad and torch.is_grad_enabled()


# The fused RoPE + QK-norm + gain (kernels/ropenorm.py) moves 4 bytes per bf16 element forward where
# Inductor's kernels for gpt.py's composition move 8 (read from its generated code), but it has not
# been measured on a GPU yet: until bench/gpu.py measures it, it is an A/B switch, off by default, like
# the rules above it moves only with a measurement. When on, it runs eagerly and under torch.compile
# alike (one opaque node there: the point is to beat Inductor's fusion, unlike use_triton_rms_norm).
def use_fused_rope_norm(x: torch.Tensor) -> bool:
    """True if gpt.py should run RoPE, QK-norm and the gain on q or k `x` as one Triton op (see above)."""
    return os.environ.get(FUSED_ROPE_NORM_ENV) == "1" and use_triton(x)


# Causal attention at which torch's SDPA beat our Triton kernel, measured by bench/gpu.py on one
# H200 (torch 2.11.0+cu130, triton 3.6.0; bf16, MHA, head dim 128, B*T = 16384; TFLOP/s):
#
#     T     pass      ours   SDPA cuDNN   SDPA flash
#     2048  fwd        374       493          286
#     4096  fwd        423       527          305
#     2048  fwd+bwd    256       422          236
#     4096  fwd+bwd    282       471          269
#
# and d20 training, compiled: 123,134 tokens/s with ours, 135,060 with SDPA + F.rms_norm.
# SDPA's own choice there is cuDNN: torch 2.11 and later put it first on sm_90 and sm_100
# (with the cuDNN their wheels bring), flash first elsewhere. So on a Hopper GPU, where SDPA
# picks cuDNN, causal attention with autograd recording (training, what was measured
# forward+backward), MHA, head dim 128, 16-bit and no window calls SDPA. Ours keeps the rest:
# sliding windows (SDPA would take a T x T mask); GQA, the other head dims it takes
# (TRITON_HEAD_DIMS; any other goes to SDPA) and other GPUs (not
# measured); forward-only calls (serving's prefill, whose length changes with every request:
# cuDNN builds a plan for each new length, 4.8 ms of host time a call in issue 26's H200
# decode profile); and wherever SDPA would pick flash, which ours beat. Move a case across
# only with a bench/gpu.py measurement.
SDPA_WINS_HEAD_DIM = 128
SDPA_WINS_CAPABILITY_MAJOR = 9
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # what the attention kernels take: powers of two for tl.arange, >= 16 for tl.dot


def sdpa_measured_faster(q: torch.Tensor, k: torch.Tensor, window: int | None, device_wins) -> bool:
    """The rule above for q (B, H, T, D), k (B, H_kv, T, D); device_wins() says whether the GPU is one
    where SDPA won (asked last: the first time, it runs a probe on the GPU)."""
    return ((window is None or window >= q.shape[2] - 1)
            and q.shape[1] == k.shape[1]
            and q.shape[-1] == SDPA_WINS_HEAD_DIM
            and q.dtype in (torch.bfloat16, torch.float16)
            and q.requires_grad and torch.is_grad_enabled()
            and device_wins())


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The backend (torch.nn.attention.SDPBackend) torch's SDPA picks for causal attention on these inputs."""
    from torch.nn.attention import SDPBackend
    return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, True, enable_gqa=q.shape[1] != k.shape[1]))


@functools.cache
def capability_major(device: torch.device) -> int:
    """The major compute capability of a CUDA device (9 for an H100/H200)."""
    return torch.cuda.get_device_capability(device)[0]


_SDPA_WINS: dict = {}  # (device index, dtype, head dim) -> sdpa_wins_on's answer


def sdpa_wins_on(device_index: int, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether GPU `device_index` is a Hopper on which torch's SDPA runs causal attention of this dtype
    and head dim with autograd on cuDNN, as it did where it was measured. SDPA's choice depends on the
    GPU, the cuDNN torch loaded and TORCH_CUDNN_SDPA_*, so it is asked of torch itself."""
    key = (device_index, dtype, head_dim)
    if key not in _SDPA_WINS:
        from torch.nn.attention import SDPBackend
        device = torch.device("cuda", device_index)
        probe = torch.zeros(1, 1, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
        _SDPA_WINS[key] = (capability_major(device) == SDPA_WINS_CAPABILITY_MAJOR
                           and sdpa_choice(probe, probe, probe) == SDPBackend.CUDNN_ATTENTION)
    return _SDPA_WINS[key]


if torch.version.cuda or torch.version.hip:
    # Under torch.compile: run once at trace time, its answer a constant of the graph. Marking it
    # imports torch._dynamo, which only a GPU build loads at start (ops_on_first_use says why).
    torch.compiler.assume_constant_result(sdpa_wins_on)


def use_triton_attention(q: torch.Tensor, k: torch.Tensor, window: int | None) -> bool:
    """True if kernels.flash_attn should launch our Triton kernel rather than torch's SDPA (see above)."""
    if not use_triton(q) or q.shape[-1] not in TRITON_HEAD_DIMS:
        return False
    if q.device.type != "cuda" or os.environ.get(TRITON_ATTENTION_ENV) == "1":
        return True
    return not sdpa_measured_faster(q, k, window, lambda: sdpa_wins_on(q.device.index, q.dtype, SDPA_WINS_HEAD_DIM))


def autotune_attention(x: torch.Tensor) -> bool:
    """True if our attention kernels, launched on tensor x, let triton.autotune pick their tiles on this GPU
    (kernels/tiles.py, HOPPER_SPACES), rather than take the hand-picked ones: 16-bit on a
    Hopper, the one GPU family whose every candidate kernels/aot.py compiles and checks, outside inference
    mode, unless NANOSCHNACK_ATTENTION_AUTOTUNE=0. Inference mode is where chat and serving prefill (gpt.py,
    session.py): there a prompt whose rounded length is new would wait for a tuning run (compiling and
    timing every candidate: seconds, the first time on a machine) before its first token."""
    return (x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
            and not torch.is_inference_mode_enabled()
            and os.environ.get(AUTOTUNE_ENV) != "0" and capability_major(x.device) == 9)


def tma_allowed() -> bool:
    """Whether the Hopper autotuner may offer its TMA candidates (kernels/tiles.py, HOPPER_TMA_SPACES), where the
    tensors allow them: unless NANOSCHNACK_ATTENTION_TMA=0."""
    return os.environ.get(TMA_ENV) != "0"


def attention_in_training(config, device, dtype: torch.dtype) -> str:
    """Which attention training runs for a gpt.GPTConfig on `device` in `dtype`, in words (train.py and sft.py
    log it): the rule above, asked with a probe of the model's head shapes."""
    device = torch.device(device)
    if not use_triton(torch.empty(0, device=device)):
        return "attention: torch's SDPA" + (f" ({REFERENCE_ENV}=1)" if device.type == "cuda" else "")
    q = torch.empty(1, config.n_head, config.sequence_len, config.head_dim, device=device, dtype=dtype,
                    requires_grad=True)
    k = torch.empty(1, config.n_kv_head, config.sequence_len, config.head_dim, device=device, dtype=dtype)
    with torch.enable_grad():
        ours = use_triton_attention(q, k, None)
        full = "our Triton kernel" if ours else "torch's SDPA, which measured faster than ours on this GPU (kernels/dispatch.py)"
    windowed = any(w is not None and w < config.sequence_len - 1 for w in config.windows())
    tuned = (ours or windowed) and autotune_attention(q)
    return (f"attention: {full}" + ("; sliding-window layers: our Triton kernel" if windowed else "")
            + ("; our kernel's tiles: triton.autotune's pick on this GPU, timed at its first steps (kernels/tiles.py)"
               if tuned else ""))


def ops_on_first_use(module_globals: dict, ops: dict, backward, setup_context):
    """(register_ops, __getattr__) for a kernel module with two custom ops, {attribute name: body} of the
    forward and then its backward; `nanoschnack::<name without _op>` each, the forward's autograd from
    backward and setup_context. torch.library.triton_op reads an op's source for the Triton kernels it
    launches and imports torch._inductor to do it: 3 s of CPU on the 2-core development box, as long as
    importing torch, at the start of every script. A CPU-only torch never takes the Triton path outside
    the tests' triton_on_cpu(), so there the ops are made on first use (the module attribute, or
    triton_on_cpu()); a CUDA or ROCm build makes them at import, before any torch.compile."""
    def register_ops() -> None:
        if all(name in module_globals for name in ops):
            return
        made = {name: triton_op(f"nanoschnack::{name.removesuffix('_op')}", body, mutates_args=())
                for name, body in ops.items()}
        next(iter(made.values())).register_autograd(backward, setup_context=setup_context)
        module_globals.update(made)

    def module_getattr(name: str):  # PEP 562: asked for an attribute the module does not have yet
        if name in ops:
            register_ops()
            return module_globals[name]
        raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")

    if torch.version.cuda or torch.version.hip:
        register_ops()
    return register_ops, module_getattr


@contextlib.contextmanager
def triton_on_cpu():
    """Run the Triton kernels on CPU tensors through the interpreter (for tests).

    The interpreter must be switched on before the first `@triton.jit` is
    executed, i.e. TRITON_INTERPRET=1 must be set before `kernels` is imported
    (tests/conftest.py does that).
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 set before `kernels` is imported")
    import kernels  # the Triton path calls the custom ops, which a CPU-only torch makes on first use
    kernels.register_ops()
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = previous
