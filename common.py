"""
common.py: the plumbing every stage shares.

    process setup   setup_distributed, teardown_distributed, default_device
    configuration   parse_config: a config dataclass -> command-line flags, with presets
    checkpoints     save_checkpoint, latest_checkpoint, load_checkpoint, load_model, model_holding (a model
                    from a state dict, with no init), check_same_model, load_hf_folder (a folder export.py wrote)
    resuming        checkpoint_to_resume (the same on every rank), check_same_settings (flags a resume must
                    keep), checkpoint_fingerprint (which base a chat model came from)
    training        training_dtype, StopSignal (SIGINT/SIGTERM, agreed by all ranks),
                    TimeBudget (--time-budget), SmoothedLoss, fit_device_batch (halve the batch on out-of-memory)
    logging         open_log, append_log (log.jsonl), Progress (rate and ETA lines), format_seconds
    batches         pad (lists of token ids -> one padded tensor)

The stages (train.py, sft.py, evaluation.py, chat.py, serve.py) import this
module; it imports only the model (gpt.py) and the tokenizer (tok.py), so no
stage ever needs another stage's script for plumbing. The optimizers and the
learning-rate schedule that train.py and sft.py share are in optim.py.

Checkpoints are torch.save files of plain data (tensors, numbers, strings,
lists, dicts) and are read with torch.load(weights_only=True): opening a
checkpoint somebody shared cannot run code.
"""
import argparse
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

import gpt
from tok import Tokenizer


# -----------------------------------------------------------------------------
# Processes and devices

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory for reuse instead of handing it back to the system.

    By default every block over 128 KB is its own mmap, unmapped when freed, so each
    CPU training step maps and zeroes its activations again: over an 8-minute demo
    run, 108M page faults and a fifth of the CPU time in the kernel. These are the
    settings MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... would make, made by the
    program itself. The cost: the process keeps its peak memory. glibc only; a no-op
    elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        pass


def setup_distributed(device: str = "") -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group under torchrun (NCCL on GPUs, gloo on CPU).

    For training on the CPU it also tunes the memory allocator (keep_freed_memory)."""
    try:
        device = torch.device(device or default_device())
    except RuntimeError as e:
        raise SystemExit(f"error: --device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}: this torch ({torch.__version__}) sees no CUDA GPU; leave "
                         f"--device out (the CPU), or install torch's CUDA build on a machine with a GPU")
    if device.type == "cpu":
        keep_freed_memory()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world_size, device


# What gloo and NCCL say in a collective when another rank's process has gone
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def run_main(main) -> None:
    """Run a stage's main() as its program (train.py, sft.py, evaluation.py). Under torchrun each rank meets a
    bad input itself and says so (an error that only one rank meets, its shard or its memory, must not be
    hidden), in one line that names the rank: Python prints a SystemExit's message and its newline in two
    writes, so the ranks' lines ran into each other ("error: Aerror: A" then two newlines)."""
    try:
        main()
    except SystemExit as e:
        if not isinstance(e.code, str) or int(os.environ.get("WORLD_SIZE", 1)) == 1:
            raise
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"[rank {os.environ.get('RANK', '?')}] {e.code}\n".encode())
        raise SystemExit(1) from None
    except RuntimeError as e:  # torch.distributed.DistBackendError is one
        if int(os.environ.get("WORLD_SIZE", 1)) == 1 or not any(words in str(e) for words in PEER_GONE):
            raise
        # another rank stopped (its error line comes first) and closed its connections: a 30-line traceback
        # of this rank's collective would only bury the cause
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"[rank {os.environ.get('RANK', '?')}] stopped: another rank failed; "
                                      f"see its error above\n".encode())
        raise SystemExit(1) from None


