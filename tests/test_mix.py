"""The demo's mix and chat recipe: weight=size, plain text in SFT, the identity rate, base -> chat bits per byte."""
import dataclasses
import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import chatdata
import common
import data
import dataloader
import evaluation as ev
import sft
from conftest import make_checkpoint
from dataloader import DOCS_PER_READ, PretrainBatches
from tok import render_conversation


def write_parquet(path, texts, row_group_size=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "source": ["x"] * len(texts)}), path, row_group_size=row_group_size)
    return path


def test_weight_size_is_the_bytes_of_text_of_each_source(tmp_path):
    """Parquet: the text column's UTF-8 bytes (not the file size, which compression and other columns
    change); JSONL and text: the files' bytes."""
    big = [("Ein langer deutscher Satz über die Nordsee. " * 40) + str(i) for i in range(30)]
    small = ["Kurz.", "Auch kurz."]
    write_parquet(tmp_path / "big" / "a.parquet", big[:20])
    write_parquet(tmp_path / "big" / "b.parquet", big[20:])
    write_parquet(tmp_path / "small" / "a.parquet", small)
    lines = tmp_path / "t.jsonl"
    lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in small), encoding="utf-8")
    sources = data.parse_specs(f"parquet://{tmp_path}/big/*.parquet?weight=size "
                               f"parquet://{tmp_path}/small/*.parquet?weight=size jsonl://{lines}?weight=size")
    text_bytes = [sum(len(t.encode()) for t in texts) for texts in (big, small)]
    assert [s.weight for s in sources[:2]] == text_bytes
    assert sources[2].weight == lines.stat().st_size
    assert data.parse_specs(f"parquet://{tmp_path}/small/*.parquet")[0].weight == 1.0  # the default stays equal tokens


@pytest.mark.parametrize("weight, ratio", [("size", 3.0), ("size^0.5", 3.0 ** 0.5)])
def test_weight_size_mixes_by_size_in_the_loader(tmp_path, small_tokenizer, weight, ratio):
    """With weight=size, each source's share of the pretraining tokens follows its bytes of text (3x the text,
    3x the tokens, to within a row); with size^0.5, their square root."""
    from dataloader import PretrainBatches
    line = "Die Sonne scheint über dem Wattenmeer und die Möwen rufen laut. "
    write_parquet(tmp_path / "a" / "a.parquet", [line * 8] * 24)
    write_parquet(tmp_path / "b" / "b.parquet", [line * 8] * 8)
    sources = data.parse_specs(f"parquet://{tmp_path}/a/*.parquet?weight={weight} parquet://{tmp_path}/b/*.parquet?weight={weight}")
    loader = PretrainBatches(sources, small_tokenizer, batch_size=4, seq_len=32)
    batches = iter(loader)
    for _ in range(12):
        next(batches)
    counts = list(loader.token_counts().values())
    assert counts[0] / counts[1] == pytest.approx(ratio, rel=0.1)


def test_the_loader_counts_how_often_each_source_was_read_through(tmp_path, small_tokenizer):
    """Equal tokens per source read a small source many times while a big one is half read; weights by size
    read both at the same pace. Passes are the bytes of text handed out against the source's size, not what
    the loader has read ahead (a novel is 200 KB). train.py logs them at the end of a run."""
    from dataloader import PretrainBatches
    line = "Die Sonne scheint über dem Wattenmeer und die Möwen rufen laut. "
    big, small = [line * 8 + str(i) for i in range(24)], [line * 8 + str(i) for i in range(4)]
    write_parquet(tmp_path / "big" / "a.parquet", big)
    write_parquet(tmp_path / "small" / "a.parquet", small)
    per_pass = [sum(len(ids) + 1 for ids in small_tokenizer.encode_batch(texts)) for texts in (big, small)]  # + BOS

    def passes(weights: str, tokens: int) -> list[float]:
        sources = data.parse_specs(f"parquet://{tmp_path}/big/*.parquet{weights} parquet://{tmp_path}/small/*.parquet{weights}")
        loader = PretrainBatches(sources, small_tokenizer, batch_size=4, seq_len=32)  # reads all 24 at once
        batches = iter(loader)
        while sum(loader.token_counts().values()) < tokens:
            next(batches)
        return list(loader.passes_read().values())

    tokens = per_pass[0]  # as much as the big source holds
    big_read, small_read = passes("", tokens)  # the small one: its half, many times over; the big one half read
    assert big_read == pytest.approx(0.5, abs=0.02)  # what was handed out, not what was read ahead
    assert int(small_read) == tokens // 2 // per_pass[1]
    assert small_read == pytest.approx(tokens / 2 / per_pass[1], abs=0.02)
    assert passes("?weight=size", 2 * sum(per_pass)) == pytest.approx([2, 2], abs=0.02)  # each twice through


