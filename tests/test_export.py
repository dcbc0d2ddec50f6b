"""export.py: the exported Hugging Face folder computes what gpt.py computes, token for token.

The checkpoint is conftest.make_checkpoint's tiny GPT (2 layers, GQA 2:1, width 64, context 128)
with random but non-zero weights, not a trained one: every weight and every norm is exercised
either way, and agreement between two implementations does not depend on how good the weights
are. Its lm_head is drawn wide (std 0.5), so the logits spread over about +-10 and the softcap
is active, and greedy choices and multiple-choice rankings are clear, not near-ties.
"""
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
import transformers  # the dev extra installs it (and lm-eval): these tests run in CI, they never skip

import evaluation as ev
import common
import export
import gpt
from conftest import REPO_ROOT, make_checkpoint
from session import Sampling, load_session
from tok import render_conversation, render_prompt

GERMAN = [
    "Die Größe der Straße überrascht Jürgen nicht.",
    "Er sagte: „Das kostet 1.000,50 € – höchstens!“ und ging.",
    "Im Jahr 2024 fuhren 12.345 Züge pünktlich; übrigens: ÄÖÜ äöüß.",
    "Gro\u0308\u00dfe",  # "Größe" with a combining diaeresis: NFC makes it the precomposed word
    "  Zwei Leerzeichen\n\nund Absätze\tmit Tab.",
]
LOGIT_ATOL = 1e-4  # fp32 on CPU; both sides sum the same products in different orders


@pytest.fixture(scope="session")
def exported(tmp_path_factory, small_tokenizer):
    """(our model, tokenizer, HF folder): a chat checkpoint in runs/chat, its report card in runs/report.md."""
    runs = tmp_path_factory.mktemp("runs")
    make_checkpoint(runs / "chat", small_tokenizer, kind="chat", seed=3)
    (runs / "report.md").write_text("# nanoschnack report card\n\n<!-- section: SFT -->\n## SFT\n\n"
                                    "| steps | 7 |\n", encoding="utf-8")
    folder = runs / "hf"
    export.main(["--checkpoint", str(runs / "chat"), "--out", str(folder)])
    model, tokenizer, _ = common.load_model(runs / "chat")
    return model, tokenizer, folder


@pytest.fixture(scope="session")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported[2], dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported[2])


def test_folder_holds_a_nanochat_model(exported, capsys):
    model, tokenizer, folder = exported
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "generation_config.json",
                                                  "tokenizer.json", "tokenizer_config.json", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    c = model.config
    assert config["architectures"] == ["NanoChatForCausalLM"] and config["model_type"] == "nanochat"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["max_position_embeddings"]) == \
           (c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.vocab_size, c.sequence_len)
    assert config["rope_parameters"]["rope_theta"] == gpt.GPTConfig.rotary_base and config["rms_norm_eps"] == gpt.NORM_EPS
    assert config["final_logit_softcapping"] == gpt.SOFTCAP and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_id, tokenizer.special["<|assistant_end|>"])
    assert config["nanoschnack"]["kind"] == "chat"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".hf.")]  # the temporary folder is gone


def test_logits_match_gpt_py(exported, hf_model):
    model, tokenizer, _ = exported
    worst = 0.0
    texts = GERMAN + [" ".join(GERMAN) * 4]  # the last one runs past the training context (128 tokens)
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text)])
        with torch.no_grad():
            ours, theirs = model(ids), hf_model(ids).logits
        worst = max(worst, (ours - theirs).abs().max().item())
    assert ids.shape[1] > model.config.sequence_len
    assert worst < LOGIT_ATOL, worst
    print(f"max |logit difference| {worst:.2e}")


@pytest.mark.parametrize("config", [dict(n_layer=3, n_head=4, n_kv_head=4, n_embd=96),   # no GQA, head_dim 24
                                    dict(n_layer=1, n_head=4, n_kv_head=2, n_embd=64)])  # GQA 2:1
def test_logits_match_for_other_shapes(tmp_path, small_tokenizer, config):
    make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", seed=5, **config)
    folder, diff = export.export(tmp_path / "base", tmp_path / "hf")
    assert diff < LOGIT_ATOL
    model, tokenizer, _ = common.load_model(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(GERMAN[1] + GERMAN[2])])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < LOGIT_ATOL


