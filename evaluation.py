"""
evaluation.py: how good is a nanoschnack model? Bits per byte and German benchmarks.

    python evaluation.py --checkpoint out/chat                    # bpb + hellaswag, arc, mmlu, lambada (hub)
    python evaluation.py --checkpoint out/base --local-only --limit 500 \
        --bpb-data 'txt://DATA/eval/ud_gsd_dev.txt?per=line' --task-file quiz=jsonl://quiz.jsonl
    torchrun --nproc_per_node=8 evaluation.py --checkpoint out/chat   # examples split over the ranks

Three measurements, all from the model's log-probabilities (no sampling):

- bits per byte (bpb) on any dataset spec: every document is <|bos|> + its
  tokens, cut into non-overlapping windows of the model's sequence length, so
  each token is predicted exactly once (a window after the first sees only its
  own window as context). bpb = sum of -ln p(token) / (ln 2 x UTF-8 bytes of the
  predicted tokens), special tokens excluded. Dividing by bytes, not tokens,
  makes models with different tokenizers comparable.
- multiple choice by log-likelihood, as lm-eval does it: each choice is
  appended to the context, and the model picks the choice with the highest
  sum of log-probs of its tokens (acc), or of that sum divided by the choice's
  length in characters (acc_norm, lm-eval's normalisation; it stops long
  choices from losing just for being long). "random" is the accuracy of guessing,
  the mean of 1/len(choices).
- LAMBADA (last word): correct when greedy decoding gives every token of the
  last word; random is 0.

Tasks are dataset specs (data.py) whose rows a small function turns into one
internal form, {"context": str, "choices": [str], "label": int, "delimiter": str}, with
German prompts: each choice is the text scored after the context, and starts with the
delimiter that joins them (lm-eval's target_delimiter, " "; "" when absent), which
acc_norm does not count as a character of the choice, as lm-eval does not. The hub defaults are the standard German sets (HUB_TASKS below); a
local JSONL file in that same form is a task too (--task-file NAME=jsonl://FILE).

The results go to the terminal and into the report card (report.md, next to the
checkpoint folders), which every stage updates with its own section.
"""
import argparse
import itertools
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import data
from data import DataError
from gpt import autocast
from report import markdown_table, report_path, update_report

# -----------------------------------------------------------------------------
# Bits per byte


@torch.no_grad()
def bpb_sums(model, batches, token_bytes: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(nats, bytes) summed over (inputs, targets) batches; targets of -1 and special tokens (0 bytes) don't count."""
    nats = torch.zeros((), device=device, dtype=torch.float64)
    n_bytes = torch.zeros((), device=device, dtype=torch.float64)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device):
            loss = model(inputs, targets, loss_reduction="none").view(-1)
        targets = targets.view(-1)
        bytes_per_target = token_bytes[targets.clamp(min=0)] * (targets >= 0)
        nats += (loss.double() * (bytes_per_target > 0)).sum()
        n_bytes += bytes_per_target.sum()
    return nats, n_bytes


def all_reduce_sum(values: list[float] | torch.Tensor, device) -> list[float]:
    """Sum a few counters over DDP ranks (a no-op in a single process)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor, device) -> float:
    """Bits per UTF-8 byte on (inputs, targets) batches, e.g. train.py's packed validation batches.

    Special tokens (0 bytes) and -1 targets are excluded; under DDP the sums are
    all-reduced, so every rank must call this once with its own batches."""
    nats, n_bytes = bpb_sums(model, batches, token_bytes, device)
    nats, n_bytes = all_reduce_sum(torch.stack([nats, n_bytes]), device)
    return bits_per_byte(nats, n_bytes)


def bits_per_byte(nats: float, n_bytes: float) -> float:
    """NaN without a byte to measure on (0 / 0), never a perfect-looking 0."""
    return nats / (math.log(2) * n_bytes) if n_bytes else math.nan


def document_windows(tokenizer, texts: list[str], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Each document as <|bos|> + tokens, cut into (inputs, targets) windows of at most seq_len predictions."""
    rows = []
    for ids in tokenizer.encode_batch(texts):
        ids = [tokenizer.bos_id] + ids
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start:start + seq_len + 1]  # windows share one token: each target is predicted once
            rows.append((window[:-1], window[1:]))
    return rows


