"""
When do flash_attn and rms_norm launch Triton, and when do they use torch's own ops?

    CUDA tensor                                  -> Triton
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

REFERENCE_ENV = "NANOSCHNACK_REFERENCE_KERNELS"

_triton_on_cpu = False


def use_triton(x: torch.Tensor) -> bool:
    """True if an op called on tensor `x` should launch its Triton kernel."""
    if os.environ.get(REFERENCE_ENV) == "1":
        return False
    if x.device.type == "cuda":
        return True
    return _triton_on_cpu and x.device.type == "cpu"


@contextlib.contextmanager
def triton_on_cpu():
    """Run the Triton kernels on CPU tensors through the interpreter (for tests).

    The interpreter must be switched on before the first `@triton.jit` is
    executed, i.e. TRITON_INTERPRET=1 must be set before `kernels` is imported
    (tests/conftest.py does that).
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 set before `kernels` is imported")
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = previous