def test_greedy_generate_gives_our_tokens(exported, hf_model, hf_tokenizer):
    model, tokenizer, _ = exported
    stops = {tokenizer.special["<|assistant_end|>"], tokenizer.bos_id}  # generation_config's eos_token_id
    prompts = [[tokenizer.bos_id] + tokenizer.encode("Es war einmal ein König, der"),
               render_prompt(tokenizer, [{"role": "user", "content": "Wie heißt die Hauptstadt von Österreich?"}])]
    for prompt in prompts:
        ours = list(model.generate(prompt, max_new_tokens=30, temperature=0.0))
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)
        theirs = out[0, len(prompt):].tolist()
        assert theirs == ours[:len(theirs)]  # transformers stops at the first stop token, ours runs on
        assert len(theirs) == 30 or theirs[-1] in stops
        assert len(theirs) >= 10, "the test wants a long sequence to compare; pick another prompt"


def test_tokenizer_gives_our_ids(exported, hf_tokenizer):
    _, tokenizer, _ = exported
    assert type(hf_tokenizer).__name__ == "TokenizersBackend"
    for text in GERMAN:
        assert hf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
        assert hf_tokenizer(text).input_ids == [tokenizer.bos_id] + tokenizer.encode(text)  # <|bos|> first, as trained
        assert hf_tokenizer.decode(hf_tokenizer(text).input_ids, skip_special_tokens=True) == tokenizer.normalize(text)
    assert hf_tokenizer.eos_token == "<|assistant_end|>" and hf_tokenizer.bos_token == "<|bos|>"


def test_chat_template_gives_render_prompt_ids(exported, hf_tokenizer):
    _, tokenizer, _ = exported
    conversations = [
        [{"role": "user", "content": "Hallo! Wie geht’s?"}],
        [{"role": "system", "content": "Du bist ein höflicher Assistent. Antworte knapp."},
         {"role": "user", "content": "Was kostet das? „Nur“ 1.000,50 €?"},
         {"role": "assistant", "content": "Ja, genau 1.000,50 €."},
         {"role": "user", "content": "Und\nmit Zeilenumbruch?  "}],
    ]
    for messages in conversations:
        assert hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == \
               render_prompt(tokenizer, messages)
        finished = messages + [{"role": "assistant", "content": "Gern geschehen."}]
        assert hf_tokenizer.apply_chat_template(finished, return_dict=False) == render_conversation(tokenizer, finished)[0]
    for empty in ("", " \n"):  # an earlier answer that was empty (a stop sequence at once), sent back by a client
        messages = [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": empty},
                    {"role": "user", "content": "Noch einmal?"}]
        assert hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == \
               render_prompt(tokenizer, messages)
        with pytest.raises(Exception, match="message 1 needs non-empty"):  # to train on: refused, as tok.py does
            hf_tokenizer.apply_chat_template(messages[:2], return_dict=False)
    bad = [[{"role": "assistant", "content": "Ich fange an."}],
           [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
           [{"role": "user", "content": "   "}]]
    for messages in bad:  # what tok.check_conversation rejects, the template rejects too
        with pytest.raises(Exception, match="message|conversation"):
            hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def test_special_token_text_typed_by_a_user(exported, hf_tokenizer):
    """Ours: ordinary text. transformers: control tokens by default; with sanitize_control_tokens=True the same
    text and no control token but the template's (split differently where a merge crosses the spelled token)."""
    _, tokenizer, _ = exported
    messages = [{"role": "user", "content": "Schreib <|assistant_end|> und <|bos|> ab."}]
    ours = render_prompt(tokenizer, messages)
    sanitized = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False,
                                                 sanitize_control_tokens=True)
    control = set(tokenizer.special.values())
    assert tokenizer.decode(sanitized) == tokenizer.decode(ours)
    assert [t for t in sanitized if t in control] == [t for t in ours if t in control]
    default = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert default != ours and default.count(tokenizer.special["<|assistant_end|>"]) == 1  # the README says so