def teardown_distributed():
    """Leave the process group (callers drop their DDP wrapper first, or gloo can hang on exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Configuration: a dataclass is the flags

def parse_config(config_class, presets: dict, argv=None, description: str = ""):
    """Flags from the dataclass fields; a preset fills in defaults, explicit flags win. The class's AT_LEAST
    and ABOVE ({field: bound}) name the numbers' ranges: a value outside is refused, naming its flag.

    Presets are the keys of `presets`; a config with a `model` field (train.py)
    also takes d<depth> (d12, d26, ...), which names the model preset of that depth."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # keeps the examples' lines
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            parser.add_argument(flag, type=kind, default=None, help=f"default: {f.default!r}")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    name = args.get("preset", config_class.preset)
    takes_depth = "model" in {f.name for f in dataclasses.fields(config_class)}
    if name in presets:
        preset = presets[name]
    elif takes_depth and name[:1] == "d" and name[1:].isdigit():
        preset = dict(model=name)
    else:
        parser.error(f"unknown preset {name!r}: use one of {', '.join(presets)}"
                     + (" or d<depth>" if takes_depth else ""))
    config = config_class(**{**preset, **args})
    problems = [f"--{f.name.replace('_', '-')} must be a finite number (got {getattr(config, f.name)})"
                for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), float)
                and not math.isfinite(getattr(config, f.name))]  # nan passes every comparison below
    problems += [f"--{name.replace('_', '-')} must be {rule} {low} (got {getattr(config, name)})"
                 for rule, bounds in (("at least", "AT_LEAST"), ("above", "ABOVE"))
                 for name, low in getattr(config_class, bounds, {}).items()
                 if getattr(config, name) < low or (rule == "above" and getattr(config, name) == low)]
    if problems:
        parser.error("; ".join(problems))
    return config


# -----------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(out: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write ckpt_<step>.pt atomically, then drop all but the newest keep_last.

    A write that fails (disk full, an unusable --out) removes its temp file, leaves
    the older checkpoints as they were, and exits with one error line. The temp files
    of saves that were killed (kill -9, torchrun's SIGKILL after a SIGTERM) go first:
    each is as large as a checkpoint, and its step may never be saved again."""
    path = Path(out) / f"ckpt_{step:07d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob("ckpt_*.pt.tmp"):
            if stale != tmp:  # its own is overwritten
                stale.unlink()
        with open(tmp, "wb") as f:  # a Python file, so that a failed write keeps its OSError (as __context__)
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a crash leaves either the old or the new file, never half a file
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
        if tmp.is_file():
            tmp.unlink()
        cause = e if isinstance(e, OSError) or not isinstance(e.__context__, OSError) else e.__context__
        kept = latest_checkpoint(path.parent)
        raise SystemExit(f"error: cannot write checkpoint {path}: {cause}; free disk space or choose another --out"
                         + (f" (the previous checkpoint {kept.name} is intact)" if kept else "")) from None
    except BaseException:  # a second Ctrl-C during the save: no half-written temp file left behind
        tmp.unlink(missing_ok=True)
        raise
    if keep_last:  # 0: keep them all
        for old in checkpoints(path.parent)[:-keep_last]:
            old.unlink()
    return path


def check_new_run(out, resume: bool) -> None:
    """A run that does not --resume must not write into another run's checkpoints: its own would mix with
    them, --keep-last would delete theirs, or its own as the older ones, and --resume would pick up theirs."""
    newest = None if resume else latest_checkpoint(out)
    if newest is not None:
        raise SystemExit(f"error: --out {out} holds another run's checkpoints (newest {newest.name}); continue "
                         f"that run with --resume, or choose another --out (or delete them)")


def latest_checkpoint(out: Path) -> Path | None:
    paths = checkpoints(out)
    return paths[-1] if paths else None


def checkpoints(out) -> list[Path]:
    """The checkpoints a run saved in folder `out` (ckpt_<step>.pt), oldest first; a ckpt_best.pt or a copy
    is none of them."""
    found = [(int(m[1]), p) for p in Path(out).glob("ckpt_*.pt") if (m := re.fullmatch(r"ckpt_(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, mapped: bool = False) -> dict:
    """A checkpoint's dict, read without running any code from the file (weights_only=True).

    Our checkpoints hold only tensors, numbers, strings, lists, tuples and dicts; a
    file that asks for anything else (a class, a function) is refused.

    mapped: torch.save's zip file is memory-mapped (privately: writing to a tensor never writes the
    file), so a tensor's bytes are read when it is used. load_model's readers never use the optimizer
    state, most of a training checkpoint (chat.py --prompt on the 1.03 GB checkpoint of an 85M-parameter
    model with two moments per weight, 2-core CPU: peak memory 1.34 -> 1.00 GB, 4.0 -> 3.1-3.5 s). Not
    for resuming: the optimizer state would stay mapped for the whole run, and so would the file's disk
    space after --keep-last deletes it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped and zipfile.is_zipfile(path))
    except Exception as e:
        if "Weights only load failed" in str(e) and "GLOBAL" in str(e):  # it names a class or function
            raise SystemExit(f"error: {path} is not a plain nanoschnack checkpoint: it would run code or build "
                             f"objects when loaded, so it was not loaded (only use checkpoints you trust)") from None
        reason = ("not a file torch.save wrote" if "Weights only load failed" in str(e) or not str(e) else
                  str(e).splitlines()[0])  # an empty file: an error with no message
        newest = Path(path).name.startswith("ckpt_") and latest_checkpoint(Path(path).parent) == Path(path)
        raise SystemExit(f"error: cannot read checkpoint {path} ({reason})"
                         + ("; delete it to fall back to an older one" if newest else "")) from None


