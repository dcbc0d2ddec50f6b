"""
train.py: pretrain the nanoschnack GPT on German text.

    python train.py --preset tiny --data 'parquet://DATA/pretrain/*/train-*.parquet'    # CPU, minutes
    torchrun --nproc_per_node=8 train.py --preset d20                                   # 8 GPUs, hub data

One process per GPU under torchrun (DDP; NCCL on GPU, gloo on CPU, multi-node
with torchrun's usual --nnodes/--rdzv flags), or a single process on one GPU or
the CPU. Rank 0 logs and saves.

- Optimizers as in nanochat: Muon for the 2-D matrices of the blocks (--muon nanochat:
  Polar Express, NorMuon, cautious weight decay; --muon torch: torch.optim.Muon), AdamW
  for the embeddings, the lm_head and the model's scalars, learning rates scaled by width.
- The model recipe's switches (gpt.py: --value-embeds, --layer-lambdas, --smear, --backout,
  --window-pattern, --qk-gain) default to gpt.GPTConfig's.
- nanochat's schedules over the tokens seen: the learning rate (warmup, flat, linear warmdown), Muon's
  momentum and its weight decay (scaled to the run's length and batch, then a cosine to 0).
- The global batch is counted in tokens; gradient accumulation makes up the
  difference between it and device_batch_size x seq_len x world size.
- Checkpoints hold everything needed to continue bit for bit: model, optimizers,
  config, every rank's data-loader state, RNG states and counters. They are
  written atomically (temp file + rename), every --save-every steps and on
  SIGINT/SIGTERM; --resume picks up the newest one.
"""
import dataclasses
import functools
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import dataloader
import evaluation
import gpt
import kernels
import optim
import report
from data import DEFAULT_PRETRAIN_SPEC, DEFAULT_VAL_SPEC
from tok import Tokenizer