def test_model_card_is_german_and_carries_the_report(exported):
    card = (exported[2] / "README.md").read_text(encoding="utf-8")
    for part in ["## Training", "## Grenzen", "## Lizenz der Daten", "## Benutzung", "AutoModelForCausalLM",
                 "Chat-Modell", "128 Tokens", "## Bericht der Trainingsschritte", "### SFT", "| steps | 7 |",
                 "apply_chat_template"]:
        assert part in card, part
    assert "<!--" not in card


def test_load_hf_folder_rebuilds_our_model(exported):
    model, tokenizer, folder = exported
    back, back_tok, ckpt = common.load_hf_folder(folder)
    assert back.config == model.config and ckpt["kind"] == "chat" and ckpt["step"] == 1
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    assert back_tok.encode(GERMAN[1]) == tokenizer.encode(GERMAN[1]) and back_tok.special == tokenizer.special
    assert back_tok.to_json() == tokenizer.to_json()  # as tok.py wrote it: re-exporting gives the same folder
    # every stage loads it through load_model, e.g. chat.py and serve.py run a model from the hub
    session = load_session(str(folder), "cpu", sampling=Sampling(temperature=0, max_new_tokens=8))
    assert session.model.config == model.config and session.checkpoint == str(folder)
    ids = render_prompt(tokenizer, [{"role": "user", "content": GERMAN[0]}])
    assert session.answer([{"role": "user", "content": GERMAN[0]}]).ids == [
        t for t in itertools.takewhile(lambda t: t not in tokenizer.special.values(),
                                       model.generate(ids, 8, temperature=0))]


def test_load_hf_folder_refuses_what_gpt_py_lacks(tmp_path, exported):
    with pytest.raises(SystemExit, match="error: .* not an exported model folder"):
        common.load_hf_folder(tmp_path)
    for name in ["config.json", "tokenizer.json", "model.safetensors"]:
        (tmp_path / name).write_bytes((exported[2] / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    with pytest.raises(SystemExit, match="error: .*final_logit_softcapping"):
        common.load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    for broken in ({k: v for k, v in weights.items() if k != name}, {**weights, name: weights[name][:-1]},
                   {**weights, "model.extra.weight": torch.zeros(1)}):
        save_file(broken, str(tmp_path / "model.safetensors"))
        with pytest.raises(SystemExit, match="model.safetensors does not fit its config.json"):
            common.load_hf_folder(tmp_path)


def test_a_checkpoint_from_before_the_rotary_base_exports_and_loads_with_its_own(tmp_path, small_tokenizer):
    """A checkpoint saved before GPTConfig had rotary_base was trained with 10,000: its folder says so as rope_theta
    (export's check against transformers passes only if transformers computes the same logits), load_hf_folder
    reads it back, a folder without rope_parameters is transformers' default (10,000), another rope type is refused."""
    path = make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", seed=3)
    state = torch.load(path, weights_only=False)
    assert state["model_config"].pop("rotary_base") == 100000.0
    torch.save(state, path)
    folder, diff = export.export(tmp_path / "base", tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"] == dict(rope_type="default", rope_theta=10000.0) and diff < LOGIT_ATOL
    back, _, _ = common.load_hf_folder(folder)
    model, _, _ = common.load_model(tmp_path / "base")
    assert back.config.rotary_base == model.config.rotary_base == 10000.0
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(back(ids), model(ids))
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "rope_parameters"}))
    assert common.load_hf_folder(folder)[0].config.rotary_base == 10000.0
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": dict(rope_type="linear", factor=2.0)}))
    with pytest.raises(SystemExit, match="error: .*rope_type"):
        common.load_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": dict(rope_type="default", rope_theta=0)}))
    with pytest.raises(SystemExit, match=r"error: .*config.json: rotary_base=0.0 must be above 0"):
        common.load_hf_folder(folder)