@pytest.mark.parametrize("spec, message", [
    ("hf://x/y?weight=size", "weight=size needs local files"),
    ("parquet:///x?weight=big", "must be a positive number, 'size' or 'size\\^P'"),
    ("parquet:///x?weight=size^2", "size\\^P with P above 0 and at most 1"),
    ("parquet:///x?weight=sizes", "write size, or size\\^P"),
])
def test_weight_size_errors_are_clear(spec, message):
    with pytest.raises(data.DataError, match=message):
        data.parse_specs(spec)


def test_weight_size_is_refused_where_weights_repeat_conversations(tmp_path, small_tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hallo"},
                                             {"role": "assistant", "content": "Hi"}]}) + "\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="give a number"):
        chatdata.load_conversations(data.parse_specs(f"jsonl://{path}?weight=size"), small_tokenizer, 64, log=lambda *a: None)


def pretraining_rows(sources, tokenizer, seq_len, skip_batches, n_batches, batch_size=2, packing="concat"):
    """Rows of seq_len + 1 tokens that an uninterrupted pretraining loader hands out after `skip_batches`
    batches, and its state at that point (what a base checkpoint stores)."""
    batches = iter(loader := PretrainBatches(sources, tokenizer, batch_size, seq_len, packing=packing))
    for _ in range(skip_batches):
        next(batches)
    state = loader.state_dict()
    rows = [ids for _ in range(n_batches) for x, y in [next(batches)] for ids in torch.cat([x, y[:, -1:]], 1).tolist()]
    return rows, state


def test_text_rows_continue_the_base_models_pretraining(tmp_path, small_tokenizer):
    """Given the base checkpoint's loader state for the same mix, the text rows are exactly the rows its
    pretraining would have read next (past several reads of the source), every token trained; for another
    mix (or no state) the text starts at its beginning. Too little text left is a clear error."""
    write_parquet(tmp_path / "a" / "a.parquet", [f"Text {i} über Hamburg und die Elbe. " * 2 for i in range(600)],
                  row_group_size=1000)
    write_parquet(tmp_path / "b" / "b.parquet", [f"Satz {i} über Bremen. " * 2 for i in range(300)])
    mix = f"parquet://{tmp_path}/a/*.parquet parquet://{tmp_path}/b/*.parquet?weight="
    sources = data.parse_specs(f"{mix}2")
    after, state = pretraining_rows(sources, small_tokenizer, 64, skip_batches=12, n_batches=3, batch_size=16)
    assert state["docs"][0] >= 2 * DOCS_PER_READ  # several reads into the source: its position counts them
    rows, continued = chatdata.load_text_rows(sources, small_tokenizer, 65, 40, base={"loader": [state]})
    assert continued and [ids for ids, _ in rows] == after[:40] and all(mask == [1] * 65 for _, mask in rows)
    for spec, base in ((f"{mix}2", None), (f"{mix}3", {"loader": [state]})):  # no base state; another mix's state
        start, _ = pretraining_rows(data.parse_specs(spec), small_tokenizer, 64, skip_batches=0, n_batches=3,
                                    batch_size=16)
        rows, continued = chatdata.load_text_rows(data.parse_specs(spec), small_tokenizer, 65, 40, base)
        assert not continued and [ids for ids, _ in rows] == start[:40]
    with pytest.raises(data.DataError, match="after what the base model read.*lower --text-frac"):
        chatdata.load_text_rows(sources, small_tokenizer, 65, 10_000, base={"loader": [state]})