def load_model(path, device="cpu", reader: str = "this code",
               flag: str = "--checkpoint") -> tuple[gpt.GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint file, a folder's newest one,
    or a folder export.py wrote (config.json + model.safetensors, e.g. downloaded from the hub).

    Checkpoints carry their tokenizer (tokenizer_json), so they work wherever they are copied.
    `reader` names the program in the error for a config it cannot use."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not latest_checkpoint(path):
        return load_hf_folder(path, device)
    file = latest_checkpoint(path) if path.is_dir() else path
    if file is None or not file.is_file():
        raise SystemExit(f"error: no checkpoint at {path}; train one with train.py (base) or sft.py (chat), "
                         f"or pass {flag} FILE_OR_FOLDER")
    ckpt = load_checkpoint(file, mapped=True)
    if not isinstance(ckpt, dict) or not {"model", "model_config"} <= ckpt.keys():
        raise SystemExit(f"error: {file} is not a nanoschnack checkpoint (no model or model_config)")
    try:
        config = gpt.GPTConfig.from_saved(ckpt["model_config"])
    except (TypeError, ValueError) as e:  # e.g. a config from another code version
        raise SystemExit(f"error: {file} is not a checkpoint {reader} can use ({type(e).__name__}: {e})")
    try:
        tokenizer = Tokenizer.from_json(ckpt["tokenizer_json"]) if "tokenizer_json" in ckpt else Tokenizer.load(ckpt["tokenizer"])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: tokenizer of {file}: {e}")
    if tokenizer.vocab_size != config.vocab_size:
        raise SystemExit(f"error: {file}: tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}")
    try:
        model = model_holding(config, ckpt["model"], device)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: {file} does not fit its own model config: {str(e)[:300]}")
    ckpt["path"] = str(file)
    return model, tokenizer, ckpt


def model_holding(config: gpt.GPTConfig, weights: dict, device) -> gpt.GPT:
    """A GPT in eval mode whose weights are `weights` (a state dict, as float32), on device.

    Built on the meta device and handed its weights (load_state_dict's assign), each copied once onto the
    device: no random init of weights that are replaced at once (seconds for d20 on a CPU), no two copies
    in memory, and nothing left pointing into a mapped file (load_model's; a file overwritten in place
    under a running server would change its weights, or crash it). Raises load_state_dict's RuntimeError
    for weights that do not fit the config, TypeError for ones not tensors."""
    if not_tensors := [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]:
        raise TypeError(f"not tensors: {', '.join(not_tensors[:5])}")
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.load_state_dict({k: v.to(device, torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                           for k, v in weights.items()}, assign=True)
    model.init_rotary(device)
    return model.eval()


# -----------------------------------------------------------------------------
# Exported Hugging Face folders (export.py writes them; load_model reads them back)

# gpt.GPTConfig fields -> transformers' NanoChatConfig fields
HF_CONFIG_FIELDS = {"vocab_size": "vocab_size", "n_embd": "hidden_size", "n_layer": "num_hidden_layers",
                    "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
                    "sequence_len": "max_position_embeddings"}

# gpt.py's weight names -> NanoChatForCausalLM's (regex, replacement), applied to whole names
HF_WEIGHT_NAMES = [
    (r"transformer\.wte\.weight", "model.embed_tokens.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.weight", r"model.layers.\1.mlp.fc1.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", r"model.layers.\1.mlp.fc2.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    # nanochat's recipe (gpt.py's switches): modeling_nanoschnack.py's NanoschnackForCausalLM
    (r"value_embeds\.(\d+)\.weight", r"model.value_embeds.\1.weight"),
    (r"transformer\.h\.(\d+)\.attn\.ve_gate\.weight", r"model.layers.\1.self_attn.ve_gate.weight"),
    (r"(resid_lambdas|x0_lambdas|smear_lambda|backout_lambda)", r"model.\1"),
    (r"smear_gate\.weight", "model.smear_gate.weight"),
]


def hf_weight_name(name: str) -> str | None:
    """transformers' name for one of our weights (None: it has none)."""
    for pattern, replacement in HF_WEIGHT_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


# gpt.py's recipe switches that modeling_nanoschnack.NanoschnackConfig has under the same name; the windows
# become its layer_types and sliding_window (hf_recipe_fields)
RECIPE_HF_FIELDS = ("value_embeds", "layer_lambdas", "smear", "backout", "qk_gain")


def hf_recipe_fields(config: gpt.GPTConfig) -> dict:
    """NanoschnackConfig's recipe fields for a model, or {} for the plain GPT (transformers' own NanoChat).
    A pattern that puts a window on no layer ("LL", or "S" on one layer: the last is always full) is plain."""
    windows = config.windows()
    if all(getattr(config, k) == gpt.PLAIN[k] for k in RECIPE_HF_FIELDS) and not any(windows):
        return {}
    short = max(w or 0 for w in windows)  # gpt.py has one short window: a query sees itself and `short` keys back
    return dict({k: getattr(config, k) for k in RECIPE_HF_FIELDS},
                layer_types=["sliding_attention" if w else "full_attention" for w in windows],
                sliding_window=short + 1 if short else None)


def recipe_from_hf(config: dict) -> dict:
    """gpt.py's recipe switches from a NanoschnackConfig's config.json (hf_recipe_fields backwards). The window
    pattern comes back spelled out per layer ("SSL" for a 3-layer "SSSL"), which gives the same windows."""
    recipe = {k: config.get(k, gpt.PLAIN[k]) for k in RECIPE_HF_FIELDS}
    pattern = "".join("S" if t == "sliding_attention" else "L" for t in config.get("layer_types") or [])
    recipe["window_pattern"] = pattern if "S" in pattern else "L"  # one letter a layer: the same windows as trained
    return recipe


def load_hf_folder(path, device="cpu") -> tuple[gpt.GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, checkpoint-like dict) from a folder export.py wrote (or any
    NanoChatForCausalLM folder whose settings gpt.py has); the dict holds model_config, kind, step, path."""
    from safetensors.torch import load_file  # safetensors comes with datasets' dependencies
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        tokenizer = Tokenizer.load(path / "tokenizer.json")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path} is not an exported model folder ({e})") from None
    tokenizer.hf.post_processor = None  # the export's <|bos|> post-processor: tokenizer.json as tok.py wrote it
    model_type = config.get("model_type") if config.get("model_type") in ("nanochat", "nanoschnack") else "nanochat"
    ours = dict(model_type=model_type, hidden_act="relu2", rms_norm_eps=gpt.NORM_EPS, final_logit_softcapping=gpt.SOFTCAP,
                rope_type="default", tie_word_embeddings=False, attention_bias=False,
                intermediate_size=4 * config.get("hidden_size", 0))
    rope = config.get("rope_parameters") or {}  # none: transformers' default, 10,000
    config = {**config, "rope_type": rope.get("rope_type", "default")}  # its rope_theta is the model's rotary_base
    differ = {k: (config.get(k), v) for k, v in ours.items() if config.get(k) != v}
    if differ:
        raise SystemExit(f"error: {path}/config.json has settings gpt.py does not have: {differ} (theirs, ours)")
    model_config = {ours_name: config[hf_name] for ours_name, hf_name in HF_CONFIG_FIELDS.items()}
    model_config["rotary_base"] = float(rope.get("rope_theta", gpt.LEGACY_ROTARY_BASE))
    recipe = recipe_from_hf(config) if model_type == "nanoschnack" else gpt.PLAIN  # NanoChat: the plain GPT
    try:
        ours_config = gpt.GPTConfig(**model_config, **recipe)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {path}/config.json: {e}") from None
    expected, written = hf_recipe_fields(ours_config), {k: config.get(k) for k in ("layer_types", "sliding_window")}
    if model_type == "nanoschnack" and expected and any(expected[k] != v for k, v in written.items()):
        raise SystemExit(f"error: {path}/config.json has windows gpt.py does not compute: {written}; gpt.py's short "
                         f"window is a quarter of max_position_embeddings rounded up to 128, the last layer full")
    with torch.device("meta"):
        to_ours = {hf_weight_name(k): k for k in gpt.GPT(ours_config).state_dict()}
    try:
        weights = load_file(str(path / "model.safetensors"))
        model = model_holding(ours_config, {to_ours[k]: v for k, v in weights.items()}, device)
    except (OSError, KeyError, RuntimeError) as e:
        raise SystemExit(f"error: {path}/model.safetensors does not fit its config.json ({str(e)[:300]})") from None
    meta = config.get("nanoschnack") or {}
    return model, tokenizer, dict(model_config=dataclasses.asdict(ours_config), kind=meta.get("kind", "base"),
                                  step=meta.get("step"), tokens=meta.get("tokens"), path=str(path))


def check_same_model(saved: dict, config: gpt.GPTConfig, path):
    mine, saved = dataclasses.asdict(config), dataclasses.asdict(gpt.GPTConfig.from_saved(saved))
    if saved != mine:
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        raise SystemExit(f"error: checkpoint {path} is from another model config {diff} (saved, asked); "
                         f"use the same --preset/--model/--seq-len" + (", --rotary-base" if "rotary_base" in diff else "")
                         + ", or another --out")


def check_same_settings(path, saved: dict, cfg, names) -> None:
    """--resume of a run whose train_config (saved) gave other values for the flags `names` than cfg: refused,
    naming each (train.py's and sft.py's SAME_ON_RESUME say why these)."""
    changed = [name for name in names if name in saved and saved[name] != getattr(cfg, name)]
    if changed:
        raise SystemExit(f"error: {path} was trained with other " + ", ".join(
            f"--{n.replace('_', '-')} ({saved[n]!r}, now {getattr(cfg, n)!r})" for n in changed)
            + "; resume with the same settings, or start afresh in another --out")


def checkpoint_to_resume(out) -> Path | None:
    """The newest checkpoint in --out for --resume, the same one on every rank. Each rank looks on its own
    node's disk, and only rank 0 saves: where --out is not shared, the other nodes find none (or older ones) and
    would train other steps, from other data, until their collectives hang. Then every rank stops, naming what
    each rank found."""
    path = latest_checkpoint(out)
    if not dist.is_initialized():
        return path
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, path.name if path else None)
    if len(set(found)) > 1:
        raise SystemExit(f"error: the ranks find different checkpoints in --out {out} ("
                         + ", ".join(f"rank {r}: {name or 'none'}" for r, name in enumerate(found))
                         + "); --out must be one folder that every node shares")
    return path


def checkpoint_fingerprint(ckpt: dict, tokenizer) -> dict:
    """What tells one checkpoint from another without reading its weights: its step, tokens and training
    seconds (two runs of one preset share the step and the tokens, not the seconds) and its tokenizer's hash.
    sft.py records its base's, and its --resume and evaluation.py check that the base is still that one."""
    return dict(step=ckpt.get("step"), tokens=ckpt.get("tokens"), train_seconds=ckpt.get("train_seconds"),
                tokenizer_sha256=tokenizer_sha256(tokenizer.to_json()))


def tokenizer_sha256(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()


# -----------------------------------------------------------------------------
# Training

def training_dtype(device, choice: str, log) -> torch.dtype:
    """--dtype resolved (gpt.compute_dtype), with a clear error for a bad value; the choice is logged."""
    try:
        dtype = gpt.compute_dtype(device, choice)
    except ValueError as e:
        sys.exit(f"error: --dtype: {e}")
    log(f"compute: {str(dtype).removeprefix('torch.')} matrix products on {device} (--dtype {choice}), fp32 weights")
    return dtype


def agree(flag: bool, device) -> bool:
    """True on every rank if it is true on any (a collective: every rank calls it at the same point)."""
    t = torch.tensor(float(flag), device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopSignal:
    """When to save and leave early: on SIGINT/SIGTERM, or after --stop-after-steps (for jobs with a time limit).

    Every rank must leave at the same step, so the check is a collective. The first signal is answered at once
    with one line; a second Ctrl-C quits without saving (KeyboardInterrupt). After a signal's save the stage
    exits 128 + the signal's number (130, 143: exit_code), as a shell reports a program the signal ended, so
    that `train.py && sft.py` and a `set -e` script (demo.sh) stop instead of going on with a half-trained
    model; a deliberate --stop-after-steps exits 0."""

    def __init__(self):
        self.signum = 0  # the first signal's number; after reason() says "signal", the same on every rank
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.received)

    def received(self, signum, frame):
        if signum == signal.SIGINT and self.signum:
            raise KeyboardInterrupt  # the second Ctrl-C: the user will not wait for the save
        if self.signum:
            return  # torchrun's SIGTERM after a Ctrl-C: the save goes on
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":  # one line, not one per rank; os.write: print could be mid-line
            again = "; Ctrl-C again to quit without saving" if signum == signal.SIGINT else ""
            os.write(sys.stderr.fileno(), f"{signal.Signals(signum).name}: stopping after this step, with a "
                                          f"checkpoint to --resume from{again}\n".encode())

    def reason(self, steps_done: int, stop_after_steps: int, device) -> str | None:
        """Why to leave after this step ("signal", "--stop-after-steps") or None; every rank calls it each step."""
        signum = torch.tensor(float(self.signum), device=device)
        if dist.is_initialized():  # a rank that got no signal exits with the code of the one that did
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if signum.item():
            self.signum = int(signum.item())
            return "signal"
        return "--stop-after-steps" if stop_after_steps and steps_done >= stop_after_steps else None

    def exit_code(self) -> int:
        """The stage's exit status: 128 + the signal's number after a signal, else 0."""
        return 128 + self.signum if self.signum else 0


def nothing_trained(out, step: int, steps: int, time_budget: float) -> str:
    """The log line of a resumed run that was finished already (under a time budget its steps are sys.maxsize)."""
    where = (f"spent its {time_budget:g}-minute budget already, at step {step:,}" if time_budget
             else f"is at step {step:,} of {steps:,} already")
    return f"{out} {where}: nothing trained, its report left as it was"


class TimeBudget:
    """--time-budget MINUTES: the run's clock, counted across resumed sessions (checkpoints keep the seconds).

    `fraction()` is how much of the budget is used: with a budget the learning-rate
    schedule follows it instead of the step count, so a faster machine simply
    trains more steps and every run ends with its warmdown done."""

    def __init__(self, minutes: float, prior_seconds: float = 0.0):
        self.seconds, self.prior, self.start = 60 * minutes, prior_seconds, time.time()

    def elapsed(self, device=None) -> float:
        """Seconds used; with `device`, the slowest rank's, the same on every rank (a collective: rank clocks
        start apart, and a schedule that follows each rank's own would step each rank's weights apart)."""
        seconds = self.prior + time.time() - self.start
        if device is not None and dist.is_initialized():
            slowest = torch.tensor(seconds, dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds = slowest.item()
        return seconds

    def fraction(self, device=None) -> float:
        return min(1.0, self.elapsed(device) / self.seconds)

    def used_up(self, device) -> bool:
        """Whether the budget is spent, agreed by all ranks."""
        return self.elapsed(device) >= self.seconds


class SmoothedLoss:
    """A debiased exponential moving average of the training loss (as nanochat logs it): easier to read
    than one step's loss, which jumps with every batch."""

    def __init__(self, beta: float = 0.9, state=(0.0, 0)):
        self.beta, (self.value, self.steps) = beta, state

    def state(self) -> list:
        """What a checkpoint keeps, so that a resumed run logs the average it would have logged."""
        return [self.value, self.steps]

    def update(self, loss: float) -> float:
        self.steps += 1
        self.value = self.beta * self.value + (1 - self.beta) * loss
        return self.value / (1 - self.beta ** self.steps)


def probe_batch(model, batch_size: int, seq_len: int, device, dtype: torch.dtype | None = None):
    """One forward and backward pass at full shape, so that running out of memory shows before training."""
    x = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    try:
        with gpt.autocast(device, dtype):
            model(x, x).backward()
    finally:
        model.zero_grad(set_to_none=True)


def fit_device_batch(try_batch, batch_size: int, divides, log, device) -> int:
    """The largest device batch, from batch_size down by halving, for which try_batch(b) runs without
    running out of GPU memory on any rank, and divides(b) holds (a step must stay a whole number of
    micro-batches). try_batch runs one forward and backward pass of the full shape.

    The most common failure of nanochat-style training on GPUs smaller than an H100 is
    out-of-memory at the first step; gradient accumulation keeps the optimizer step the
    same with smaller micro-batches, so only throughput changes."""
    first = batch_size
    if not divides(first):
        return first  # the stage's own check says what does not divide, in its flags' names
    while True:
        if divides(batch_size):
            try:
                try_batch(batch_size)
                failed = False
            except torch.OutOfMemoryError:
                failed = True
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            if not agree(failed, device):  # every rank must train with the same batch
                if batch_size != first:
                    log(f"device batch {batch_size} (out of memory at {first}; gradient accumulation keeps the "
                        f"tokens per step)")
                return batch_size
            log(f"out of memory at device batch {batch_size}")
        if batch_size == 1:
            raise SystemExit(f"error: out of memory even at device batch 1 (asked {first}); use a smaller model "
                             f"(--preset/--model), a shorter --seq-len, or a GPU with more memory")
        batch_size //= 2


# -----------------------------------------------------------------------------
# Logs and progress

def open_log(out: Path):
    """log.jsonl in `out`, unbuffered and appending (a resumed run continues it).

    A line cut short (the disk filled up mid-write, the process was killed) is dropped first: the resumed
    run's first record would be glued onto it, and that line would be JSON no more."""
    path = Path(out) / "log.jsonl"
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                text = f.read()
                whole = text.rfind(b"\n") + 1
                f.truncate(whole)
                print(f"note: {path} ended in a line cut short (a full disk or a kill); its {len(text) - whole:,} "
                      f"bytes dropped")
    return open(path, "ab", buffering=0)


def append_log(file, record: dict):
    """One JSON line to log.jsonl; a full disk ends the run with one line."""
    try:
        line = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode())
        while line:  # an unbuffered write can be short (the disk filling up): write the rest, or raise ENOSPC
            line = line[file.write(line):]
    except OSError as e:
        raise SystemExit(f"error: cannot write {file.name} ({e}); free disk space, then continue with --resume")


def format_seconds(s: float) -> str:
    return f"{s:.0f}s" if s < 60 else f"{s / 60:.1f}m" if s < 3600 else f"{s / 3600:.1f}h"


class Progress:
    """'hellaswag: 120/500, 12.3/s, 10s, ETA 31s' lines, at most every `every` seconds (or when forced).

    `fraction` overrides done/total where the caller knows better how far along it is."""

    def __init__(self, label: str, total: int | None = None, unit: str = "", every: float = 10.0,
                 log=lambda line: print(line, file=sys.stderr, flush=True)):
        self.label, self.total, self.unit, self.every, self.log = label, total, unit, every, log
        self.start = self.last = time.time()

    def update(self, done: int, extra: str = "", fraction: float | None = None, force: bool = False):
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last, seconds = now, max(now - self.start, 1e-9)
        if fraction is None and self.total:
            fraction = done / self.total
        of = f"/{self.total:,}" if self.total else ""
        line = f"{self.label}: {done:,}{of}{self.unit}, {done / seconds:,.1f}{self.unit}/s{extra} | {format_seconds(seconds)}"
        if fraction:
            line += f" | {min(fraction, 1.0):.1%}, ETA {format_seconds(seconds * max(1 - fraction, 0) / fraction)}"
        self.log(line)


# -----------------------------------------------------------------------------
# Batches

def pad(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """Token-id lists as one (len(rows), length or longest) LongTensor, filled on the right with `value`."""
    out = torch.full((len(rows), length or max(map(len, rows))), value, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return out
