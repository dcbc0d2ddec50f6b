"""optim.py: nanochat's Muon (Polar Express, NorMuon, cautious weight decay) against its code written out, torch's
Muon in fp32, the optimizer groups, and the schedules of the learning rate, momentum and weight decay."""
import dataclasses
import math

import pytest
import torch
import torch.optim._muon

import gpt
import optim
import train

TORCH_NEWTON_SCHULZ = torch.optim._muon._zeropower_via_newtonschulz  # bf16: what optim.FP32Muon replaces


def test_lr_schedule():
    def lr(progress):
        return optim.lr_multiplier(progress, warmdown_ratio=0.2, final_lr_frac=0.1, step=int(progress * 100),
                                   warmup_steps=10)
    assert lr(0.04) == pytest.approx(0.5)
    assert lr(0.5) == 1.0
    assert lr(0.9) == pytest.approx(0.55)
    assert lr(1.0) == pytest.approx(0.1)


def test_warmup_counts_the_step_itself_as_nanochat_does():
    """nanochat's (it + 1) / warmup_iters, over steps as its --warmup-steps: with 4 steps and a warmup of 2, 0.5
    then 1.0 (with a warmup over a share of the run the first step ran at 2e-9, its batch spent for nothing)."""
    mults = [optim.lr_multiplier(step / 4, 0.5, 0.05, step, warmup_steps=2) for step in range(4)]
    assert mults == [0.5, 1.0, 1.0, pytest.approx(0.525)]
    assert train.TrainConfig().warmup_steps == 40 and train.PRESETS["tiny"]["warmup_steps"] == 0


def test_muon_momentum_and_weight_decay_follow_nanochats_schedules():
    """nanochat's base_train: Muon's momentum 0.85 -> 0.97 over 400 steps, 0.97 -> 0.90 over the warmdown; its
    weight decay a cosine from the configured value to 0. AdamW's groups keep their momentum and weight decay."""
    cfg = train.TrainConfig(warmdown_ratio=0.5, weight_decay=0.2, momentum_schedule=True)
    model = gpt.GPT(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    adamw, muon = optimizers = optim.build_optimizers(model, cfg)
    adamw_before = [(g["betas"], g["weight_decay"]) for g in adamw.param_groups]
    cosine = [0.2 * 0.5 * (1 + math.cos(p * math.pi)) for p in (0.1, 0.75)]
    for step, progress, momentum, decay in [(0, 0.0, 0.85, 0.2), (200, 0.1, 0.91, cosine[0]), (1000, 0.5, 0.97, 0.1),
                                            (2000, 0.75, 0.935, cosine[1]), (3000, 1.0, 0.90, 0.0)]:
        settings = train.schedule(cfg, step, progress)
        optim.set_schedule(optimizers, **settings)
        assert all(g["momentum"] == pytest.approx(momentum) for g in muon.param_groups), step
        assert all(g["weight_decay"] == pytest.approx(decay, abs=1e-12) for g in muon.param_groups), step
        assert [(g["betas"], g["weight_decay"]) for g in adamw.param_groups] == adamw_before
    assert train.schedule(dataclasses.replace(cfg, momentum_schedule=False), 0, 0.0)["muon_momentum"] is None
    optim.set_schedule(optimizers, **train.schedule(dataclasses.replace(cfg, momentum_schedule=False), 10, 0.9))
    assert all(g["momentum"] == pytest.approx(0.90) for g in muon.param_groups)  # kept where it was


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_fp32_newton_schulz_matches_torch_muon(shape):
    torch.manual_seed(0)
    grad = torch.randn(shape)
    coefficients = (3.4445, -4.7750, 2.0315)
    ours = optim.newton_schulz_fp32(grad, coefficients, 5, 1e-7)
    theirs = TORCH_NEWTON_SCHULZ(grad, coefficients, 5, 1e-7)
    assert ours.dtype == grad.dtype and ours.shape == grad.shape
    torch.testing.assert_close(ours, theirs.float(), atol=1e-2, rtol=0)  # theirs is bf16


def test_fp32_muon_is_torch_muon_with_fp32_newton_schulz(monkeypatch):
    """optim.FP32Muon's update is torch.optim.Muon's, step for step, once both orthogonalise in fp32."""
    torch.manual_seed(0)
    weights = [torch.randn(48, 80), torch.randn(80, 48)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]
    settings = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01, adjust_lr_fn="original")

    def run(optimizer_class):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = optimizer_class(params, **settings)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return params, opt.state_dict()

    ours, our_state = run(optim.FP32Muon)
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", optim.newton_schulz_fp32)
    theirs, their_state = run(torch.optim.Muon)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert our_state["state"].keys() == their_state["state"].keys()  # checkpoints move between the two
    for k in our_state["state"]:
        assert our_state["state"][k].keys() == their_state["state"][k].keys()


