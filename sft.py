"""
sft.py: supervised fine-tuning, turning a pretrained nanoschnack into a German chat model.

    python sft.py --preset tiny --base out/base --data 'jsonl://DATA/sft/[!v]*.jsonl' \\
                  --val-data 'jsonl://DATA/sft/val.jsonl'                             # CPU, minutes
    torchrun --nproc_per_node=8 sft.py --base out/base                                 # 8 GPUs, hub data

Starts from the newest checkpoint in --base (its model config and tokenizer)
and writes chat checkpoints to --out in the same format (kind "chat"), which
chat.py loads.

- Conversations: {"messages": [{"role", "content"}]} rows from any data.py
  spec (jsonl://, parquet://, hf://). Hub chat sets in other common shapes are
  converted by `to_messages` (ShareGPT "conversations" from/value, OASST
  "conversation" role/text, Alpaca instruction/input/output, Dolly
  instruction/context/response).
- Each conversation is rendered with tok.py's chat template; the loss is on the
  assistant's text and its <|assistant_end|> only. Conversations longer than
  the context are cut at a turn boundary; malformed ones are counted and
  reported with an example, never dropped silently.
- One row per conversation, padded to the longest in the micro-batch (targets
  -1 on padding and on everything that is not trained); a step's rows go into
  its micro-batches shortest first, so rows of like length share one. The loss
  is the mean over all trained tokens of the whole optimizer step, on every rank
  together, so a batch of long answers weighs as much per token as one of short
  answers.
- Order: a seeded permutation per epoch; step s trains examples
  [s*E, (s+1)*E) of it (E = examples per step), rank r micro-step m takes
  its slice (m*W + r)*B ... Resume is exact and only needs (epoch, step).
- A small set of identity conversations (assets/identity.jsonl: who nanoschnack
  is, what it can and cannot do) is mixed into every epoch.
- Plain text keeps the German (--text-data, --text-frac): a share of each epoch's
  rows are pretraining rows, trained on every token, as nanochat's mid-training
  mixes pretraining data into its chat stage. A model fine-tuned on conversations
  alone loses some of its general German (bits per byte on held-out text rise);
  the text rows hold it (README, "The demo"). Given the base model's own
  pretraining mix, they continue its data stream where pretraining stopped, so
  they are text the base model has not read. --text-bestfit F: a share F of them
  each begin at a document's start (best-fit packing), so the chat model keeps
  how a text begins, not only how it goes on.
- At the end: the stop rate (held-out answers that end with <|assistant_end|>)
  and the identity rate (sampled answers to "Wer bist du?" and two paraphrases that
  name nanoschnack), both on the report card.
"""
import dataclasses
import functools
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import chatdata
import common
import data
import kernels
import optim
import report
from gpt import autocast
from session import Sampling
from tok import render_prompt

IDENTITY_FILE = Path(__file__).parent / "assets" / "identity.jsonl"
# German chat sets on the hub: OASST (human-written, translated), Alpaca-GPT4 (German), Dolly (curated, German split)
DEFAULT_SFT_SPEC = " ".join([
    "hf://OpenAssistant/OASST-DE?weight=1",
    "hf://FreedomIntelligence/alpaca-gpt4-deutsch?weight=1",
    "hf://argilla/databricks-dolly-15k-curated-multilingual?split=de&weight=1",
])
SAMPLE_QUESTIONS = ["Wer bist du?", "Was ist die Hauptstadt von Deutschland?", "Erzähl mir einen kurzen Witz.",
                    "Wie viele Beine hat eine Spinne?"]


