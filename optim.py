"""
optim.py: the optimizers train.py and sft.py share, nanochat's recipe, and the learning-rate schedule.

    build_optimizers   Muon (NorMuon with Polar Express, nanochat's; or torch's Muon in fp32) for the
                       matrices, AdamW for the embeddings, the lm_head and the scalars
    schedule_error, lr_multiplier, set_schedule
                       warmup, flat, warmdown to a final fraction; the settings of one step
"""
import functools
import math

import torch

import gpt


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation (the same quintic Newton-Schulz iteration), in fp32."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if grad.size(0) > grad.size(1) else x).to(grad.dtype)


class FP32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in fp32, for training in fp32.

    torch runs the iteration in bf16, which hardware without native bf16 products (most
    CPUs before AVX512-BF16) runs about 20x slower than fp32. The update is torch's
    (same state, same lr adjustment "original": sqrt(max(1, rows/cols))), so
    checkpoints move between the two."""

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "FP32Muon takes no closure"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz_fp32(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * math.sqrt(max(1, p.shape[0] / p.shape[1])))


# Polar Express (arXiv:2505.16932): the coefficients (a, b, c) of each step x <- a x + (b A + c A^2) x,
# A = x x^T, computed for 5 steps, safety factor 2e-2, cushion 2 (nanochat/optim.py, polar_express_coeffs)
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About the orthogonal factor U V^T of g = U S V^T, for each matrix of g (..., m, n): every singular value
    is pushed towards 1 by odd polynomials whose coefficients change per step, converging in fewer steps than
    Muon's fixed Newton-Schulz quintic. In g's dtype. nanochat/optim.py muon_step_fused, "Polar Express"."""
    wide = g.size(-2) <= g.size(-1)
    x = g if wide else g.mT  # iterate on the wide side, so A is the smaller square
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # every singular value below 1
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