def nanochat_muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer, momentum, lr, wd,
                       beta2, ns_steps, red_dim):
    """nanochat/optim.py muon_step_fused at 92d63d4, line for line in fp32 (no compile, plain floats for its
    0-D tensors): the oracle for optim.NorMuon."""
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    X = g
    target = X.float().norm(dim=(-2, -1), keepdim=True) / (X.size(-2) ** 0.5)
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (target / row_norm).to(X.dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    if g.size(-2) > g.size(-1):
        for a, b, c in optim.POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in optim.POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    g = X.to(stacked_params.dtype)
    target_norm = min(g.size(-2), g.size(-1)) ** 0.5
    current_norm = g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    g = g * (target_norm / current_norm).to(g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm_sq = v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size
    v_norm = v_norm_sq.sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled_sq_sum = (v_mean * red_dim_size) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt()
    final_scale = step_size * (v_norm / v_norm_new.clamp_min(1e-10))
    g = g * final_scale.to(g.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)


def run_normuon(weights, grads, **settings):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    shapes = sorted({tuple(w.shape) for w in weights})
    opt = optim.NorMuon([dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes],
                         ortho_dtype=torch.float32, **settings)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_polar_express_is_about_orthogonal(shape):
    """A matrix with singular values from 1 down to 0.01 comes out with all of them near 1 (0.86..1.14
    measured), nearer than Muon's Newton-Schulz quintic gets in as many steps (0.68..1.20)."""
    torch.manual_seed(0)
    u, _, v = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    g = u @ torch.diag(torch.logspace(0, -2, min(shape))) @ v
    assert optim.polar_express(g).shape == shape
    polar = torch.linalg.svdvals(optim.polar_express(g))
    newton = torch.linalg.svdvals(optim.newton_schulz_fp32(g, (3.4445, -4.7750, 2.0315), 5, 1e-7))
    assert (polar - 1).abs().max() < 0.15, polar
    assert (polar - 1).abs().max() < (newton - 1).abs().max()


def test_normuon_is_nanochats_muon_step():
    torch.manual_seed(0)
    # wide, tall and square (most of a model's matrices: attention's are n_embd x n_embd): NorMuon's neurons are
    # the rows of a square one, as nanochat's
    weights = [torch.randn(48, 80), torch.randn(48, 80), torch.randn(80, 48), torch.randn(64, 64)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]
    settings = dict(lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.2, ns_steps=5)
    ours, opt = run_normuon(weights, grads, **settings)
    for shape, members in [((48, 80), [0, 1]), ((80, 48), [2]), ((64, 64), [3])]:
        stacked = torch.stack([weights[i] for i in members])
        buf = torch.zeros_like(stacked)
        red_dim = -1 if shape[0] >= shape[1] else -2
        second = torch.zeros_like(stacked.mean(red_dim, keepdim=True))
        for step_grads in grads:
            nanochat_muon_step(torch.stack([step_grads[i] for i in members]), stacked, buf, second, 0.95,
                               0.02 * max(1, shape[0] / shape[1]) ** 0.5, 0.2, 0.9, 5, red_dim)
        for k, i in enumerate(members):
            torch.testing.assert_close(ours[i].detach(), stacked[k], atol=1e-6, rtol=1e-5)
    state = opt.state_dict()  # a checkpoint holds the group's buffers with its first matrix
    assert [sorted(v) for v in state["state"].values()] == [["momentum_buffer", "second_momentum_buffer"]] * 3


def test_compiled_normuon_step_is_the_eager_step_and_compiles_once_per_shape():
    """The compiled step (on CUDA: build_optimizers turns it on) against the eager one, through Inductor on the
    CPU: the same weights over steps whose learning rate, momentum and weight decay change every step, as the
    schedules change them, and one graph per group's shape, whatever the values (0-D tensors, not constants)."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    weights = [torch.randn(48, 80), torch.randn(48, 80), torch.randn(80, 48)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(4)]
    runs = []
    torch._dynamo.reset()
    counters.clear()
    for compile_step in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = optim.NorMuon([dict(params=params[:2]), dict(params=params[2:])], ortho_dtype=torch.float32,
                             weight_decay=0.2, compile_step=compile_step)
        for i, step_grads in enumerate(grads):
            for group in opt.param_groups:
                group.update(lr=0.02 * (1 - i / 8), momentum=0.85 + 0.03 * i, weight_decay=0.2 * (1 - i / 4))
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        runs.append(params)
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled.detach(), eager.detach(), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # (48, 80) and (80, 48): no recompile for a new value
    torch._dynamo.reset()


def test_normuon_moves_every_neuron_alike_and_decays_cautiously():
    """NorMuon's first update has equal norms per neuron (rows of a tall matrix, columns of a wide one) and the
    Frobenius norm of an orthogonal matrix; the weight decay only touches weights the update also shrinks."""
    torch.manual_seed(1)
    weights = [torch.randn(80, 48), torch.randn(48, 80)]
    grads = [[torch.randn_like(w) for w in weights]]
    plain, _ = run_normuon(weights, grads, lr=0.01, weight_decay=0.0)
    decayed, _ = run_normuon(weights, grads, lr=0.01, weight_decay=0.5)
    for w, p, d, neuron_dim in zip(weights, plain, decayed, [-1, -2]):
        lr = 0.01 * max(1, w.shape[0] / w.shape[1]) ** 0.5
        update = (w - p.detach()) / lr
        norms = update.norm(dim=neuron_dim)
        torch.testing.assert_close(norms, norms.mean().expand_as(norms), atol=0, rtol=1e-4)
        assert update.norm().item() == pytest.approx(48 ** 0.5, rel=1e-4)
        shrinks = update * w >= 0  # the update moves these weights towards zero: they also decay
        assert 0.3 < shrinks.float().mean() < 0.7
        torch.testing.assert_close(d.detach(), p.detach() - lr * 0.5 * w * shrinks, atol=1e-6, rtol=0)


def test_optimizer_groups_follow_nanochat():
    model = gpt.GPT(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                                  value_embeds=True, layer_lambdas=True, smear=True, backout=True))
    cfg = train.TrainConfig(embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5, matrix_lr=0.02)
    adamw, muon = optim.build_optimizers(model, cfg)
    scale = (64 / 768) ** -0.5
    groups = {tuple(sorted(n for n, p in model.named_parameters() if any(p is q for q in g["params"]))):
              (pytest.approx(g["lr"]), g["betas"], g["weight_decay"]) for g in adamw.param_groups}
    assert groups == {
        ("transformer.wte.weight",): (pytest.approx(0.3 * scale), (0.8, 0.995), 0.001),
        ("lm_head.weight",): (pytest.approx(0.008 * scale), (0.8, 0.96), 0.01),
        ("value_embeds.1.weight",): (pytest.approx(0.3 * scale * 0.5), (0.8, 0.995), 0.01),
        ("resid_lambdas",): (pytest.approx(0.005), (0.8, 0.95), 0.05),
        ("x0_lambdas",): (pytest.approx(0.5), (0.96, 0.95), 0.0),
        ("backout_lambda", "smear_gate.weight", "smear_lambda"): (pytest.approx(0.2), (0.8, 0.95), 0.0)}
    in_muon = [p for g in muon.param_groups for p in g["params"]]
    assert {n for n, p in model.named_parameters() if any(p is q for q in in_muon)} == \
        {n for n, _ in model.transformer.h.named_parameters(prefix="transformer.h")}  # the ve gates too
    assert all(len({p.shape for p in g["params"]}) == 1 for g in muon.param_groups)
    with pytest.raises(ValueError, match="unknown muon 'adam'"):
        optim.build_optimizers(model, train.TrainConfig(muon="adam"))


def test_schedule_flags_at_their_bounds():
    """The warmdown may fill the run (sft.py's --warmdown-ratio 1: decay from the first step); a share outside 0..1
    is refused, naming its flag."""
    assert optim.schedule_error(1.0) is None and optim.schedule_error(0.0, 1.0) is None
    for bad in (-0.1, 1.5):
        assert (optim.schedule_error(0.5, bad) or "").startswith(f"error: --final-lr-frac {bad:g} must be between 0 and 1")
        assert (optim.schedule_error(bad) or "").startswith(f"error: --warmdown-ratio {bad:g} must be between 0 and 1")
    assert optim.lr_multiplier(0.0, 1.0, 0.0) == 1.0 and optim.lr_multiplier(0.5, 1.0, 0.0) == 0.5
    # --warmdown-ratio 0: flat to the very end (a time budget's fraction reaches 1.0), never 0 / 0
    assert optim.lr_multiplier(1.0, 0.0, 0.05) == 1.0
