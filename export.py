"""
export.py: share a nanoschnack model as a Hugging Face model folder.

    python export.py --checkpoint out/chat --out out/hf                       # a checkpoint file or folder
    python export.py --checkpoint out/chat --out out/hf --push-to-hub you/nanoschnack

transformers (5.x) has nanochat's architecture built in, NanoChatForCausalLM
(model_type "nanochat"), and gpt.py is that architecture: weightless RMSNorm
(also after the embedding), RoPE then QK-norm, ReLU^2 MLP, GQA, no biases,
untied lm_head, tanh soft-capped logits. So the export is a renaming of the
weights plus a config, and the folder works wherever transformers models do:
AutoModelForCausalLM, vLLM (through its transformers backend), lm-eval.

A model with nanochat's recipe (gpt.py's switches: value embeddings, layer
scalars, smear, backout, sliding windows, q/k gain), none of which transformers'
NanoChat computes, gets modeling_nanoschnack.py in its folder (NanoChat plus the
recipe) and a config.json of model_type "nanoschnack" whose auto_map names it:
it loads with trust_remote_code=True (transformers and lm-eval; vLLM untested).

The folder holds config.json, model.safetensors, generation_config.json,
tokenizer.json + tokenizer_config.json (with the chat template in Jinja) and a
German model card (README.md), and modeling_nanoschnack.py for a recipe model.

The exporter refuses (one `error:` line, nothing written) rather than writing a
model that silently differs:
- gpt.GPTConfig has a field export.py does not map, or the checkpoint holds a
  weight it does not map (gpt.py grew a feature the export does not know);
- a weight has the wrong shape;
- and finally, after writing into a temporary folder, transformers loads the
  model, and its logits on a German probe, of one forward and of a few steps of
  its generate() on its cache, must match gpt.py's (fp32): any other difference
  between the two implementations stops the export here.

What transformers cannot express, and what is therefore only documented:
- gpt.py refuses positions past 10x the training context (its rotary tables);
  transformers computes rotary angles for any position. Within our range the
  two agree; past it ours errors and theirs extrapolates (badly: the model never
  saw those positions).
- tok.py never turns text into special tokens; transformers' tokenizer does,
  unless apply_chat_template is called with sanitize_control_tokens=True (then it
  stays the same text, split a little differently where a merge would cross the
  spelled token's edge; the tests check both).

load_hf_folder() goes the other way: an exported folder back to gpt.GPT +
tok.Tokenizer.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import common
import gpt
from report import read_report, report_path
from tok import SPECIAL_TOKENS, Tokenizer, render_prompt

TRANSFORMERS_VERSION = "5.24.0"  # the version export.py and its tests were checked against (pyproject pins it)
VERIFY_ATOL = 1e-3  # max |logit difference| the export accepts (fp32); a real mismatch is O(1)
VERIFY_NEW_TOKENS = 8  # tokens transformers generates after the probe, their logits checked too
PROBE_TEXT = ("Die Hauptstadt von Deutschland ist Berlin. „Größer“ wäre übertrieben: "
              "Der Eintritt kostet 1.000,50 € – für Schüler und Studierende ermäßigt.")

# Our template (tok.py) in Jinja: <|bos|> [system] (user assistant)* [user <|assistant_start|>].
# Roles are checked as tok.check_conversation does, so a conversation ours rejects fails here too (a prompt's
# earlier answer may be empty: a server's answer is "" when a stop sequence matches at once).
CHAT_TEMPLATE = (
    "{%- if messages | length == 0 %}{{ raise_exception('messages must be a non-empty list') }}{% endif -%}"
    "{{- bos_token -}}"
    "{%- set offset = 1 if messages[0]['role'] == 'system' else 0 -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string or (message['content'] | trim == '' "
    "and not (message['role'] == 'assistant' and add_generation_prompt)) -%}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ' needs non-empty string content') }}"
    "{%- endif -%}"
    "{%- if loop.index0 >= offset -%}"
    "{%- set expected = 'user' if (loop.index0 - offset) % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ' is ' ~ message['role'] ~ ' where ' ~ expected ~ "
    "' must come (system first if any, then user and assistant alternating)') }}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '_start|>' ~ message['content'] ~ '<|' ~ message['role'] ~ '_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages[-1]['role'] != 'user' -%}"
    "{{ raise_exception('add_generation_prompt needs a conversation that ends with a user message') }}"
    "{%- endif -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- endif -%}"
)


class ExportError(Exception):
    """What stops an export; main() prints it as one `error:` line."""


# -----------------------------------------------------------------------------
# Config, weights, tokenizer, generation config


def special_ids(tokenizer: Tokenizer) -> dict:
    """bos: starts every document; eos: ends an assistant turn (and stops generation). Padding, where transformers
    pads (the tokenizer, generate()), is bos too; not in the model's config (hf_config says why)."""
    s = tokenizer.special
    return dict(bos_token_id=s["<|bos|>"], eos_token_id=s["<|assistant_end|>"])