def normuon_update(grads, weights, buf, second, momentum, beta2, lr, weight_decay, ns_steps: int, ortho_dtype):
    """NorMuon's steps 1-6 (below) on one group's stacked matrices (n, rows, cols): weights, buf and second are
    updated in place. momentum, beta2, lr and weight_decay: floats, or 0-D tensors of the weights' dtype where
    the step is compiled (a new value, the schedule's every step, then needs no new compile)."""
    rows, cols = weights.shape[-2:]
    neuron_dim = -1 if rows >= cols else -2  # the mean of each row (tall, square) or column (wide)
    buf.lerp_(grads, 1 - momentum)  # 1. Nesterov
    g = grads.lerp(buf, momentum)
    x = g.to(ortho_dtype)  # 2. MuonEq
    row_norms = x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    x = x * (x.float().norm(dim=(-2, -1), keepdim=True) / rows ** 0.5 / row_norms).to(x.dtype)
    g = polar_express(x, ns_steps).to(weights.dtype)  # 3.
    g = g * (min(rows, cols) ** 0.5 / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))  # 4. Muon+
    norm_before = g.norm(dim=(-2, -1), keepdim=True)  # 5. NorMuon
    second.lerp_(g.square().mean(neuron_dim, keepdim=True), 1 - beta2)
    g = g * second.clamp_min(1e-10).rsqrt()
    g = g * (norm_before / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    lr = lr * max(1.0, rows / cols) ** 0.5  # 6. cautious weight decay, then the step
    decay = (g * weights >= 0) * weights
    weights.sub_(lr * g + lr * weight_decay * decay)


@functools.cache
def _compiled_normuon_update():
    # One graph per group's shape (dynamic=False: three for d20), made at the first step, as nanochat compiles
    # its muon_step_fused. Eagerly, the step's two dozen elementwise ops each read and write the group's
    # stacked fp32 state (1.6 GB a pass at d20); compiled they fuse into a few kernels around the matmuls.
    return torch.compile(normuon_update, dynamic=False, fullgraph=True)


class NorMuon(torch.optim.Optimizer):
    """Muon as nanochat trains with it (nanochat/optim.py, muon_step_fused), for 2-D matrices:

    1. Nesterov momentum on the gradient;
    2. MuonEq: every row scaled to the mean row norm, so the matrix going in is better conditioned;
    3. Polar Express orthogonalisation (polar_express above), in `ortho_dtype` (bf16 where the hardware
       multiplies bf16 natively, as nanochat and torch do; fp32 elsewhere, see FP32Muon);
    4. Muon+: the result scaled to the Frobenius norm of an exactly orthogonal matrix, sqrt(min(m, n));
    5. NorMuon (arXiv:2510.05491): a running mean (beta2) of each neuron's squared update, the rows of a
       tall or square matrix, the columns of a wide one; the update is divided by its square root, so
       every neuron moves about as much, then rescaled to its norm before this step;
    6. cautious weight decay: only weights whose update would also shrink them decay.
    The step is lr * sqrt(max(1, rows/cols)), as torch's "original" lr adjustment and nanochat do.

    Give each param group matrices of one shape (build_optimizers does): they are stacked, so each
    step of the iteration is one batched product; the group's state lives with its first matrix.
    compile_step: run normuon_update through torch.compile (build_optimizers does on CUDA, as nanochat
    does). Not on the CPU: for the demo's tiny model (2 threads, development box) a compiled step took
    136 ms against 154 eager, 11 s over the demo's ~600 steps, and the compile itself 28.5 s."""

    def __init__(self, param_groups, lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.0, ns_steps=5,
                 ortho_dtype=torch.bfloat16, compile_step=False):
        super().__init__(param_groups, dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay,
                                            ns_steps=ns_steps, ortho_dtype=ortho_dtype))
        self.compile_step = compile_step
        for group in self.param_groups:
            if len({p.shape for p in group["params"]}) != 1 or group["params"][0].ndim != 2:
                raise ValueError("NorMuon wants each param group to hold 2-D matrices of one shape")

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "NorMuon takes no closure"
        update = _compiled_normuon_update() if self.compile_step else normuon_update
        for group in self.param_groups:
            params = group["params"]
            state = self.state[params[0]]
            if not state:
                rows, cols = params[0].shape
                state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype,
                                                       device=params[0].device)
                neuron_dim = -1 if rows >= cols else -2
                state["second_momentum_buffer"] = torch.zeros_like(state["momentum_buffer"].mean(neuron_dim, True))
            weights = torch.stack(params)
            settings = [group[k] for k in ("momentum", "beta2", "lr", "weight_decay")]
            if self.compile_step:  # 0-D CPU tensors: a new value is an input, not a new graph
                settings = [torch.tensor(v, dtype=weights.dtype) for v in settings]
            update(torch.stack([p.grad for p in params]), weights, state["momentum_buffer"],
                   state["second_momentum_buffer"], *settings, group["ns_steps"], group["ortho_dtype"])
            torch._foreach_copy_(params, list(weights.unbind(0)))


MUON_KINDS = ("nanochat", "torch")