def test_load_hf_folder_refuses_windows_gpt_py_does_not_compute(tmp_path, recipe_exported):
    """gpt.py's short window follows from the context (a quarter, rounded up to 128), and its last layer is full."""
    for name in ["config.json", "tokenizer.json", "model.safetensors"]:
        (tmp_path / name).write_bytes((recipe_exported[2] / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    for wrong in ({"sliding_window": 65}, {"layer_types": ["sliding_attention"] * 4}):
        (tmp_path / "config.json").write_text(json.dumps({**config, **wrong}))
        with pytest.raises(SystemExit, match="error: .*config.json has windows gpt.py does not compute"):
            common.load_hf_folder(tmp_path)


def test_refuses_what_transformers_cannot_express(tmp_path, small_tokenizer, exported, monkeypatch):
    model, tokenizer, _ = exported
    config = dict(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    with pytest.raises(export.ExportError, match="sliding_window.*does not map"):
        export.hf_config({**config, "sliding_window": 64}, tokenizer, "float32", {})
    with pytest.raises(export.ExportError, match="value_embeds.*does not map"):
        export.hf_weight_name("transformer.value_embeds.0.weight")
    # a gpt.py whose rotary pairs neighbours (x[2i], x[2i+1]) instead of halves: only the numbers tell
    def interleaved(x, cos, sin):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).flatten(-2)
    monkeypatch.setattr(gpt, "apply_rotary", interleaved)
    make_checkpoint(tmp_path / "base", small_tokenizer, kind="base")
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(tmp_path / "base"), "--out", str(tmp_path / "hf")])
    assert str(e.value.code).startswith("error: transformers' NanoChatForCausalLM computes other logits")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["base"]


RECIPE = dict(n_layer=4, value_embeds=True, layer_lambdas=True, smear=True, backout=True, window_pattern="SL", qk_gain=1.2)


@pytest.fixture(scope="session")
def recipe_exported(tmp_path_factory, small_tokenizer):
    """(our model, tokenizer, HF folder) of a base model with every part of nanochat's recipe on; GQA (2 query
    heads, 1 key/value head), layers 0 and 2 with a 128-token window (a quarter of the 128-token context,
    rounded up to 128), value embeddings on layers 1 and 3."""
    runs = tmp_path_factory.mktemp("recipe")
    make_checkpoint(runs / "base", small_tokenizer, kind="base", seed=4, **RECIPE)
    export.main(["--checkpoint", str(runs / "base"), "--out", str(runs / "hf")])
    model, tokenizer, _ = common.load_model(runs / "base")
    return model, tokenizer, runs / "hf"


@pytest.fixture(scope="session")
def recipe_hf_model(recipe_exported):
    return transformers.AutoModelForCausalLM.from_pretrained(recipe_exported[2], dtype=torch.float32,
                                                             trust_remote_code=True).eval()


def test_a_recipe_model_exports_with_its_code(recipe_exported):
    model, tokenizer, folder = recipe_exported
    assert (folder / "modeling_nanoschnack.py").read_bytes() == (REPO_ROOT / "modeling_nanoschnack.py").read_bytes()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["NanoschnackForCausalLM"] and config["model_type"] == "nanoschnack"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanoschnack.NanoschnackForCausalLM"
    assert {k: config[k] for k in common.RECIPE_HF_FIELDS} == {k: getattr(model.config, k) for k in common.RECIPE_HF_FIELDS}
    assert model.config.windows() == [128, None, 128, None]
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2 and config["sliding_window"] == 129
    assert "trust_remote_code=True" in (folder / "README.md").read_text()
    weights = load_file(str(folder / "model.safetensors"))
    assert {"model.value_embeds.1.weight", "model.value_embeds.3.weight", "model.layers.3.self_attn.ve_gate.weight",
            "model.resid_lambdas", "model.x0_lambdas", "model.smear_gate.weight", "model.smear_lambda",
            "model.backout_lambda"} <= weights.keys()
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers runs the folder's code only if asked
        transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)