@dataclass
class TrainConfig:
    preset: str = "d20"              # model and run size: tiny (CPU), d12, d20 (8xH100) or d<depth>
    model: str = ""                  # model preset, default: the run preset's
    data: str = DEFAULT_PRETRAIN_SPEC
    val_data: str = DEFAULT_VAL_SPEC
    tokenizer: str = "out/tokenizer"
    out: str = "out/base"
    seq_len: int = 2048
    device_batch_size: int = 32      # sequences per device per micro-step
    total_batch_size: int = 524288   # tokens per optimizer step, all devices together
    tokens_per_param: float = 12.0   # training length unless tokens/steps are given: tokens per parameter of the
                                     # blocks and the lm_head (nanochat's base_train --target-param-data-ratio 12)
    max_tokens: int = 0
    max_steps: int = 0
    time_budget: float = 0.0         # minutes of wall time: the schedule follows it, the run ends on time
                                     # with its warmdown done (then tokens/steps above are ignored)
    # the optimizer and its schedules: nanochat's base_train.py and setup_optimizer (92d63d4)
    matrix_lr: float = 0.02          # Muon
    embedding_lr: float = 0.3        # AdamW, scaled by (width/768)^-0.5 like the next one
    unembedding_lr: float = 0.008
    weight_decay: float = 0.28       # Muon's cautious weight decay as tuned for d12, scaled to the run
                                     # (scaled_weight_decay), then a cosine from there to 0 over the run
    momentum_schedule: bool = True   # Muon's momentum 0.85 -> 0.97 over 400 steps, -> 0.90 over the warmdown;
                                     # off: 0.95 throughout
    scalar_lr: float = 0.5           # AdamW, the per-layer lambdas (nanochat's; resid_lambdas get 0.01x)
    muon: str = "nanochat"           # nanochat (Polar Express + NorMuon + cautious weight decay) or torch (Muon)
    # the model recipe (gpt.py), defaults gpt.GPTConfig's
    value_embeds: bool = gpt.GPTConfig.value_embeds
    layer_lambdas: bool = gpt.GPTConfig.layer_lambdas
    smear: bool = gpt.GPTConfig.smear
    backout: bool = gpt.GPTConfig.backout
    window_pattern: str = gpt.GPTConfig.window_pattern
    qk_gain: float = gpt.GPTConfig.qk_gain
    rotary_base: float = gpt.GPTConfig.rotary_base  # 10000 to resume a run begun before it was a setting
    warmup_steps: int = 40           # the learning rate rises linearly over these first steps (nanochat's)
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    eval_every: int = 250
    eval_tokens: int = 20 * 2**19    # validation tokens (nanochat's 10M): the first eval_tokens / seq_len rows of
                                     # --val-data, shared out over the processes, so the same set and bpb on any
                                     # number of them and at any --device-batch-size
    eval_tasks: str = ""             # multiple-choice tasks at each eval: hub names or NAME=SPEC (evaluation.py), e.g.
                                     # 'quiz=jsonl://quiz.jsonl hellaswag'; default none
    eval_task_limit: int = 500       # examples per task (a fixed random sample)
    sample_every: int = 1000
    save_every: int = 1000
    keep_last: int = 2
    log_every: int = 10
    compile: bool = True
    device: str = ""                 # default: cuda if available, else cpu
    dtype: str = "auto"              # matrix products: bfloat16 where the hardware has bf16 products (CUDA,
                                     # AVX512-BF16/AMX CPUs), else float32; or float32 / bfloat16
    seed: int = 1337
    resume: bool = False
    stop_after_steps: int = 0        # save and leave after this many steps (for jobs with a time limit)
    prefetch: int = 4
    packing: str = "bestfit"         # rows of the training batches: bestfit (nanochat's: each row starts at a
                                     # document, some tokens cropped) or concat (split the document stream); the CPU
                                     # presets keep concat (README, "Packing": the demo's long documents)
    # the numbers' ranges (common.parse_config refuses a value outside, naming its flag); 0 turns off the
    # evals, samples, saves and limits, and --keep-last 0 keeps every checkpoint
    AT_LEAST: ClassVar[dict] = dict(
        device_batch_size=1, seq_len=1, total_batch_size=1, max_tokens=0, max_steps=0, time_budget=0, warmup_steps=0,
        matrix_lr=0, embedding_lr=0, unembedding_lr=0, weight_decay=0, scalar_lr=0, eval_every=0, eval_tokens=1,
        eval_task_limit=1, sample_every=0, save_every=0, keep_last=0, log_every=1, stop_after_steps=0, prefetch=0)
    ABOVE: ClassVar[dict] = dict(tokens_per_param=0, rotary_base=0)


# The CPU presets' optimizer, measured on the demo's model (width 128, 1,572 steps of 4,096 tokens, 3.5 tokens per
# parameter; bench/RESULTS.md, "nanochat's current schedules"): nanochat's AdamW learning rates 0.3 / 0.008 changed
# validation bits per byte by +0.000 against 0.2 / 0.004 and its weight decay 0.28 by +0.007; Muon's learning rate
# 0.02 / 0.01 / 0.005 gave 1.7944 / 1.7830 / 1.7894 (0.0025: 0.045 behind 0.01 at step 1,000), at a batch of 1/128
# of nanochat's 2^19 tokens. nanochat's values were tuned on GPUs for d12 and up at 12 tokens per parameter.
# The layer scalars' AdamW (--layer-lambdas) at 0.05, not nanochat's 0.5: its base_train scales every learning rate
# by sqrt(B / 2^19), 0.044 at these 4,096-token steps, and on the demo's model the scalars at 0.5 cost 0.060 bits
# per byte in 200 steps, at 0.05 0.009, and with smear, backout and qk gain -0.011 (bench/RESULTS.md, "The recipe
# on the demo's model"). No warmup: these were measured without one (nanochat's 40 steps are 2.5% of the demo's).
SMALL_RUN = dict(matrix_lr=0.01, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0, scalar_lr=0.05,
                 warmup_steps=0)
