"""
When do flash_attn and rms_norm launch Triton, and when do they use torch's own ops?

    CUDA tensor                                  -> Triton (rms_norm: only where ours measured faster, below)
    CUDA tensor, NANOSCHNACK_REFERENCE_KERNELS=1 -> torch's ops (for A/B comparisons)
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
import os

import torch
from torch.library import triton_op

REFERENCE_ENV = "NANOSCHNACK_REFERENCE_KERNELS"

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