def test_a_recipe_model_computes_our_logits_and_tokens_in_transformers(recipe_exported, recipe_hf_model):
    """Past the 128-token window (its layers see less than the whole text), and through generate()'s cache, where
    the smear takes the token before each new one from the sequence so far and the windowed layers' cache slides."""
    (model, tokenizer, _), hf = recipe_exported, recipe_hf_model
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(" ".join(GERMAN) * 6)])
    assert ids.shape[1] > 300
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < LOGIT_ATOL
        states = hf(ids[:, :16], output_hidden_states=True).hidden_states  # as transformers' own models give them
    assert len(states) == model.config.n_layer + 1 and all(h.shape == (1, 16, model.config.n_embd) for h in states)
    prompts = [ids[0, :20].tolist(), [tokenizer.bos_id] + tokenizer.encode("Es war einmal ein König, der")]
    ours = [list(model.generate(p, max_new_tokens=160, temperature=0.0)) for p in prompts]
    first = torch.tensor([prompts[0]])  # the mask says <|bos|> is not padding (it is the pad token too)
    out = hf.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=160, do_sample=False, eos_token_id=None)
    assert out[0, 20:].tolist() == ours[0]  # 180 tokens: the windowed layers' cache has slid
    pad = len(prompts[0]) - len(prompts[1])  # a batch of both, the shorter one padded on the left
    batch = torch.tensor([prompts[0], [tokenizer.bos_id] * pad + prompts[1]])
    mask = torch.tensor([[1] * len(prompts[0]), [0] * pad + [1] * len(prompts[1])])
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None)
    assert [row[len(prompts[0]):].tolist() for row in out] == [ours[0][:40], ours[1][:40]]


def test_beam_search_on_a_recipe_model_scores_its_beams_as_one_forward_does(recipe_exported, recipe_hf_model):
    """Beam search reorders the cache and the sequences between steps: the smear's token before each step comes
    from the reordered sequences, so every beam's score is the log-probability one forward over it gives."""
    (model, tokenizer, _), hf = recipe_exported, recipe_hf_model
    prompt = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("Es war einmal ein König, der")])
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), num_beams=4, num_return_sequences=4,
                      max_new_tokens=12, min_new_tokens=12, do_sample=False, length_penalty=0.0,
                      return_dict_in_generate=True, output_scores=True)
    assert len({tuple(s.tolist()) for s in out.sequences}) == 4
    with torch.no_grad():
        for sequence, score in zip(out.sequences, out.sequences_scores):
            logits = model(sequence[None])[0, prompt.shape[1] - 1:-1]
            new = sequence[prompt.shape[1]:, None]
            assert torch.log_softmax(logits, -1).gather(1, new).sum().item() == pytest.approx(score.item(), abs=1e-4)


@pytest.mark.parametrize("feature", [dict(value_embeds=True), dict(layer_lambdas=True), dict(smear=True),
                                     dict(backout=True), dict(n_layer=3, window_pattern="SSSL"), dict(qk_gain=1.2),
                                     dict(n_layer=3, value_embeds=True)])  # an odd depth: value embeddings on 0 and 2
def test_each_recipe_feature_alone_exports_verified(tmp_path, small_tokenizer, feature):
    make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", seed=6, **feature)
    folder, diff = export.export(tmp_path / "base", tmp_path / "hf")
    assert diff < LOGIT_ATOL and json.loads((folder / "config.json").read_text())["model_type"] == "nanoschnack"
    model, _, _ = common.load_model(tmp_path / "base")
    back, _, _ = common.load_hf_folder(folder)
    assert back.config.windows() == model.config.windows()  # the pattern comes back spelled out per layer
    assert dataclasses.replace(back.config, window_pattern=model.config.window_pattern) == model.config
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


@pytest.mark.parametrize("raises, error", [(False, "computes other logits than gpt.py"),
                                           (True, "could not run the exported NanoschnackForCausalLM")])
def test_a_recipe_computed_otherwise_is_refused(tmp_path, small_tokenizer, monkeypatch, raises, error):
    """export.py checks generate()'s cached steps too: modeling code whose generate() forgets the token before
    each new one (the smear's previous_ids) computes the same logits in one forward, and is still refused,
    whether the step then smears in nothing or raises (as the model does without previous_ids)."""
    make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", smear=True)
    code = export.MODELING_FILE.read_text()
    forgets = code.replace('inputs["previous_ids"] = input_ids', 'inputs["forgotten"] = input_ids')
    if not raises:
        forgets = forgets.replace("if past_seen and previous_ids is None:", "if False:")
    assert forgets.count("forgotten") == 1 and forgets.count("if False:") == (not raises)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / export.MODELING_FILE.name).write_text(forgets)
    monkeypatch.setattr(export, "MODELING_FILE", tmp_path / "code" / export.MODELING_FILE.name)
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(tmp_path / "base"), "--out", str(tmp_path / "hf")])
    assert str(e.value.code).startswith("error: transformers") and error in str(e.value.code), e.value.code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "code"]


