"""Tests for sft.py: conversation reading, masks in batches, sharding, learning, exact resume, errors."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chatdata
import common
import data
import evaluation
import optim
import sft
import tok
from conftest import FIXTURE_TEXT, make_checkpoint, refusal, sigkill_when_file_appears, signal_handlers_kept
from test_train import GradCapture
from tok import check_conversation, parse_conversation, render_conversation

REPO = Path(__file__).resolve().parents[1]


def fixture_conversations(n=40):
    lines = [l for l in FIXTURE_TEXT.read_text(encoding="utf-8").splitlines() if l.strip()]
    return [{"messages": [{"role": "user", "content": f"Sag mir Satz {i % len(lines)}."},
                          {"role": "assistant", "content": lines[i % len(lines)]}]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture
def setup(tmp_path, small_tokenizer):
    make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", sequence_len=64, n_embd=32)
    write_jsonl(tmp_path / "train.jsonl", fixture_conversations(40))
    write_jsonl(tmp_path / "val.jsonl", fixture_conversations(8))
    return tmp_path


def args_for(root, out="chat", *extra):
    return ["--preset", "tiny", "--base", str(root / "base"), "--data", f"jsonl://{root}/train.jsonl",
            "--val-data", f"jsonl://{root}/val.jsonl", "--out", str(root / out), "--max-steps", "6",
            "--device-batch-size", "2", "--examples-per-step", "4", "--eval-every", "3", "--save-every", "3",
            "--identity-repeat", "1", *extra]


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Hi"}]},
    {"conversations": [{"from": "human", "value": "Hallo"}, {"from": "gpt", "value": "Hi"}]},
    {"conversation": [{"role": "prompter", "text": "Hallo"}, {"role": "assistant", "text": "Hi"}]},
    {"instruction": "Hallo", "input": "", "output": "Hi"},
    {"instruction": "Hallo", "context": "", "response": "Hi", "category": "open_qa"},
])
def test_common_chat_shapes_become_messages(row):
    assert chatdata.to_messages(row) == [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Hi"}]


def test_instruction_with_input_puts_both_in_the_question():
    messages = chatdata.to_messages({"instruction": "Übersetze.", "input": "Good morning", "output": "Guten Morgen"})
    assert messages[0]["content"] == "Übersetze.\n\nGood morning"


def test_malformed_conversations_are_counted_with_an_example(tmp_path, small_tokenizer):
    good = fixture_conversations(3)
    rows = good + [
        "{not json",
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
        {"text": "kein Gespräch"},
        ["a", "list"],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    lines = []
    got = chatdata.load_conversations(data.parse_specs(f"jsonl://{path}"), small_tokenizer, 1000, log=lines.append)
    assert len(got) == 3
    report = "\n".join(lines)
    assert "rejected 7 of 10 conversations" in report
    for reason, line in [("not valid JSON", 4), ("empty content", 5), ("'user' where 'assistant' must come", 6),
                         ("unknown role 'robot'", 7), ("non-string content", 8), ("no conversation in the row", 9),
                         ("must be a JSON object", 10)]:
        assert any(reason in l and f"mixed.jsonl:{line})" in l for l in lines), (reason, report)


def test_too_long_conversations_are_cut_or_rejected_and_said(tmp_path, small_tokenizer):
    long_answer = "Das ist ein sehr langer Satz über die Elbe. " * 20
    rows = [{"messages": [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Guten Tag."},
                          {"role": "user", "content": "Erzähl"}, {"role": "assistant", "content": long_answer}]},
            {"messages": [{"role": "user", "content": "Erzähl"}, {"role": "assistant", "content": long_answer}]}]
    lines = []
    got = chatdata.load_conversations(data.parse_specs(f"jsonl://{write_jsonl(tmp_path / 'a.jsonl', rows)}"),
                                 small_tokenizer, 32, log=lines.append)
    assert len(got) == 1 and len(got[0][0]) <= 32
    assert any("cut 1 conversations" in l for l in lines) and any("too long" in l for l in lines)


def test_batches_train_exactly_the_masked_tokens(small_tokenizer):
    convs = [render_conversation(small_tokenizer, c["messages"]) for c in fixture_conversations(3)]
    inputs, targets = sft.collate(convs, pad_id=small_tokenizer.bos_id)
    for row, (ids, mask) in enumerate(convs):
        n = len(ids) - 1
        assert inputs[row, :n].tolist() == ids[:-1]
        assert targets[row, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert (targets[row, n:] == -1).all()
    longest = max(len(ids) - 1 for ids, _ in convs)  # a few shapes per run, not one per length
    assert inputs.shape[1] % sft.PAD_MULTIPLE == 0 and 0 <= inputs.shape[1] - longest < sft.PAD_MULTIPLE


def test_ranks_share_each_step_disjointly_and_completely(small_tokenizer, monkeypatch):
    monkeypatch.setattr(sft, "PAD_MULTIPLE", 1)  # the padding below is then exactly the grouping's
    convs = [render_conversation(small_tokenizer, c["messages"]) for c in fixture_conversations(24)]
    cfg = sft.SFTConfig(device_batch_size=2, examples_per_step=8)
    order = sft.epoch_order(len(convs), seed=1, epoch=0)
    assert sorted(order) == list(range(24)) and order != sft.epoch_order(len(convs), seed=1, epoch=1)
    for step in range(3):
        one, n_one = sft.step_batches(convs, order, step, cfg, 0, 1, 0)
        per_rank = [sft.step_batches(convs, order, step, cfg, r, 2, 0) for r in range(2)]
        assert n_one == per_rank[0][1] == per_rank[1][1]  # every rank knows the step's trained-token count
        rows = lambda batches: sorted(tuple(row.tolist()) for inputs, _ in batches for row in inputs)
        assert rows(one) == rows(per_rank[0][0] + per_rank[1][0])
        assert not set(rows(per_rank[0][0])) & set(rows(per_rank[1][0]))
        # rows of like length share a micro-batch: as little padding as B rows per micro-batch allow
        lengths = sorted(len(convs[i][0]) - 1 for i in order[step * 8:(step + 1) * 8])
        assert sum(inputs.numel() for inputs, _ in one) == sum(2 * lengths[i + 1] for i in range(0, 8, 2))


def test_identity_conversations_are_valid_and_about_nanoschnack():
    rows = [json.loads(l) for l in sft.IDENTITY_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 20
    for row in rows:
        check_conversation(row["messages"])
    answers = [" ".join(m["content"] for m in row["messages"] if m["role"] == "assistant") for row in rows]
    assert sum("nanoschnack" in a for a in answers) >= len(rows) // 2
    # the identity rate's paraphrases stay held out, in any turn, and so does each of them with a word swapped
    # ("Mit wem rede ich gerade?" would make the rate a recall test)
    questions = {m["content"].lower() for row in rows for m in row["messages"] if m["role"] == "user"}
    assert sft.IDENTITY_QUESTIONS[0].lower() in questions
    words = lambda text: re.findall(r"\w+", text.lower())
    for held_out in map(words, sft.IDENTITY_QUESTIONS[1:]):
        for question in map(words, questions):
            assert not (len(question) == len(held_out) and sum(a != b for a, b in zip(question, held_out)) <= 1), question


def test_loss_falls_and_samples_are_logged(setup):
    sft.main(args_for(setup, "chat", "--max-steps", "30", "--eval-every", "30", "--init-lr-frac", "0.5",
                      "--save-every", "0", "--warmdown-ratio", "0.5"))
    records = [json.loads(l) for l in (setup / "chat" / "log.jsonl").read_text().splitlines()]
    # flat for the first half of the run, then linear to 0 (nanochat's chat_sft.py schedule)
    assert [r["lr_mult"] for r in records] == [1.0] * 16 + [pytest.approx((14 - i) / 15) for i in range(14)]
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert "val_loss" in records[-1] and set(records[-1]["samples"]) == set(sft.SAMPLE_QUESTIONS)
    model, tokenizer, ckpt = common.load_model(setup / "chat")
    assert ckpt["kind"] == "chat" and ckpt["step"] == 30
    report = (setup / "report.md").read_text(encoding="utf-8")
    assert "## SFT" in report and "## Chat samples" in report and "**Wer bist du?**" in report
    assert f"{records[-1]['val_loss']:.4f}" in report
    ended, asked, named = records[-1]["stop_rate"]  # the first questions of the 8 held-out conversations
    assert asked == 8
    assert f"| answers that end | {ended} of {asked}" in report


def test_resume_is_bitwise_exact(setup):
    sft.main(args_for(setup, "a"))
    sft.main(args_for(setup, "b", "--stop-after-steps", "3"))
    assert common.latest_checkpoint(setup / "b").name == "ckpt_0000003.pt"
    sft.main(args_for(setup, "b", "--resume"))
    a, b = (torch.load(common.latest_checkpoint(setup / d), weights_only=True) for d in ("a", "b"))
    assert a["step"] == b["step"] == 6
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    loss = lambda d: {r["step"]: (r["loss"], r["loss_smooth"])  # the smoothed loss goes on where it was too
                      for r in map(json.loads, (setup / d / "log.jsonl").read_text().splitlines())}
    assert loss("a") == loss("b")
    assert a["tokens"] == b["tokens"] > 0  # the trained tokens (log, report) count the earlier session's too
    sft.main(args_for(setup, "c", "--stop-after-steps", "3"))
    with pytest.raises(SystemExit, match=r"trained with other --identity-repeat \(1, now 2\), --seed"):
        sft.main(args_for(setup, "c", "--resume", "--identity-repeat", "2", "--seed", "5"))
    # each of SAME_ON_RESUME is refused by name (another --data went on with the saved step in another set's order);
    # --text-frac in a call of its own: with --text-data it would read text rows
    changed = dict(data=f"jsonl://{setup}/val.jsonl", val_data=f"jsonl://{setup}/train.jsonl", val_conversations="5",
                   identity_repeat="2", text_data="base", text_bestfit="0.5", answer_chars="50", examples_per_step="8",
                   seed="5", matrix_lr="0.3", embedding_lr="0.3", unembedding_lr="0.01", weight_decay="0.1",
                   init_lr_frac="0.9")
    for flags in (changed, dict(text_frac="0.5")):
        with pytest.raises(SystemExit) as refused:
            sft.main(args_for(setup, "c", "--resume", *[x for k, v in flags.items()
                                                         for x in (f"--{k.replace('_', '-')}", v)]))
        assert [n for n in flags if f"--{n.replace('_', '-')} (" in str(refused.value)] == list(flags), refused.value
    assert set(changed) | {"text_frac"} == set(sft.SAME_ON_RESUME)  # a setting added there is tried here too


def test_two_ranks_equal_one_process(setup):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # fp32: equal up to the order of float sums (bf16 products would round differently per split); 8 examples a
    # step: two micro-steps on each rank (DDP's no_sync accumulation), and an evaluation at the last step
    flags = ("--max-steps", "3", "--eval-every", "3", "--dtype", "float32", "--examples-per-step", "8")
    args = args_for(setup, "ddp", *flags)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "sft.py"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sft.main(args_for(setup, "one", *flags))
    ddp, one = (torch.load(common.latest_checkpoint(setup / d), weights_only=True)["model"] for d in ("ddp", "one"))
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # the logged step losses and the validation loss are the whole step's and the whole set's, not rank 0's share
    ddp, one = ([json.loads(l) for l in (setup / d / "log.jsonl").read_text().splitlines()] for d in ("ddp", "one"))
    assert [r["loss"] for r in ddp] == [pytest.approx(r["loss"], rel=1e-5) for r in one]
    assert ddp[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5)


def run_sft(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "sft.py"), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_bad_input_gives_one_clear_error(setup, tmp_path, capsys):
    """Each bad input ends sft.py with one `error:` line that names it. The first runs as a user runs it, in a
    process of its own (exit code, stderr, no traceback); the others call the same main() here (conftest's
    refusal)."""
    proc = run_sft(args_for(setup, "err", "--base", str(tmp_path / "none")))
    assert proc.returncode != 0 and "no checkpoint at" in proc.stderr, proc.stderr[-1500:]
    assert "pass --base FILE_OR_FOLDER" in proc.stderr, proc.stderr[-1500:]  # sft.py's flag (it said --checkpoint)
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    cases = [
        (["--data", f"jsonl://{tmp_path}/missing.jsonl"], "file not found"),
        (["--data", f"jsonl://{write_jsonl(tmp_path / 'bad.jsonl', ['{oops', json.dumps({'text': 'x'})])}",
          "--identity-repeat", "0"], "no usable conversations"),
        (["--data", "hf://OpenAssistant/OASST-DE"], "error:"),
        (["--examples-per-step", "5"], "not a multiple"),
        (["--warmdown-ratio", "1.5"], "--warmdown-ratio 1.5 must be between 0 and 1"),
        (["--out", str(tmp_path / "base")], "is --base's folder"),  # saving would prune the base checkpoints
        (["--examples-per-step", "0"], "--examples-per-step must be at least 1 (got 0)"),
        (["--epochs", "0", "--log-every", "0"], "--epochs must be at least 1 (got 0); --log-every must be at least 1"),
        (["--init-lr-frac", "-1"], "--init-lr-frac must be above 0"),
        (["--data", f"jsonl://{tmp_path}/latin1.jsonl"], "latin1.jsonl is not valid UTF-8"),
    ]
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(fixture_conversations(1)[0], ensure_ascii=False)
                                            .encode("latin1", errors="replace") + "ä\n".encode("latin1"))
    for extra, message in cases:
        said, _ = refusal(sft.main, args_for(setup, "err", *extra), capsys)
        assert message in said, (extra, said[-1500:])


def test_without_val_data_the_first_conversations_are_held_out(setup, small_tokenizer):
    cfg = sft.SFTConfig(data=f"jsonl://{setup}/train.jsonl", val_data="", val_conversations=5, identity_repeat=0)
    train_convs, val = sft.load_sft_data(cfg, small_tokenizer, 1000, log=lambda *a: None)
    everything = chatdata.load_conversations(data.parse_specs(cfg.data), small_tokenizer, 1000, log=lambda *a: None)
    assert val == everything[:5] and train_convs == everything[5:]
    with pytest.raises(data.DataError, match="would hold out every one for validation"):  # nothing left to train
        sft.load_sft_data(dataclasses.replace(cfg, val_conversations=len(everything)), small_tokenizer, 1000,
                          log=lambda *a: None)
    cfg.identity_repeat = 2
    with_identity, _ = sft.load_sft_data(cfg, small_tokenizer, 1000, log=lambda *a: None)
    n_identity = len(sft.IDENTITY_FILE.read_text(encoding="utf-8").splitlines())
    assert len(with_identity) == len(train_convs) + 2 * n_identity


def test_validation_conversations_spread_over_a_file_grouped_by_source(setup, small_tokenizer):
    """A validation file in blocks by source (the demo's sft/val.jsonl): its first N would all be one source."""
    blocks = [[{"messages": [{"role": "user", "content": f"Frage {s}{i}?"}, {"role": "assistant", "content": "Ja."}]}
               for i in range(10)] for s in "abc"]
    write_jsonl(setup / "grouped.jsonl", [c for block in blocks for c in block])
    cfg = sft.SFTConfig(data=f"jsonl://{setup}/train.jsonl", val_data=f"jsonl://{setup}/grouped.jsonl",
                        val_conversations=6, identity_repeat=0)
    _, val = sft.load_sft_data(cfg, small_tokenizer, 1000, log=lambda *a: None)
    asked = [parse_conversation(small_tokenizer, ids)[0]["content"] for ids, _ in val]
    assert asked == ["Frage a0?", "Frage a5?", "Frage b0?", "Frage b5?", "Frage c0?", "Frage c5?"]
    assert sft.evenly_spaced(val, 3) == val[::2] and sft.evenly_spaced(val, 0) == sft.evenly_spaced(val, 9) == val


def test_resume_after_sigkill_equals_uninterrupted(setup):
    sft.main(args_for(setup, "a", "--save-every", "2"))
    sigkill_when_file_appears(REPO / "sft.py", args_for(setup, "b", "--save-every", "2"), setup / "b" / "ckpt_0000002.pt")
    assert common.latest_checkpoint(setup / "b").name in ("ckpt_0000002.pt", "ckpt_0000004.pt")
    proc = run_sft(args_for(setup, "b", "--save-every", "2", "--resume"))
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-1500:]
    a, b = (torch.load(common.latest_checkpoint(setup / d), weights_only=True) for d in ("a", "b"))
    assert a["step"] == b["step"] == 6
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_stop_rate_counts_answers_that_end_their_turn(tmp_path, small_tokenizer, monkeypatch):
    """Scripted models: one that ends every answer after two tokens, one that never does, one that
    ends only the answers to odd questions; the prompt is each conversation's first question."""
    import gpt
    model, tokenizer, _ = common.load_model(make_checkpoint(tmp_path, small_tokenizer))
    conversations = [render_conversation(tokenizer, c["messages"]) for c in fixture_conversations(6)]
    end = tokenizer.special["<|assistant_end|>"]
    prompts = []

    def script(ending):
        def sample(logits, *args, **kwargs):
            return torch.tensor([[end if ending(len(prompts)) else 7]])
        return sample

    def generate(self, prompt, *args, **kwargs):  # note each prompt, then sample as scripted
        prompts.append(prompt)
        yield from original(self, prompt, *args, **kwargs)
    original = gpt.GPT.generate
    monkeypatch.setattr(gpt.GPT, "generate", generate)
    monkeypatch.setattr(gpt, "sample_next_token", script(lambda n: True))
    assert sft.stop_rate(model, tokenizer, conversations) == (6, 6, 0)
    start = tokenizer.special["<|assistant_start|>"]
    assert all(p[-1] == start and p.count(start) == 1 for p in prompts)  # the first question only
    monkeypatch.setattr(gpt, "sample_next_token", script(lambda n: False))
    assert sft.stop_rate(model, tokenizer, conversations) == (0, 6, 0)
    monkeypatch.setattr(gpt, "sample_next_token", script(lambda n: n % 2 == 0))
    assert sft.stop_rate(model, tokenizer, conversations) == (3, 6, 0)
    # another special token (a new user turn, a new document) ends the answer too, but not its turn as it should
    other = tokenizer.special["<|user_start|>"]
    monkeypatch.setattr(gpt, "sample_next_token", lambda *args, **kwargs: torch.tensor([[other]]))
    assert sft.stop_rate(model, tokenizer, conversations) == (0, 6, 0)