def padded_batches(rows, batch_size: int):
    """(inputs, targets) lists into (B, T) tensors, padded on the right (targets -1, so they don't count)."""
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        yield common.pad([x for x, _ in chunk], 0), common.pad([y for _, y in chunk], -1)


def first_bytes(texts, max_bytes: int):
    """Documents until `max_bytes` bytes of UTF-8 text (0 = all); the last one cut to fit, at a character
    boundary. A fixed sample of every source, however long its documents are (one novel can be 200 KB)."""
    left = max_bytes
    for text in texts:
        if max_bytes:
            encoded = text.encode("utf-8")
            if len(encoded) >= left:
                yield encoded[:left].decode("utf-8", errors="ignore")
                return
            left -= len(encoded)
        yield text


@torch.no_grad()
def text_bpb(model, tokenizer, texts, device, batch_size: int = 16, limit: int = 0, rank: int = 0,
             world_size: int = 1, progress: "common.Progress | None" = None, max_bytes: int = 0) -> dict:
    """Bits per byte of the model on an iterable of documents (the first `limit` of them, 0 = all; at most
    `max_bytes` of their text, 0 = all).

    Under DDP rank r takes documents r, r+W, ...; the result is the same on every rank:
    {"bpb", "documents", "bytes", "tokens"}."""
    token_bytes = torch.tensor(tokenizer.token_bytes, device=device)
    nats = n_bytes = 0.0
    docs = tokens = 0
    texts = first_bytes(itertools.islice(texts, limit or None), max_bytes)
    mine = (t for i, t in enumerate(texts) if i % world_size == rank)
    while chunk := list(itertools.islice(mine, 64)):
        rows = sorted(document_windows(tokenizer, chunk, model.config.sequence_len), key=lambda r: len(r[0]))
        n, b = bpb_sums(model, padded_batches(rows, batch_size), token_bytes, device)
        nats, n_bytes = nats + n.item(), n_bytes + b.item()
        docs, tokens = docs + len(chunk), tokens + sum(len(y) for _, y in rows)
        if progress:  # with max_bytes: how far along in bytes (this rank's share of them)
            progress.update(docs * world_size, fraction=n_bytes * world_size / max_bytes if max_bytes else None)
    nats, n_bytes, docs, tokens = all_reduce_sum([nats, n_bytes, docs, tokens], device)
    return dict(bpb=bits_per_byte(nats, n_bytes), documents=int(docs), bytes=int(n_bytes), tokens=int(tokens))


# -----------------------------------------------------------------------------
# Multiple choice by log-likelihood


def choice_rows(tokenizer, example: dict, seq_len: int) -> list[tuple[list[int], int]]:
    """For each choice: the tokens <|bos|> context choice (cut from the left to seq_len + 1) and
    how many tokens at the end are the choice's. Context and choice are encoded separately, so
    every choice is scored on the same context tokens."""
    context = [tokenizer.bos_id] + tokenizer.encode(example["context"])
    rows = []
    for choice in example["choices"]:
        answer = tokenizer.encode(choice)
        ids = (context + answer)[-(seq_len + 1):]
        rows.append((ids, min(len(answer), len(ids) - 1)))
    return rows