def test_modeling_code_that_ignores_the_windows_is_refused(tmp_path, small_tokenizer, monkeypatch):
    """The probe is longer than the shortest window (the text repeated): modeling code that gives every layer the
    full causal mask computes other logits only past a window, and is refused."""
    make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", seed=4, sequence_len=512, n_layer=2,
                    window_pattern="SL")
    code = export.MODELING_FILE.read_text()
    full = code.replace("attention_mask=masks[c.layer_types[i]]", 'attention_mask=masks["full_attention"]') \
               .replace("sliding_window=self.sliding_window,", "sliding_window=None,")
    assert full.count('masks["full_attention"]') == code.count('masks["full_attention"]') + 1
    assert "sliding_window=None," in full
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / export.MODELING_FILE.name).write_text(full)
    monkeypatch.setattr(export, "MODELING_FILE", tmp_path / "code" / export.MODELING_FILE.name)
    with pytest.raises(export.ExportError, match="computes other logits than gpt.py"):
        export.export(tmp_path / "base", tmp_path / "hf")


def test_the_recipe_code_names_the_transformers_it_needs(monkeypatch):
    """A transformers without the internals modeling_nanoschnack.py builds on: one ImportError saying which to install."""
    import importlib.util
    monkeypatch.setitem(sys.modules, "transformers.utils.output_capturing", None)  # as if this transformers lacked it
    spec = importlib.util.spec_from_file_location("modeling_copy", export.MODELING_FILE)
    with pytest.raises(ImportError, match=r"written for transformers 5.24 .*pip install 'transformers==5.24.\*'"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_recipe_switches_that_change_nothing_export_as_nanochat(small_tokenizer):
    """A pattern without an S window anywhere (one layer: the last is always full) is the plain GPT."""
    plain = dict(sequence_len=128, vocab_size=512, n_layer=1, n_head=2, n_kv_head=1, n_embd=64, **gpt.PLAIN)
    for config in ({**plain, "window_pattern": "S"}, {**plain, "n_layer": 2, "window_pattern": "LL"}):
        assert export.hf_config(config, small_tokenizer, "float32", {})["model_type"] == "nanochat"
    assert export.hf_config({**plain, "n_layer": 2, "window_pattern": "SL"}, small_tokenizer, "float32",
                            {})["model_type"] == "nanoschnack"


def test_bad_input_is_one_error_line(tmp_path, small_tokenizer):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    make_checkpoint(tmp_path / "ok", small_tokenizer)
    (tmp_path / "a_file").write_text("x")
    cases = [(["--checkpoint", str(tmp_path / "missing")], "no checkpoint at"),
             (["--checkpoint", str(tmp_path / "junk.pt")], "cannot read checkpoint"),
             (["--checkpoint", str(tmp_path / "other.pt")], "not a nanoschnack checkpoint"),
             (["--checkpoint", str(tmp_path / "ok"), "--out", str(tmp_path / "a_file")], "is a file"),
             (["--checkpoint", str(tmp_path / "ok"), "--out", str(tmp_path / "project")], "holds other files")]
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("# mein Projekt\n")
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            export.main(args + (["--out", str(tmp_path / "hf")] if "--out" not in args else []))
        text = str(e.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not (tmp_path / "hf").exists() and (tmp_path / "project" / "README.md").read_text() == "# mein Projekt\n"


def test_evaluation_of_an_exported_folder(tmp_path, exported):
    """Its report card is the one beside the folder (as for a run's folder of checkpoints), and a chat model
    fine-tuned from an exported base model is measured against it."""
    model, tokenizer, folder = exported
    shutil.copytree(folder, tmp_path / "out" / "hf")
    text = tmp_path / "dev.txt"
    text.write_text("Guten Morgen, wie geht es dir?\nDas Wetter ist heute schön.\n", encoding="utf-8")
    ev.main(["--checkpoint", str(tmp_path / "out" / "hf"), "--tasks", "bpb", "--local-only",
                     "--bpb-data", f"txt://{text}?per=line", "--device", "cpu"])
    assert "## Evaluation (chat)" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "report.md").exists()
    base = ev.chat_base({"base": str(tmp_path / "out" / "hf")}, tokenizer, "cpu", print)
    notes = []  # an exported chat folder names no base (it said "the base checkpoint None is not there")
    assert ev.chat_base({"path": str(tmp_path / "out" / "hf")}, tokenizer, "cpu", notes.append) is None
    assert notes == [f"note: {tmp_path / 'out' / 'hf'} names no base model (an exported folder does not): no base "
                     f"-> chat change of bits per byte"]
    assert base is not None and all(torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                                       model.state_dict().values()))