def build_optimizers(model: gpt.GPT, cfg, dtype: torch.dtype | None = None) -> list[torch.optim.Optimizer]:
    """Muon for the blocks' matrices; AdamW for the embeddings, the lm_head and the recipe's scalars
    (nanochat's setup_optimizer, gpt.py L419-452: its groups, learning rates, betas and weight decays).

    cfg gives matrix_lr, embedding_lr, unembedding_lr and weight_decay; scalar_lr and muon if it has them
    (else nanochat's 0.5 and NorMuon). muon: "nanochat" (NorMuon above) or "torch" (torch.optim.Muon,
    or FP32Muon in fp32). Muon orthogonalises in the compute dtype (default: gpt.default_dtype)."""
    c = model.config
    width_scale = (c.n_embd / 768) ** -0.5  # nanochat's LRs are tuned at width 768
    matrices = [p for p in model.transformer.h.parameters()]  # the value-embedding gates too, as nanochat
    if any(p.ndim != 2 for p in matrices):
        raise ValueError("Muon expects only 2-D matrices in the blocks")
    scalar_lr, kind = getattr(cfg, "scalar_lr", 0.5), getattr(cfg, "muon", "nanochat")
    if kind not in MUON_KINDS:
        raise ValueError(f"unknown muon {kind!r}: use one of {', '.join(MUON_KINDS)}")
    groups = [dict(params=[model.transformer.wte.weight], lr=cfg.embedding_lr * width_scale, betas=(0.8, 0.995),
                   weight_decay=0.001),
              dict(params=[model.lm_head.weight], lr=cfg.unembedding_lr * width_scale, betas=(0.8, 0.96),
                   weight_decay=0.01)]
    if c.value_embeds:
        groups.append(dict(params=list(model.value_embeds.parameters()), lr=cfg.embedding_lr * width_scale * 0.5,
                           betas=(0.8, 0.995), weight_decay=0.01))
    if c.layer_lambdas:
        groups += [dict(params=[model.resid_lambdas], lr=scalar_lr * 0.01, weight_decay=0.05),
                   dict(params=[model.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95))]
    gates = ([model.smear_gate.weight, model.smear_lambda] if c.smear else []) + \
        ([model.backout_lambda] if c.backout else [])
    if gates:
        groups.append(dict(params=gates, lr=0.2))  # nanochat: 0.2, not scaled
    if len(matrices) + sum(len(g["params"]) for g in groups) != len(list(model.parameters())):
        raise ValueError("build_optimizers does not know every parameter of the model")
    device = model.lm_head.weight.device
    adamw = torch.optim.AdamW(groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=device.type == "cuda")
    bf16 = (dtype or gpt.default_dtype(device)) == torch.bfloat16
    if kind == "nanochat":
        shapes = sorted({tuple(p.shape) for p in matrices})
        muon = NorMuon([dict(params=[p for p in matrices if tuple(p.shape) == s]) for s in shapes],
                       lr=cfg.matrix_lr, momentum=0.95, beta2=0.9, weight_decay=cfg.weight_decay,
                       ortho_dtype=torch.bfloat16 if bf16 else torch.float32, compile_step=device.type == "cuda")
    else:  # adjust_lr_fn "original" scales by sqrt(max(1, rows/cols)), as nanochat's Muon does
        muon = (torch.optim.Muon if bf16 else FP32Muon)(matrices, lr=cfg.matrix_lr, momentum=0.95, nesterov=True,
                                                        weight_decay=cfg.weight_decay, adjust_lr_fn="original")
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"], group["initial_weight_decay"] = group["lr"], group["weight_decay"]
    return optimizers


def schedule_error(warmdown_ratio: float, final_lr_frac: float = 0.0) -> str | None:
    """Why these learning-rate schedule flags give no schedule (an error line to print), or None if they do."""
    for flag, value in (("--warmdown-ratio", warmdown_ratio), ("--final-lr-frac", final_lr_frac)):
        if not 0 <= value <= 1:
            return f"error: {flag} {value:g} must be between 0 and 1 (a share of the run, or of the learning rate)"
    return None


def lr_multiplier(progress: float, warmdown_ratio: float, final_lr_frac: float, step: int = 0,
                  warmup_steps: int = 0) -> float:
    """nanochat's base_train schedule: a linear warmup over the first warmup_steps steps ((step + 1) /
    warmup_steps: the first step moves the weights too), flat, then a linear warmdown to final_lr_frac over the
    last warmdown_ratio of the run; progress runs from 0 to 1 over the run (tokens, or the clock)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if progress <= 1 - warmdown_ratio:
        return 1.0
    left = (1 - progress) / warmdown_ratio
    return left + (1 - left) * final_lr_frac


def set_schedule(optimizers, lr_mult: float, muon_momentum: float | None = None, weight_decay_mult: float = 1.0):
    """This step's learning rates (initial x lr_mult); for Muon's groups (the ones with a momentum) also the
    momentum (None: keep it) and the weight decay (initial x weight_decay_mult)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if "momentum" in group:
                # a checkpoint from before the weight-decay schedule had a constant one: its initial value
                initial = group.setdefault("initial_weight_decay", group["weight_decay"])
                group["weight_decay"] = initial * weight_decay_mult
                if muon_momentum is not None:
                    group["momentum"] = muon_momentum