@torch.no_grad()
def continuation_scores(model, rows, device) -> tuple[list[float], list[bool]]:
    """For rows (ids, n): the sum of log p of the last n tokens given the ones before, and whether
    each of those n tokens is also the model's greedy (argmax) prediction."""
    inputs = common.pad([ids[:-1] for ids, _ in rows], 0)
    targets = common.pad([[-1] * (len(ids) - 1 - n) + ids[len(ids) - n:] for ids, n in rows], -1)
    inputs, targets = inputs.to(device), targets.to(device)
    with autocast(device):
        logits = model(inputs)
    scored = targets >= 0
    logp = F.log_softmax(logits[scored].float(), dim=-1)  # only the scored positions: (N, vocab)
    wanted = targets[scored]
    token_logp = logp.gather(1, wanted[:, None]).squeeze(1)
    token_greedy = logp.argmax(dim=1) == wanted
    row_of = scored.nonzero()[:, 0]
    sums = torch.zeros(len(rows), device=logp.device, dtype=torch.float64).index_add_(0, row_of, token_logp.double())
    misses = torch.zeros(len(rows), device=logp.device).index_add_(0, row_of, (~token_greedy).float())
    return sums.tolist(), (misses == 0).tolist()


def example_groups(examples, max_rows: int):
    """Consecutive examples with at most max_rows choices together (at least one example each)."""
    group, rows = [], 0
    for ex in examples:
        if group and rows + len(ex["choices"]) > max_rows:
            yield group
            group, rows = [], 0
        group.append(ex)
        rows += len(ex["choices"])
    if group:
        yield group


def argmax(values) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal values


@torch.no_grad()
def evaluate_task(model, tokenizer, examples: list[dict], device, kind: str = "choice", batch_size: int = 16,
                  rank: int = 0, world_size: int = 1, progress: "common.Progress | None" = None) -> dict:
    """Accuracy on examples {"context", "choices", "label"}: {"examples", "acc", "acc_norm", "random"}.

    kind "choice": pick the choice with the highest log-likelihood (acc) or log-likelihood per
    character (acc_norm). kind "greedy": correct when greedy decoding yields choices[label]
    (LAMBADA); acc_norm is None, random 0. Under DDP rank r takes examples r, r+W, ... and
    the counts are all-reduced, so every rank returns the same numbers."""
    seq_len = model.config.sequence_len
    n = correct = correct_norm = chance = 0.0
    mine = examples[rank::world_size]
    for group in example_groups(mine, batch_size):
        rows = [row for ex in group for row in choice_rows(tokenizer, ex, seq_len)]
        logps, greedy = continuation_scores(model, rows, device)
        start = 0
        for ex in group:
            k, label = len(ex["choices"]), ex["label"]
            lp, gr = logps[start:start + k], greedy[start:start + k]
            start += k
            n += 1
            if kind == "greedy":
                correct += gr[label]
                continue
            correct += argmax(lp) == label
            own = [c.removeprefix(ex.get("delimiter", "")) for c in ex["choices"]]  # lm-eval's len(choice)
            correct_norm += argmax([s / max(len(c), 1) for s, c in zip(lp, own)]) == label
            chance += 1 / k
        if progress:
            progress.update(int(n) * world_size)
    n, correct, correct_norm, chance = all_reduce_sum([n, correct, correct_norm, chance], device)
    n_ = max(n, 1)
    return dict(examples=int(n), acc=correct / n_, acc_norm=None if kind == "greedy" else correct_norm / n_,
                random=chance / n_)


# -----------------------------------------------------------------------------
# Tasks: a dataset spec, a function from its rows to examples, German prompts
#
# The row functions follow lm-eval's prompts for these tasks, in German. The
# column names are those of the hub datasets (looked up in the datasets'
# cards and in lm-eval/lighteval code; the hub is not reachable from the
# development machine, so they are tested on fake rows with those columns).


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow's "[title]" and other [..] markup out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class SkipRow(Exception):
    """A hub row that is no usable example (a missing, empty or non-string field, an answer that is
    not among the options): load_examples skips and counts it. Hub sets have such rows: MMMLU's CSV
    reads "None" and "NA" as NaN, for one."""


def field_text(row: dict, key: str) -> str:
    """row[key] if it is a string; else SkipRow naming what it is."""
    value = row.get(key)
    if isinstance(value, str):
        return value
    what = ("missing" if key not in row else "None" if value is None else
            "NaN" if isinstance(value, float) and math.isnan(value) else f"of type {type(value).__name__} ({value!r:.40})")
    raise SkipRow(f"field {key!r} is {what}, not a string")