def test_text_rows_half_best_fit_read_on_where_the_concatenated_ones_stop(tmp_path, small_tokenizer):
    """--text-bestfit 0.5: the first half of the rows are the concatenated rows pretraining would have read
    next, the second half best-fit rows (each from a document's start) of the documents after them. Without
    it, the rows are packed as the base model's pretraining packed them."""
    # documents of 1 to 4 like sentences, shorter than a row (so the packings differ), each length in turn:
    # best-fit takes the oldest of the longest that fits, so where it starts reading shows in its first row
    write_parquet(tmp_path / "a" / "a.parquet", [f"Text {i:04d} über die Elbe. " * (1 + i % 4) for i in range(1200)],
                  row_group_size=2000)
    sources = data.parse_specs(f"parquet://{tmp_path}/a/*.parquet")
    after, state = pretraining_rows(sources, small_tokenizer, 64, skip_batches=12, n_batches=1, batch_size=16)
    _, state_after = pretraining_rows(sources, small_tokenizer, 64, skip_batches=13, n_batches=0, batch_size=16)
    bestfit = PretrainBatches(sources, small_tokenizer, 16, 64, loop=False, packing="bestfit")
    bestfit.continue_reading(state_after)
    rows, continued = chatdata.load_text_rows(sources, small_tokenizer, 65, 32, {"loader": [state]}, bestfit=0.5)
    rows = [ids for ids, _ in rows]
    assert continued and rows[:16] == after and rows[16:] == [row.tolist() for row in itertools.islice(bestfit.rows(), 16)]
    assert all(row[0] == small_tokenizer.bos_id for row in rows[16:])
    # by default, packed as the base model's pretraining was: a best-fit base model gets its next best-fit rows
    after, state = pretraining_rows(sources, small_tokenizer, 64, skip_batches=12, n_batches=1, batch_size=16,
                                    packing="bestfit")
    rows, _ = chatdata.load_text_rows(sources, small_tokenizer, 65, 16, {"loader": [state]})
    assert [ids for ids, _ in rows] == after


def test_text_data_base_continues_the_base_checkpoints_own_mix(tmp_path, small_tokenizer):
    """--text-data base: the spec is the one the base model was pretrained on, continued where it stopped; a
    checkpoint that names no pretraining mix (a chat model, an export) is a clear error."""
    from test_sft import args_for, fixture_conversations, write_jsonl
    write_jsonl(tmp_path / "train.jsonl", fixture_conversations(8))
    write_jsonl(tmp_path / "val.jsonl", fixture_conversations(4))
    write_parquet(tmp_path / "a" / "a.parquet", [f"Text {i} über Hamburg und die Elbe. " * 3 for i in range(60)])
    mix = f"parquet://{tmp_path}/a/*.parquet"
    after, state = pretraining_rows(data.parse_specs(mix), small_tokenizer, 64, skip_batches=3, n_batches=8)
    cfg = common.parse_config(sft.SFTConfig, sft.PRESETS, args_for(tmp_path, "chat", "--text-data", "base",
                                                                   "--text-frac", "0.05"))
    base = {"kind": "base", "path": "out/base/ckpt.pt", "train_config": {"data": mix}, "loader": [state]}
    train, _ = sft.load_sft_data(cfg, small_tokenizer, 65, lambda *a: None, base=base)
    text = [ids for ids, mask in train if all(mask)]  # every token trained: only text rows (a chat masks its prompt)
    assert 0 < len(text) <= len(after) and text == after[:len(text)]
    for other in ({"kind": "chat", "path": "out/chat/ckpt.pt", "train_config": {"data": "jsonl://c.jsonl"}},
                  {"path": "export/"}):
        with pytest.raises(data.DataError, match=f"--text-data base: {other['path']} is not a train.py checkpoint"):
            sft.load_sft_data(dataclasses.replace(cfg, text_frac=0.5), small_tokenizer, 65, lambda *a: None, base=other)