def test_bfloat16_export_is_verified_against_rounded_weights(tmp_path, small_tokenizer):
    make_checkpoint(tmp_path / "base", small_tokenizer, kind="base")
    folder, diff = export.export(tmp_path / "base", tmp_path / "hf", dtype="bfloat16")
    assert diff < LOGIT_ATOL
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert (folder / "model.safetensors").stat().st_size < 400_000  # half of fp32's 620 kB


# -----------------------------------------------------------------------------
# A second harness: lm-evaluation-harness on the exported folder vs evaluation.py on the checkpoint

QUIZ = Path(__file__).parent / "fixtures" / "quiz_de.jsonl"
LM_EVAL_TASK = """\
task: nanoschnack_quiz
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
QUIZ_CHOICES = [json.loads(line)["choices"] for line in QUIZ.read_text(encoding="utf-8").splitlines()]
LL_ATOL = 1e-4  # per-choice sums of log-probs, fp32, a few tokens each


@pytest.mark.slow  # about 25 s each, most of it importing lm-eval and transformers in a fresh process
@pytest.mark.parametrize("which", ["exported", "recipe_exported"])  # NanoChat, and modeling_nanoschnack.py's model
def test_lm_eval_agrees_with_eval_py(tmp_path, request, which):
    """Same examples, same strings: evaluation.local_example joins context and choice with one space, as
    lm-eval's default target_delimiter does, and acc_norm divides by the characters of the choice without it
    on both sides (it counted the space: ties broke otherwise than lm-eval's hellaswag and arc). The
    per-choice log-likelihoods agree to fp32 precision, so acc and acc_norm agree exactly."""
    model, tokenizer, folder = request.getfixturevalue(which)
    remote_code = ",trust_remote_code=True" if which == "recipe_exported" else ""  # NanoChat is transformers' own
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "nanoschnack_quiz.yaml").write_text(LM_EVAL_TASK.format(file=QUIZ))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf",
                          "--model_args", f"pretrained={folder},dtype=float32{remote_code}", "--device", "cpu",
                          "--tasks", "nanoschnack_quiz", "--include_path", str(tmp_path / "task"),
                          "--batch_size", "16", "--output_path", str(tmp_path / "lm_eval"), "--log_samples"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())["results"]
    theirs = results["nanoschnack_quiz"]
    samples = [json.loads(l) for l in next((tmp_path / "lm_eval").rglob("samples_*.jsonl")).read_text().splitlines()]

    examples = ev.load_examples(ev.make_task("quiz", f"jsonl://{QUIZ}"))
    ours = ev.evaluate_task(model, tokenizer, examples, "cpu")
    print(f"lm-eval: acc {theirs['acc,none']:.4f} acc_norm {theirs['acc_norm,none']:.4f} | "
          f"evaluation.py: acc {ours['acc']:.4f} acc_norm {ours['acc_norm']:.4f} ({len(examples)} examples)")
    assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])

    assert len(samples) == len(examples) == 12
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        ex = examples[sample["doc_id"]]
        assert [a["arg_1"] for a in sample["arguments"].values()] == ex["choices"]
        lls, _ = ev.continuation_scores(model, ev.choice_rows(tokenizer, ex, model.config.sequence_len), "cpu")
        theirs_lls = [float(r[0][0]) for r in sample["resps"]]
        assert theirs_lls == pytest.approx(lls, abs=LL_ATOL)
        for scores in (lls, [s / len(c) for s, c in zip(lls, QUIZ_CHOICES[sample["doc_id"]])]):  # acc's, acc_norm's
            best, second = sorted(scores, reverse=True)[:2]
            assert best - second > 10 * LL_ATOL  # no near-ties: equal accuracies are not luck


def test_generation_stops_at_the_end_of_a_turn_and_at_a_new_document(exported):
    _, tokenizer, folder = exported
    config = transformers.GenerationConfig.from_pretrained(folder)
    assert set(config.eos_token_id) == {tokenizer.special["<|assistant_end|>"], tokenizer.bos_id}


def test_fine_tuning_in_transformers_trains_every_embedding_row(exported):
    """transformers' NanoChat makes config.pad_token_id its embedding's padding_idx, whose row gets no gradient:
    with pad = <|bos|> in config.json, a fine-tune with transformers froze the token every sequence starts with.
    The tokenizer and generate() still pad with <|bos|>."""
    _, tokenizer, folder = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("Hallo Welt"), tokenizer.bos_id]])
    model(ids, labels=ids).loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert model.config.pad_token_id is None and grad[tokenizer.bos_id].abs().sum() > 0
    assert transformers.GenerationConfig.from_pretrained(folder).pad_token_id == tokenizer.bos_id
    assert transformers.AutoTokenizer.from_pretrained(folder).pad_token_id == tokenizer.bos_id


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, small_tokenizer):
    path = make_checkpoint(tmp_path / "base", small_tokenizer, kind="base")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["lm_head.weight"][0, 0] = float("nan")  # a run that diverged
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match=r"error: .*weights that are not finite \(NaN or inf\) in lm_head.weight; the run diverged"):
        export.main(["--checkpoint", str(tmp_path / "base"), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_exporting_again_replaces_an_earlier_export(tmp_path, small_tokenizer):
    make_checkpoint(tmp_path / "a", small_tokenizer, kind="base", seed=1)
    make_checkpoint(tmp_path / "b", small_tokenizer, kind="base", seed=2)
    export.export(tmp_path / "a", tmp_path / "hf")
    export.export(tmp_path / "b", tmp_path / "hf")
    model, _, _ = common.load_model(tmp_path / "b")
    back, _, _ = common.load_model(tmp_path / "hf")
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


# --- from a mutation audit of common.py -------------------------------------------------

def test_a_nanochat_folder_from_elsewhere_is_a_base_model(tmp_path, exported):
    for name in ["config.json", "tokenizer.json", "model.safetensors"]:
        (tmp_path / name).write_bytes((exported[2] / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("nanoschnack")  # not written by export.py: no kind, step or tokens
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, _, ckpt = common.load_hf_folder(tmp_path)
    assert (ckpt["kind"], ckpt["step"], ckpt["tokens"]) == ("base", None, None)


def test_a_run_folder_with_a_config_json_loads_its_newest_checkpoint(tmp_path, small_tokenizer):
    make_checkpoint(tmp_path, small_tokenizer, kind="chat")
    (tmp_path / "config.json").write_text("{}")  # e.g. a run's own notes: the checkpoints decide
    _, _, ckpt = common.load_model(tmp_path)
    assert ckpt["path"] == str(tmp_path / "ckpt_0000001.pt") and ckpt["kind"] == "chat"


def test_an_export_stopped_while_moving_is_completed_by_the_rerun(tmp_path, small_tokenizer, monkeypatch, capsys):
    """Ctrl-C between the renames into --out: config.json and model.safetensors, by which an export is known,
    come last, and the same command run again completes the folder (it refused it as "other files"). The
    temporary folder of a killed export, as large as the model, is removed by the next one."""
    make_checkpoint(tmp_path / "base", small_tokenizer, kind="base")
    (tmp_path / ".hf.x01f9vq8").mkdir()
    (tmp_path / ".hf.x01f9vq8" / "model.safetensors").write_bytes(b"half a model")
    replace, moved = os.replace, []

    def stopped_replace(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(Path(dst).name)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", stopped_replace)
    with pytest.raises(KeyboardInterrupt):
        export.export(tmp_path / "base", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(moved) == ["tokenizer.json",
                                                                                    "tokenizer_config.json"]
    assert "removed " + str(tmp_path / ".hf.x01f9vq8") in capsys.readouterr().out
    monkeypatch.setattr(os, "replace", replace)
    folder, diff = export.export(tmp_path / "base", tmp_path / "hf")
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()} and diff < LOGIT_ATOL
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