def hellaswag_example(row: dict) -> dict | None:
    """alexandrainst/m_hellaswag (de): activity_label, ctx_a, ctx_b, endings, label (a string; "" in test)."""
    label = row.get("label")
    if isinstance(label, str) and label.strip() == "":
        return None  # an unlabeled (test) row
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise SkipRow(f"field 'endings' is {endings!r:.60}, not a list of two or more strings")
    if isinstance(label, bool) or not (isinstance(label, int) or isinstance(label, str) and label.strip().isdigit()) \
            or not 0 <= int(label) < len(endings):
        raise SkipRow(f"field 'label' is {label!r:.40}, not the index of one of the {len(endings)} endings")
    context = f"{field_text(row, 'activity_label')}: {field_text(row, 'ctx_a')} {field_text(row, 'ctx_b').capitalize()}"
    return dict(context=hellaswag_clean(context), choices=[" " + hellaswag_clean(e) for e in endings],
                label=int(label), delimiter=" ")


def arc_example(row: dict) -> dict | None:
    """alexandrainst/m_arc (de): instruction, option_a .. option_e (empty, None, "None" or NaN when fewer),
    answer ("A".."E"). Scored like lm-eval's arc_challenge: the answer text after "Antwort:"."""
    keys = []
    for k in ("option_a", "option_b", "option_c", "option_d", "option_e"):
        value = row.get(k)
        if value in (None, "", "None") or isinstance(value, float) and math.isnan(value):
            continue  # no such option
        field_text(row, k)
        keys.append(k)
    letters = [k[-1].upper() for k in keys]
    answer = field_text(row, "answer").strip().upper()
    if answer not in letters or len(keys) < 2:
        raise SkipRow(f"answer {answer!r} is not one of its two or more options ({', '.join(letters) or 'none'})")
    return dict(context=f"Frage: {field_text(row, 'instruction').strip()}\nAntwort:",
                choices=[" " + row[k].strip() for k in keys], label=letters.index(answer), delimiter=" ")


def mmlu_example(row: dict) -> dict | None:
    """openai/MMMLU (DE_DE): Question, A, B, C, D, Answer ("A".."D"), Subject.
    Scored like lm-eval's mmlu: the options are listed, the model picks a letter."""
    letters = ["A", "B", "C", "D"]
    answer = field_text(row, "Answer").strip().upper()
    if answer not in letters:
        raise SkipRow(f"answer {answer!r} is not one of A, B, C, D")
    options = "".join(f"\n{x}. {field_text(row, x).strip()}" for x in letters)
    return dict(context=f"Frage: {field_text(row, 'Question').strip()}{options}\nAntwort:",
                choices=[" " + x for x in letters], label=letters.index(answer), delimiter=" ")


def lambada_example(row: dict) -> dict | None:
    """EleutherAI/lambada_openai (de, machine-translated LAMBADA): text; predict its last word."""
    context, _, word = field_text(row, "text").strip().rpartition(" ")
    if not context or not word:
        raise SkipRow("field 'text' has no context before its last word")
    return dict(context=context, choices=[" " + word], label=0, delimiter=" ")


def local_example(row: dict) -> dict:
    """The local multiple-choice format: {"context": str, "choices": [str, ...], "label": int}.

    A choice is joined to the context with one space, unless the context ends or
    the choice starts with whitespace (then they are joined as they are). acc_norm counts a choice's
    characters without that space, as lm-eval's default target_delimiter " " (with a choice that brings
    its own whitespace: every choice as joined, as lm-eval's target_delimiter "")."""
    context, choices, label = row.get("context"), row.get("choices"), row.get("label")
    if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, str) and c for c in choices):
        raise ValueError('a row needs "context" (a string) and "choices" (two or more non-empty strings)')
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f'"label" must be the index of the right choice, 0 to {len(choices) - 1}, not {label!r}')
    join = "" if not context or context[-1].isspace() else " "
    own_space = any(c[0].isspace() for c in choices)  # then acc_norm counts every choice as joined
    return dict(context=context, choices=[c if c[0].isspace() else join + c for c in choices], label=label,
                delimiter="" if own_space else join)