def test_stop_rate_shows_a_model_that_answers_everything_with_its_name(tmp_path, small_tokenizer, monkeypatch):
    """Identity answers end, so a model that gives one to every question would pass the stop rate alone: the
    third count, answers that name nanoschnack though no question asked, shows it."""
    import gpt
    model, tokenizer, _ = common.load_model(make_checkpoint(tmp_path, small_tokenizer))
    conversations = [render_conversation(tokenizer, c["messages"]) for c in fixture_conversations(6)]
    name, other = tokenizer.encode(" Ich bin nanoschnack."), tokenizer.encode(" Hallo")
    answers = iter(range(1000))

    def generate(self, prompt, *args, **kwargs):
        yield from (name if next(answers) % 3 == 0 else other) + [tokenizer.special["<|assistant_end|>"]]
    monkeypatch.setattr(gpt.GPT, "generate", generate)
    assert sft.stop_rate(model, tokenizer, conversations) == (6, 6, 2)


def test_step_loss_is_the_mean_over_all_trained_tokens_of_the_step(tmp_path, small_tokenizer):
    """A micro-batch of long answers weighs as much per token as one of short answers: the loss (and its
    gradient) is the sum over the step's trained tokens divided by their count, not a mean of micro-batch means."""
    model, tokenizer, _ = common.load_model(make_checkpoint(tmp_path, small_tokenizer))
    model.train()
    short = [{"role": "user", "content": "Hallo?"}, {"role": "assistant", "content": "Ja."}]
    answer = " ".join(c["messages"][1]["content"] for c in fixture_conversations(3))
    long = [{"role": "user", "content": "Erzähl."}, {"role": "assistant", "content": answer}]
    convs = [render_conversation(tokenizer, m, 120) for m in (short, short, long)]
    micro = [sft.collate(convs[:2], tokenizer.bos_id), sft.collate(convs[2:], tokenizer.bos_id)]
    n_trained = sum(sum(mask[1:]) for _, mask in convs)
    assert sum(convs[2][1][1:]) > 5 * sum(convs[0][1][1:])  # very different micro-batches
    total = sum(model(x, y, loss_reduction="sum") for x, y in micro) / n_trained
    total.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    capture = GradCapture(model)
    loss = sft.sft_step(model, [capture], micro, n_trained, 1, 1.0, "cpu", torch.float32)
    assert loss == pytest.approx(total.item(), rel=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(capture.grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_validation_loss_is_the_mean_over_trained_tokens(tmp_path, small_tokenizer):
    """Padding and untrained (prompt) tokens do not count: conversations of different lengths in one batch
    give the per-token mean of each conversation's own trained tokens."""
    model, tokenizer, _ = common.load_model(make_checkpoint(tmp_path, small_tokenizer))
    convs = [render_conversation(tokenizer, c["messages"]) for c in fixture_conversations(5)]
    nats = count = 0.0
    with torch.no_grad():
        for conv in convs:  # one at a time: no padding
            x, y = sft.collate([conv], tokenizer.bos_id)
            nats += model(x, y, loss_reduction="sum").item()
            count += sum(conv[1][1:])
    got = sft.validation_loss(model, convs, 4, 0, 1, tokenizer.bos_id, "cpu")
    assert got == pytest.approx(nats / count, rel=1e-5)


def test_each_epoch_trains_in_its_own_order(setup, monkeypatch):
    """Step s of epoch e takes its examples from epoch_order(n, seed, e): a new permutation every epoch."""
    seen = []
    original = sft.step_batches

    def recording(conversations, order, step_in_epoch, *args):
        seen.append((list(order), step_in_epoch, len(conversations)))
        return original(conversations, order, step_in_epoch, *args)
    monkeypatch.setattr(sft, "step_batches", recording)
    sft.main(args_for(setup, "chat", "--identity-repeat", "0", "--max-steps", "12", "--eval-every", "0",
                      "--save-every", "0", "--identity-samples", "0", "--stop-rate-conversations", "0"))
    n = seen[0][2]
    assert n == 40 and len(seen) == 12  # 10 steps of 4 per epoch
    for step, (order, step_in_epoch, _) in enumerate(seen):
        epoch, expected_step = divmod(step, n // 4)
        assert step_in_epoch == expected_step and order == sft.epoch_order(n, 1337, epoch), step


def test_learning_rates_are_scaled_by_init_lr_frac(setup):
    sft.main(args_for(setup, "chat", "--max-steps", "1", "--eval-every", "0", "--identity-samples", "0",
                      "--stop-rate-conversations", "0", "--init-lr-frac", "0.25"))
    model, _, ckpt = common.load_model(setup / "chat")
    cfg = sft.SFTConfig(**{k: v for k, v in ckpt["train_config"].items()})
    fresh = optim.build_optimizers(model, cfg)
    for opt, saved in zip(fresh, ckpt["optimizers"]):
        for group, saved_group in zip(opt.param_groups, saved["param_groups"]):
            assert saved_group["initial_lr"] == pytest.approx(0.25 * group["initial_lr"])
            assert saved_group["lr"] == pytest.approx(0.25 * group["initial_lr"])  # lr_mult 1.0 at the first step


def test_resume_refuses_another_examples_per_step(setup):
    sft.main(args_for(setup, "c", "--stop-after-steps", "1", "--identity-samples", "0"))
    with pytest.raises(SystemExit, match=r"trained with other --examples-per-step \(4, now 8\)"):
        sft.main(args_for(setup, "c", "--resume", "--examples-per-step", "8"))


def test_resume_refuses_changed_learning_rates(setup):
    """The optimizers' saved state holds the learning rates these gave, so a resumed run would train with the old
    ones and record the new ones: refused, naming each flag."""
    sft.main(args_for(setup, "c", "--stop-after-steps", "1", "--identity-samples", "0"))
    with pytest.raises(SystemExit, match=r"trained with other --matrix-lr \(0.02, now 0.3\), --init-lr-frac "
                                         r"\(0.2, now 0.9\); resume with the same settings"):
        sft.main(args_for(setup, "c", "--resume", "--init-lr-frac", "0.9", "--matrix-lr", "0.3"))


def test_resume_refuses_a_base_it_did_not_start_from(setup, small_tokenizer):
    """--base a folder whose newest checkpoint is now another (pretraining went on), or a base with another
    tokenizer of the same size, would train the chat run on from another model's ids and text stream and record
    that base: refused, naming the base it started from, which resumes exactly."""
    sft.main(args_for(setup, "a"))
    sft.main(args_for(setup, "b", "--stop-after-steps", "3"))
    started = common.latest_checkpoint(setup / "base")
    newer = torch.load(started, weights_only=True)
    newer.update(step=2, tokens=1024, train_seconds=9.5)
    torch.save(newer, setup / "base" / "ckpt_0000002.pt")
    with pytest.raises(SystemExit, match=rf"was fine-tuned from {started}, but --base {setup / 'base'} now gives "
                                         rf".*ckpt_0000002.pt \(step 1 -> 2, tokens 0 -> 1024, train_seconds None "
                                         rf"-> 9.5\); resume with --base {started}"):
        sft.main(args_for(setup, "b", "--resume"))
    lines = [l for l in FIXTURE_TEXT.read_text(encoding="utf-8").splitlines() if l.strip()]
    other = tok.Tokenizer.train(lines * 3 + ["Quatsch Quark Quitte"] * 9, vocab_size=small_tokenizer.vocab_size,
                                show_progress=False)  # conftest's with a few merges of its own
    assert other.vocab_size == small_tokenizer.vocab_size and other.to_json() != small_tokenizer.to_json()
    make_checkpoint(setup / "other", other, kind="base", sequence_len=64, n_embd=32)
    with pytest.raises(SystemExit, match=r"now gives .*other.*ckpt_0000001.pt \(another tokenizer\)"):
        sft.main(args_for(setup, "b", "--resume", "--base", str(setup / "other")))
    sft.main(args_for(setup, "b", "--resume", "--base", str(started)))  # the base it started from: exact
    a, b = (torch.load(common.latest_checkpoint(setup / d), weights_only=True) for d in ("a", "b"))
    assert a["step"] == b["step"] == 6 and b["base_path"] == str(started.resolve())
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
    _, tokenizer, chat = common.load_model(setup / "b")
    assert evaluation.chat_base(chat, tokenizer, "cpu", print) is not None  # evaluation.py knows it as its base
    assert (setup / "b" / b["base_relative"]).resolve() == started.resolve()  # and finds it when the run moves


def test_a_fractional_weight_keeps_a_prefix_of_the_conversations(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", fixture_conversations(10))
    load = lambda spec: chatdata.load_conversations(data.parse_specs(spec), small_tokenizer, 1000, log=lambda *a: None)
    once = load(f"jsonl://{path}")
    assert load(f"jsonl://{path}?weight=0.5") == once[:5]
    assert load(f"jsonl://{path}?weight=1.3") == once + once[:3]


def test_dolly_context_goes_into_the_question():
    messages = chatdata.to_messages({"instruction": "Fasse zusammen.", "context": "Die Elbe fließt.",
                                     "response": "Ein Fluss.", "category": "summarization"})
    assert messages[0]["content"] == "Fasse zusammen.\n\nDie Elbe fließt."


def test_resuming_a_finished_time_budget_run_trains_nothing(setup):
    """As train.py's: a run whose budget is spent, resumed, trains no step."""
    flags = ("--time-budget", "0.01", "--max-steps", "0", "--eval-every", "0", "--save-every", "0",
             "--identity-samples", "0", "--stop-rate-conversations", "0")
    sft.main(args_for(setup, "budget", *flags))
    first = common.load_checkpoint(common.latest_checkpoint(setup / "budget"))
    sft.main(args_for(setup, "budget", *flags, "--resume"))
    assert common.load_checkpoint(common.latest_checkpoint(setup / "budget"))["step"] == first["step"]


def test_a_resumed_time_budget_counts_the_earlier_sessions(setup):
    """As train.py's: the resumed session's clock starts at the checkpoint's train_seconds (its learning rate goes
    on where the budget stood), and its own checkpoint adds this session's seconds to them."""
    flags = ("--time-budget", "1", "--max-steps", "0", "--eval-every", "0", "--save-every", "0", "--identity-samples",
             "0", "--stop-rate-conversations", "0", "--stop-after-steps", "1", "--log-every", "1")
    sft.main(args_for(setup, "budget", *flags))
    path = common.latest_checkpoint(setup / "budget")
    ckpt = torch.load(path, weights_only=True)
    ckpt["train_seconds"] = 45.0  # as if the earlier sessions had used 45 of the 60 seconds
    torch.save(ckpt, path)
    sft.main(args_for(setup, "budget", *flags, "--resume"))
    resumed = json.loads((setup / "budget" / "log.jsonl").read_text().splitlines()[-1])
    assert resumed["step"] == 2 and resumed["lr_mult"] <= optim.lr_multiplier(45 / 60, 0.5, 0.0) < 1
    assert common.load_checkpoint(common.latest_checkpoint(setup / "budget"))["train_seconds"] >= 45.0


# --- from a mutation audit of chatdata.py ----------------------------------------------

@pytest.mark.parametrize("user, assistant", [("human", "gpt"), ("prompter", "bot"), ("user", "model")])
def test_every_role_name_of_the_common_shapes_is_mapped(user, assistant):
    row = {"conversations": [{"from": user, "value": "Hallo"}, {"from": assistant, "value": "Hi"}]}
    assert chatdata.to_messages(row) == [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Hi"}]


def test_a_blank_input_adds_nothing_to_the_question():
    messages = chatdata.to_messages({"instruction": "Hallo", "input": " \n", "output": "Hi"})
    assert messages[0] == {"role": "user", "content": "Hallo"}


def test_rejections_are_grouped_by_reason_whatever_the_message_number(tmp_path, small_tokenizer):
    def empty_after(turns):  # message `2 * turns` has empty content
        return {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * turns
                + [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}
    robot = {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}
    path = write_jsonl(tmp_path / "r.jsonl", fixture_conversations(2) + [robot, empty_after(0), empty_after(1),
                                                                           empty_after(2)])
    lines, stats = [], {}
    got = chatdata.load_conversations(data.parse_specs(f"jsonl://{path}"), small_tokenizer, 1000, log=lines.append,
                                      stats=stats)
    assert len(got) == 2 and stats == dict(read=6, rejected=4, cut=0)
    assert lines[0] == "rejected 4 of 6 conversations:"
    assert lines[1] == f"        3 x message N (user) has empty content (e.g. {path}:4)"  # the most common first
    assert lines[2].startswith("        1 x message N has unknown role 'robot'") and lines[2].endswith(f"{path}:3)")
    assert len(lines) == 3


def test_stats_count_the_conversations_cut_to_the_context(tmp_path, small_tokenizer):
    long_answer = "Das ist ein sehr langer Satz über die Elbe. " * 20
    rows = [{"messages": [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Guten Tag."},
                          {"role": "user", "content": "Erzähl"}, {"role": "assistant", "content": long_answer}]},
            {"messages": [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Guten Tag."}]}]
    stats = {}
    got = chatdata.load_conversations(data.parse_specs(f"jsonl://{write_jsonl(tmp_path / 'a.jsonl', rows)}"),
                                      small_tokenizer, 32, log=lambda *a: None, stats=stats, answer_chars=10_000)
    assert len(got) == 2 and stats == dict(read=2, rejected=0, cut=1)


def test_sigterm_saves_then_exits_143(setup, monkeypatch, capfd):
    """A SIGTERM (a scheduler, `kill`) stops SFT after the step with a checkpoint, then exits 128 + 15: exit 0 let
    a script go on to the evaluation of a half-trained chat model."""
    check = common.StopSignal.reason

    def reason(self, *args):  # the signal arrives in the first step
        if not hasattr(reason, "sent"):
            reason.sent = True
            signal.raise_signal(signal.SIGTERM)
        return check(self, *args)

    monkeypatch.setattr(common.StopSignal, "reason", reason)
    with signal_handlers_kept(), pytest.raises(SystemExit) as stopped:
        sft.main(args_for(setup, "c", "--eval-every", "0"))
    assert stopped.value.code == 143
    said = capfd.readouterr()
    assert "SIGTERM: stopping after this step, with a checkpoint to --resume from\n" in said.err
    assert "stopped at step 1 (signal); continue with --resume" in said.out
    assert common.latest_checkpoint(setup / "c").name == "ckpt_0000001.pt"


@pytest.mark.parametrize("opener", ["gzip", "bz2", "lzma"])
def test_compressed_jsonl_is_read_like_pretraining_data(tmp_path, small_tokenizer, opener):
    """conversations.jsonl.gz (.bz2, .xz) is read decompressed, as jsonl:// pretraining files are."""
    rows = fixture_conversations(6)
    plain = write_jsonl(tmp_path / "c.jsonl", rows)
    packed = tmp_path / ("c.jsonl." + {"gzip": "gz", "bz2": "bz2", "lzma": "xz"}[opener])
    packed.write_bytes(__import__(opener).compress(plain.read_bytes()))
    load = lambda path: chatdata.load_conversations(data.parse_specs(f"jsonl://{path}"), small_tokenizer, 1000)
    assert load(packed) == load(plain) and len(load(plain)) == 6


def test_a_bad_byte_is_named_with_its_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(json.dumps(fixture_conversations(1)[0]).encode() + b"\n" + '{"messages": "Grüße"}\n'.encode("latin1"))
    with pytest.raises(data.DataError, match=r"s\.jsonl is not valid UTF-8 \(invalid start byte, line 2\)"):
        list(data.iter_rows(data.parse_spec(f"jsonl://{path}")))