PRESETS = {
    # CPU demo: a 4-layer model, 1.6M tokens (demo.sh: a time budget instead). torch.compile pays on the
    # CPU too (fused elementwise work, fewer allocations); its warm-up is seconds, and cached.
    "tiny": dict(model="tiny", seq_len=256, device_batch_size=8, total_batch_size=4096, max_steps=400,
                 eval_every=100, eval_tokens=8192, sample_every=200, save_every=100, log_every=20, compile=True,
                 prefetch=2, packing="concat", **SMALL_RUN),
    "nano": dict(model="nano", seq_len=64, device_batch_size=4, total_batch_size=512, max_steps=20,
                 eval_every=10, eval_tokens=512, sample_every=0, save_every=10, log_every=1, compile=False,
                 prefetch=0, packing="concat", **SMALL_RUN),
    "d12": dict(model="d12"),
    "d20": dict(model="d20"),
}
# The optimizers' saved state holds what these gave: each group's initial learning rate and weight decay, which
# the schedule scales (optim.set_schedule), and Muon's param groups (--muon). A resumed run would train on with
# the saved ones and record the new ones, so --resume refuses other values.
SAME_ON_RESUME = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay", "muon")
SAMPLE_PROMPTS = ["Die Hauptstadt von Deutschland ist", "Es war einmal", "Der Bundestag hat heute"]
# dense bf16 FLOP/s by a part of the device's name, the first that matches: the H100's PCIe and NVL cards before
# the SXM one, whose name ("NVIDIA H100 80GB HBM3") says neither (NVIDIA's data sheets)
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "L40S": 362e12, "4090": 165e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def parse_config(argv=None) -> TrainConfig:
    return common.parse_config(TrainConfig, PRESETS, argv, description=__doc__.split("\n\n")[1])


# -----------------------------------------------------------------------------
# Model, schedule, one step

def build_model(cfg: TrainConfig, vocab_size: int, device) -> gpt.GPT:
    config = dataclasses.replace(gpt.preset(cfg.model or cfg.preset, vocab_size=vocab_size, sequence_len=cfg.seq_len),
                                 **{k: getattr(cfg, k) for k in (*gpt.PLAIN, "rotary_base")})
    if any(config.windows()) and not gpt.FLASH_ATTN_HAS_WINDOW:
        raise ValueError(f"--window-pattern {cfg.window_pattern} asks for sliding windows, but kernels.flash_attn "
                         f"has no window argument yet; train with --window-pattern L")
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed=cfg.seed)
    return model


def muon_momentum(step: int, progress: float, warmdown_ratio: float) -> float:
    """nanochat's base_train get_muon_momentum (92d63d4): 0.85 -> 0.97 over the first 400 steps, when the
    gradients of a fresh model turn fast and old ones mislead, then 0.97 -> 0.90 over the LR's warmdown."""
    if step < 400:
        return 0.85 + (0.97 - 0.85) * step / 400
    if warmdown_ratio and progress >= 1 - warmdown_ratio:
        into = (progress - (1 - warmdown_ratio)) / warmdown_ratio
        return 0.97 + (0.90 - 0.97) * min(into, 1.0)
    return 0.97