@dataclass
class Task:
    name: str
    spec: str                              # where the rows come from (a dataset spec)
    to_example: Callable[[dict], dict | None]  # row -> example, None to skip the row
    kind: str = "choice"                   # "choice" (multiple choice) or "greedy" (LAMBADA)

    @property
    def on_hub(self) -> bool:
        return self.spec.startswith("hf://")


HUB_TASKS = {  # the standard German sets
    "hellaswag": Task("hellaswag", "hf://alexandrainst/m_hellaswag?name=de&split=val", hellaswag_example),
    "arc": Task("arc", "hf://alexandrainst/m_arc?name=de&split=test", arc_example),
    "mmlu": Task("mmlu", "hf://openai/MMMLU?name=DE_DE&split=test", mmlu_example),
    "lambada": Task("lambada", "hf://EleutherAI/lambada_openai?name=de&split=test", lambada_example, kind="greedy"),
}
DEFAULT_TASKS = "bpb,hellaswag,arc,mmlu,lambada"
HUB_HINT = ("evaluate local data only with --local-only, --bpb-data SPEC and --task-file NAME=jsonl://FILE "
            "(see README)")


def make_task(name: str, spec: str | None = None) -> Task:
    """A task by name: a hub default, or NAME=SPEC. Rows in the local format are read as such;
    other rows go through the named hub task's row function (e.g. a downloaded copy of m_hellaswag)."""
    hub = HUB_TASKS.get(name)
    if spec is None:
        if hub is None:
            raise DataError(f"unknown task {name!r}: use one of bpb, {', '.join(HUB_TASKS)}, "
                            f"or give a file with --task-file {name}=jsonl://FILE")
        return hub
    hub_row = hub.to_example if hub else None

    def to_example(row):
        if "choices" in row or hub_row is None:
            return local_example(row)
        return hub_row(row)

    return Task(name, spec, to_example, hub.kind if hub else "choice")


def parse_task_list(items) -> list[Task]:
    """'hellaswag quiz=jsonl://quiz.jsonl' (or a list of such items): names and NAME=SPEC."""
    if isinstance(items, str):
        items = items.replace(",", " ").split()
    tasks = []
    for item in items:
        name, eq, spec = item.partition("=")
        if eq and not (name and spec):
            raise DataError(f"bad task {item!r}: write NAME=SPEC, e.g. quiz=jsonl://quiz.jsonl")
        tasks.append(make_task(name, spec if eq else None))
    return tasks


def iter_rows(spec: str):
    """The rows (dicts) of a dataset spec (hf://, jsonl:// or parquet://), each with `_where` for messages."""
    for where, row in data.iter_rows(data.parse_spec(spec)):
        if not isinstance(row, dict):
            problem = row if isinstance(row, Exception) else f"a JSON {type(row).__name__}"
            raise DataError(f"{where}: not a JSON object ({problem})")
        yield dict(row, _where=where)


class Examples(list):
    """load_examples' list of examples, with how many rows were skipped and why (the first of them)."""
    skipped: int = 0
    first_skipped: str = ""