MODELING_FILE = Path(__file__).with_name("modeling_nanoschnack.py")  # a recipe model's code, copied into its folder
RECIPE_AUTO_MAP = {"AutoConfig": "modeling_nanoschnack.NanoschnackConfig",
                   "AutoModelForCausalLM": "modeling_nanoschnack.NanoschnackForCausalLM"}


def hf_config(model_config: dict, tokenizer: Tokenizer, dtype: str, meta: dict) -> dict:
    """config.json: every field that makes transformers compute what gpt.py computes. The plain GPT is
    transformers' own NanoChatForCausalLM; a model with nanochat's recipe is modeling_nanoschnack.py's
    NanoschnackForCausalLM (NanoChat plus the recipe's fields), which auto_map names."""
    unknown = set(model_config) - set(common.HF_CONFIG_FIELDS) - set(gpt.PLAIN) - {"rotary_base"}
    if unknown:
        raise ExportError(f"the model config has {sorted(unknown)}, which export.py does not map to transformers' "
                          f"NanoChatConfig; refusing to write a model that would differ")
    cfg = gpt.GPTConfig.from_saved(model_config)
    recipe = common.hf_recipe_fields(cfg)
    architecture = dict(architectures=["NanoschnackForCausalLM"], model_type="nanoschnack", auto_map=RECIPE_AUTO_MAP,
                        **recipe) if recipe else dict(architectures=["NanoChatForCausalLM"], model_type="nanochat")
    return dict(
        **architecture,
        **{hf: getattr(cfg, ours) for ours, hf in common.HF_CONFIG_FIELDS.items()},
        intermediate_size=4 * cfg.n_embd,         # gpt.MLP: 4x width
        hidden_act="relu2",                        # relu(x)^2
        rms_norm_eps=gpt.NORM_EPS,                 # every norm (embedding, blocks, QK, final) is weightless
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rotary_base),
        final_logit_softcapping=gpt.SOFTCAP,
        attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False, use_cache=True,
        **special_ids(tokenizer), dtype=dtype, transformers_version=TRANSFORMERS_VERSION,
        # No pad token in the model's config (null, not NanoChatConfig's default 1): transformers' NanoChat makes it
        # its embedding's padding_idx, a row that never gets a gradient, and our pad is <|bos|>, which starts every
        # sequence, so a fine-tune in transformers would freeze it.
        pad_token_id=None,
        nanoschnack=meta,                          # where it came from (kind, step, tokens); ignored by transformers
    )


def hf_weight_name(name: str) -> str:
    hf_name = common.hf_weight_name(name)
    if hf_name is None:
        raise ExportError(f"the checkpoint has a weight {name!r} that export.py does not map to transformers' "
                          f"names; refusing to write a model that would differ")
    return hf_name