@dataclass
class SFTConfig:
    preset: str = "full"
    base: str = "out/base"           # pretraining checkpoint: a file, or a folder (its newest)
    data: str = DEFAULT_SFT_SPEC
    val_data: str = ""               # held-out conversations; empty: hold out the first val_conversations of --data
    identity_repeat: int = 4         # copies of each identity conversation per epoch (0: none)
    text_data: str = ""              # plain text mixed in: a spec, or "base" (the base model's pretraining mix,
                                     # continued where it stopped); empty: none
    text_frac: float = 0.0           # share of the training rows that are text documents (0 <= f < 1)
    text_bestfit: float = -1.0       # share of those rows packed best-fit, each from a document's start, the
                                     # rest documents concatenated and cut; -1: as the base model's pretraining
                                     # packed its rows (--packing: all best-fit, or all concatenated)
    answer_chars: int = 0            # training answers longer than this are cut to their first sentences (0: off)
    out: str = "out/chat"
    device_batch_size: int = 4       # conversations per device per micro-step (4 x 8 GPUs = 32)
    examples_per_step: int = 32      # conversations per optimizer step, all devices together
    epochs: int = 1
    max_steps: int = 0               # 0: the epochs decide
    time_budget: float = 0.0         # minutes of wall time: the learning rate decays with it, the run ends
                                     # on time (then epochs and max_steps are ignored)
    matrix_lr: float = 0.02          # the base LRs, as in pretraining ...
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    weight_decay: float = 0.0
    init_lr_frac: float = 0.02       # ... times this (nanochat's earlier chat_sft.py), flat, then linearly to 0
    warmdown_ratio: float = 0.5      # over this last share of the run, as nanochat's chat_sft.py now does
                                     # (1: from the first step, as it did before)
    eval_every: int = 100
    val_conversations: int = 256     # validation conversations, spread over --val-data (0: all of it)
    stop_rate_conversations: int = 50  # at the end: how many of these (spread over the validation ones) get a
                                       # greedy answer to their first question that ends with <|assistant_end|>
    identity_samples: int = 10       # at the end: sampled answers per identity question (0: skip)
    sample_every: int = 0            # 0: only at the end
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    device: str = ""
    dtype: str = "auto"              # as train.py's: bfloat16 where the hardware has bf16 products, else float32
    seed: int = 1337
    resume: bool = False
    stop_after_steps: int = 0
    # the numbers' ranges (common.parse_config refuses a value outside, naming its flag); 0 turns off the
    # evals, samples, saves and limits, and --keep-last 0 keeps every checkpoint
    AT_LEAST: ClassVar[dict] = dict(
        device_batch_size=1, examples_per_step=1, epochs=1, max_steps=0, time_budget=0, matrix_lr=0, embedding_lr=0,
        unembedding_lr=0, weight_decay=0, eval_every=0, val_conversations=0, stop_rate_conversations=0,
        identity_samples=0, sample_every=0, save_every=0, keep_last=0, log_every=1, stop_after_steps=0)
    ABOVE: ClassVar[dict] = dict(init_lr_frac=0)


# what decides which conversations each step trains on, and the learning rates and weight decay that the
# optimizers' saved state holds (train.py's SAME_ON_RESUME: a resumed run would train on with the saved ones):
# --resume refuses other values
SAME_ON_RESUME = ("data", "val_data", "val_conversations", "identity_repeat", "text_data", "text_frac", "text_bestfit",
                  "answer_chars", "examples_per_step", "seed", "matrix_lr", "embedding_lr", "unembedding_lr",
                  "weight_decay", "init_lr_frac")
