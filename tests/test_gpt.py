"""
Tests for gpt.py on the CPU: configs, the loss, torch.compile vs eager, the KV
cache against full recomputation, generation, and overfitting one batch.

Freshly initialised models have zero output projections and a zero lm_head,
which would make most gradients exactly zero and most comparisons vacuous, so
`random_model` also fills those with small random weights.
"""
import copy
import dataclasses
import hashlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gpt
from gpt import GPT, GPTConfig, KVCache, PRESETS, preset
import kernels
from kernels import triton_on_cpu

REPO = Path(__file__).resolve().parents[1]


def random_model(seed=0, **overrides) -> GPT:
    cfg = dict(sequence_len=32, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # the zero-initialised projections and lm_head
                p.normal_(0.0, 0.05)
    return model


def random_tokens(model, B, T, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# Config, sizes, init


def test_from_depth_follows_nanochat():
    c = GPTConfig.from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (20, 1280, 10, 10, 128)
    assert GPTConfig.from_depth(12, 1000, 512).head_dim == 128
    assert GPTConfig.from_depth(3, 1000, 512, head_dim=64).n_head == 3
    with pytest.raises(ValueError, match="multiple of head_dim"):
        GPTConfig.from_depth(3, 1000, 512)


def test_presets():
    tiny = preset("tiny", vocab_size=4096, sequence_len=256)
    assert (tiny.n_layer, tiny.n_embd, tiny.head_dim, tiny.vocab_size, tiny.sequence_len) == (4, 256, 64, 4096, 256)
    assert preset("d20", 4096, 2048) == GPTConfig.from_depth(20, 4096, 2048)
    demo = preset("demo", vocab_size=4096, sequence_len=256)  # demo.sh's model (gpt.py: why this width)
    assert (demo.n_layer, demo.n_embd, demo.head_dim) == (4, 128, 64)
    assert set(PRESETS) >= {"nano", "demo", "tiny"}
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge", 4096, 256)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=64)


def test_num_params_and_flops_per_token():
    c = preset("tiny", vocab_size=1000, sequence_len=128)
    model = GPT(c)
    C, L, V = c.n_embd, c.n_layer, c.vocab_size
    per_layer = 4 * C * C + 8 * C * C  # q, k, v, proj + MLP in and out (no GQA here, no biases, no norm weights)
    assert model.num_params() == 2 * V * C + L * per_layer
    assert model.num_params(exclude_embedding=True) == V * C + L * per_layer
    assert model.flops_per_token() == 6 * (V * C + L * per_layer) + 12 * L * c.n_head * c.head_dim * c.sequence_len
    gqa = GPT(GPTConfig(sequence_len=16, vocab_size=10, n_layer=1, n_head=4, n_kv_head=1, n_embd=64))
    assert gqa.num_params() == 2 * 10 * 64 + (64 * 64 + 2 * 64 * 16 + 64 * 64) + 8 * 64 * 64


def test_init_is_deterministic_and_starts_at_log_vocab():
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    a, b = GPT(cfg), GPT(cfg)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not a.lm_head.weight.any() and not a.transformer.h[0].attn.c_proj.weight.any()
    assert a.transformer.wte.weight.std().item() == pytest.approx(1.0, abs=0.1)
    idx = torch.randint(0, 50, (2, 16))
    assert a(idx, idx).item() == pytest.approx(math.log(50), abs=1e-6)  # zero lm_head: uniform logits


def test_meta_device_construction():
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    with torch.device("meta"):
        meta = GPT(cfg)
    assert meta.lm_head.weight.is_meta
    meta.to_empty(device="cpu")
    meta.init_weights(seed=7)
    ref = GPT(cfg)
    ref.init_weights(seed=7)
    for (name, pa), pb in zip(meta.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.equal(meta.cos, ref.cos) and torch.equal(meta.sin, ref.sin)


# ----------------------------------------------------------------------------
# Forward and loss


def test_forward_logits_and_loss_ignore_minus_one():
    model = random_model()
    idx = random_tokens(model, 3, 20)
    targets = random_tokens(model, 3, 20, seed=1)
    targets[0, :5] = -1
    targets[2, 7] = -1
    logits = model(idx)
    assert logits.shape == (3, 20, 96)
    assert logits.abs().max() <= 15.0  # softcap
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(model(idx, targets), expected)
    per_token = model(idx, targets, loss_reduction="none").view(3, 20)
    assert (per_token[~keep] == 0).all()
    torch.testing.assert_close(per_token[keep], F.cross_entropy(logits[keep], targets[keep], reduction="none"))
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), expected * keep.sum())


@pytest.mark.parametrize("recipe", [False, True])
def test_attention_is_causal(recipe):
    """Changing a later token must not change any earlier logit (with the recipe: the smear looks one token
    back, never ahead)."""
    model = random_model(**(RECIPE if recipe else {}))
    idx = random_tokens(model, 1, 24)
    changed = idx.clone()
    changed[0, 15] = (idx[0, 15] + 1) % 96
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], atol=1e-6, rtol=0)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


