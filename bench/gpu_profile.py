"""
Where a training step's GPU time goes: bench/gpu.py's train section profiles a few
compiled steps of each variant and groups the kernels' time by what they do.

    profile = profile_steps(lambda: train_step(...), steps=2, device=device)
    profile["kernels"]      # {kernel name: (seconds, calls)}
    profile["optimizers"]   # {"NorMuon": seconds, ...}: each optimizer's step, its kernels inside it
    by_group(profile["kernels"])                                          # {group: seconds}

Issue 25 asks for fused RMSNorm ops worth 1.05x of the whole compiled step. Before
fusing, this says how much of the step the normalisations, RoPE and the other
pointwise work take at all, next to matmuls, attention and the loss: a group that
is 3% of the step cannot give 5% however it is fused. The optimizers' steps are
timed apart as well (their matmuls and elementwise kernels also fall in the groups),
since both variants share them. On the GPU the kernels are
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


def profile_steps(step, steps: int, device) -> dict:
    """Over `steps` calls of step(): {"kernels": {name: (seconds, calls)}, "optimizers": {name: seconds}}, the
    CUDA kernels on a GPU (else the CPU operators' own time), and the time of the kernels each optimizer's step
    launched (torch.optim's "Optimizer.step#<name>.step" ranges; on the CPU the ranges' CPU time)."""
    cuda = device.type == "cuda"
    # on the GPU the CPU side is recorded too: the optimizers' ranges are CPU events, their kernels' time
    # (device_time_total) taken over their children; a CPU operator's own device time is its kernels' again
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    kernels, optimizers = {}, {}
    for event in prof.key_averages():
        if event.key.startswith("Optimizer.step#"):
            name = event.key.removeprefix("Optimizer.step#").removesuffix(".step")
            optimizers[name] = (event.device_time_total if cuda else event.cpu_time_total) / 1e6
        if cuda != (event.device_type == torch.autograd.DeviceType.CUDA):
            continue
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if micros > 0:
            seconds, calls = kernels.get(event.key, (0.0, 0))
            kernels[event.key] = (seconds + micros / 1e6, calls + event.count)
    return dict(kernels=kernels, optimizers=optimizers)


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
    """Two tables from {variant: measure_training's result, its "profile" from profile_steps}: each variant's
    GPU time a step by group and in its optimizers' steps, and the top kernels of the variant the model runs
    ("ours", else the first profiled)."""
    profiled = {variant: r for variant, r in results.items() if r.get("profile") and r["profile"]["kernels"]}
    empty = [variant for variant, r in results.items() if r.get("profile") and not r["profile"]["kernels"]]
    notes = ["", f"The profiler recorded no kernels for {preset} ({', '.join(empty)}): is CUPTI available?"] if empty else []
    if not profiled:
        return notes
    per_step = {variant: {g: s / r["profile_steps"] for g, s in by_group(r["profile"]["kernels"]).items()}
                for variant, r in profiled.items()}
    groups = [g for g in next(iter(per_step.values())) if any(shares[g] for shares in per_step.values())]
    optimizers = sorted({name for r in profiled.values() for name in r["profile"]["optimizers"]})
    lines = notes + ["", f"Where a step's GPU time goes, {preset}: ms a step by kernel group (bench/gpu_profile.py; share of "
                     "the GPU's busy time), and in each optimizer's step (its kernels, also counted in the groups). "
                     "Busy below wall: the GPU waited for the host.", "",
                     "| kernels | " + " | ".join(groups + [f"{name} step" for name in optimizers]) + " | GPU busy ms | wall ms |",
                     "|---|" + "---:|" * (len(groups) + len(optimizers) + 2)]
    for variant, shares in per_step.items():
        r = profiled[variant]
        busy = sum(shares.values())
        steps = [r["profile"]["optimizers"].get(name, 0.0) / r["profile_steps"] for name in optimizers]
        cells = [f"{1e3 * t:.1f} ({100 * t / busy:.0f}%)" for t in [shares[g] for g in groups] + steps]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {1e3 * busy:.1f} | {1e3 * r['step_seconds']:.1f} |")
    variant = "ours" if "ours" in profiled else next(iter(profiled))
    r = profiled[variant]
    kernels = r["profile"]["kernels"]
    busy = sum(s for s, _ in kernels.values())
    lines += ["", f"Top kernels, {preset}, {variant}:", "", "| kernel | group | ms a step | calls a step | share |",
              "|---|---|---:|---:|---:|"]
    for name, seconds, calls in top_kernels(kernels, top):
        lines.append(f"| `{name[:70]}` | {group_of(name)} | {1e3 * seconds / r['profile_steps']:.2f} | "
                     f"{calls / r['profile_steps']:.0f} | {100 * seconds / busy:.1f}% |")
    return lines