PRESETS = {
    "full": {},
    # CPU demo (bench/RESULTS.md, "The demo's mix and chat recipe on a slow CPU"). A small model needs a
    # higher learning rate than nanochat's 0.02 to learn to end its answers within minutes: on a demo base
    # model, 200 steps at 0.02 gave 0 of 50 held-out answers that end. On the demo's width-128 model (447
    # steps, its 4 minutes on a slow CPU) 0.2 ended 46 of 50 and 0.4 47, but 0.4 cost about twice the
    # German. Answers cut to their first sentences (200 characters), because a small model that imitates
    # paragraph-long answers repeats itself until the context is full. Identity 40x (199 conversations, 15% of
    # the rows beside the demo's data and text): the share trades a model that never names itself against one
    # that answers unrelated questions with its name. On an EPYC's demo base model (7.6M tokens) at the demo's
    # 360 steps of 32, 40x of the 175 conversations before named it for "Wer bist du?" and both held-out
    # paraphrases 10-10-10 of 10 with 7 of 50 unrelated answers naming it, 20x 10-6-9 with 6 (bench/RESULTS.md,
    # "Thirty-two conversations a step"); on other base models 10-10-2 and 10-6-10, which the answers' one
    # first word lifted to 10-10-7 and 10-10-10, and 60x was no help (10-10-7, UD German-GSD +0.029; "One first
    # word for who it is"). On a slow CPU's weak base model (129 steps) no share teaches the name (at most 4
    # of 10; "Fifth pass", "Sixth pass").
    # 32 conversations a step (the default, nanochat's earlier chat_sft.py's): Muon moves the weights by the
    # learning rate whatever the batch, so many small steps walk away from the base model. On that EPYC 721
    # steps of 16 cost the manuals' text +0.060 bits per byte, 360 of 32 (the same rows, the same minutes)
    # +0.012 and at most +0.014 on any text (UD German-GSD's sentences), and 49 of 50 answers ended against 46;
    # steps of 8 had cost a fast CPU's manuals +0.11 ("Fourth pass"). The price is on a slow CPU, which gets few
    # steps: its weak base model ended 42 and 30 of 50 answers in 65 steps of 16, 47 and 42 in 129 of 8 ("Fourth
    # pass"); at 32 a step it gets about 32 (not measured).
    # The learning rate flat for the first half (the default warmdown_ratio): at half the demo's steps the
    # model learns more before it decays. At 482 steps on the fast CPU's base model 46 and 48 of 50 answers
    # ended in the two orders that gave 41 and 48 with a decay from the first step, and on the slow CPU's
    # weak base model (65 steps) 37 and 49 against 31 and 37; the manuals' text lost about 0.006 more bits
    # per byte (bench/RESULTS.md, "Seventh pass").
    "tiny": dict(device_batch_size=4, max_steps=200, eval_every=50, val_conversations=64, save_every=100,
                 log_every=10, identity_repeat=40, init_lr_frac=0.2, answer_chars=200),
}


# -----------------------------------------------------------------------------
# Batches

# Micro-batches are padded to a multiple of this many positions, so a run sees a few shapes, not one per
# length. On a CPU with bf16 units each new shape makes oneDNN build (JIT) and cache kernels of its own:
# 400 demo SFT steps padded to the longest row grew the process from 1.7 to 4.0 GB and took 122 s; padded
# to a multiple of 32, 1.7 GB throughout and 103 s (2 threads, Xeon with AMX; in fp32, where MKL builds
# nothing per shape, about 3% slower; bench/RESULTS.md, "SFT's padding"). The extra positions are padding:
# their targets are -1, so the gradient is the same.
PAD_MULTIPLE = 32