def test_model_with_triton_kernels_matches_reference():
    """One forward/backward of a small model with every kernel run by Triton (interpreted on a CPU)."""
    model = random_model(n_head=2, n_kv_head=1, n_embd=128)  # head_dim 64
    idx, targets = random_tokens(model, 1, 24), random_tokens(model, 1, 24, seed=1)
    ref_loss = model(idx, targets)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    with triton_on_cpu():
        loss = model(idx, targets)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def inductor_cache_dir(tmp_path_factory, monkeypatch):
    """An inductor cache keyed on the source of kernels/ and gpt.py: a stale compiled graph is never reused."""
    sources = sorted((REPO / "kernels").glob("*.py")) + [REPO / "gpt.py"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanoschnack"
    path = root / f"inductor-{torch.__version__}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
    return path


@pytest.mark.slow
def test_compile_fullgraph_matches_eager(inductor_cache_dir):
    model = random_model(**RECIPE)  # the recipe's features too: one graph, the same numbers
    idx, targets = random_tokens(model, 2, 32), random_tokens(model, 2, 32, seed=1)
    targets[1, :4] = -1

    # A CPU model attends with torch's own SDPA and rms_norm (kernels/dispatch.py), in one graph.
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True)(idx, targets)
    code = graphs[0].code
    assert len(graphs) == 1 and "scaled_dot_product_attention" in code and "rms_norm" in code
    # On a GPU the model calls the custom ops instead: they too trace whole, with no graph break.
    q, k = torch.randn(2, 4, 32, 16), torch.randn(2, 2, 32, 16)
    torch._dynamo.reset()
    torch.compile(lambda q, k: kernels.flash_attn_op(q, k, k)[0] + kernels.rms_norm_op(q, 1e-6)[0],
                  backend=capture, fullgraph=True)(q, k)
    code = graphs[1].code
    assert len(graphs) == 2 and "nanoschnack.flash_attn" in code and "nanoschnack.rms_norm" in code

    eager_loss = model(idx, targets)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    loss = compiled(idx, targets)
    grads = torch.autograd.grad(loss, list(compiled.parameters()))
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, eager_grads):
        assert r.abs().max() > 0, f"{name}: zero gradient makes the comparison vacuous"
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=lambda h: f"kv{h}")
def test_kv_cache_matches_full_recomputation(n_kv_head):
    model = random_model(n_kv_head=n_kv_head)
    idx = random_tokens(model, 2, 20)
    full = model(idx)
    cache = model.new_kv_cache(batch_size=2, max_len=20)
    # prefill 7, then a chunk of 4 on top of the cache (the next chat turn), then one token at a time
    pieces = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:11], kv_cache=cache)]
    pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(11, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)

    cache.truncate(9)  # roll back and redo the tail in one go
    torch.testing.assert_close(model(idx[:, 9:], kv_cache=cache), full[:, 9:], atol=1e-5, rtol=1e-5)
    cache.reset()
    torch.testing.assert_close(model(idx[:, :5], kv_cache=cache), full[:, :5], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model(idx, kv_cache=cache)


def test_kv_cache_positions_past_training_length():
    """Generation may run past sequence_len; the cache path then still matches full recomputation."""
    model = random_model(sequence_len=8)
    idx = random_tokens(model, 1, 30)
    cache = model.new_kv_cache(1, max_len=30)
    model(idx[:, :12], kv_cache=cache)
    step = torch.cat([model(idx[:, t:t + 1], kv_cache=cache) for t in range(12, 30)], dim=1)
    torch.testing.assert_close(step, model(idx)[:, 12:], atol=1e-5, rtol=1e-5)
    assert isinstance(cache, KVCache)


def test_generate_greedy_matches_recomputation():
    model = random_model()
    prompt = [3, 14, 15, 92, 65]
    got = list(model.generate(prompt, max_new_tokens=12, temperature=0))
    seq = list(prompt)
    for _ in range(12):  # the slow way: recompute the whole sequence for every token
        seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    assert got == seq[len(prompt):]
    assert all(isinstance(t, int) for t in got)
    assert list(model.generate(prompt, 12, temperature=0.7, top_k=1, seed=5)) == got


def test_generate_is_seeded_and_streams():
    model = random_model()
    prompt = [1, 2, 3]
    a = list(model.generate(prompt, 20, temperature=1.0, seed=0))
    assert a == list(model.generate(prompt, 20, temperature=1.0, seed=0))
    assert a != list(model.generate(prompt, 20, temperature=1.0, seed=1))
    assert len(set(a)) > 3  # near-uniform logits at temperature 1: not a constant stream

    cache = model.new_kv_cache(1, max_len=64)
    stream = model.generate(prompt, 20, temperature=1.0, seed=0, kv_cache=cache)
    first = [next(stream) for _ in range(4)]
    stream.close()  # the caller stops early: the cache holds the prompt and every token received
    assert first == a[:4] and cache.pos == len(prompt) + 4
    # continue the conversation on the same cache: the same as generating from scratch
    turn = [7, 8]
    cont = list(model.generate(turn, 5, temperature=0, kv_cache=cache))
    assert cont == list(model.generate(prompt + first + turn, 5, temperature=0))


def test_generate_goes_to_the_end_of_the_rotary_tables_or_refuses_up_front():
    """Up to rotary_len - 1 tokens in all (generate feeds the last token too); one more was N - 1 tokens and then
    "KV cache full", mid-stream."""
    model = random_model()
    room = model.rotary_len - 1
    assert len(list(model.generate([1] * (room - 2), 2, temperature=0))) == 2
    stream = model.generate([1] * (room - 1), 2, temperature=0)
    with pytest.raises(ValueError, match=f"at most {room:,} in all"):
        next(stream)


def recompute_greedy(model, ids, n):
    """n greedy tokens the slow way: the whole sequence through the model for every token."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            out.append(model(torch.tensor([ids]))[0, -1].argmax().item())
            ids.append(out[-1])
    return out


def test_decode_step_keeps_its_shapes_over_hundreds_of_tokens_and_turns(monkeypatch):
    """Every tensor entering and leaving the decode step has the same shape at every token of a
    conversation (three turns, a rollback, 240 tokens in all): a compiled step never needs a second
    graph. And the tokens are the full recomputation's."""
    model = random_model(sequence_len=32)  # rotary tables for 320 positions
    seen = set()
    step = gpt.decode_step

    def recording(model, kv_cache, tokens):
        logits = step(model, kv_cache, tokens)
        seen.add(tuple(tuple(t.shape) for t in (tokens, kv_cache.k, kv_cache.v, kv_cache.seq_lens, logits)))
        return logits

    monkeypatch.setattr(gpt, "decode_step", recording)
    cache = model.new_kv_cache(1, max_len=300)
    history = [3, 14, 15]
    for turn, n in enumerate((100, 80, 60)):
        new = [turn + 1, 92, 65]  # the next "user message"
        answer = list(model.generate(new if turn else history, n, temperature=0, kv_cache=cache))
        history = history + (new if turn else []) + answer
        assert answer == recompute_greedy(model, history[:-n], n)
        assert cache.pos == len(history)
        if turn == 1:
            cache.truncate(cache.pos - 10)  # a rolled-back answer, as a chat session does after Ctrl-C
            history = history[:-10]
    assert len(seen) == 1, seen
    assert next(iter(seen))[0] == (1, 1)


def test_windowed_layers_decode_as_they_prefill():
    """A layer with a sliding window (key j visible at position p iff p - window <= j <= p): one token at a
    time through the cache gives the logits of prefilling everything at once, which honours the window too;
    a window as long as the sequence changes nothing, a short one changes the logits."""
    model = random_model()
    idx = random_tokens(model, 2, 24)

    def logits(windows, one_at_a_time):
        for block, window in zip(model.transformer.h, windows):
            block.attn.window = window
        cache = model.new_kv_cache(2, max_len=24)
        with torch.no_grad():
            if not one_at_a_time:
                return model(idx, kv_cache=cache)
            out = [model(idx[:, :5], kv_cache=cache)]
            out += [model.decode(idx[:, t:t + 1], cache)[:, None] for t in range(5, 24)]
        return torch.cat(out, dim=1)

    full = logits((None, None), False)
    for windows in ((3, None), (0, 7), (None, None)):
        torch.testing.assert_close(logits(windows, True), logits(windows, False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits((24, 30), True), full, atol=1e-5, rtol=1e-5)
    assert (logits((3, None), True) - full).abs().max() > 1e-3


def test_cache_rows_keep_their_own_lengths():
    model = random_model()
    cache = model.new_kv_cache(3, max_len=16)
    ids = random_tokens(model, 3, 6)
    model(ids[:2, :4], kv_cache=cache.rows(1))  # rows 1 and 2
    cache.set_length(2, 2)
    assert cache.lengths == [0, 4, 2] and cache.seq_lens.tolist() == [0, 4, 2]
    with pytest.raises(ValueError, match="different numbers"):
        cache.pos
    cache.swap(0, 1)
    assert cache.lengths == [4, 0, 2] and cache.seq_lens.tolist() == [4, 0, 2]
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(1)  # row 1 holds nothing
    cache.truncate(0)
    assert cache.pos == 0 and cache.seq_lens.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="holds 0 to 16"):
        cache.set_length(0, 17)
    cache.set_length(0, 16)  # a row filled to max_len exactly (a prompt that fits just so)
    assert cache.lengths[0] == 16 and cache.seq_lens[0].item() == 16


def test_serving_weights_give_the_same_logits():
    """Linear weights kept in bf16 for generation: the same logits as casting fp32 weights under autocast."""
    model = random_model()
    idx = random_tokens(model, 2, 12)
    with torch.no_grad(), gpt.autocast("cpu", torch.bfloat16):
        want = model(idx)
        gpt.serving_weights(model, torch.bfloat16)
        got = model(idx)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(got, want)


def test_a_full_cache_refuses_one_more_token():
    """A row holds max_len tokens, never more: exactly max_len fits (prefilled, or decoded up to it),
    the next token, prefilled or decoded, is a clear error and leaves the cache as it was."""
    model = random_model()
    idx = random_tokens(model, 1, 9)
    cache = model.new_kv_cache(1, max_len=8)
    model(idx[:, :7], kv_cache=cache)
    model.decode(idx[:, 7:8], cache)  # the 8th token: fits exactly
    assert cache.pos == 8
    with pytest.raises(ValueError, match="KV cache full"):
        model.decode(idx[:, 8:9], cache)
    with pytest.raises(ValueError, match="KV cache full"):
        model(idx[:, 8:9], kv_cache=cache)
    assert cache.pos == 8 and cache.seq_lens.tolist() == [8]


def test_decode_rows_past_keep_are_computed_not_kept():
    """GPT.decode(keep=n): rows n.. only fill the compiled step's batch size. Their lengths (host and device)
    stay as they were, however often they are fed, so an idle row never creeps toward (or past) max_len;
    the kept rows' logits are those of decoding them alone."""
    model = random_model(n_layer=3, **RECIPE)
    idx = random_tokens(model, 2, 8)
    cache = model.new_kv_cache(3, max_len=8)
    model(idx[:, :4], kv_cache=cache)  # rows 0 and 1 hold 4 tokens, row 2 none
    alone = model.new_kv_cache(2, max_len=8)
    model(idx[:, :4], kv_cache=alone)
    for t in range(4, 8):
        tokens = torch.cat([idx[:, t:t + 1], torch.zeros(1, 1, dtype=torch.long)])  # row 2: a dummy token
        logits = model.decode(tokens, cache, keep=2)
        torch.testing.assert_close(logits[:2], model.decode(idx[:, t:t + 1], alone), atol=1e-5, rtol=1e-5)
        assert cache.lengths == [t + 1, t + 1, 0] and cache.seq_lens.tolist() == [t + 1, t + 1, 0]


# ----------------------------------------------------------------------------
# Learning


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    idx = torch.randint(0, 64, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = model(x, y).item()
    for _ in range(150):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(64), abs=1e-4)
    assert loss.item() < 0.05, f"loss {first:.3f} -> {loss.item():.3f}"


# ----------------------------------------------------------------------------
# nanochat's recipe: value embeddings, layer lambdas, smear, backout, windows, q/k gain

RECIPE = dict(value_embeds=True, layer_lambdas=True, smear=True, backout=True, qk_gain=1.2)  # all but windows
WINDOWED = dict(sequence_len=512, window_pattern="SSSL")  # short windows of 128: longer sequences feel them


def windowed_reference_attention(q, k, v, window=None):
    """Causal attention with an explicit mask, keys i-window..i for query i: the oracle for windows."""
    i = torch.arange(q.shape[2])
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask &= i[None, :] >= i[:, None] - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def test_window_pattern_follows_nanochat():
    c = GPTConfig(sequence_len=256, vocab_size=10, n_layer=6, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL")
    assert c.windows() == [128, 128, 128, None, 128, None]  # tiled, the last layer always full
    assert GPTConfig(sequence_len=2048, n_layer=2, window_pattern="S").windows() == [512, None]  # a quarter, to 128
    assert GPTConfig(n_layer=3, window_pattern="sl").windows() == [256, None, None]
    assert GPTConfig(sequence_len=640, n_layer=2, window_pattern="S").windows() == [256, None]  # 160, rounded up
    assert GPTConfig(n_layer=3).windows() == [None] * 3
    for bad in ["", "SXL"]:
        with pytest.raises(ValueError, match="use the letters S .* and L"):
            GPTConfig(window_pattern=bad)
    with pytest.raises(ValueError, match="too narrow for the smear"):
        GPTConfig(n_embd=16, n_head=2, n_kv_head=2, smear=True)


def test_recipe_parameters_and_init_follow_nanochat():
    c = GPTConfig(sequence_len=16, vocab_size=50, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, **RECIPE)
    model = GPT(c)
    model.init_weights(seed=0)
    assert sorted(model.value_embeds) == ["1", "3"]  # alternating, the last layer among them
    assert sorted(GPT(GPTConfig(**{**c.__dict__, "n_layer": 3})).value_embeds) == ["0", "2"]
    for i, block in enumerate(model.transformer.h):
        assert hasattr(block.attn, "ve_gate") == (i in (1, 3))
    gate = model.transformer.h[1].attn.ve_gate.weight
    assert gate.shape == (2, 12) and 0 <= gate.min() and gate.max() <= 0.02
    bound = math.sqrt(3 / 64)  # uniform with std 1/sqrt(n_embd), as c_v
    table = model.value_embeds["1"].weight
    assert table.shape == (50, 2 * 16) and table.abs().max() <= bound and table.std().item() == pytest.approx(64 ** -0.5, rel=0.1)
    torch.testing.assert_close(model.resid_lambdas.detach(), torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(model.x0_lambdas.detach(), torch.tensor([0.2, 0.15, 0.1, 0.05]))
    assert model.smear_gate.weight.shape == (1, 24) and 0 <= model.smear_gate.weight.min() <= 0.02
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    idx = torch.randint(0, 50, (2, 16))
    assert model(idx, idx).item() == pytest.approx(math.log(50), abs=1e-6)  # still a zero lm_head
    with torch.device("meta"):
        meta = GPT(c)
    meta.to_empty(device="cpu")
    meta.init_weights(seed=0)
    for (name, a), b in zip(meta.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_recipe_off_is_the_plain_gpt():
    """Checkpoints from before the switches hold the plain GPT, and from_saved reads them as that."""
    plain = dict(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    config = GPTConfig.from_saved(plain)
    assert all(getattr(config, k) == v for k, v in gpt.PLAIN.items())
    assert set(GPT(config).state_dict()) == {"transformer.wte.weight", "lm_head.weight"} | {
        f"transformer.h.{i}.{m}.weight" for i in range(2)
        for m in ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}


@pytest.mark.parametrize("feature", ["value_embeds", "layer_lambdas", "smear", "backout", "qk_gain"])
def test_each_recipe_feature_at_its_neutral_value_is_the_plain_gpt(feature):
    """With its parameters at their neutral values a feature computes the plain GPT exactly; away from them,
    something else, and every parameter gets a gradient."""
    plain = random_model(seed=1, n_layer=3)
    model = GPT(GPTConfig(**{**plain.config.__dict__, feature: RECIPE[feature]}))
    model.load_state_dict(plain.state_dict(), strict=False)
    neutral = dict(value_embeds=["value_embeds.0.weight", "value_embeds.2.weight"], layer_lambdas=[],
                   smear=["smear_lambda"], backout=["backout_lambda"], qk_gain=[])[feature]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in neutral:
                p.zero_()
        if feature == "layer_lambdas":
            model.resid_lambdas.fill_(1.0)
            model.x0_lambdas.zero_()
    idx = random_tokens(model, 2, 20)
    if feature != "qk_gain":  # the gain has no parameter: gain 1 is the plain GPT
        torch.testing.assert_close(model(idx), plain(idx), atol=1e-6, rtol=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in neutral or name.endswith("lambdas"):
                p.normal_(0.5, 0.1)
    assert (model(idx) - plain(idx)).abs().max() > 1e-3
    model(idx, random_tokens(model, 2, 20, seed=1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0 and p.grad.isfinite().all(), name


def cached_pieces(model, idx, cuts):
    """Logits of idx fed through a KV cache in chunks ending at cuts, then one token at a time."""
    cache = model.new_kv_cache(idx.shape[0], max_len=idx.shape[1])
    pieces, start = [], 0
    for end in cuts + list(range(cuts[-1] + 1, idx.shape[1] + 1)):
        pieces.append(model(idx[:, start:end], kv_cache=cache))
        start = end
    return torch.cat(pieces, dim=1), cache


def test_kv_cache_matches_full_forward_with_the_recipe():
    model = random_model(n_layer=3, **RECIPE)
    idx = random_tokens(model, 2, 20)
    full = model(idx)
    step, cache = cached_pieces(model, idx, [7, 11])
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    cache.truncate(9)  # the smear's previous token after a rollback is the cached one at position 8
    torch.testing.assert_close(model(idx[:, 9:], kv_cache=cache), full[:, 9:], atol=1e-5, rtol=1e-5)
    out = list(model.generate(idx[0, :5].tolist(), 6, temperature=0))
    seq = idx[0, :5].tolist()
    for _ in range(6):
        seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    assert out == seq[5:]


def test_a_fresh_cache_takes_the_dtype_of_its_first_keys():
    """With the smear, the cache records token ids before any layer runs: that must not fix the keys' dtype
    (under bf16 autocast, fp32 keys beside bf16 queries were refused by our attention, and twice the memory)."""
    model = random_model(n_layer=2, **RECIPE).eval()
    assert model.config.smear
    cache = model.new_kv_cache(1, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16 and cache.ids.dtype == torch.long


def test_kv_cache_honours_the_windows(monkeypatch):
    """Cached decode masks keys older than position - window, as the reference windowed attention does
    in the full forward; the windows change the logits, so the comparison is not vacuous."""
    monkeypatch.setattr(gpt, "flash_attn", windowed_reference_attention)
    monkeypatch.setattr(gpt, "FLASH_ATTN_HAS_WINDOW", True)
    model = random_model(n_layer=4, **RECIPE, **WINDOWED)
    idx = random_tokens(model, 2, 150)
    full = model(idx)
    step, _ = cached_pieces(model, idx, [100, 140])
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    unwindowed = GPT(GPTConfig(**{**model.config.__dict__, "window_pattern": "L"}))
    unwindowed.load_state_dict(model.state_dict())
    assert (unwindowed(idx)[:, 130:] - full[:, 130:]).abs().max() > 1e-3
    torch.testing.assert_close(unwindowed(idx)[:, :129], full[:, :129], atol=1e-6, rtol=0)  # within the window


@pytest.mark.skipif(not gpt.FLASH_ATTN_HAS_WINDOW, reason="kernels.flash_attn has no window argument yet")
def test_kv_cache_matches_the_windowed_kernel(monkeypatch):
    """Training's windowed attention (the kernel) = cached decode = the reference windowed attention."""
    model = random_model(n_layer=4, **RECIPE, **WINDOWED)
    idx = random_tokens(model, 2, 150)
    full = model(idx)
    step, _ = cached_pieces(model, idx, [100, 140])
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(gpt, "flash_attn", windowed_reference_attention)
    torch.testing.assert_close(model(idx), full, atol=1e-5, rtol=1e-5)


def test_window_without_kernel_support_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(gpt, "FLASH_ATTN_HAS_WINDOW", False)
    model = random_model(**WINDOWED)
    with pytest.raises(NotImplementedError, match="flash_attn has no window argument yet; train with --window-pattern L"):
        model(random_tokens(model, 1, 8))


def test_rows_at_their_own_positions_match_the_full_forward_with_the_recipe():
    """The server's case: rows prefilled at different times to different lengths, then decoded together in
    one fixed-shape step; each row's smear reads its own previous token, its window its own positions."""
    model = random_model(n_layer=3, **RECIPE)
    idx = random_tokens(model, 2, 14)
    lengths = [5, 9]
    cache = model.new_kv_cache(2, max_len=16)
    for row, n in enumerate(lengths):  # each row alone, into its own slot
        model(idx[row:row + 1, :n], kv_cache=cache.rows(row))
    logits = model.decode(idx[range(2), lengths][:, None], cache)
    for row, n in enumerate(lengths):
        want = model(idx[row:row + 1, :n + 1])[0, -1].float()
        torch.testing.assert_close(logits[row], want, atol=1e-5, rtol=1e-5)


def test_sizes_with_the_recipe():
    c = GPTConfig(sequence_len=256, vocab_size=100, n_layer=4, n_head=4, n_kv_head=4, n_embd=64,
                  value_embeds=True, layer_lambdas=True, smear=True, backout=True, window_pattern="SSSL")
    model = GPT(c)
    blocks = 4 * 12 * 64 * 64 + 2 * 4 * 12  # + the value-embedding gates of layers 1 and 3
    assert model.num_scaling_params() == blocks + 100 * 64
    assert model.num_params() == blocks + 100 * 64 * 2 + 2 * 100 * 64 + 2 * 4 + 24 + 1 + 1
    assert model.num_params(exclude_embedding=True) == blocks + 100 * 64 + 2 * 4 + 24 + 2
    attention = 12 * 4 * 16 * (3 * 128 + 256)  # three layers see 128 keys, the last 256
    assert model.flops_per_token() == 6 * (blocks + 100 * 64 + 24) + attention


def test_smear_across_the_cache_reads_a_previous_token_of_id_0():
    """Token id 0 is a token like any other: when it is the last cached one, the smear of the next token
    (prefilled or decoded on the cache) takes it in, as the full forward does."""
    model = random_model(n_layer=3, **RECIPE)
    idx = random_tokens(model, 2, 12)
    idx[:, 5] = 0  # the last token of the first chunk
    idx[:, 8] = 0  # the token before a decode step
    full = model(idx)
    cache = model.new_kv_cache(2, max_len=12)
    pieces = [model(idx[:, :6], kv_cache=cache), model(idx[:, 6:9], kv_cache=cache)]
    pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_smear_after_a_single_cached_token_reads_it():
    """A cache holding one token (a one-token prompt such as <|bos|>, or a rollback to it): the next token's
    smear reads the token at position 0, whether it comes as a chunk or as a decode step."""
    model = random_model(n_layer=3, **RECIPE)
    idx = random_tokens(model, 2, 6)
    full = model(idx)
    for cuts in ([1, 4, 6], [1, 2, 3, 4, 5, 6]):
        cache, pieces, start = model.new_kv_cache(2, max_len=6), [], 0
        for end in cuts:
            pieces.append(model(idx[:, start:end], kv_cache=cache))
            start = end
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    prompt = idx[0, :1].tolist()
    want = []
    for _ in range(4):
        want.append(int(model(torch.tensor([prompt + want]))[0, -1].argmax()))
    assert list(model.generate(prompt, 4, temperature=0)) == want


def test_swapped_rows_take_their_smear_token_with_them():
    """KVCache.swap moves a row's token ids with its keys and values: after the swap each row's next token
    (whose smear reads the cached previous token) gets the logits of its own sequence."""
    model = random_model(n_layer=3, **RECIPE)
    idx = random_tokens(model, 2, 7)
    cache = model.new_kv_cache(2, max_len=8)
    model(idx[:, :6], kv_cache=cache)
    cache.swap(0, 1)
    logits = model.decode(idx.flip(0)[:, 6:7], cache)
    torch.testing.assert_close(logits, model(idx.flip(0))[:, -1].float(), atol=1e-5, rtol=1e-5)


def test_qk_gain_scales_the_attention_logits_by_its_square(monkeypatch):
    """qk_gain g multiplies q and k after QK-norm: the plain GPT with attention at softmax scale g^2/sqrt(D)."""
    plain = random_model(seed=1)
    gained = GPT(GPTConfig(**{**plain.config.__dict__, "qk_gain": 1.2}))
    gained.load_state_dict(plain.state_dict())
    idx = random_tokens(plain, 2, 16)
    D = plain.config.head_dim

    def scaled(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.2 ** 2 / math.sqrt(D),
                                              enable_gqa=q.shape[1] != k.shape[1])
    monkeypatch.setattr(gpt, "flash_attn", scaled)
    want = plain(idx)
    monkeypatch.undo()
    torch.testing.assert_close(gained(idx), want, atol=1e-5, rtol=1e-5)


def test_rotary_base_is_nanochats_and_older_checkpoints_keep_theirs():
    """nanochat's base 100,000 for new models; a checkpoint saved before the field was trained with 10,000 and is
    read so (its logits unchanged); the model's tables follow the field."""
    assert gpt.GPTConfig().rotary_base == 100000.0
    saved = dataclasses.asdict(random_model().config)
    del saved["rotary_base"]
    assert gpt.GPTConfig.from_saved(saved).rotary_base == gpt.LEGACY_ROTARY_BASE == 10000.0
    import common  # --resume of such a run: refused with today's base, naming the flag; taken with its own
    with pytest.raises(SystemExit, match=r"'rotary_base': \(10000.0, 100000.0\).*--rotary-base"):
        common.check_same_model(saved, gpt.GPTConfig(**{**saved, "rotary_base": 100000.0}), "ckpt.pt")
    common.check_same_model(saved, gpt.GPTConfig(**{**saved, "rotary_base": 10000.0}), "ckpt.pt")
    for base in (10000.0, 100000.0):
        model = random_model(rotary_base=base)
        D = model.config.head_dim
        angle = 5 / base ** (2 / D)  # position 5, the second frequency
        assert model.cos[0, 5, 0, 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def written_out_logits(model, idx):
    """The recipe's forward written out from its definitions (module docstring; nanochat gpt.py), with its own
    rotary tables: an oracle independent of GPT.trunk, Block and CausalSelfAttention."""
    c = model.config
    B, T = idx.shape
    H, H_kv, D = c.n_head, c.n_kv_head, c.head_dim
    rms = lambda t: F.rms_norm(t, (t.shape[-1],), eps=1e-6)
    inv_freq = 1.0 / c.rotary_base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]

    def rotate(t):  # the pairs (t[i], t[i + D/2]) rotated by the position's angles
        t1, t2 = t[..., :D // 2], t[..., D // 2:]
        return torch.cat([t1 * cos + t2 * sin, t2 * cos - t1 * sin], dim=-1)

    x = rms(model.transformer.wte(idx))
    previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    x = x + model.smear_lambda * torch.sigmoid(x[..., :24] @ model.smear_gate.weight.T) * previous
    x0 = x
    for i, block in enumerate(model.transformer.h):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        a, h = block.attn, rms(x)
        q = (h @ a.c_q.weight.T).view(B, T, H, D)
        k = (h @ a.c_k.weight.T).view(B, T, H_kv, D)
        v = (h @ a.c_v.weight.T).view(B, T, H_kv, D)
        if str(i) in model.value_embeds:
            gate = 3 * torch.sigmoid(h[..., :12] @ a.ve_gate.weight.T)  # (B, T, H_kv), in (0, 3)
            v = v + gate[..., None] * model.value_embeds[str(i)](idx).view(B, T, H_kv, D)
        q, k = rms(rotate(q)) * c.qk_gain, rms(rotate(k)) * c.qk_gain
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=H != H_kv)
        x = x + y.transpose(1, 2).reshape(B, T, c.n_embd) @ a.c_proj.weight.T
        x = x + (F.relu(rms(x) @ block.mlp.c_fc.weight.T) ** 2) @ block.mlp.c_proj.weight.T
        if i == c.n_layer // 2:
            x_mid = x
    x = x - model.backout_lambda * x_mid
    return 15.0 * torch.tanh(rms(x) @ model.lm_head.weight.T / 15.0)


@pytest.mark.parametrize("n_layer", [3, 4])
def test_recipe_forward_equals_its_definition_written_out(n_layer):
    """Value-embedding gates, layer lambdas, smear, backout (the middle layer), q/k gain, RoPE and the softcap,
    each at a non-neutral value, against the written-out forward; the cached decode path is pinned to the full
    forward elsewhere (test_kv_cache_matches_full_forward_with_the_recipe), so this pins both."""
    model = random_model(seed=2, n_layer=n_layer, **RECIPE)
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.4)
        model.resid_lambdas.uniform_(0.8, 1.2)
        model.x0_lambdas.uniform_(0.1, 0.5)
        for block in model.transformer.h:
            if hasattr(block.attn, "ve_gate"):
                block.attn.ve_gate.weight.normal_(0.0, 0.5)
        idx = random_tokens(model, 2, 20)
        torch.testing.assert_close(model(idx), written_out_logits(model, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field", ["n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "sequence_len"])
def test_a_model_of_no_size_is_refused_by_name(field):
    """train.py --model d0 was a bare ZeroDivisionError (n_embd % n_head with no heads)."""
    with pytest.raises(ValueError, match=f"{field}=0"):
        gpt.GPTConfig(**{**dict(n_layer=1, n_head=1, n_kv_head=1, n_embd=64, vocab_size=64, sequence_len=16), field: 0})
    with pytest.raises(ValueError, match="at least one layer"):
        gpt.GPTConfig.from_depth(0, vocab_size=64, sequence_len=16)


def test_positions_past_the_rotary_tables_are_refused_by_name():
    """The rotary tables hold positions 0..rotary_len-1: a forward of rotary_len tokens runs, one more is a clear
    ValueError (not a broadcasting error); a cache's rows hold at most rotary_len - 1 tokens, since a row fed only to
    fill a compiled step's batch (GPT.decode's keep) writes at position max_len, which must have its angles."""
    model = random_model(sequence_len=4)  # rotary tables for 40 positions
    n = model.rotary_len
    assert model(random_tokens(model, 1, n)).shape == (1, n, model.config.vocab_size)
    with pytest.raises(ValueError, match="past the rotary tables"):
        model(random_tokens(model, 1, n + 1))
    assert model.new_kv_cache(1).max_len == n - 1
    with pytest.raises(ValueError, match="past the rotary tables"):
        model.new_kv_cache(1, max_len=n)


def test_three_rows_at_their_own_positions_decode_as_their_full_forwards():
    """The server's batched decode with rows 0 and 2 at one length and row 1 at another: every row's key is
    written at its own position (not all at row 0's because the first and last rows agree), so each row's
    logits are its full forward's, step after step."""
    model = random_model(n_layer=3, **RECIPE)
    idx = random_tokens(model, 3, 14)
    lengths = [5, 9, 5]
    cache = model.new_kv_cache(3, max_len=16)
    for row, n in enumerate(lengths):
        model(idx[row:row + 1, :n], kv_cache=cache.rows(row))
    for step in range(2):
        at = [n + step for n in lengths]
        logits = model.decode(idx[range(3), at][:, None], cache)
        for row, p in enumerate(at):
            torch.testing.assert_close(logits[row], model(idx[row:row + 1, :p + 1])[0, -1].float(), atol=1e-5, rtol=1e-5)


def test_a_token_of_zero_probability_is_never_sampled_even_at_a_uniform_of_zero():
    """Each row's number u in [0, 1) picks the token whose share [cdf_{i-1}, cdf_i) of the distribution holds it:
    at u = 0 the first token of nonzero probability, never a token that has none (one the softmax gave 0, or
    one top_k dropped), which the server's own uniforms (sample_next_token's `uniform`) may ask about."""
    zero = torch.zeros(2, 1, dtype=torch.float64)
    logits = torch.log(torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]))
    assert gpt.sample_next_token(logits, uniform=zero).view(-1).tolist() == [1, 0]
    assert gpt.sample_next_token(logits, top_k=2, uniform=zero).view(-1).tolist() == [1, 1]


def test_the_frequency_penalty_counts_every_repeat_and_the_presence_penalty_only_the_first():
    """gpt.penalize is OpenAI's formula, logit - frequency x count - presence x (count > 0); in GPT.generate the
    counts grow by one with each generated token, so a token said three times pays the frequency penalty three
    times, the presence penalty once (on an answer where that changes the greedy tokens)."""
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    assert gpt.penalize(logits, counts, 0.5, 2.0).tolist() == [[0.0, -2.5, -3.5, -3.0]]
    model = random_model()
    prompt = [5, 17, 3, 5, 17]

    def written_out(penalty, n=30):
        ids, counts = list(prompt), torch.zeros(model.config.vocab_size, dtype=torch.float64)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int((model(torch.tensor([ids]))[0, -1].double() - penalty(counts)).argmax()))
                counts[ids[-1]] += 1
        return ids[len(prompt):]

    frequency = written_out(lambda counts: 0.05 * counts)
    assert frequency != written_out(lambda counts: 0.05 * (counts > 0))  # the counts past one matter here
    assert list(model.generate(prompt, 30, temperature=0.0, frequency_penalty=0.05)) == frequency
    assert list(model.generate(prompt, 30, temperature=0.0, presence_penalty=0.05)) == \
        written_out(lambda counts: 0.05 * (counts > 0))


def test_swapping_rows_of_different_lengths_moves_the_whole_longer_row():
    """KVCache.swap of a row of 6 tokens with one of 3: each row's keys, values and token ids move whole, so the
    next decode step of each (now in the other's slot) gives the logits of its own full forward."""
    model = random_model(n_layer=3, **RECIPE)
    idx = random_tokens(model, 2, 8)
    cache = model.new_kv_cache(2, max_len=8)
    for row, n in enumerate([6, 3]):
        model(idx[row:row + 1, :n], kv_cache=cache.rows(row))
    cache.swap(0, 1)
    assert cache.lengths == [3, 6] and cache.seq_lens.tolist() == [3, 6]
    logits = model.decode(idx[[1, 0], [3, 6]][:, None], cache)
    for row, (seq, n) in enumerate([(1, 3), (0, 6)]):
        torch.testing.assert_close(logits[row], model(idx[seq:seq + 1, :n + 1])[0, -1].float(), atol=1e-5, rtol=1e-5)


def test_a_full_row_refuses_the_next_token_only_where_it_is_kept():
    """GPT.decode(keep=n) checks the room of the kept rows only: an idle row past keep may sit full (a finished
    request's), and the others still decode with their own logits; a full row that is kept refuses, whichever
    row of the batch it is, and nothing moves."""
    model = random_model()
    idx = random_tokens(model, 2, 8)
    cache = model.new_kv_cache(2, max_len=8)
    model(idx[1:, :8], kv_cache=cache.rows(1))  # row 1 full
    model(idx[:1, :3], kv_cache=cache.rows(0))
    logits = model.decode(idx[:, 3:4], cache, keep=1)
    torch.testing.assert_close(logits[0], model(idx[:1, :4])[0, -1].float(), atol=1e-5, rtol=1e-5)
    assert cache.lengths == [4, 8]
    with pytest.raises(ValueError, match="KV cache full"):
        model.decode(idx[:, 4:5], cache)  # row 1 kept: no room
    assert cache.lengths == [4, 8] and cache.seq_lens.tolist() == [4, 8]
