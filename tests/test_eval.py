"""Tests for evaluation.py: bits per byte, multiple choice, task rows, the report card, the CLI."""
import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import evaluation as ev
import gpt
import tok
import train
import common
import report
from conftest import FIXTURE_TEXT, make_checkpoint, torchrun

REPO = Path(__file__).resolve().parents[1]
LINES = [l for l in FIXTURE_TEXT.read_text(encoding="utf-8").splitlines() if l.strip()]


def random_gpt(tokenizer, seq_len=8, seed=0):
    """A tiny GPT with random weights (not init_weights' zeros, so the logits depend on the input)."""
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(sequence_len=seq_len, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2,
                                  n_kv_head=1, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.shape[0] == tokenizer.vocab_size else 0.1)
    return model.eval()


class LogitsStub(torch.nn.Module):
    """A 'model' whose next-token logits are a fixed vector, whatever the input."""

    def __init__(self, logits, seq_len=64):
        super().__init__()
        self.logits, self.config = logits, SimpleNamespace(sequence_len=seq_len)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        return self.logits.expand(*idx.shape, -1).clone()


# --- bits per byte -------------------------------------------------------------------

def test_bpb_equals_hand_computation(small_tokenizer):
    tk, T = small_tokenizer, 8
    model = random_gpt(tk, seq_len=T)
    texts = LINES[:3] + [LINES[3] + " " + LINES[4]]  # the last one needs several windows of 8
    assert len(tk.encode(texts[-1])) > 2 * T
    result = ev.text_bpb(model, tk, iter(texts), "cpu", batch_size=3)

    nats = n_bytes = n_tokens = 0
    for doc in texts:  # token by token: each predicted once, from the start of its window of T
        ids = [tk.bos_id] + tk.encode(doc)
        for j in range(1, len(ids)):
            start = (j - 1) // T * T
            with torch.no_grad():
                logits = model(torch.tensor([ids[start:j]]))[0, -1]
            logp = torch.log_softmax(logits.double(), dim=-1)[ids[j]].item()
            nats -= logp if tk.token_bytes[ids[j]] > 0 else 0
            n_bytes += int(tk.token_bytes[ids[j]])
            n_tokens += 1
    assert result["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert result["bytes"] == n_bytes == sum(len(tk.normalize(t).encode()) for t in texts)
    assert result["tokens"] == n_tokens and result["documents"] == len(texts)
    assert ev.text_bpb(model, tk, iter(texts), "cpu", limit=2)["documents"] == 2


def test_max_bytes_takes_the_first_documents_and_cuts_the_last_at_a_character(small_tokenizer):
    texts = ["Straße", "Grüße aus Köln", "noch einer"]  # 7, 17 and 10 bytes of UTF-8
    assert list(ev.first_bytes(iter(texts), 0)) == texts
    assert list(ev.first_bytes(iter(texts), 24)) == ["Straße", "Grüße aus Köln"]
    assert list(ev.first_bytes(iter(texts), 10)) == ["Straße", "Gr"]  # "ü" would need bytes 10 and 11
    model = random_gpt(small_tokenizer, seq_len=8)
    result = ev.text_bpb(model, small_tokenizer, iter(texts), "cpu", max_bytes=12)
    assert result["documents"] == 2 and result["bytes"] == len("Straße".encode()) + len("Grü".encode())


def test_evaluate_bpb_excludes_special_tokens_and_padding(small_tokenizer):
    tk = small_tokenizer
    model = random_gpt(tk, seq_len=16)
    ids = [tk.bos_id] + tk.encode("Guten Morgen!") + [tk.bos_id] + tk.encode("Wie geht's?")
    inputs, targets = torch.tensor([ids[:-1] + [0, 0]]), torch.tensor([ids[1:] + [-1, -1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs)[0].double(), dim=-1)
    keep = [j for j, t in enumerate(ids[1:]) if t != tk.bos_id]
    expected = -sum(logp[j, ids[j + 1]].item() for j in keep) / (math.log(2) * sum(tk.token_bytes[ids[1:]]))
    assert ev.evaluate_bpb(model, [(inputs, targets)], torch.tensor(tk.token_bytes), "cpu") == pytest.approx(expected)


# --- multiple choice -----------------------------------------------------------------

def test_mc_picks_the_planted_answer_when_the_logits_force_it(small_tokenizer):
    tk = small_tokenizer
    right = " Die Lehrerin"
    favoured = set(tk.encode(right))
    logits = torch.zeros(tk.vocab_size)
    logits[list(favoured)] = 10.0  # the model 'knows' only the right answer's tokens
    wrong = [w for w in (" Paket", " Sommer", " Preis", " Oktober", " Etikett", " Haus")
             if not favoured & set(tk.encode(w))]
    rng = random.Random(0)
    examples = []
    for _ in range(20):
        choices = rng.sample(wrong, 3)
        label = rng.randrange(4)
        choices.insert(label, right)
        examples.append(dict(context="Wer rief überrascht?", choices=choices, label=label))
    r = ev.evaluate_task(LogitsStub(logits), tk, examples, "cpu", batch_size=6)
    assert r == dict(examples=20, acc=1.0, acc_norm=1.0, random=0.25)


def test_mc_is_at_chance_level_on_a_random_model(small_tokenizer):
    tk = small_tokenizer
    model = random_gpt(tk, seq_len=64)
    words = sorted({w for line in LINES for w in line.split()})
    rng = random.Random(1)
    examples = [dict(context=rng.choice(LINES), choices=[" " + w for w in rng.sample(words, 4)], label=rng.randrange(4))
                for _ in range(400)]
    r = ev.evaluate_task(model, tk, examples, "cpu", batch_size=32)
    assert r["examples"] == 400 and r["random"] == pytest.approx(0.25)
    assert abs(r["acc"] - 0.25) < 0.08 and abs(r["acc_norm"] - 0.25) < 0.08, r


def test_scores_are_token_log_probs_and_acc_norm_divides_by_characters(small_tokenizer):
    tk = small_tokenizer
    uniform = LogitsStub(torch.zeros(tk.vocab_size))  # every token: log p = -ln V
    choices = [" Straße", " xyzqvw", " Haus"]
    n_tokens = [len(tk.encode(c)) for c in choices]
    rows = ev.choice_rows(tk, dict(context="Das ist die", choices=choices, label=0), seq_len=64)
    sums, _ = ev.continuation_scores(uniform, rows, "cpu")
    assert sums == pytest.approx([-n * math.log(tk.vocab_size) for n in n_tokens])
    by_sum = ev.argmax([-n for n in n_tokens])
    by_char = ev.argmax([-n / len(c) for n, c in zip(n_tokens, choices)])
    assert by_sum != by_char  # the fixture makes the two rules disagree
    r = ev.evaluate_task(uniform, tk, [dict(context="Das ist die", choices=choices, label=by_sum)], "cpu")
    assert (r["acc"], r["acc_norm"]) == (1.0, 0.0)


def test_lambada_counts_greedy_last_words(small_tokenizer):
    tk = small_tokenizer
    word = next(w for w in (" die", " der", " und", " in") if len(tk.encode(w)) == 1)
    logits = torch.zeros(tk.vocab_size)
    logits[tk.encode(word)[0]] = 5.0  # the stub always predicts this word
    examples = [dict(context="Wir wohnen hier", choices=[word], label=0),
                dict(context="Wir wohnen hier", choices=[" Zelt"], label=0)]
    r = ev.evaluate_task(LogitsStub(logits), tk, examples, "cpu", kind="greedy")
    assert r == dict(examples=2, acc=0.5, acc_norm=None, random=0.0)


def test_long_contexts_are_cut_from_the_left(small_tokenizer):
    rows = ev.choice_rows(small_tokenizer, dict(context=" ".join(LINES), choices=[" Ja", " Nein"], label=0), seq_len=16)
    assert all(len(ids) == 17 and ids[-n:] == small_tokenizer.encode(c) for (ids, n), c in zip(rows, [" Ja", " Nein"]))


# --- task rows -----------------------------------------------------------------------

def test_hub_rows_map_to_examples_with_german_prompts():
    hellaswag = dict(ind=1, activity_label="Kuchen backen", ctx_a="Eine Frau steht in der Küche.", ctx_b="sie",
                     ctx="...", endings=["holt Mehl.", "singt. [title] Lied", "schläft.", "fährt Rad."],
                     source_id="x", split="val", split_type="indomain", label="1")
    assert ev.hellaswag_example(hellaswag) == dict(
        context="Kuchen backen: Eine Frau steht in der Küche. Sie",
        choices=[" holt Mehl.", " singt.. Lied", " schläft.", " fährt Rad."], label=1, delimiter=" ")
    assert ev.hellaswag_example({**hellaswag, "label": ""}) is None  # the test split has no labels

    arc = dict(id="Mercury_1", instruction="Welche Farbe hat der Himmel?", option_a="Grün", option_b="Blau",
               option_c="Rot", option_d="Gelb", option_e="None", answer="B")
    assert ev.arc_example(arc) == dict(context="Frage: Welche Farbe hat der Himmel?\nAntwort:",
                                       choices=[" Grün", " Blau", " Rot", " Gelb"], label=1, delimiter=" ")

    mmlu = {"Unnamed: 0": 0, "Question": "Was ist 2 + 2?", "A": "3", "B": "4", "C": "5", "D": "22",
            "Answer": "B", "Subject": "elementary_mathematics"}
    assert ev.mmlu_example(mmlu) == dict(context="Frage: Was ist 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAntwort:",
                                         choices=[" A", " B", " C", " D"], label=1, delimiter=" ")

    lambada = dict(text="Er öffnete die Tür und sah seinen alten Freund Peter")
    assert ev.lambada_example(lambada) == dict(context="Er öffnete die Tür und sah seinen alten Freund",
                                               choices=[" Peter"], label=0, delimiter=" ")
    assert {n: t.kind for n, t in ev.HUB_TASKS.items()} == dict(hellaswag="choice", arc="choice", mmlu="choice",
                                                                  lambada="greedy")
    assert all(t.on_hub for t in ev.HUB_TASKS.values())


NAN = float("nan")
HELLASWAG = dict(activity_label="Kochen", ctx_a="Er schneidet Zwiebeln.", ctx_b="dann", endings=["weint.", "lacht."],
                 label="0")
ARC = dict(instruction="Was ist nass?", option_a="Wasser", option_b="Sand", option_c=None, option_d=NAN,
           option_e="None", answer="A")
MMLU = {"Question": "Was ist 2 + 2?", "A": "3", "B": "4", "C": "5", "D": "22", "Answer": "B", "Subject": "math"}
LAMBADA = dict(text="Sie rief ihren Hund Bello")


@pytest.mark.parametrize("function, good, bad, text_field", [
    (ev.hellaswag_example, HELLASWAG, [{"ctx_a": None}, {"ctx_b": NAN}, {"activity_label": 3}, {"endings": None},
                                       {"endings": ["weint.", NAN]}, {"label": NAN}, {"label": "7"}, {"label": None}],
     "ctx_a"),
    (ev.arc_example, ARC, [{"instruction": None}, {"instruction": NAN}, {"option_a": 4}, {"answer": NAN},
                           {"answer": "C"}, {"option_b": None}], "instruction"),
    (ev.mmlu_example, MMLU, [{"Question": NAN}, {"A": NAN}, {"C": None}, {"D": 22}, {"Answer": NAN}, {"Answer": "E"}],
     "B"),
    (ev.lambada_example, LAMBADA, [{"text": None}, {"text": NAN}, {"text": 12}, {"text": "Einwort"}], "text"),
])
def test_hub_rows_with_missing_or_non_string_fields_are_skip_rows(function, good, bad, text_field):
    assert function(good)["choices"]  # the good row is an example
    for change in bad:
        with pytest.raises(ev.SkipRow):
            function({**good, **change})
    with pytest.raises(ev.SkipRow, match=f"field '{text_field}' is missing, not a string"):
        function({k: v for k, v in good.items() if k != text_field})
    with pytest.raises(ev.SkipRow, match=f"field '{text_field}' is NaN, not a string"):
        function({**good, text_field: NAN})
    with pytest.raises(ev.SkipRow, match=f"field '{text_field}' is of type int \\(5\\), not a string"):
        function({**good, text_field: 5})


def test_arc_options_that_are_none_nan_or_empty_are_absent():
    assert ev.arc_example(ARC)["choices"] == [" Wasser", " Sand"]
    assert ev.arc_example({**ARC, "option_c": "", "option_d": "Luft", "answer": "D"})["label"] == 2


def test_rows_of_hub_sets_with_bad_fields_are_skipped_and_counted(tmp_path):
    # as a downloaded copy (the hub is off in the tests): the same row functions, through load_examples;
    # JSON's NaN and null stand for what MMMLU's CSV gives for "None" and "NA"
    rows = [MMLU, {**MMLU, "A": NAN}, {**MMLU, "Question": None}, {**MMLU, "C": 5}, {**MMLU, "Answer": "B"},
            {k: v for k, v in MMLU.items() if k != "D"}]
    messages = []
    task = ev.make_task("mmlu", f"jsonl://{write_jsonl(tmp_path / 'mmlu.jsonl', rows)}")
    examples = ev.load_examples(task, log=messages.append)
    assert examples == [ev.mmlu_example(MMLU)] * 2 and examples.skipped == 4
    assert messages == [f"mmlu: skipped 4 of 6 rows that are no usable example (the first: {tmp_path}/mmlu.jsonl:2: "
                        f"field 'A' is NaN, not a string)"]
    sample = ev.load_examples(task, limit=1, log=messages.append)
    assert len(sample) == 1 and sample.skipped == 4

    pq.write_table(pa.table({"text": ["Sie rief ihren Hund Bello", None, "Er trank seinen Kaffee schwarz"]}),
                   tmp_path / "lambada.parquet")
    lambada = ev.load_examples(ev.make_task("lambada", f"parquet://{tmp_path}/lambada.parquet"), log=None)
    assert [e["choices"] for e in lambada] == [[" Bello"], [" schwarz"]] and lambada.skipped == 1

    write_jsonl(tmp_path / "none.jsonl", [{**MMLU, "Answer": NAN}] * 3)
    with pytest.raises(ev.DataError, match=r"no examples for task mmlu \(all 3 rows skipped; the first: .*none.jsonl:1: "
                                           r"field 'Answer' is NaN"):
        ev.load_examples(ev.make_task("mmlu", f"jsonl://{tmp_path}/none.jsonl"))


def test_skipped_rows_are_reported_once_by_default(tmp_path, capsys):
    task = ev.make_task("lambada", f"jsonl://{write_jsonl(tmp_path / 'l.jsonl', [LAMBADA, {'text': None}])}")
    assert len(ev.load_examples(task)) == 1
    assert capsys.readouterr().err.count("warning: lambada: skipped 1 of 2 rows") == 1


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


QUIZ = [dict(context="Die Hauptstadt von Deutschland ist", choices=["Berlin", "Bern", "Wien"], label=0),
        dict(context="2 + 2 =\n", choices=["4", " 5"], label=0),
        dict(context="Der Rhein fließt in die", choices=["Nordsee", "Ostsee"], label=0)] * 4


def test_local_jsonl_tasks(tmp_path):
    task = ev.parse_task_list(f"quiz=jsonl://{write_jsonl(tmp_path / 'q.jsonl', QUIZ)}")[0]
    assert (task.name, task.kind, task.on_hub) == ("quiz", "choice", False)
    examples = ev.load_examples(task)
    assert examples[0] == dict(context="Die Hauptstadt von Deutschland ist", choices=[" Berlin", " Bern", " Wien"],
                               label=0, delimiter=" ")
    assert examples[1]["choices"] == ["4", " 5"]  # after a newline, and a choice's own space, nothing is added
    sample = ev.load_examples(task, limit=5)
    assert len(sample) == 5 and sample == ev.load_examples(task, limit=5)

    # a downloaded copy of a hub set, named like the hub task, is read with that task's columns
    arc = dict(instruction="Was ist nass?", option_a="Wasser", option_b="Sand", answer="A")
    arc_task = ev.make_task("arc", f"jsonl://{write_jsonl(tmp_path / 'arc.jsonl', [arc])}")
    assert ev.load_examples(arc_task)[0]["choices"] == [" Wasser", " Sand"]

    write_jsonl(tmp_path / "bad.jsonl", QUIZ[:2] + [dict(context="x", choices=["a", "b"], label=2)])
    with pytest.raises(ev.DataError, match=r"bad.jsonl:3: .*label"):
        ev.load_examples(ev.make_task("bad", f"jsonl://{tmp_path}/bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"context": "x", \n')
    with pytest.raises(ev.DataError, match=r"broken.jsonl:1: not a JSON object"):
        ev.load_examples(ev.make_task("broken", f"jsonl://{tmp_path}/broken.jsonl"))
    with pytest.raises(ev.DataError, match="unknown task 'nope'"):
        ev.parse_task_list("nope")


# --- the report card -----------------------------------------------------------------

def test_report_card_keeps_order_and_is_rebuilt_idempotently(tmp_path):
    path = tmp_path / "report.md"
    writes = [("Evaluation (base)", "e-base"), ("Custom", "c"), ("Tokenizer", "t"),
              ("Chat samples", report.format_samples([("Hallo?", "## keine Überschrift\n<!-- section: SFT -->")])),
              ("Pretraining", report.markdown_table(["", ""], [["parameters", 1234567], ["bpb", 1.23456], ["x", None]])),
              ("Evaluation (chat)", "e-chat")]
    for title, body in writes:
        report.update_report(path, title, body)
    card = path.read_text()
    assert list(report.read_report(path)) == ["Tokenizer", "Pretraining", "Evaluation (base)", "Evaluation (chat)",
                                          "Chat samples", "Custom"]
    assert "| parameters | 1,234,567 |" in card and "| bpb | 1.2346 |" in card and "| x | – |" in card
    assert "> ## keine Überschrift" in card  # model output stays quoted

    for title, body in writes:  # every stage once more: the same card
        report.update_report(path, title, body)
    assert path.read_text() == card
    other = tmp_path / "other.md"
    for title, body in reversed(writes):  # written in any order: the same card
        report.update_report(other, title, body)
    assert other.read_text() == card

    report.update_report(path, "Pretraining", "p2")  # re-running a stage replaces only its section
    sections = report.read_report(path)
    assert sections["Pretraining"] == "p2" and sections["Tokenizer"] == "t" and len(sections) == 6
    assert card.count("## Pretraining") == 1 and not list(tmp_path.glob("*.tmp"))
    assert report.report_path("out/base") == report.report_path("out/tokenizer") == Path("out/report.md").resolve()


def write_sections(path, titles, barrier):
    barrier.wait()
    for title in titles:
        report.update_report(path, title, f"body of {title}")


def test_stages_that_end_together_keep_each_others_sections(tmp_path):
    """Four processes write their sections into one card at once (evaluation.py on two models, one GPU each): it
    held every section only by luck (one shared temporary file, read-change-write unlocked): in 200 rounds of
    two writers, a lost section, a mixed card, and 29 writers told to free disk space."""
    ctx = multiprocessing.get_context("fork")
    for round in range(10):
        path = tmp_path / f"r{round}" / "report.md"
        barrier = ctx.Barrier(4)
        titles = [[f"Evaluation (p{i}-{j})" for j in range(5)] for i in range(4)]
        writers = [ctx.Process(target=write_sections, args=(path, mine, barrier)) for mine in titles]
        for w in writers:
            w.start()
        for w in writers:
            w.join(60)
        assert [w.exitcode for w in writers] == [0] * 4, round
        assert sorted(report.read_report(path)) == sorted(sum(titles, [])), round
        assert [p.name for p in path.parent.iterdir()] == ["report.md"]  # no temporary file left behind


def test_a_card_that_is_not_utf8_is_kept_aside_and_a_new_one_begun(tmp_path, capsys):
    """A card saved by a Latin-1 editor ended every stage with a UnicodeDecodeError traceback (after its work)."""
    path = tmp_path / "report.md"
    path.write_bytes("# meine Notiz: Größe\n".encode("latin-1"))
    report.update_report(path, "Tokenizer", "t")
    assert report.read_report(path) == {"Tokenizer": "t"}
    assert (tmp_path / "report.md.damaged").read_bytes() == "# meine Notiz: Größe\n".encode("latin-1")
    assert "is not UTF-8 text" in capsys.readouterr().err


# --- the command line ----------------------------------------------------------------

@pytest.fixture
def files(tmp_path, small_tokenizer):
    ckpt = make_checkpoint(tmp_path / "chat", small_tokenizer, kind="chat", sequence_len=16)
    text = tmp_path / "dev.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    return SimpleNamespace(ckpt=ckpt, text=text, quiz=quiz, root=tmp_path)


def cli_args(f, *extra):
    return ["--checkpoint", str(f.root / "chat"), "--tasks", "bpb", "--bpb-data", f"txt://{f.text}?per=line",
            "--task-file", f"quiz=jsonl://{f.quiz}", "--device", "cpu", "--batch-size", "4", *extra]


def test_cli_evaluates_and_writes_the_report_card(files, small_tokenizer, capsys):
    results = ev.main(cli_args(files, "--json", str(files.root / "r.json")))
    assert [r["task"] for r in results] == ["bpb", "quiz"]
    model, tk, _ = common.load_model(files.root / "chat")
    expected = ev.text_bpb(model, tk, iter(LINES), "cpu")
    assert results[0]["bpb"] == pytest.approx(expected["bpb"]) and results[0]["documents"] == len(LINES)
    assert results[1]["examples"] == 12 and results[1]["random"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert json.loads((files.root / "r.json").read_text()) == results
    card = (files.root / "report.md").read_text()
    assert "## Evaluation (chat)" in card and "| quiz | 12 |" in card and "ckpt_0000001.pt" in card
    ev.main(cli_args(files))
    assert (files.root / "report.md").read_text() == card  # re-running replaces the section with the same one
    assert "bits per byte" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(files, capsys):
    with pytest.raises(SystemExit) as e:  # the hub is switched off in the tests
        ev.main(["--checkpoint", str(files.root / "chat"), "--tasks", "hellaswag"])
    assert str(e.value).startswith("error:") and "--local-only" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="error: nothing to evaluate"):
        ev.main(["--checkpoint", str(files.root / "chat"), "--local-only"])
    with pytest.raises(SystemExit, match="error: unknown task 'foo'"):
        ev.main(cli_args(files, "--tasks", "foo"))
    with pytest.raises(SystemExit, match="file not found"):
        ev.main(cli_args(files, "--bpb-data", f"txt://{files.root}/none.txt"))
    (files.root / "blank.txt").write_text("\n \n\n")  # no byte to measure on: its bpb was 0 / 1 = 0.0000
    with pytest.raises(SystemExit, match=r"error: no text in txt://.*blank\.txt\?per=line to measure bits per byte"):
        ev.main(cli_args(files, "--bpb-data", f"txt://{files.root}/blank.txt?per=line"))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        ev.main(cli_args(files, "--checkpoint", str(files.root / "none")))
    for flag, value in [("--batch-size", "0"), ("--limit", "-1"), ("--max-bytes", "-10")]:
        with pytest.raises(SystemExit):
            ev.main(cli_args(files, flag, value))
        assert "--batch-size at least 1" in capsys.readouterr().err


def test_two_ranks_give_the_numbers_of_one_process(files):
    one = ev.main(cli_args(files, "--no-report"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "evaluation.py"), *cli_args(files, "--no-report", "--json", str(files.root / "two.json"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((files.root / "two.json").read_text())
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and {k: v for k, v in a.items() if k != "bpb"} == \
            {k: v for k, v in b.items() if k != "bpb"}
        if "bpb" in a:
            assert a["bpb"] == pytest.approx(b["bpb"], rel=1e-6)


# --- the stages' sections ------------------------------------------------------------

def test_tokenizer_and_pretraining_write_their_sections(tmp_path, small_tokenizer_dir):
    pq.write_table(pa.table({"text": [" ".join(LINES[i:] + LINES[:i]) for i in range(len(LINES))] * 4}),
                   tmp_path / "train.parquet")
    tok.main(["--data", f"parquet://{tmp_path}/train.parquet", "--vocab-size", "320", "--out", str(tmp_path / "tok")])
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    train.main(["--preset", "nano", "--tokenizer", str(tmp_path / "tok"), "--data", f"parquet://{tmp_path}/train.parquet",
                "--val-data", f"parquet://{tmp_path}/train.parquet", "--out", str(tmp_path / "base"),
                "--max-steps", "4", "--eval-every", "2", "--save-every", "0", "--eval-tasks", f"quiz=jsonl://{quiz}"])
    sections = report.read_report(tmp_path / "report.md")
    assert list(sections) == ["Tokenizer", "Pretraining"]
    assert "320 tokens" in sections["Tokenizer"] and "bytes/token" in sections["Tokenizer"]
    pre = sections["Pretraining"]
    for row in ("| parameters |", "| tokens | 2,048 |", "| steps | 4 of 4 |", "| MFU | n/a on CPU |",
                "| final val bpb |", "(step 4)", "| quiz | 12 |"):
        assert row in pre, (row, pre)
    records = [json.loads(l) for l in (tmp_path / "base" / "log.jsonl").read_text().splitlines()]
    assert [set(r.get("evals", {})) for r in records] == [set(), {"quiz"}, set(), {"quiz"}]
    with pytest.raises(SystemExit, match="error: unknown task"):
        train.main(["--preset", "nano", "--tokenizer", str(tmp_path / "tok"), "--eval-tasks", "nope",
                    "--data", f"parquet://{tmp_path}/train.parquet", "--out", str(tmp_path / "x")])


# --- from a mutation audit of evaluation.py --------------------------------------------

def test_a_choice_longer_than_the_window_is_scored_on_every_token_that_fits(small_tokenizer):
    tk = small_tokenizer
    choice = " " + " ".join(LINES[:2])  # far more than 8 tokens
    [(ids, n)] = ev.choice_rows(tk, dict(context="Er sagte", choices=[choice], label=0), seq_len=8)
    assert len(ids) == 9 and n == 8 and ids == tk.encode(choice)[-9:]  # every prediction is of a choice token
    sums, _ = ev.continuation_scores(LogitsStub(torch.zeros(tk.vocab_size)), [(ids, n)], "cpu")
    assert sums == pytest.approx([-8 * math.log(tk.vocab_size)])


def test_lambada_needs_every_token_of_the_word(small_tokenizer):
    tk = small_tokenizer
    word = next(w for w in (" Tür", " Ei", " Zelt") if len(set(tk.encode(w))) >= 2)
    logits = torch.zeros(tk.vocab_size)
    logits[tk.encode(word)[0]] = 5.0  # greedy gets the first token of the word, never the second
    r = ev.evaluate_task(LogitsStub(logits), tk, [dict(context="Wir wohnen hier", choices=[word], label=0)], "cpu",
                         kind="greedy")
    assert r["acc"] == 0.0


def test_greedy_tasks_check_the_labelled_choice(small_tokenizer):
    tk = small_tokenizer
    word = next(w for w in (" die", " der", " und", " in") if len(tk.encode(w)) == 1)
    logits = torch.zeros(tk.vocab_size)
    logits[tk.encode(word)[0]] = 5.0
    examples = [dict(context="Wir wohnen hier", choices=[" Zelt", word], label=1),
                dict(context="Wir wohnen hier", choices=[word, " Zelt"], label=0)]
    r = ev.evaluate_task(LogitsStub(logits), tk, examples, "cpu", kind="greedy")
    assert r["acc"] == 1.0


def test_equal_scores_pick_the_first_choice(small_tokenizer):
    assert ev.argmax([1.0, 3.0, 3.0, 2.0]) == 1
    tk = small_tokenizer
    uniform = LogitsStub(torch.zeros(tk.vocab_size))
    same = [" Haus", " Haus"]  # the same score and the same length: a tie on both rules
    r = [ev.evaluate_task(uniform, tk, [dict(context="Das ist ein", choices=same, label=label)], "cpu")
         for label in (0, 1)]
    assert [(x["acc"], x["acc_norm"]) for x in r] == [(1.0, 1.0), (0.0, 0.0)]


def test_acc_norm_divides_by_characters_not_bytes(small_tokenizer):
    tk = small_tokenizer
    uniform = LogitsStub(torch.zeros(tk.vocab_size))
    choices = [" ää", " Ofen"]  # umlauts: fewer characters than UTF-8 bytes
    n_tokens = [len(tk.encode(c)) for c in choices]
    by_char = ev.argmax([-n / len(c) for n, c in zip(n_tokens, choices)])
    by_byte = ev.argmax([-n / len(c.encode()) for n, c in zip(n_tokens, choices)])
    assert by_char != by_byte  # the fixture makes the two rules disagree
    r = ev.evaluate_task(uniform, tk, [dict(context="Das ist", choices=choices, label=by_char)], "cpu")
    assert r["acc_norm"] == 1.0


def test_row_labels_outside_the_choices_are_refused():
    with pytest.raises(ev.SkipRow, match="not the index"):
        ev.hellaswag_example({**HELLASWAG, "label": "2"})  # two endings: 0 or 1
    with pytest.raises(ValueError, match='"label" must be the index'):
        ev.local_example(dict(context="x", choices=["a", "b"], label=-1))
    assert ev.local_example(dict(context="", choices=["a", " b"], label=0)) == dict(context="", choices=["a", " b"],
                                                                                   label=0, delimiter="")


def test_a_local_file_named_like_a_hub_task_is_read_in_the_local_format(tmp_path):
    task = ev.make_task("arc", f"jsonl://{write_jsonl(tmp_path / 'arc.jsonl', QUIZ)}")
    assert ev.load_examples(task) == [ev.local_example(row) for row in QUIZ]


def test_a_limited_sample_keeps_the_dataset_order(tmp_path):
    rows = [dict(context=f"Frage {i}:", choices=["ja", "nein"], label=i % 2) for i in range(40)]
    task = ev.make_task("quiz", f"jsonl://{write_jsonl(tmp_path / 'q.jsonl', rows)}")
    sample = ev.load_examples(task, limit=10)
    order = [int(e["context"].split()[1].rstrip(":")) for e in sample]
    assert len(order) == 10 and order == sorted(order) and order != list(range(10))


def test_a_task_file_named_like_a_hub_task_replaces_it(files):
    results = ev.main(["--checkpoint", str(files.root / "chat"), "--tasks", "arc", "--task-file",
                       f"arc=jsonl://{files.quiz}", "--device", "cpu", "--no-report"])  # the hub is off in the tests
    assert [(r["task"], r["data"], r["examples"]) for r in results] == [("arc", f"jsonl://{files.quiz}", 12)]


def test_a_base_model_with_another_tokenizer_is_not_compared(tmp_path, small_tokenizer):
    other = tok.Tokenizer.train([l.upper() for l in LINES] * 3, vocab_size=512, show_progress=False)
    assert other.to_json() != small_tokenizer.to_json()
    notes = []
    base = make_checkpoint(tmp_path / "other", other, kind="base", sequence_len=16)
    assert ev.chat_base({"base": str(base), "path": "chat.pt"}, small_tokenizer, "cpu", notes.append) is None
    assert len(notes) == 1 and "has another tokenizer" in notes[0]
    same = make_checkpoint(tmp_path / "same", small_tokenizer, kind="base", sequence_len=16)
    assert ev.chat_base({"base": str(same), "path": "chat.pt"}, small_tokenizer, "cpu", notes.append) is not None


def test_another_model_at_the_base_path_is_not_compared(tmp_path, small_tokenizer):
    """A run moved away and a new one written in its place: the recorded base path now holds the new run's base,
    of the same step and tokens (one preset) and the same tokenizer. Its fingerprint tells it apart."""
    path = make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", sequence_len=16, seed=1)
    state = torch.load(path, weights_only=True)
    state.update(step=400, tokens=1638400, train_seconds=512.25)
    torch.save(state, path)
    chat = {"base": "out/base/ckpt_0000001.pt", "base_path": str(path), "path": "run1/chat/ckpt.pt",
            "base_fingerprint": common.checkpoint_fingerprint(state, small_tokenizer)}
    notes = []
    assert ev.chat_base(chat, small_tokenizer, "cpu", notes.append) is not None and notes == []
    state["train_seconds"] = 498.5  # another run of the same preset
    torch.save(state, path)
    assert ev.chat_base(chat, small_tokenizer, "cpu", notes.append) is None
    assert notes == [f"note: {path} is not the base model run1/chat/ckpt.pt was fine-tuned from (train_seconds "
                     f"512.25, now 498.5): no base -> chat change of bits per byte"]


def test_the_base_of_a_moved_run_is_found_beside_it(tmp_path, small_tokenizer):
    """`mv out run1` and a new run in out: the chat checkpoint's recorded base path now holds the new run's base,
    and its own base moved with it. It is found from the chat checkpoint's folder, told apart by its fingerprint."""
    theirs = make_checkpoint(tmp_path / "run1" / "base", small_tokenizer, kind="base", sequence_len=16, seed=1)
    new = make_checkpoint(tmp_path / "out" / "base", small_tokenizer, kind="base", sequence_len=16, seed=2)
    state = torch.load(theirs, weights_only=True)
    state["train_seconds"] = 7.5  # the new run's base differs only in its training time
    torch.save(state, theirs)
    chat = {"base_path": str(new), "base_relative": "../base/" + theirs.name,
            "path": str(tmp_path / "run1" / "chat" / "ckpt_0000003.pt"),
            "base_fingerprint": common.checkpoint_fingerprint(state, small_tokenizer)}
    notes = []
    found = ev.chat_base(chat, small_tokenizer, "cpu", notes.append)
    assert notes == [] and torch.equal(found.lm_head.weight, common.load_model(theirs)[0].lm_head.weight)
    theirs.unlink()  # the run moved without its base: the recorded path holds another model, and says so
    assert ev.chat_base(chat, small_tokenizer, "cpu", notes.append) is None
    assert len(notes) == 1 and notes[0].startswith(f"note: {new} is not the base model")


def test_ranks_agree_whether_to_compare_with_the_base(tmp_path, small_tokenizer):
    """A base that only some nodes have: every rank skips it, or rank 0 alone would measure it and the ranks'
    sums would pair up wrongly."""
    base = make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", sequence_len=16)
    script = tmp_path / "ranks.py"
    script.write_text("import sys\nimport common, evaluation\n"
                      "rank, _, device = common.setup_distributed('cpu')\n"
                      "model, tokenizer, _ = common.load_model(sys.argv[1])\n"
                      "base = sys.argv[1] if rank == 0 else sys.argv[1] + '.not-on-this-node'\n"
                      "found = evaluation.chat_base({'base': base, 'path': 'chat.pt'}, tokenizer, device, print)\n"
                      "print(f'rank {rank} compares: {found is not None}', flush=True)\n"
                      "common.teardown_distributed()\n")
    proc = torchrun(script, base, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(l for l in proc.stdout.splitlines() if "compares" in l) == [
        "rank 0 compares: False", "rank 1 compares: False"], proc.stdout
    assert f"note: the base checkpoint {base} is missing or another model on another rank's node" in proc.stdout


def test_table_cells_and_samples_keep_the_markdown_intact():
    assert report.markdown_table(["task", "ok"], [["a|b\nc", True]]) == "| task | ok |\n|---|---|\n| a\\|b c | True |"
    assert report.format_samples([("Was | ist?", "  "), ("Hallo", "Hi\nda")]) == \
        "**Was \\| ist?**\n\n> (keine Antwort)\n\n**Hallo**\n\n> Hi\n> da"


def test_acc_norm_does_not_count_the_joining_space_as_lm_eval(small_tokenizer, monkeypatch):
    """lm-eval scores context + target_delimiter (" ") + choice and divides by len(choice); evaluation.py's
    HellaSwag/ARC choices carry that space and divided by it too, so near-ties went the other way (toward short
    endings). Log-likelihoods -10 and -19.5 over "kocht." (6) and "schläft ein." (12): -1.67 < -1.63 is
    lm-eval's pick of the second; with the space, -1.43 > -1.5 picked the first."""
    row = dict(activity_label="Kochen", ctx_a="Ein Mann steht in der Küche.", ctx_b="er",
               endings=["kocht.", "schläft ein.", "x", "y"], label="1")
    example = ev.hellaswag_example(row)
    assert example["choices"][:2] == [" kocht.", " schläft ein."] and example["delimiter"] == " "
    monkeypatch.setattr(ev, "continuation_scores", lambda model, rows, device: ([-10.0, -19.5, -30.0, -30.0],
                                                                                 [False] * len(rows)))
    model = LogitsStub(torch.zeros(small_tokenizer.vocab_size))
    assert ev.evaluate_task(model, small_tokenizer, [example], "cpu")["acc_norm"] == 1.0
    local = ev.local_example(dict(context="Er", choices=["kocht.", "schläft ein.", "x", "y"], label=1))
    assert local["choices"] == example["choices"] and local["delimiter"] == " "
    assert ev.evaluate_task(model, small_tokenizer, [local], "cpu")["acc_norm"] == 1.0


def test_bpb_of_no_bytes_is_nan_not_a_perfect_zero(small_tokenizer):
    """Documents that give no byte to predict (none at all, or only empty ones): no measurement, NaN, which a
    report shows as such; 0.0 would read as a perfect model."""
    model = random_gpt(small_tokenizer, seq_len=8)
    for texts in ([], [""]):
        result = ev.text_bpb(model, small_tokenizer, iter(texts), "cpu")
        assert math.isnan(result["bpb"]) and result["bytes"] == 0, (texts, result)