def test_sft_mixes_text_rows_into_training(tmp_path, small_tokenizer):
    from test_sft import args_for, fixture_conversations, write_jsonl
    make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", sequence_len=64, n_embd=32)
    write_jsonl(tmp_path / "train.jsonl", fixture_conversations(40))
    write_jsonl(tmp_path / "val.jsonl", fixture_conversations(8))
    write_parquet(tmp_path / "p" / "a.parquet", ["Ein Text über das Meer. " * 30] * 20)  # text for a quarter of the rows
    cfg = common.parse_config(sft.SFTConfig, sft.PRESETS, args_for(tmp_path, "chat", "--text-data",
                                                                   f"parquet://{tmp_path}/p/*.parquet",
                                                                   "--text-frac", "0.25"))
    stats = {}
    train, _ = sft.load_sft_data(cfg, small_tokenizer, 65, lambda *a: None, stats)
    text = [row for row in train if all(row[1])]  # every token trained: only text rows (a chat masks its prompt)
    assert stats["text_rows"] == len(text) == round((len(train) - len(text)) * 0.25 / 0.75)
    with pytest.raises(SystemExit, match="--text-frac 1.0 must be"):
        sft.main(args_for(tmp_path, "chat", "--text-frac", "1.0"))
    with pytest.raises(SystemExit, match="--text-bestfit 1.5 must be from 0 to 1"):
        sft.main(args_for(tmp_path, "chat", "--text-bestfit", "1.5"))


def test_identity_rate_counts_answers_that_name_nanoschnack(tmp_path, small_tokenizer, monkeypatch):
    """Scripted: the model says 'nanoschnack' in every other sampled answer."""
    import gpt
    model, tokenizer, _ = common.load_model(make_checkpoint(tmp_path, small_tokenizer))
    name = tokenizer.encode(" nanoschnack")
    end = tokenizer.special["<|assistant_end|>"]
    answers = iter(range(1000))

    def generate(self, prompt, *args, **kwargs):
        yield from (name if next(answers) % 2 else tokenizer.encode(" Hallo")) + [end]
    monkeypatch.setattr(gpt.GPT, "generate", generate)
    assert sft.identity_rate(model, tokenizer, samples=4, seed=0) == {q: 2 for q in sft.IDENTITY_QUESTIONS}


def test_evaluation_of_a_chat_model_shows_its_base(tmp_path, small_tokenizer):
    """A chat checkpoint's bits per byte come with its base model's on the same documents, and the change."""
    base = make_checkpoint(tmp_path / "base", small_tokenizer, kind="base", sequence_len=16, seed=1)
    chat = make_checkpoint(tmp_path / "chat", small_tokenizer, kind="chat", sequence_len=16, seed=2)
    state = torch.load(chat, weights_only=True)
    state["base"] = str(base)
    torch.save(state, chat)
    text = tmp_path / "dev.txt"
    lines = ["Das ist ein Satz.", "Noch ein Satz über Berlin.", "Und ein dritter."]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["--checkpoint", str(chat), "--tasks", "bpb", "--bpb-data", f"txt://{text}?per=line", "--device", "cpu"]
    [result] = ev.main(args)
    models = [common.load_model(path)[0] for path in (chat, base)]
    want = [ev.text_bpb(m, small_tokenizer, iter(lines), "cpu")["bpb"] for m in models]
    assert (result["bpb"], result["base_bpb"]) == pytest.approx(want) and want[0] != want[1]
    card = (tmp_path / "report.md").read_text()
    assert "| base model | change |" in card and f"{want[0] - want[1]:+.4f}" in card
    [alone] = ev.main(args + ["--no-base", "--no-report"])
    assert "base_bpb" not in alone


