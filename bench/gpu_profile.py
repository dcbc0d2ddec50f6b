"""
Where a training step's GPU time goes: bench/gpu.py's train section profiles a few
compiled steps of each variant and groups the kernels' time by what they do.

    times = kernel_times(lambda: train_step(...), steps=2, device=device)   # {kernel name: (seconds, calls)}
    shares = by_group(times)                                               # {group: seconds}

Issue 25 asks for fused RMSNorm ops worth 1.05x of the whole compiled step. Before
fusing, this says how much of the step the normalisations, RoPE and the other
pointwise work take at all, next to matmuls, attention and the loss: a group that
is 3% of the step cannot give 5% however it is fused. On the GPU the kernels are
CUDA kernels (torch.profiler's device events); in the CPU smoke run, which has none,
the CPU operators' own time stands in, so the same code runs in the tests.
"""
import re

import torch
from torch.profiler import ProfilerActivity, profile

# (group, pattern on the lower-cased kernel name), first match wins. Inductor names its
# kernels triton_{poi,red,per}_fused_<the aten ops it fused>; cuBLAS/CUTLASS GEMMs carry
# gemm, xmma, cutlass or nvjet in theirs; the CPU run's operators are aten::<op>.
GROUPS = [
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|aten::(mm|addmm|bmm|matmul|linear)\b"),
    ("attention", r"flash|fmha|cudnn|_attn|attention|sdpa"),
    ("loss (softcap, cross-entropy)", r"log_softmax|nll_loss|cross_entropy|tanh"),
    ("RoPE + QK-norm, ours", r"^_rope_norm"),  # our kernels' names (kernels/*.py) start with an underscore
    ("RMSNorm, ours", r"^_rms_norm"),
    ("Inductor reductions (norms, ...)", r"triton_(red|per)_|rsqrt|rms_norm"),
    ("optimizer (foreach)", r"foreach|multi_tensor"),
    ("Inductor pointwise", r"triton_poi_"),
    ("eager elementwise, copies", r"copy|memcpy|memset|fill|elementwise_kernel"),
]
OTHER = "other"


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, pattern in GROUPS if re.search(pattern, lowered)), OTHER)


def kernel_times(step, steps: int, device) -> dict:
    """{kernel: (seconds, calls)} over `steps` calls of step(): CUDA kernels on a GPU, else CPU operators' self time."""
    cuda = device.type == "cuda"
    # on the GPU the CPU side is recorded too (what torch.profiler is used with most), and left out below: a
    # CPU operator's device time is its kernels' again
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if cuda != on_device:
            continue
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if micros > 0:
            seconds, calls = times.get(event.key, (0.0, 0))
            times[event.key] = (seconds + micros / 1e6, calls + event.count)
    return times


def by_group(times: dict) -> dict:
    """{group: seconds}, every group present (0.0 where none ran), in GROUPS' order, then OTHER."""
    totals = {group: 0.0 for group, _ in GROUPS} | {OTHER: 0.0}
    for name, (seconds, _calls) in times.items():
        totals[group_of(name)] += seconds
    return totals


def top_kernels(times: dict, n: int) -> list[tuple[str, float, int]]:
    """The n kernels that took longest: (name, seconds, calls)."""
    return sorted(((name, s, c) for name, (s, c) in times.items()), key=lambda row: -row[1])[:n]


def report_lines(preset: str, results: dict, top: int = 8) -> list[str]:
    """Two tables from {variant: measure_training's result}: each variant's GPU time a step by group, and the
    top kernels of the variant the model runs ("ours", else the first profiled)."""
    profiled = {variant: r for variant, r in results.items() if r.get("profile")}
    empty = [variant for variant, r in results.items() if r.get("profile") == {}]
    notes = ["", f"The profiler recorded no kernels for {preset} ({', '.join(empty)}): is CUPTI available?"] if empty else []
    if not profiled:
        return notes
    per_step = {variant: {g: s / r["profile_steps"] for g, s in by_group(r["profile"]).items()}
                for variant, r in profiled.items()}
    groups = [g for g in next(iter(per_step.values())) if any(shares[g] for shares in per_step.values())]
    lines = notes + ["", f"Where a step's GPU time goes, {preset}: ms a step by kernel group (bench/gpu_profile.py; share of "
                 "the GPU's busy time). Busy below wall: the GPU waited for the host.", "",
             "| kernels | " + " | ".join(groups) + " | GPU busy ms | wall ms |", "|---|" + "---:|" * (len(groups) + 2)]
    for variant, shares in per_step.items():
        busy = sum(shares.values())
        cells = [f"{1e3 * shares[g]:.1f} ({100 * shares[g] / busy:.0f}%)" for g in groups]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {1e3 * busy:.1f} | {1e3 * profiled[variant]['step_seconds']:.1f} |")
    variant = "ours" if "ours" in profiled else next(iter(profiled))
    r = profiled[variant]
    busy = sum(s for s, _ in r["profile"].values())
    lines += ["", f"Top kernels, {preset}, {variant}:", "", "| kernel | group | ms a step | calls a step | share |",
              "|---|---|---:|---:|---:|"]
    for name, seconds, calls in top_kernels(r["profile"], top):
        lines.append(f"| `{name[:70]}` | {group_of(name)} | {1e3 * seconds / r['profile_steps']:.2f} | "
                     f"{calls / r['profile_steps']:.0f} | {100 * seconds / busy:.1f}% |")
    return lines