def warn(message: str):
    """A warning on stderr, once (rank 0) when several processes run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"warning: {message}", file=sys.stderr)


def load_examples(task: Task, limit: int = 0, seed: int = 0, log=warn) -> Examples:
    """All examples of a task, or a fixed random sample of `limit` of them (the same every run,
    in the dataset's order; the first N would be biased, MMMLU is sorted by subject).

    Hub rows that are no usable example (SkipRow: missing, None, NaN or non-string fields;
    unlabeled rows) are skipped and counted, and `log` says how many; a row of the local
    format that is wrong stops with its line, as it is the user's own file."""
    examples, skipped, first = Examples(), 0, ""
    for i, row in enumerate(iter_rows(task.spec)):
        where = row.pop("_where", f"{task.spec} row {i}")
        try:
            example = task.to_example(row)
            if example is None:
                raise SkipRow("not an example (no label)")
        except SkipRow as e:
            skipped, first = skipped + 1, first or f"{where}: {e}"
            continue
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            detail = f"no column {e}" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{where}: not a {task.name} example ({detail}); the local format is "
                            '{"context": "...", "choices": ["...", "..."], "label": 0}') from None
        examples.append(example)
    if not examples:
        raise DataError(f"{task.spec}: no examples for task {task.name}"
                        + (f" (all {skipped:,} rows skipped; the first: {first})" if skipped else ""))
    if skipped and log:
        log(f"{task.name}: skipped {skipped:,} of {skipped + len(examples):,} rows that are no usable example "
            f"(the first: {first})")
    if limit and limit < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        examples[:] = [examples[i] for i in keep]
    examples.skipped, examples.first_skipped = skipped, first
    return examples


# -----------------------------------------------------------------------------
# Results as markdown (the report card's Evaluation section)

def results_markdown(results: list[dict]) -> str:
    """Tables of evaluate_task / text_bpb results (dicts with "task" and, for bpb, "data")."""
    bpb = [r for r in results if "bpb" in r]
    mc = [r for r in results if "acc" in r]
    parts = []
    if bpb and all("base_bpb" in r for r in bpb):  # a chat model, next to the base it was fine-tuned from
        parts.append(markdown_table(["text", "documents", "bytes", "bits per byte", "base model", "change"],
                                    [[f"`{r['data']}`", r["documents"], r["bytes"], r["bpb"], r["base_bpb"],
                                      f"{r['bpb'] - r['base_bpb']:+.4f}"] for r in bpb]))
    elif bpb:
        parts.append(markdown_table(["text", "documents", "bytes", "bits per byte"],
                                    [[f"`{r['data']}`", r["documents"], r["bytes"], r["bpb"]] for r in bpb]))
    if mc:
        parts.append(markdown_table(["task", "examples", "acc", "acc_norm", "random"],
                                    [[r["task"], r["examples"], r["acc"], r["acc_norm"], r["random"]] for r in mc]))
    return "\n\n".join(parts)


# -----------------------------------------------------------------------------
# python evaluation.py


def chat_base(ckpt: dict, tokenizer, device, log):
    """The base model a chat checkpoint was fine-tuned from, or None, with a note why: it is gone, or another
    model now sits at its path (a run moved away and a new one in its place; step numbers of one preset
    collide). sft.py records the base's resolved path, its path from the chat checkpoint's folder (a whole run
    moved, `mv out run1`, is looked for there first) and its fingerprint (common.checkpoint_fingerprint); older
    checkpoints only the path as given. Under torchrun the ranks agree: a node that lacks the base, or finds
    another, makes every rank skip it, or their collectives would pair up wrongly."""
    path = ckpt.get("base_path") or ckpt.get("base")
    beside = ckpt.get("base_relative") and ckpt.get("path") and os.path.normpath(
        Path(ckpt["path"]).parent / ckpt["base_relative"])
    model, why = None, (f"the base checkpoint {path} is not there" if path else
                        f"{ckpt.get('path')} names no base model (an exported folder does not)")
    for candidate in dict.fromkeys(p for p in (beside, path) if p and Path(p).exists()):
        model, why = checked_base(candidate, ckpt, tokenizer, device)
        if model is not None:
            break
    if common.agree(model is None, device):
        if model is not None:
            why = f"the base checkpoint {path} is missing or another model on another rank's node"
        log(f"note: {why}: no base -> chat change of bits per byte")
        return None
    return model