def collate(conversations, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (B, longest - 1 rounded up to PAD_MULTIPLE); untrained and padded targets
    are -1."""
    length = -(-max(len(ids) - 1 for ids, _ in conversations) // PAD_MULTIPLE) * PAD_MULTIPLE
    inputs = common.pad([ids[:-1] for ids, _ in conversations], pad_id, length)
    targets = common.pad([[t if trained else -1 for t, trained in zip(ids[1:], mask[1:])]
                          for ids, mask in conversations], -1, length)
    return inputs, targets


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def step_batches(conversations, order, step_in_epoch, cfg: SFTConfig, rank, world_size, pad_id):
    """This rank's micro-batches for one step, and the trained-token count of the whole step (all ranks)."""
    E, B = cfg.examples_per_step, cfg.device_batch_size
    chosen = [conversations[i] for i in order[step_in_epoch * E:(step_in_epoch + 1) * E]]
    # Shortest first, so each micro-batch holds rows of like length: a row is padded to the longest of its
    # micro-batch, and one text row (the whole context) among short answers made the micro-batch all
    # padding. The loss is a sum over the whole step, so the order does not change the gradient.
    chosen.sort(key=lambda conversation: len(conversation[0]))
    n_trained = sum(sum(mask[1:]) for _, mask in chosen)
    micro = []
    for m in range(E // (B * world_size)):
        start = (m * world_size + rank) * B
        micro.append(collate(chosen[start:start + B], pad_id))
    return micro, n_trained


def sft_step(model, optimizers, micro_batches, n_trained: int, world_size: int, lr_mult: float, device,
             dtype: torch.dtype | None = None) -> float:
    """One optimizer step; the loss is the mean over the step's trained tokens on all ranks."""
    optim.set_schedule(optimizers, lr_mult)
    total = torch.zeros((), device=device)
    for i, (inputs, targets) in enumerate(micro_batches):
        inputs, targets = inputs.to(device), targets.to(device)
        sync = i == len(micro_batches) - 1 or not isinstance(model, DDP)
        with (nullcontext() if sync else model.no_sync()), autocast(device, dtype):
            loss_sum = model(inputs, targets, loss_reduction="sum") / max(n_trained, 1)
            (loss_sum * world_size).backward()  # DDP averages over ranks; undo that: we want the sum
        total += loss_sum.detach()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    if world_size > 1:
        dist.all_reduce(total)
    return float(total)


@torch.no_grad()
def validation_loss(model, conversations, batch_size, rank, world_size, pad_id, device) -> float:
    """Mean loss per trained token over the validation conversations (all ranks together)."""
    nats = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    mine = sorted(conversations[rank::world_size], key=lambda conversation: len(conversation[0]))  # less padding
    for start in range(0, len(mine), batch_size):
        inputs, targets = collate(mine[start:start + batch_size], pad_id)
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device):
            nats += model(inputs, targets, loss_reduction="sum").double()
        count += (targets >= 0).sum()
    if world_size > 1:
        dist.all_reduce(nats)
        dist.all_reduce(count)
    return float(nats / count.clamp(min=1))


def greedy_answer(model, tokenizer, prompt: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """The greedy answer's tokens to a rendered prompt, and whether it ended with <|assistant_end|> in time."""
    ids = []
    for token in model.generate(prompt, min(max_new_tokens, model.config.sequence_len - len(prompt)), temperature=0.0):
        if token in tokenizer.special.values():  # <|assistant_end|> (or any special token) ends the answer
            return ids, token == tokenizer.special["<|assistant_end|>"]
        ids.append(token)
    return ids, False


def sample_answers(model, tokenizer, questions, max_new_tokens=48) -> list[str]:
    """Greedy answers to fixed German questions, to watch the model become a chat model."""
    return [tokenizer.decode(greedy_answer(model, tokenizer, render_prompt(tokenizer, [{"role": "user", "content": q}]),
                                           max_new_tokens)[0]) for q in questions]


def stop_rate(model, tokenizer, conversations) -> tuple[int, int, int]:
    """(answers that ended, questions asked, answers that name nanoschnack): greedy answers to the first user
    turn of each held-out conversation, with the whole rest of the context as the limit (as chat.py and
    serve.py allow). A chat model that never emits <|assistant_end|> talks until the limit in every answer;
    one that answers everything with its identity ends every answer, which the last count shows (none of
    these questions asks who the model is)."""
    start = tokenizer.special["<|assistant_start|>"]
    ended = named = 0
    for ids, _ in conversations:
        answer, stopped = greedy_answer(model, tokenizer, ids[:ids.index(start) + 1], model.config.sequence_len)
        ended += stopped
        named += "nanoschnack" in tokenizer.decode(answer).lower()
    return ended, len(conversations), named


# Who the model says it is: the first question is in assets/identity.jsonl, the other two are not.
IDENTITY_QUESTIONS = ["Wer bist du?", "Wie heißt du eigentlich?", "Mit wem spreche ich gerade?"]


def identity_rate(model, tokenizer, samples: int, seed: int, max_new_tokens: int = 48) -> dict[str, int]:
    """For each identity question: how many of `samples` answers, sampled as chat.py samples them (its
    default temperature and top-k), name nanoschnack."""
    sampling = Sampling()
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    stops, named = set(tokenizer.special.values()), {}
    for question in IDENTITY_QUESTIONS:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": question}])
        named[question] = 0
        for _ in range(samples):
            ids = []
            for token in model.generate(prompt, max_new_tokens, *sampling.sampler(), generator=gen):
                if token in stops:
                    break
                ids.append(token)
            named[question] += "nanoschnack" in tokenizer.decode(ids).lower()
    return named


def write_report(cfg, base, model, data_stats, n_train, n_val, steps, trained_tokens, seconds, last, log):
    """The SFT and chat-sample sections of the report card (report.py) next to the checkpoints."""
    rows = [["base checkpoint", f"`{base['path']}`"], ["parameters", model.num_params()],
            ["conversations", f"{n_train:,} rows for training (identity and {data_stats.get('text_rows', 0):,} "
                              f"rows of text included), {n_val:,} for validation"],
            ["read / rejected / cut", f"{data_stats.get('read', 0):,} / {data_stats.get('rejected', 0):,} / "
                                      f"{data_stats.get('cut', 0):,} (cut: shortened at a turn boundary)"],
            ["steps", f"{steps:,} of {cfg.examples_per_step} conversations"], ["trained tokens", trained_tokens],
            ["wall time", f"{seconds / 60:.1f} min (this run)"], ["final train loss", last.get("loss")],
            ["final validation loss", last.get("val_loss")], ["data", f"`{cfg.data}`"]]
    if "stop_rate" in last:
        ended, asked, named = last["stop_rate"]
        rows.insert(-1, ["answers that end", f"{ended} of {asked} ({ended / asked:.0%}): greedy answers to the first "
                                             f"question of held-out conversations that end with <|assistant_end|> "
                                             f"before the context is full; {named} of the {asked} name nanoschnack "
                                             f"unasked"])
    if "identity" in last:
        rows.insert(-1, ["names itself", ", ".join(f"{q!r} {n} of {cfg.identity_samples}" for q, n in last["identity"].items())
                         + ": sampled answers (chat.py's default sampling) that name nanoschnack"])
    path = report.report_path(cfg.out)
    report.update_report(path, "SFT", report.markdown_table(["", ""], rows))
    if "samples" in last:
        report.update_report(path, "Chat samples", report.format_samples(list(last["samples"].items())))
    log(f"report: {path}")


# -----------------------------------------------------------------------------

def evenly_spaced(items: list, n: int) -> list:
    """n of the items (all if n is 0 or there are fewer), spread evenly from the first to near the last,
    in order: where the first n of a validation file grouped by source would be one or two sources."""
    return items if not n or n >= len(items) else [items[i * len(items) // n] for i in range(n)]


def pretraining_mix(base: dict | None) -> str:
    """The --data spec the base checkpoint was pretrained on (--text-data base)."""
    if not base or base.get("kind", "base") != "base" or not base.get("train_config", {}).get("data"):
        raise data.DataError(f"--text-data base: {(base or {}).get('path', 'the base model')} is not a train.py "
                             f"checkpoint, so it names no pretraining mix; give the text as a dataset spec")
    return base["train_config"]["data"]


def load_sft_data(cfg: SFTConfig, tokenizer, max_tokens: int, log, stats: dict | None = None,
                  base: dict | None = None):
    """(train conversations, validation conversations), identity conversations and text rows mixed into
    train; `base`: the base model's checkpoint, whose pretraining the text rows continue (load_text_rows)."""
    conversations = chatdata.load_conversations(data.parse_specs(cfg.data), tokenizer, max_tokens, log, stats=stats,
                                       answer_chars=cfg.answer_chars)
    if cfg.val_data:  # all of it, then N spread over it: a file grouped by source gives each source its share
        val = evenly_spaced(chatdata.load_conversations(data.parse_specs(cfg.val_data, "--val-data"), tokenizer, max_tokens, log),
                            cfg.val_conversations)
    else:  # the hub sets have no held-out split: keep the first ones out of training
        if conversations and len(conversations) <= cfg.val_conversations:
            raise data.DataError(f"--data has {len(conversations):,} conversations, and --val-conversations "
                                 f"{cfg.val_conversations} would hold out every one for validation; give --val-data, "
                                 f"or hold out fewer (e.g. --val-conversations {len(conversations) // 10})")
        val, conversations = conversations[:cfg.val_conversations], conversations[cfg.val_conversations:]
    if cfg.identity_repeat:
        identity = data.parse_spec(f"jsonl://{quote(str(IDENTITY_FILE))}?weight={cfg.identity_repeat}")
        conversations += chatdata.load_conversations([identity], tokenizer, max_tokens, log)
    if cfg.text_data and cfg.text_frac:
        count = max(1, round(len(conversations) * cfg.text_frac / (1 - cfg.text_frac)))
        spec = pretraining_mix(base) if cfg.text_data == "base" else cfg.text_data
        rows, continued = chatdata.load_text_rows(data.parse_specs(spec, "--text-data"), tokenizer, max_tokens, count, base,
                                         cfg.text_bestfit)
        conversations += rows
        # every best-fit row begins a document; a concatenated one only where a document happens to begin it
        share = sum(ids[0] == tokenizer.bos_id for ids, _ in rows) / count
        log(f"text: {count:,} rows of plain text mixed in ({cfg.text_frac:.0%} of the training rows; "
            f"{share:.0%} of them begin a document), "
            + ("continuing the base model's pretraining where it stopped" if continued else
               "from the start of --text-data (not the base checkpoint's pretraining mix)"))
        if stats is not None:
            stats["text_rows"] = count
    return conversations, val


def check_same_base(ckpt: dict, path, base: dict, fingerprint: dict, flag_value: str):
    """A resumed chat run goes on from the base it started from: its tokenizer gives the ids, and --text-data
    base continues that base's data stream. A --base folder whose newest checkpoint is now another one (the
    pretraining went on), or another run's, is refused, naming what differs."""
    recorded = ckpt.get("base_fingerprint")
    if recorded is None:  # a checkpoint from before the fingerprint was recorded: its tokenizer tells
        recorded = dict(tokenizer_sha256=common.tokenizer_sha256(ckpt["tokenizer_json"])
                        if "tokenizer_json" in ckpt else fingerprint["tokenizer_sha256"])
    differ = ["another tokenizer" if k == "tokenizer_sha256" else f"{k} {recorded[k]} -> {v}"
              for k, v in fingerprint.items() if k in recorded and recorded[k] != v]
    if differ:
        was = ckpt.get("base_path", ckpt.get("base"))
        sys.exit(f"error: {path} was fine-tuned from {was}, but --base {flag_value} now gives {base['path']} "
                 f"({', '.join(differ)}); resume with --base {was}, or start afresh in another --out")


def main(argv=None):
    cfg = common.parse_config(SFTConfig, PRESETS, argv, description=__doc__.split("\n\n")[1])
    if not 0 <= cfg.text_frac < 1:
        sys.exit(f"error: --text-frac {cfg.text_frac} must be at least 0 and below 1 (a share of the training rows)")
    if not (0 <= cfg.text_bestfit <= 1 or cfg.text_bestfit == -1):
        sys.exit(f"error: --text-bestfit {cfg.text_bestfit} must be from 0 to 1 (a share of the text rows), "
                 f"or -1 (as the base model's pretraining packed its rows)")
    if error := optim.schedule_error(cfg.warmdown_ratio):
        sys.exit(error)
    if cfg.examples_per_step % cfg.device_batch_size:
        sys.exit(f"error: --examples-per-step {cfg.examples_per_step} is not a multiple of "
                 f"--device-batch-size {cfg.device_batch_size}")
    rank, world_size, device = common.setup_distributed(cfg.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if cfg.examples_per_step % (cfg.device_batch_size * world_size):
        sys.exit(f"error: --examples-per-step {cfg.examples_per_step} is not a multiple of device batch "
                 f"x world size = {cfg.device_batch_size * world_size}")
    torch.manual_seed(cfg.seed)

    if common.latest_checkpoint(cfg.out) and Path(cfg.out).resolve() in (Path(cfg.base).resolve(),
                                                                          Path(cfg.base).resolve().parent):
        sys.exit(f"error: --out {cfg.out} is --base's folder: SFT's checkpoints would mix with the base model's, "
                 f"and --keep-last would delete those; choose another --out (e.g. out/chat)")
    model, tokenizer, base = common.load_model(cfg.base, device, flag="--base")
    data.check_folder(cfg.out)  # a bad --out fails now, on every rank, not at the first save
    common.check_new_run(cfg.out, cfg.resume)
    if base.get("kind") == "chat":
        log(f"note: {base['path']} is already a chat checkpoint; fine-tuning it further")
    model.train()
    max_tokens = model.config.sequence_len + 1  # a row of T inputs predicts T targets
    log(f"base {base['path']} | {model.num_params():,} parameters | context {model.config.sequence_len}")
    data_stats = {}
    try:
        conversations, val = load_sft_data(cfg, tokenizer, max_tokens, log, data_stats, base)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    steps_per_epoch = len(conversations) // cfg.examples_per_step
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(conversations)} conversations are fewer than one step of "
                 f"--examples-per-step {cfg.examples_per_step}")
    steps = sys.maxsize if cfg.time_budget else cfg.max_steps or steps_per_epoch * cfg.epochs
    dtype = common.training_dtype(device, cfg.dtype, log)
    log(kernels.attention_in_training(model.config, device, dtype))
    cfg.device_batch_size = common.fit_device_batch(  # out of memory at the first step: halve it, accumulate more
        functools.partial(common.probe_batch, model, seq_len=model.config.sequence_len, device=device, dtype=dtype),
        cfg.device_batch_size, lambda b: cfg.examples_per_step % (b * world_size) == 0, log, device)
    accum = cfg.examples_per_step // (cfg.device_batch_size * world_size)
    length = f"{cfg.time_budget:g} minutes (time budget)" if cfg.time_budget else f"{steps:,} steps"
    log(f"plan: {len(conversations):,} conversations ({len(val):,} validation), {length} of "
        f"{cfg.examples_per_step} ({steps_per_epoch:,} per epoch), {world_size} process(es) on {device}, "
        f"{accum} micro-steps per step")

    optimizers = optim.build_optimizers(model, cfg, dtype)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] *= cfg.init_lr_frac
    step, trained_tokens, prior_seconds, out, loss_smooth = 0, 0, 0.0, Path(cfg.out), (0.0, 0)
    base_path, base_fingerprint = str(Path(base["path"]).resolve()), common.checkpoint_fingerprint(base, tokenizer)
    if cfg.resume and (path := common.checkpoint_to_resume(out)):
        ckpt = common.load_checkpoint(path)
        if not isinstance(ckpt, dict) or ckpt.get("kind") != "chat" or "optimizers" not in ckpt:
            sys.exit(f"error: {path} is not an sft.py checkpoint to resume; resume in sft.py's own --out, "
                     f"or choose another --out")
        common.check_same_model(ckpt["model_config"], model.config, path)
        common.check_same_settings(path, ckpt.get("train_config", {}), cfg, SAME_ON_RESUME)
        check_same_base(ckpt, path, base, base_fingerprint, cfg.base)
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        torch.set_rng_state(ckpt["rng"]["cpu"])
        step, trained_tokens, prior_seconds = ckpt["step"], ckpt["tokens"], ckpt.get("train_seconds", 0.0)
        loss_smooth = ckpt.get("loss_smooth", loss_smooth)
        log(f"resumed from {path} at step {step:,}")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out}, starting from {base['path']}")

    raw_model = model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    pad_id = tokenizer.bos_id  # any id: padded positions have target -1

    stop, smoothed = common.StopSignal(), common.SmoothedLoss(state=loss_smooth)

    def save():
        if master:
            state = dict(model=raw_model.state_dict(), optimizers=[o.state_dict() for o in optimizers],
                         model_config=dataclasses.asdict(raw_model.config), train_config=dataclasses.asdict(cfg),
                         tokenizer=base.get("tokenizer"), tokenizer_json=tokenizer.to_json(), kind="chat",
                         base=base["path"], base_path=base_path, base_fingerprint=base_fingerprint,
                         base_relative=os.path.relpath(base_path, out.resolve()),  # found when the run moves
                         world_size=world_size, rng=dict(cpu=torch.get_rng_state()),
                         step=step, tokens=trained_tokens, train_seconds=prior_seconds + time.time() - start_time,
                         loss_smooth=smoothed.state())
            log(f"saved {common.save_checkpoint(out, step, state, cfg.keep_last)}")

    if master:
        data.make_folder(out)
        log_file = common.open_log(out)
    first_step, start_time, record = step, time.time(), {}
    window_start, window_tokens = time.time(), 0
    budget = common.TimeBudget(cfg.time_budget, prior_seconds) if cfg.time_budget else None  # starts with the steps

    def finished():  # before the first step too: a resumed run whose budget is spent trains none
        return step >= steps or (budget is not None and budget.used_up(device))
    last = finished()
    while not last:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if step == first_step or step_in_epoch == 0:
            order = epoch_order(len(conversations), cfg.seed, epoch)
        micro, n_trained = step_batches(conversations, order, step_in_epoch, cfg, rank, world_size, pad_id)
        lr_mult = optim.lr_multiplier(budget.fraction(device) if budget else step / steps, cfg.warmdown_ratio, 0.0)
        loss = sft_step(model, optimizers, micro, n_trained, world_size, lr_mult, device, dtype)
        step += 1
        trained_tokens += n_trained
        window_tokens += n_trained
        last = finished()
        record = dict(step=step, epoch=epoch, loss=loss, loss_smooth=smoothed.update(loss), lr_mult=lr_mult,
                      trained_tokens=trained_tokens)
        if step % cfg.log_every == 0 or last:
            now = time.time()
            rate = window_tokens / (now - window_start)
            window_start, window_tokens = now, 0
            left = budget.seconds - budget.elapsed() if budget else (steps - step) * (now - start_time) / (step - first_step)
            record.update(trained_tok_per_s=round(rate), elapsed_s=round(now - start_time, 1))
            log(f"step {step:>5,}" + ("" if budget else f"/{steps:,}") + f" | epoch {epoch} | loss "
                f"{record['loss_smooth']:.4f} (this step {loss:.4f}) | lr x{lr_mult:.3f} | "
                f"{rate:,.0f} trained tok/s | ETA {common.format_seconds(max(left, 0))}")
        if cfg.eval_every and val and (step % cfg.eval_every == 0 or last):
            raw_model.eval()
            record["val_loss"] = validation_loss(raw_model, val, cfg.device_batch_size, rank, world_size, pad_id, device)
            raw_model.train()
            log(f"step {step:>5,} | validation loss {record['val_loss']:.4f}")
        if master and (last or (cfg.sample_every and step % cfg.sample_every == 0)):
            raw_model.eval()
            record["samples"] = dict(zip(SAMPLE_QUESTIONS, sample_answers(raw_model, tokenizer, SAMPLE_QUESTIONS)))
            raw_model.train()
            for question, answer in record["samples"].items():
                log(f"  {question} -> {answer!r}")
        if master and last and cfg.stop_rate_conversations and val:
            raw_model.eval()
            record["stop_rate"] = stop_rate(raw_model, tokenizer, evenly_spaced(val, cfg.stop_rate_conversations))
            raw_model.train()
            log("answers that end with <|assistant_end|>: {} of {}; answers that name nanoschnack unasked: {}"
                .format(*record["stop_rate"]))
        if master and last and cfg.identity_samples:
            raw_model.eval()
            record["identity"] = identity_rate(raw_model, tokenizer, cfg.identity_samples, cfg.seed)
            raw_model.train()
            log("answers that name nanoschnack: " + ", ".join(f"{q!r} {n} of {cfg.identity_samples}"
                                                              for q, n in record["identity"].items()))
        if master:
            common.append_log(log_file, record)

        leave = None if last else stop.reason(step - first_step, cfg.stop_after_steps, device)
        if (cfg.save_every and step % cfg.save_every == 0) or last or leave:
            save()
        if leave:
            log(f"stopped at step {step:,} ({leave}); continue with --resume")
            break
    log(f"done: {step:,} steps, {trained_tokens:,} trained tokens in {time.time() - start_time:.0f}s")
    if step == first_step:
        log(common.nothing_trained(out, step, steps, cfg.time_budget))
    elif master and last:
        write_report(cfg, base, raw_model, data_stats, len(conversations), len(val), step, trained_tokens,
                     time.time() - start_time, record, log)
    del model  # DDP's reducer must go before its process group, or gloo can hang on exit
    common.teardown_distributed()
    if stop.exit_code():  # a Ctrl-C or SIGTERM stop, saved: the next stage of a script must not start (StopSignal)
        raise SystemExit(stop.exit_code())


if __name__ == "__main__":
    common.run_main(main)