def hf_state_dict(model: gpt.GPT, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names (the layouts are the same: nn.Linear (out, in) everywhere)."""
    weights = {hf_weight_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    c = model.config
    expected = {"model.embed_tokens.weight": (c.vocab_size, c.n_embd), "lm_head.weight": (c.vocab_size, c.n_embd)}
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        expected.update({p + "self_attn.q_proj.weight": (c.n_head * c.head_dim, c.n_embd),
                         p + "self_attn.k_proj.weight": (c.n_kv_head * c.head_dim, c.n_embd),
                         p + "self_attn.v_proj.weight": (c.n_kv_head * c.head_dim, c.n_embd),
                         p + "self_attn.o_proj.weight": (c.n_embd, c.n_head * c.head_dim),
                         p + "mlp.fc1.weight": (4 * c.n_embd, c.n_embd), p + "mlp.fc2.weight": (c.n_embd, 4 * c.n_embd)})
    expected.update(recipe_weight_shapes(c))
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[:4]
        raise ExportError(f"the weights do not have {hf_architecture(c)}'s names and shapes (e.g. {wrong})")
    return weights


def recipe_weight_shapes(c: gpt.GPTConfig) -> dict:
    """modeling_nanoschnack.py's weights of nanochat's recipe, and their shapes (gpt.GPT.__init__'s)."""
    shapes, kv_dim = {}, c.n_kv_head * c.head_dim
    for i in range(c.n_layer):
        if c.value_embeds and gpt.has_value_embed(i, c.n_layer):
            shapes.update({f"model.value_embeds.{i}.weight": (c.vocab_size, kv_dim),
                           f"model.layers.{i}.self_attn.ve_gate.weight": (c.n_kv_head, gpt.VE_GATE_CHANNELS)})
    if c.layer_lambdas:
        shapes.update({"model.resid_lambdas": (c.n_layer,), "model.x0_lambdas": (c.n_layer,)})
    if c.smear:
        shapes.update({"model.smear_gate.weight": (1, gpt.SMEAR_CHANNELS), "model.smear_lambda": (1,)})
    if c.backout:
        shapes["model.backout_lambda"] = (1,)
    return shapes


def hf_architecture(c: gpt.GPTConfig) -> str:
    return "NanoschnackForCausalLM" if common.hf_recipe_fields(c) else "NanoChatForCausalLM"


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """Our tokenizer.json plus a post-processor that puts <|bos|> first when add_special_tokens=True
    (transformers' default), as every training document starts. apply_chat_template and lm-eval's
    loglikelihood get exactly one <|bos|> (the template writes its own, and tokenizes without it)."""
    spec = json.loads(tokenizer.to_json())
    bos = {"SpecialToken": {"id": "<|bos|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [tokenizer.bos_id], "tokens": ["<|bos|>"]}},
    }
    return json.dumps(spec, ensure_ascii=False, indent=2)


def hf_tokenizer_config() -> dict:
    """No model_max_length: the context is config.json's max_position_embeddings (transformers would
    only warn about longer texts, which gpt.py handles up to 10x its context)."""
    return dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|bos|>", eos_token="<|assistant_end|>",
                pad_token="<|bos|>", additional_special_tokens=SPECIAL_TOKENS[1:], add_bos_token=True,
                clean_up_tokenization_spaces=False,
                chat_template=CHAT_TEMPLATE)


def generation_config(tokenizer: Tokenizer, kind: str) -> dict:
    """Stop at <|assistant_end|> (end of a chat turn) and at <|bos|> (a base model's next document).
    Sampling defaults as chat.py's."""
    ids = special_ids(tokenizer)
    return dict(bos_token_id=ids["bos_token_id"], eos_token_id=[ids["eos_token_id"], ids["bos_token_id"]],
                pad_token_id=ids["bos_token_id"], do_sample=kind == "chat", temperature=0.6 if kind == "chat" else 1.0,
                top_k=50, transformers_version=TRANSFORMERS_VERSION)


# -----------------------------------------------------------------------------
# The model card (German)

DATA_LICENCES = {  # as the dataset cards state them (README, "Data: formats, sources and licences")
    "HuggingFaceFW/fineweb-2": "ODC-By 1.0 (und die Nutzungsbedingungen von Common Crawl)",
    "wikimedia/wikipedia": "CC BY-SA 3.0 / GFDL",
    "coral-nlp/german-commons": "offen lizenzierte Texte; Lizenz je Dokument im Datensatz",
    "OpenAssistant/OASST-DE": "Apache-2.0",
    "FreedomIntelligence/alpaca-gpt4-deutsch": "Apache-2.0 (Antworten von GPT-4 erzeugt)",
    "argilla/databricks-dolly-15k-curated-multilingual": "CC BY-SA 3.0",
}

MODEL_CARD = """\
---
language: de
library_name: transformers
pipeline_tag: text-generation
tags: [nanoschnack, nanochat]
---

# {name}

Ein kleines deutsches Sprachmodell aus nanoschnack, von Grund auf trainiert im Geist von nanoGPT und
nanochat: {what}. {architecture}

| | |
|---|---|
| Art | {kind_de} (Checkpoint `{checkpoint}`, Schritt {step}) |
| Parameter | {params} |
| Schichten / Breite / Köpfe (KV-Köpfe) | {n_layer} / {n_embd} / {n_head} ({n_kv_head}) |
| Kontext beim Training | {sequence_len} Tokens |
| Vokabular | {vocab_size} Tokens (Byte-Level-BPE, deutsch) |
| Gewichte | {dtype} |

## Training

{training}

## Grenzen

- Ein kleines Modell: es erfindet Fakten, rechnet falsch und widerspricht sich. Nicht für Auskünfte verwenden,
  auf die sich jemand verlassen muss.
- Deutsch ist die einzige Sprache, auf die es trainiert wurde.
- Es ist nicht auf Sicherheit abgestimmt und gibt wieder, was in seinen Trainingsdaten steht, Vorurteile
  eingeschlossen.
- Es hat nur {sequence_len} Tokens Kontext gesehen; längere Texte werden schlechter.
- Text wie `<|user_end|>` in einer Nachricht ist für nanoschnack gewöhnlicher Text. transformers macht daraus
  Steuer-Tokens, außer mit `apply_chat_template(..., sanitize_control_tokens=True)`.

## Lizenz der Daten

{licences}

## Benutzung

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}"{remote_code})
model = AutoModelForCausalLM.from_pretrained("{repo}"{remote_code})
{usage}
```

{vllm}
{report}"""
ARCHITECTURE = {  # the card's words for the two architectures (hf_architecture)
    "NanoChatForCausalLM": dict(
        architecture="Die Architektur ist die von nanochat; transformers kennt sie als `NanoChatForCausalLM`.",
        remote_code="", vllm="Mit vLLM (über dessen transformers-Backend): `vllm serve {repo}`."),
    "NanoschnackForCausalLM": dict(
        architecture="Die Architektur ist die von nanochat mit dessen aktuellem Rezept ({recipe}); transformers "
                     "rechnet sie mit dem Code in diesem Ordner (`modeling_nanoschnack.py`, "
                     "`NanoschnackForCausalLM`), darum `trust_remote_code=True` beim Laden.",
        remote_code=", trust_remote_code=True",
        vllm="vLLM ist mit diesem Code nicht geprüft; für vLLM ein Modell ohne die Rezept-Schalter trainieren."),
}
USAGE = {
    "chat": """\
messages = [{"role": "user", "content": "Was ist die Hauptstadt von Deutschland?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, sanitize_control_tokens=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=100)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))""",
    "base": """\
inputs = tokenizer("Die Hauptstadt von Deutschland ist", return_tensors="pt")  # <|bos|> kommt von selbst davor
output = model.generate(**inputs, max_new_tokens=50)
print(tokenizer.decode(output[0], skip_special_tokens=True))""",
}


def licence_lines(specs: list[str]) -> str:
    lines = []
    for spec in specs:
        name = re.match(r"hf://([^?]+)", spec)
        licence = DATA_LICENCES.get(name.group(1)) if name else None
        lines.append(f"- `{spec}`: " + (licence or "lokale oder unbekannte Daten – Lizenz bitte selbst angeben"))
    return "\n".join(lines) or "- unbekannt (der Checkpoint nennt keine Daten)"


def model_card(ckpt: dict, model: gpt.GPT, name: str, repo: str, dtype: str) -> str:
    kind = ckpt.get("kind", "base")
    cfg = ckpt.get("train_config") or {}
    specs = str(cfg.get("data", "")).split()
    training = []
    if kind == "chat":
        training.append(f"Feinabgestimmt (SFT) auf Gesprächen aus dem Basis-Modell `{ckpt.get('base', '?')}`.")
    else:
        training.append("Vortrainiert auf deutschem Text.")
    training.append(f"{german_int(ckpt.get('tokens') or 0)} Tokens in {ckpt.get('step', '?')} Schritten.")
    if cfg:
        shown = {k: cfg[k] for k in ("preset", "model", "seq_len", "total_batch_size", "matrix_lr", "embedding_lr",
                                     "unembedding_lr", "max_steps", "seed") if k in cfg}
        training.append("Einstellungen: " + ", ".join(f"`{k}={v}`" for k, v in shown.items()) + ".")
    sections = read_report(report_path(Path(ckpt["path"]).parent))  # report.md next to the checkpoint folders
    report = "".join(f"\n### {title}\n\n{body}\n" for title, body in sections.items())
    c = model.config
    return MODEL_CARD.format(
        name=name, what="ein Chat-Assistent" if kind == "chat" else "ein Basis-Modell, das Text fortsetzt",
        kind_de="Chat-Modell (SFT)" if kind == "chat" else "Basis-Modell", checkpoint=Path(ckpt["path"]).name,
        step=ckpt.get("step", "?"), params=german_int(model.num_params()), n_layer=c.n_layer, n_embd=c.n_embd,
        n_head=c.n_head, n_kv_head=c.n_kv_head, sequence_len=c.sequence_len, vocab_size=german_int(c.vocab_size),
        dtype=dtype, training=" ".join(training), licences=licence_lines(specs), repo=repo or "PFAD/ZUM/ORDNER",
        usage=USAGE["chat" if kind == "chat" else "base"],
        **{k: v.format(repo=repo or "PFAD/ZUM/ORDNER", recipe=recipe_words(c))
           for k, v in ARCHITECTURE[hf_architecture(c)].items()},
        report=f"\n## Bericht der Trainingsschritte (report.md)\n{report}" if report else "")


def recipe_words(c: gpt.GPTConfig) -> str:
    """The recipe switches a model has on, as train.py's flags name them."""
    flags = [f"--{k.replace('_', '-')}" for k in ("value_embeds", "layer_lambdas", "smear", "backout") if getattr(c, k)]
    flags += [f"--window-pattern {c.window_pattern}"] if any(c.windows()) else []
    flags += [f"--qk-gain {c.qk_gain:g}"] if c.qk_gain != 1.0 else []
    return ", ".join(f"`{f}`" for f in flags)


def german_int(n: int) -> str:
    return f"{n:,}".replace(",", ".")


# -----------------------------------------------------------------------------
# Writing, verifying, sharing


def write_folder(folder: Path, model: gpt.GPT, tokenizer: Tokenizer, ckpt: dict, dtype: str, repo: str):
    from safetensors.torch import save_file
    kind = ckpt.get("kind", "base")
    meta = dict(kind=kind, step=ckpt.get("step"), tokens=ckpt.get("tokens"), checkpoint=Path(ckpt["path"]).name)
    config = hf_config(dataclasses.asdict(model.config), tokenizer, dtype, meta)
    weights = hf_state_dict(model, getattr(torch, dtype))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    files = {"config.json": config, "generation_config.json": generation_config(tokenizer, kind),
             "tokenizer_config.json": hf_tokenizer_config()}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (folder / "tokenizer.json").write_text(hf_tokenizer_json(tokenizer), encoding="utf-8")
    if "auto_map" in config:  # the recipe's code travels with the model: the hub runs it with trust_remote_code
        shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)
    card = model_card(ckpt, model, repo.split("/")[-1] if repo else "nanoschnack", repo, dtype)
    (folder / "README.md").write_text(card, encoding="utf-8")


@torch.no_grad()
def verify(folder: Path, model: gpt.GPT, tokenizer: Tokenizer, dtype: str) -> float:
    """Load the folder with transformers and compare with gpt.py on a German probe (fp32, both).

    Checks the logits (within VERIFY_ATOL) of one forward over the probe and of transformers'
    generate() after it (VERIFY_NEW_TOKENS steps on its cache: what a recipe's smear and windows change; the
    probe is longer than the shortest window, so the windows leave keys out),
    the tokenizer's ids on the probe, and the chat template's ids. Returns the max |logit
    difference|; raises ExportError on any mismatch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    hf_tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # it reads config.json, and its auto_map
    ids = [tokenizer.bos_id] + tokenizer.encode(PROBE_TEXT)
    if hf_tok(PROBE_TEXT).input_ids != ids:
        raise ExportError("transformers' tokenizer gives other ids than tok.py on the probe text")
    messages = [{"role": "system", "content": "Antworte kurz."}, {"role": "user", "content": PROBE_TEXT}]
    if hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) != \
            render_prompt(tokenizer, messages):
        raise ExportError("the exported chat template gives other ids than tok.render_prompt")
    architecture = hf_architecture(model.config)
    # longer than the shortest sliding window (the probe text repeated), or no window would leave out a key
    shortest = min((w for w in model.config.windows() if w), default=0)
    length = max(1, min(model.config.sequence_len - VERIFY_NEW_TOKENS, max(len(ids), shortest + 2)))
    ids = ids + (ids[1:] * (length // max(1, len(ids) - 1)))  # enough to cut `length` from
    probe = torch.tensor([ids[:length]])  # and the new ones: at most the context
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
        out = hf_model.generate(probe, attention_mask=torch.ones_like(probe), max_new_tokens=VERIFY_NEW_TOKENS,
                                min_new_tokens=VERIFY_NEW_TOKENS, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        theirs = torch.cat([hf_model(probe).logits, torch.stack(out.logits[1:], dim=1)], dim=1).float()
    except Exception as e:  # modeling_nanoschnack.py (or transformers) raised: whatever it is, nothing is written
        raise ExportError(f"transformers could not run the exported {architecture} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    reference = model
    if dtype != "float32":  # compare with our model rounded the same way
        reference = gpt.GPT(model.config).eval()
        reference.load_state_dict({k: v.to(getattr(torch, dtype)).float() for k, v in model.state_dict().items()})
    ours = reference(out.sequences.to(reference.lm_head.weight.device)).float().cpu()[:, :-1]
    diff = (ours - theirs).abs().max().item()
    if not math.isfinite(diff) or diff > VERIFY_ATOL:
        raise ExportError(f"transformers' {architecture} computes other logits than gpt.py (max difference "
                          f"{diff:.3g} > {VERIFY_ATOL}); gpt.py must have changed in a way the exporter does not map")
    return diff


# The files write_folder writes, in the order they are moved into --out. An earlier export is known by its
# config.json and model.safetensors, so they go last; a move that was stopped halfway (Ctrl-C) leaves only names
# from this list, one of the first three among them (a README.md alone could be anyone's), and the same command
# run again completes it.
EXPORT_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", MODELING_FILE.name, "README.md",
                "model.safetensors", "config.json")


def export(checkpoint, out, dtype: str = "float32", repo: str = "") -> tuple[Path, float]:
    """Write the Hugging Face folder `out` from a checkpoint; returns (out, max logit difference).

    Everything is written into a temporary folder next to `out` and verified there; only a
    verified export replaces the files in `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder (it is created if missing)")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    earlier_export = {"config.json", "model.safetensors"} <= names
    stopped_export = names <= set(EXPORT_FILES) and bool(names & set(EXPORT_FILES[:3]))
    if names and not (earlier_export or stopped_export):  # its README.md, config.json would be replaced
        raise ExportError(f"--out {out} holds other files and no earlier export (config.json + model.safetensors); "
                          f"give a new or empty folder")
    model, tokenizer, ckpt = common.load_model(checkpoint, "cpu")
    broken = [name for name, w in model.state_dict().items() if w.is_floating_point() and not w.isfinite().all()]
    if broken:  # a run that diverged: its logits would be NaN in transformers too, and mean nothing
        raise ExportError(f"{checkpoint}: weights that are not finite (NaN or inf) in {', '.join(broken[:3])}"
                          f"{' and others' if len(broken) > 3 else ''}; the run diverged: export an earlier checkpoint")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.iterdir():  # the temporary folder of an export that was killed: as large as a model
            if stale.is_dir() and re.fullmatch(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}", stale.name):
                shutil.rmtree(stale)
                print(f"removed {stale}, left by an export that was stopped")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write to {out.parent} ({e})") from None
    try:
        write_folder(tmp, model, tokenizer, ckpt, dtype, repo)
        diff = verify(tmp, model, tokenizer, dtype)
        out.mkdir(exist_ok=True)
        for file in sorted(tmp.iterdir(), key=lambda f: EXPORT_FILES.index(f.name)):
            file.chmod(0o644)  # safetensors writes 0600; a shared model folder is readable
            os.replace(file, out / file.name)
    except OSError as e:
        raise ExportError(f"cannot write {out} ({e}); free disk space or choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, diff


def push_to_hub(folder: Path, repo: str, private: bool):
    """Upload the folder as a model repository (needs `huggingface-cli login` or HF_TOKEN)."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="nanoschnack export")


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a nanoschnack checkpoint as a Hugging Face model folder "
                                                 "(transformers' NanoChatForCausalLM, or modeling_nanoschnack.py's "
                                                 "model for nanochat's recipe), verified against gpt.py.")
    parser.add_argument("--checkpoint", default="out/chat", help="checkpoint file, or a folder (its newest one)")
    parser.add_argument("--out", required=True, help="output folder: a new or empty one, or an earlier export (its files are replaced)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights in model.safetensors (default float32: exactly the checkpoint's)")
    parser.add_argument("--push-to-hub", default="", metavar="REPO", help="also upload to this hub repo (user/name)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    args = parser.parse_args(argv)
    try:
        out, diff = export(args.checkpoint, args.out, args.dtype, args.push_to_hub)
    except ExportError as e:
        sys.exit(f"error: {e}")
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out}: {files}")
    print(f"verified with transformers: max |logit difference| {diff:.2e} on a {len(PROBE_TEXT)}-character probe")
    if args.push_to_hub:
        try:
            print(f"pushed: {push_to_hub(out, args.push_to_hub, args.private)}")
        except Exception as e:  # network, auth, name: huggingface_hub raises many kinds
            sys.exit(f"error: push to {args.push_to_hub} failed ({e}); the folder {out} is complete, "
                     f"upload it later with `huggingface-cli upload {args.push_to_hub} {out}`")


if __name__ == "__main__":
    main()