def checked_base(path, ckpt: dict, tokenizer, device):
    """(the model at path, "") if it is the chat checkpoint's base (its tokenizer, and its fingerprint where
    one is recorded), else (None, why not)."""
    model, base_tokenizer, base = common.load_model(path, device)
    now, recorded = common.checkpoint_fingerprint(base, base_tokenizer), ckpt.get("base_fingerprint")
    if base_tokenizer.to_json() != tokenizer.to_json():
        return None, f"{path} has another tokenizer than {ckpt.get('path')}"
    if recorded and now != recorded:
        return None, (f"{path} is not the base model {ckpt.get('path')} was fine-tuned from ("
                      + ", ".join(f"{k} {recorded.get(k)}, now {v}" for k, v in now.items() if recorded.get(k) != v)
                      + ")")
    return model, ""


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a nanoschnack checkpoint: bits per byte and German "
                                                 "benchmarks; writes the Evaluation section of the report card.")
    parser.add_argument("--checkpoint", default="out/chat", help="checkpoint file, or a folder (its newest one)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help=f"comma-separated: bpb, {', '.join(HUB_TASKS)} or a --task-file name (default: all)")
    parser.add_argument("--task-file", action="append", default=[], metavar="NAME=SPEC",
                        help="a task from a local file (jsonl://, parquet://) or another hub spec; repeatable; "
                             "added to --tasks")
    parser.add_argument("--bpb-data", nargs="+", default=[data.DEFAULT_VAL_SPEC],
                        help="dataset spec(s) for bits per byte, one result each (default: FineWeb-2 deu_Latn test)")
    parser.add_argument("--limit", type=int, default=0,
                        help="examples per task (a fixed random sample) and documents for bpb (the first); 0 = all")
    parser.add_argument("--max-bytes", type=int, default=0,
                        help="bpb: at most this many bytes of text per dataset (the first documents, the last one "
                             "cut to fit); 0 = all")
    parser.add_argument("--local-only", action="store_true", help="skip everything that lives on the hub")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    parser.add_argument("--device", default="", help="default: cuda if available, else cpu")
    parser.add_argument("--report", default="", help="report card to update (default: report.md next to the "
                                                      "checkpoint's folder)")
    parser.add_argument("--no-base", action="store_true", help="for a chat checkpoint, don't also measure the "
                                                                "bits per byte of the base model it was fine-tuned from")
    parser.add_argument("--no-report", action="store_true", help="don't touch the report card")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.max_bytes < 0 or args.batch_size < 1:
        parser.error("--limit and --max-bytes must be 0 (all) or more, --batch-size at least 1")

    rank, world_size, device = common.setup_distributed(args.device)
    master = rank == 0
    for flag, file in [("--json", args.json), ("--report", not args.no_report and args.report)]:
        if file:  # a bad output path fails now, on every rank, not after an hour of evaluation
            data.check_folder(Path(file).parent, flag)
    log = print if master else (lambda *a, **k: None)
    try:
        names = [n for n in args.tasks.replace(",", " ").split()]
        files = parse_task_list(args.task_file)
        file_names = [t.name for t in files]
        run_bpb = "bpb" in names
        tasks = files + parse_task_list([n for n in names if n != "bpb" and n not in file_names])
        bpb_sources = data.parse_specs(args.bpb_data, "--bpb-data") if run_bpb else []
        if args.local_only:
            skipped = [t.name for t in tasks if t.on_hub] + [s.spec for s in bpb_sources if s.kind == "hf"]
            tasks = [t for t in tasks if not t.on_hub]
            bpb_sources = [s for s in bpb_sources if s.kind != "hf"]
            if skipped:
                log(f"--local-only: skipping {', '.join(skipped)}")
        if not tasks and not bpb_sources:
            raise DataError("nothing to evaluate: give --bpb-data SPEC or --task-file NAME=jsonl://FILE")
        # read everything first, so that missing data fails in seconds, not after an hour of evaluation
        texts = [(s, data.iter_texts(s, data.open_source(s))) for s in bpb_sources]
        examples = [(t, load_examples(t, args.limit)) for t in tasks]
    except DataError as e:
        sys.exit(f"error: {e.problem}; {HUB_HINT}" if e.hint else f"error: {e}")

    model, tokenizer, ckpt = common.load_model(args.checkpoint, device)
    kind = ckpt.get("kind", "base")
    log(f"{ckpt['path']}: {kind} model, step {ckpt.get('step', '?')}, {model.num_params():,} parameters, "
        f"context {model.config.sequence_len}; {world_size} process(es) on {device}")
    base_model = chat_base(ckpt, tokenizer, device, log) if texts and kind == "chat" and not args.no_base else None
    results = []
    for source, docs in texts:
        start = time.time()
        total = None if args.max_bytes else args.limit or None  # with --max-bytes the documents' count is unknown
        progress = common.Progress(f"bpb {source.spec}", total) if master else None
        try:
            r = text_bpb(model, tokenizer, docs, device, args.batch_size, args.limit, rank, world_size, progress,
                         args.max_bytes)
            if base_model is not None:  # the same documents again: how much of its German SFT cost the model
                docs = data.iter_texts(source, data.open_source(source))
                progress = common.Progress(f"bpb of the base model, {source.spec}", total) if master else None
                r["base_bpb"] = text_bpb(base_model, tokenizer, docs, device, args.batch_size, args.limit, rank,
                                         world_size, progress, args.max_bytes)["bpb"]
        except DataError as e:
            sys.exit(f"error: {e}")
        if not r["bytes"]:
            sys.exit(f"error: no text in {source.spec} to measure bits per byte on (0 bytes in {r['documents']:,} "
                     f"documents); check --bpb-data")
        results.append(dict(task="bpb", data=source.spec, **r))
        base = f" (base model {r['base_bpb']:.4f}, change {r['bpb'] - r['base_bpb']:+.4f})" if "base_bpb" in r else ""
        log(f"bpb  {r['bpb']:.4f} bits per byte{base} on {r['documents']:,} documents ({r['bytes']:,} bytes) "
            f"of {source.spec} in {time.time() - start:.0f}s")
    for task, exs in examples:
        start = time.time()
        progress = common.Progress(task.name, len(exs)) if master else None
        r = evaluate_task(model, tokenizer, exs, device, task.kind, args.batch_size, rank, world_size, progress)
        skipped = getattr(exs, "skipped", 0)
        results.append(dict(task=task.name, data=task.spec, **r, skipped_rows=skipped))
        norm = f"acc_norm {r['acc_norm']:.4f}  " if r["acc_norm"] is not None else ""
        log(f"{task.name:<10} {r['examples']:>6,} examples  acc {r['acc']:.4f}  {norm}random {r['random']:.4f}  "
            f"({time.time() - start:.0f}s{f'; {skipped:,} rows skipped' if skipped else ''})")

    if master:
        table = results_markdown(results)
        print("\n" + table)
        json_error = None
        if args.json:  # a temporary file beside it, then a rename: a failed write leaves the old results whole
            tmp = Path(args.json + ".tmp")
            try:
                tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
                tmp.replace(args.json)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                json_error = f"error: cannot write --json {args.json} ({e}); the file as it was is unchanged"
        if not args.no_report:
            checkpoint = Path(ckpt["path"])  # a checkpoint file in its run's folder, or an exported folder
            path = Path(args.report) if args.report else report_path(checkpoint if checkpoint.is_dir() else
                                                                     checkpoint.parent)
            limit = f", at most {args.limit:,} examples (documents) per task" if args.limit else ""
            limit += f", at most {args.max_bytes:,} bytes of text per bpb dataset" if args.max_bytes else ""
            legend = (" acc: the likeliest choice; acc_norm: the likeliest per character; random: guessing; "
                      "lambada: greedy last word." if any("acc" in r for r in results) else "")
            body = f"`{ckpt['path']}` ({kind}, step {ckpt.get('step', '?')}){limit}.{legend}\n\n{table}"
            update_report(path, f"Evaluation ({kind})", body)
            print(f"report: {path}")
        if json_error:  # only now: the results are in the report card, not lost with the --json file
            sys.exit(json_error)
    common.teardown_distributed()
    return results


if __name__ == "__main__":
    common.run_main(main)