def schedule(cfg: TrainConfig, step: int, progress: float) -> dict:
    """The optimizer's settings for this step (optim.set_schedule's arguments), nanochat's base_train schedules;
    progress runs from 0 to 1 over the run (tokens, or the clock with --time-budget)."""
    momentum = muon_momentum(step, progress, cfg.warmdown_ratio) if cfg.momentum_schedule else None
    return dict(lr_mult=optim.lr_multiplier(progress, cfg.warmdown_ratio, cfg.final_lr_frac, step, cfg.warmup_steps),
                muon_momentum=momentum, weight_decay_mult=0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_step(model, optimizers, micro_batches, settings: dict, device, dtype: torch.dtype | None = None) -> float:
    """One optimizer step over the micro-batches with this step's schedule(); returns the mean loss of this rank."""
    optim.set_schedule(optimizers, **settings)
    total = 0.0
    for i, (inputs, targets) in enumerate(micro_batches):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        # DDP averages gradients over ranks; only the last micro-step needs to sync
        sync = i == len(micro_batches) - 1 or not isinstance(model, DDP)
        with (nullcontext() if sync else model.no_sync()), gpt.autocast(device, dtype):
            loss = model(inputs, targets) / len(micro_batches)
            loss.backward()
        total += loss.detach()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return float(total)


def sample_texts(model, tokenizer, prompts, max_new_tokens=24) -> list[str]:
    """Greedy continuations of fixed German prompts, to watch the model learn."""
    was_training = model.training
    model.eval()
    texts = []
    for prompt in prompts:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        room = min(max_new_tokens, model.config.sequence_len - len(ids))  # a short --seq-len leaves less, or none
        new = model.generate(ids, room, temperature=0.0) if room > 0 else []
        texts.append(prompt + tokenizer.decode([i for i in new if i not in tokenizer.special.values()]))
    model.train(was_training)
    return texts


def ranks_in_sync(model) -> bool:
    """Whether every rank holds bit-identical parameters (DDP's promise, checked at the end)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    fingerprint = torch.stack([flat.double().sum(), (flat.double() * torch.arange(len(flat), device=flat.device)).sum()])
    gathered = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(g, fingerprint) for g in gathered)


# -----------------------------------------------------------------------------
# The run's pieces, in the order main() uses them

def plan_run(cfg: TrainConfig, model: gpt.GPT, world_size: int, device, log) -> tuple[int, int, float | None]:
    """(optimizer steps, micro-steps per step, the device's peak FLOP/s or None); logs the plan.

    With --time-budget the clock decides when the run ends; steps is then only an upper bound."""
    tokens_per_micro = cfg.device_batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % tokens_per_micro:
        sys.exit(f"error: --total-batch-size {cfg.total_batch_size} is not a multiple of device batch x seq len "
                 f"x world size = {tokens_per_micro}")
    accum = cfg.total_batch_size // tokens_per_micro
    n_params, n_scaling = model.num_params(), model.num_scaling_params()
    total_tokens = cfg.max_tokens or (cfg.max_steps * cfg.total_batch_size) or int(cfg.tokens_per_param * n_scaling)
    steps = sys.maxsize if cfg.time_budget else max(1, total_tokens // cfg.total_batch_size)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    log(f"model {model.config} | {n_params:,} parameters | {model.flops_per_token():.3g} FLOPs/token")
    length = (f"{cfg.time_budget:g} minutes (time budget)" if cfg.time_budget else
              f"{steps:,} steps x {cfg.total_batch_size:,} tokens = {steps * cfg.total_batch_size:,} tokens "
              f"({steps * cfg.total_batch_size / n_scaling:.1f} per parameter of the blocks and lm_head)")
    log(f"plan: {length}; {world_size} process(es) on {device}, {cfg.device_batch_size}x{cfg.seq_len} per "
        f"micro-step, {accum} micro-steps per step of {cfg.total_batch_size:,} tokens")
    if peak and not cfg.time_budget:
        est = steps * cfg.total_batch_size * model.flops_per_token() / (0.4 * peak * world_size)
        log(f"estimated time at 40% MFU on {torch.cuda.get_device_name()}: {est / 3600:.2f} h")
    return steps, accum, peak


B_REF = 2**19  # nanochat's reference batch in tokens, the best one it measured for d12


def scaled_weight_decay(cfg: TrainConfig, config: gpt.GPTConfig, steps: int, log) -> float:
    """Muon's weight decay for this run, as nanochat's base_train (92d63d4, step 4) scales it: --weight-decay is
    the value tuned for d12 trained on --tokens-per-param tokens at B_REF tokens a step; a run of D tokens at B
    tokens a step gets weight_decay * sqrt(B / B_REF) * (D_ref / D), which keeps AdamW's T_epoch = B / (lr *
    decay * D) of the reference run (arXiv 2405.13698; nanochat assumes the same holds for Muon). d20 with
    the defaults: 0.28 -> 0.0708. With --time-budget D is not known in advance: unscaled."""
    if not cfg.weight_decay or cfg.time_budget:
        return cfg.weight_decay
    with torch.device("meta"):
        d12 = gpt.GPT(gpt.preset("d12", vocab_size=config.vocab_size, sequence_len=config.sequence_len))
    reference_tokens, tokens = cfg.tokens_per_param * d12.num_scaling_params(), steps * cfg.total_batch_size
    scaled = cfg.weight_decay * (cfg.total_batch_size / B_REF) ** 0.5 * reference_tokens / tokens
    log(f"Muon's weight decay {cfg.weight_decay:g} (d12's) scaled to this run's {tokens:,} tokens "
        f"of {cfg.total_batch_size:,} a step: {scaled:.4g}")
    # Each step multiplies the matrices by 1 - lr x decay: from lr x decay = 1 on it flips their signs and they
    # grow without bound (a run of a few steps, a smoke test, scales the decay up that far: d12 for 10 steps,
    # 87). Capped where a step at most halves them.
    ceiling = 0.5 / cfg.matrix_lr if cfg.matrix_lr > 0 else math.inf
    if scaled > ceiling:
        log(f"note: Muon's weight decay capped at {ceiling:.4g} (0.5 / --matrix-lr): {scaled:.4g} would make each "
            f"step flip the matrices' signs")
    return min(scaled, ceiling)


def resume(cfg: TrainConfig, model, tokenizer, optimizers, loader, rank: int, world_size: int, log) -> dict:
    """Load the newest checkpoint of --out into model, optimizers, loader and RNG; its counters ({} if none)."""
    path = common.checkpoint_to_resume(cfg.out)
    if path is None:
        log(f"--resume: no checkpoint in {cfg.out}, starting fresh")
        return {}
    ckpt = common.load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind", "base") != "base" or "loader" not in ckpt:
        sys.exit(f"error: {path} is not a train.py checkpoint to resume; resume in train.py's own --out, "
                 f"or choose another --out")
    common.check_same_model(ckpt["model_config"], model.config, path)
    if ckpt.get("tokenizer_json", tokenizer.to_json()) != tokenizer.to_json():
        sys.exit(f"error: {path} was trained with another tokenizer than --tokenizer {cfg.tokenizer}; resume with "
                 f"the one it was trained with ({ckpt.get('tokenizer')})")
    if ckpt["world_size"] != world_size:
        sys.exit(f"error: {path} was written by {ckpt['world_size']} processes, not {world_size}; "
                 f"resume with the same number")
    common.check_same_settings(path, ckpt.get("train_config", {}), cfg, SAME_ON_RESUME)
    model.load_state_dict(ckpt["model"])
    planned = [[g["initial_weight_decay"] for g in opt.param_groups] for opt in optimizers]
    try:
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
    except ValueError as e:  # a checkpoint whose train_config does not name its --muon
        sys.exit(f"error: {path}: its optimizer state does not fit this run's optimizers ({e}); resume with "
                 f"the --muon it was trained with")
    rescaled = set()  # scaled_weight_decay follows --max-steps and --total-batch-size, as the schedule does
    for opt, decays in zip(optimizers, planned):
        for group, decay in zip(opt.param_groups, decays):
            if group.get("initial_weight_decay", decay) != decay:
                rescaled.add((group["initial_weight_decay"], decay))
            group["initial_weight_decay"] = decay
    for was, now in sorted(rescaled):
        log(f"weight decay {was:.4g} -> {now:.4g}: scaled to the run's new length or batch")
    try:
        loader.load_state_dict(ckpt["loader"][rank])
    except data.DataError as e:
        sys.exit(f"error: {path}: {e}")
    torch.set_rng_state(ckpt["rng"]["cpu"])
    log(f"resumed from {path} at step {ckpt['step']:,} ({ckpt['tokens']:,} tokens)")
    return ckpt


def evaluate(model, tokenizer, val_batches, eval_tasks, record: dict, step: int, cfg, rank, world_size, device,
             log) -> list[dict]:
    """Validation bits per byte and the multiple-choice tasks, into `record`; returns the task results."""
    model.eval()
    token_bytes = torch.tensor(tokenizer.token_bytes, device=device)
    record["val_bpb"] = evaluation.evaluate_bpb(model, val_batches, token_bytes, device)
    log(f"step {step:>6,} | validation bits per byte {record['val_bpb']:.4f}")
    results = []
    for task, examples in eval_tasks:  # every rank scores its share; results are all-reduced
        r = evaluation.evaluate_task(model, tokenizer, examples, device, task.kind, cfg.device_batch_size,
                                     rank, world_size)
        results.append(dict(task=task.name, data=task.spec, **r))
        record.setdefault("evals", {})[task.name] = dict(acc=r["acc"], acc_norm=r["acc_norm"])
        log(f"step {step:>6,} | {task.name}: acc {r['acc']:.4f}"
            + (f", acc_norm {r['acc_norm']:.4f}" if r["acc_norm"] is not None else "")
            + f" (random {r['random']:.4f}, {r['examples']} examples)")
    model.train()
    return results


def write_report(cfg: TrainConfig, model, steps: int, step: int, first_step: int, tokens_seen: int,
                 tok_per_s: float, seconds: float, peak, world_size: int, device, val_bpb, task_results, log):
    """The Pretraining section of the report card (report.py)."""
    mfu = f"{model.flops_per_token() * tok_per_s / (peak * world_size):.1%}" if peak else \
        ("n/a on CPU" if device.type == "cpu" else f"n/a (no peak FLOPs known for {torch.cuda.get_device_name()})")
    rows = [
        ["parameters", model.num_params()], ["model", f"`{cfg.model or cfg.preset}`: " + ", ".join(
            f"{k}={v}" for k, v in dataclasses.asdict(model.config).items())],
        ["tokens", tokens_seen], ["tokens per step", cfg.total_batch_size],
        ["steps", f"{step:,} in a time budget of {cfg.time_budget:g} min" if cfg.time_budget else f"{step:,} of {steps:,}"],
        ["wall time", f"{seconds / 60:.1f} min" + (" (all sessions)" if first_step else "")],
        ["tokens/s", f"{tok_per_s:,.0f} (mean over " + ("this session" if first_step else "the run")
         + ", evals included)"], ["MFU", mfu],
        ["hardware", f"{world_size} x {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"],
        ["final val bpb", val_bpb or ("not measured (--eval-every 0)" if not cfg.eval_every else
                                      "not measured yet (the run stopped before its first evaluation)")],
        ["validation data", " ".join(f"`{s}`" for s in cfg.val_data.split())],
        ["training data", " ".join(f"`{s}`" for s in cfg.data.split())],
        ["checkpoint", f"`{common.latest_checkpoint(cfg.out)}`"],
    ]
    body = report.markdown_table(["", ""], rows)
    if task_results:
        body += "\n\nMultiple choice at the last eval:\n\n" + evaluation.results_markdown(task_results)
    log(f"report: {report.update_report(report.report_path(cfg.out), 'Pretraining', body)}")


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(argv)
    if error := optim.schedule_error(cfg.warmdown_ratio, cfg.final_lr_frac):
        sys.exit(error)  # before any process group, model or data is set up
    rank, world_size, device = common.setup_distributed(cfg.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    data.check_folder(cfg.out)  # a bad --out fails now, on every rank, not at the first save
    common.check_new_run(cfg.out, cfg.resume)

    try:
        tokenizer = Tokenizer.load(cfg.tokenizer)
        sources, val_sources = data.parse_specs(cfg.data), data.parse_specs(cfg.val_data, "--val-data")
        eval_tasks = [(t, evaluation.load_examples(t, cfg.eval_task_limit))
                      for t in evaluation.parse_task_list(cfg.eval_tasks)]
    except (FileNotFoundError, ValueError, data.DataError) as e:
        sys.exit(f"error: {e}")
    dtype = common.training_dtype(device, cfg.dtype, log)
    try:
        raw_model = build_model(cfg, tokenizer.vocab_size, device)
    except ValueError as e:  # e.g. a bad --window-pattern
        sys.exit(f"error: {e}")
    log(kernels.attention_in_training(raw_model.config, device, dtype))
    model = torch.compile(raw_model) if cfg.compile else raw_model
    cfg.device_batch_size = common.fit_device_batch(  # out of memory at the first step: halve it, accumulate more
        functools.partial(common.probe_batch, model, seq_len=cfg.seq_len, device=device, dtype=dtype),
        cfg.device_batch_size,
        lambda b: cfg.total_batch_size % (b * cfg.seq_len * world_size) == 0, log, device)
    steps, accum, peak = plan_run(cfg, raw_model, world_size, device, log)
    try:
        weight_decay = scaled_weight_decay(cfg, raw_model.config, steps, log)
        optimizers = optim.build_optimizers(raw_model, dataclasses.replace(cfg, weight_decay=weight_decay), dtype)
    except ValueError as e:  # e.g. a bad --muon
        sys.exit(f"error: {e}")
    try:
        loader = dataloader.PretrainBatches(sources, tokenizer, cfg.device_batch_size, cfg.seq_len, rank, world_size,
                                      prefetch=cfg.prefetch, packing=cfg.packing)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    val_batches = None
    if cfg.eval_every:  # read now: bad --val-data fails before the first step, not at the first evaluation
        try:
            val_batches = dataloader.validation_batches(val_sources, tokenizer, cfg.device_batch_size, cfg.seq_len,
                                                        rank, world_size, -(-cfg.eval_tokens // cfg.seq_len))
        except data.DataError as e:
            sys.exit(f"error: validation data: {e.problem}; "
                     + (e.hint.replace("--data", "--val-data") if e.hint else "check --val-data"))
    resumed = resume(cfg, raw_model, tokenizer, optimizers, loader, rank, world_size, log) if cfg.resume else {}
    step, tokens_seen = resumed.get("step", 0), resumed.get("tokens", 0)
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    stop, smoothed = common.StopSignal(), common.SmoothedLoss(state=resumed.get("loss_smooth", (0.0, 0)))
    out, prior_seconds = Path(cfg.out), resumed.get("train_seconds", 0.0)

    def save():
        loaders = [None] * world_size  # every rank takes part in gathering the loader states
        if world_size > 1:
            dist.all_gather_object(loaders, loader.state_dict())
        else:
            loaders = [loader.state_dict()]
        state = dict(model=raw_model.state_dict(), optimizers=[o.state_dict() for o in optimizers],
                     model_config=dataclasses.asdict(raw_model.config), train_config=dataclasses.asdict(cfg),
                     tokenizer=str(Path(cfg.tokenizer).resolve()), tokenizer_json=tokenizer.to_json(),
                     kind="base", loader=loaders, world_size=world_size,
                     rng=dict(cpu=torch.get_rng_state()), step=step, tokens=tokens_seen,
                     train_seconds=prior_seconds + time.time() - start_time, loss_smooth=smoothed.state(),
                     last_eval=dict(val_bpb=val_bpb, task_results=task_results))  # for a later session's report
        if master:
            log(f"saved {common.save_checkpoint(out, step, state, cfg.keep_last)}")

    if master:
        data.make_folder(out)
        log_file = common.open_log(out)
    batches = iter(loader)

    def next_batches(n):
        try:
            return [next(batches) for _ in range(n)]
        except data.DataError as e:  # a bad row found while reading, e.g. malformed JSON lines
            sys.exit(f"error: {e}")

    first_step, first_tokens = step, tokens_seen
    last_eval = resumed.get("last_eval", {})  # an earlier session's, until this one evaluates
    val_bpb, task_results = last_eval.get("val_bpb"), last_eval.get("task_results", [])
    start_time, window_start, window_tokens = time.time(), time.time(), 0
    budget = common.TimeBudget(cfg.time_budget, prior_seconds) if cfg.time_budget else None  # starts with the steps

    def finished():  # before the first step too: a resumed run whose budget is spent trains none
        return step >= steps or (budget is not None and budget.used_up(device))
    last = finished()
    while not last:
        progress = budget.fraction(device) if budget else tokens_seen / (steps * cfg.total_batch_size)
        settings = schedule(cfg, step, progress)
        lr_mult = settings["lr_mult"]
        loss = train_step(model, optimizers, next_batches(accum), settings, device, dtype)
        if world_size > 1:  # every step's loss is the mean over ranks: the log's, and the smoothed one's
            mean = torch.tensor(loss, device=device)
            dist.all_reduce(mean)
            loss = mean.item() / world_size
        step += 1
        tokens_seen += cfg.total_batch_size
        window_tokens += cfg.total_batch_size
        last = finished()
        record = dict(step=step, tokens=tokens_seen, loss=loss, loss_smooth=smoothed.update(loss), lr_mult=lr_mult)

        if step % cfg.log_every == 0 or last:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            tok_per_s = window_tokens / (now - window_start)
            window_start, window_tokens = now, 0
            mfu = raw_model.flops_per_token() * tok_per_s / (peak * world_size) if peak else None
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            record.update(tok_per_s=round(tok_per_s), mfu=mfu, mem_gib=mem, elapsed_s=round(now - start_time, 1))
            left = (budget.seconds - budget.elapsed() if budget else
                    (steps - step) * cfg.total_batch_size / tok_per_s)
            log(f"step {step:>6,}" + ("" if budget else f"/{steps:,}")
                + f" | loss {record['loss_smooth']:.4f} (this step {loss:.4f}) | lr x{lr_mult:.3f} | {tok_per_s:,.0f} tok/s"
                + (f" | MFU {mfu:.1%}" if mfu is not None else "") + (f" | mem {mem:.1f} GiB" if mem else "")
                + f" | ETA {common.format_seconds(max(left, 0))}")
        paused = time.time()  # evaluation, samples and saves are no training: the next rate leaves them out
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            task_results = evaluate(raw_model, tokenizer, val_batches, eval_tasks, record, step, cfg, rank,
                                    world_size, device, log)
            val_bpb = f"{record['val_bpb']:.4f} (step {step:,})"
        if master and cfg.sample_every and (step % cfg.sample_every == 0 or last):
            record["samples"] = sample_texts(raw_model, tokenizer, SAMPLE_PROMPTS)
            for text in record["samples"]:
                log(f"  sample: {text!r}")
        if master:
            common.append_log(log_file, record)

        leave = None if last else stop.reason(step - first_step, cfg.stop_after_steps, device)
        if (cfg.save_every and step % cfg.save_every == 0) or last or leave:
            save()
        window_start += time.time() - paused
        if leave:
            log(f"stopped at step {step:,} ({leave}); continue with --resume")
            break
    if world_size > 1:
        log(f"parameters identical on all {world_size} ranks: {ranks_in_sync(raw_model)}")
    seconds = time.time() - start_time
    counts = {"tokens": loader.token_counts(), "cropped": loader.cropped_counts()}
    if world_size > 1:  # all ranks' tokens, not rank 0's share
        every_rank = [None] * world_size
        dist.all_gather_object(every_rank, counts)
        counts = {kind: {spec: sum(rank[kind][spec] for rank in every_rank) for spec in counts[kind]}
                  for kind in counts}
    log(f"done: {tokens_seen:,} tokens" + (f", {tokens_seen - first_tokens:,} of them" if first_step else "")
        + f" in {seconds:.0f}s"
        + (f" (this session's share of the {cfg.time_budget:g}-minute budget)" if budget else "")
        + f"; counts per source: {json.dumps(counts['tokens'], ensure_ascii=False)}"
        + f"; times read through per source: {json.dumps(loader.passes_read(), ensure_ascii=False)}"
        + (f"; cropped per source: {json.dumps(counts['cropped'], ensure_ascii=False)}"
           if cfg.packing == "bestfit" else ""))
    if step == first_step:
        log(common.nothing_trained(out, step, steps, cfg.time_budget))
    elif master:
        write_report(cfg, raw_model, steps, step, first_step, tokens_seen,
                     (tokens_seen - first_tokens) / max(seconds, 1e-9), prior_seconds + seconds, peak, world_size,
                     device, val_bpb, task_results, log)
    del model  # DDP's reducer must go before its process group, or gloo can hang on exit
    common.teardown_distributed()
    if stop.exit_code():  # a Ctrl-C or SIGTERM stop, saved: the next stage of a script must not start (StopSignal)
        raise SystemExit(stop.exit_code())


if __name__ == "__main__":
    common.run_main(main)