def test_answers_are_cut_to_their_first_sentences(tmp_path, small_tokenizer):
    """--answer-chars: a long answer keeps its sentences that fit, never half a sentence; abbreviations and
    ordinals are not sentence ends; questions and short answers stay as they are."""
    text = "Er kam am 1. Januar zu Dr. Müller, z. B. nach Kiel. Dann „ging er.“ Ende gut! alles gut"
    assert chatdata.first_sentences(text, 1000) == text
    assert chatdata.first_sentences(text, 60) == "Er kam am 1. Januar zu Dr. Müller, z. B. nach Kiel."
    assert chatdata.first_sentences(text, 70) == "Er kam am 1. Januar zu Dr. Müller, z. B. nach Kiel. Dann „ging er.“"
    assert chatdata.first_sentences(text, 30) == text  # no sentence ends that early: whole, not cut mid-sentence
    long_answer = {"messages": [{"role": "user", "content": "Erzähl. Bitte ausführlich. " * 3},
                                {"role": "assistant", "content": text}]}
    short = {"messages": [{"role": "user", "content": "Hallo"}, {"role": "assistant", "content": "Hi."}]}
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (long_answer, short)) + "\n", encoding="utf-8")
    logged = []
    got = chatdata.load_conversations(data.parse_specs(f"jsonl://{path}"), small_tokenizer, 1000, logged.append,
                                 answer_chars=60)
    cut = dict(long_answer, messages=[long_answer["messages"][0],
                                      {"role": "assistant", "content": chatdata.first_sentences(text, 60)}])
    assert got == [render_conversation(small_tokenizer, c["messages"]) for c in (cut, short)]
    assert any("shortened the answers of 1 conversations" in line for line in logged)


def test_passes_read_carry_over_a_resume(tmp_path, small_tokenizer):
    """train.py logs passes_read at the end of a resumed run: the bytes handed out before the resume count."""
    line = "Die Sonne scheint über dem Wattenmeer und die Möwen rufen laut. "
    write_parquet(tmp_path / "a" / "a.parquet", [line * 8 + str(i) for i in range(12)])
    spec = f"parquet://{tmp_path}/a/*.parquet"
    loader = PretrainBatches(data.parse_specs(spec), small_tokenizer, batch_size=4, seq_len=32)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    fresh = PretrainBatches(data.parse_specs(spec), small_tokenizer, batch_size=4, seq_len=32)
    fresh.load_state_dict(loader.state_dict())
    assert loader.passes_read()[spec] > 0.1
    assert fresh.passes_read() == loader.passes_read()
    next(batches), next(iter(fresh))
    assert fresh.passes_read() == loader.passes_read()


def test_passes_read_count_this_ranks_share(tmp_path, small_tokenizer):
    """On 2 ranks each rank reads half of a source: handing out its half once is one pass, not half a pass."""
    line = "Die Sonne scheint über dem Wattenmeer und die Möwen rufen laut. "
    write_parquet(tmp_path / "a" / "a.parquet", [line * 8 + f"{i:02d}" for i in range(24)])  # equal lengths
    spec = f"parquet://{tmp_path}/a/*.parquet"
    source = data.parse_specs(spec)[0]
    mine = list(data.iter_texts(source, dataloader.open_rank_shard(source, 0, 2, quiet=True)))
    assert len(mine) == 12
    per_pass = sum(len(ids) + 1 for ids in small_tokenizer.encode_batch(mine))  # + BOS
    loader = PretrainBatches(data.parse_specs(spec), small_tokenizer, batch_size=1, seq_len=32, rank=0,
                             world_size=2)
    batches = iter(loader)
    while loader.token_counts()[spec] < per_pass:
        next(batches)
    assert loader.passes_read()[spec] == pytest.approx(1.0, abs=0.03)


# --- from a mutation audit of chatdata.py ----------------------------------------------

def test_first_sentences_at_the_limit_exactly():
    text = "Er kam. Dann ging er weiter"
    assert chatdata.first_sentences(text, len(text)) == text  # not longer than the limit: whole
    assert chatdata.first_sentences(text, len(text) - 1) == "Er kam."
    assert chatdata.first_sentences(text, len("Er kam.")) == "Er kam."  # a sentence that ends at the limit fits


def test_text_rows_continue_the_first_rank_of_a_base_model_trained_on_two(tmp_path, small_tokenizer):
    write_parquet(tmp_path / "a" / "a.parquet", [f"Text {i} über Hamburg und die Elbe. " * 2 for i in range(600)])
    sources = data.parse_specs(f"parquet://{tmp_path}/a/*.parquet")
    batches = iter(loader := PretrainBatches(sources, small_tokenizer, 4, 64, rank=0, world_size=2))
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    after = [ids for _ in range(2) for x, y in [next(batches)] for ids in torch.cat([x, y[:, -1:]], 1).tolist()]
    rows, continued = chatdata.load_text_rows(sources, small_tokenizer, 65, 8, base={"loader": [state]})
    assert continued and [ids for ids, _ in rows] == after
