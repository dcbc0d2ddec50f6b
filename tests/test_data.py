"""Tests for data.py: dataset specs and reading sources."""
import gzip
import json
import re
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import dataloader
import prepare
import shards
from data import DataError, parse_spec, parse_specs


# --- the spec grammar -------------------------------------------------------------

def test_parse_hub_spec():
    s = parse_spec("hf://HuggingFaceFW/fineweb-2?name=deu_Latn&split=train&text=content&weight=0.6")
    assert (s.kind, s.location, s.name, s.split, s.text, s.weight) == (
        "hf", "HuggingFaceFW/fineweb-2", "deu_Latn", "train", "content", 0.6)


def test_parse_local_specs_with_odd_paths():
    s = parse_spec("parquet:///data/with:colons/*.parquet?text=body")
    assert (s.kind, s.location, s.text, s.weight) == ("parquet", "/data/with:colons/*.parquet", "body", 1.0)
    assert parse_spec("jsonl://rel/dir/a.jsonl").location == "rel/dir/a.jsonl"
    assert parse_spec("txt:///a%20b/what%3F/100%25.txt?per=line").location == "/a b/what?/100%.txt"
    assert parse_spec("txt:///x.txt?per=line").per == "line"


def test_parse_several_specs_by_whitespace_and_list():
    sources = parse_specs(["parquet:///a/*.parquet  jsonl:///b.jsonl\ntxt:///c.txt", "hf://x/y"])
    assert [s.kind for s in sources] == ["parquet", "jsonl", "txt", "hf"]


@pytest.mark.parametrize("spec, message", [
    ("/data/x.parquet", "no '<kind>://' prefix"),
    ("csv:///x.csv", "unknown kind 'csv'"),
    ("parquet://", "empty location"),
    ("parquet:///x?weight=0", "weight='0' must be a positive number"),
    ("parquet:///x?weight=abc", "weight='abc'"),
    ("parquet:///x?name=deu", "option 'name' does not apply to parquet://"),
    ("txt:///x?per=page", "per='page'"),
    ("hf://a/b?split", "option 'split' is not key=value"),
    ("hf://a/b?shuffle=yes", "shuffle='yes' must be 'on' or 'off'"),
    ("hf://a/b?seed=-1", "seed='-1' must be a whole number"),
    ("hf://a/b?seed=²", "seed='²' must be a whole number"),
    ("parquet:///x?weight=inf", "weight='inf' must be a positive number"),
    ("parquet:///x?seed=1&shuffle=off", "seed= orders a shuffled source, but shuffle=off"),
])
def test_bad_specs_name_the_offending_part(spec, message):
    with pytest.raises(DataError, match="bad dataset spec") as e:
        parse_spec(spec)
    assert message in str(e.value) and repr(spec) in str(e.value)


def test_hub_sources_are_shuffled_by_default_local_ones_on_request():
    assert [s.shuffled for s in parse_specs(data.DEFAULT_PRETRAIN_SPEC)] == [True, True, True]
    assert parse_spec(data.DEFAULT_VAL_SPEC).shuffled
    assert parse_spec("hf://a/b?shuffle=off").shuffled is False
    assert not parse_spec("parquet:///x.parquet").shuffled and not parse_spec("txt:///x.txt").shuffled
    s = parse_spec("jsonl:///x.jsonl?seed=7")  # a seed asks for the shuffle
    assert (s.shuffled, s.seed) == (True, 7)
    assert (parse_spec("parquet:///x?shuffle=on").seed, parse_spec("hf://a/b").seed) == (data.DEFAULT_SEED,) * 2


def test_no_spec_at_all():
    with pytest.raises(DataError, match="no dataset spec given: pass e.g. --data "):
        parse_specs(["  "])
    with pytest.raises(DataError, match="pass e.g. --val-data "):  # the flag that was empty, not always --data
        parse_specs("", "--val-data")


# --- reading sources ----------------------------------------------------------------

def test_reads_every_kind(tmp_path):
    pq.write_table(pa.table({"body": ["Erstes", "Zweites"], "x": [1, 2]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Drei", "Vier"]))
    (tmp_path / "c.txt").write_text("Fünf\nSechs\n")
    specs = {f"parquet://{tmp_path}/a.parquet?text=body": ["Erstes", "Zweites"],
             f"jsonl://{tmp_path}/*.jsonl": ["Drei", "Vier"],
             f"txt://{tmp_path}/c.txt": ["Fünf\nSechs\n"],
             f"txt://{tmp_path}/c.txt?per=line": ["Fünf", "Sechs"]}
    for spec, expected in specs.items():
        assert list(data.iter_texts(parse_spec(spec))) == expected, spec
        # shuffled: the same documents (one file each here, so in the same order), through ShuffledShards
        shuffled = parse_spec(spec + ("&" if "?" in spec else "?") + "shuffle=on")
        assert isinstance(data.open_source(shuffled), shards.ShuffledShards)
        assert list(data.iter_texts(shuffled)) == expected, spec


def test_blank_lines_and_empty_fields_are_no_documents(tmp_path):
    (tmp_path / "a.txt").write_text("Eins\n\n  \nZwei\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Drei", "", " \n", "Vier"]))
    assert list(data.iter_texts(parse_spec(f"txt://{tmp_path}/a.txt?per=line"))) == ["Eins", "Zwei"]
    assert list(data.iter_texts(parse_spec(f"jsonl://{tmp_path}/b.jsonl"))) == ["Drei", "Vier"]


def test_a_byte_order_mark_is_no_text(tmp_path):
    """Files saved by Windows editors start with a UTF-8 byte order mark: SFT lost the first conversation of such
    a JSONL file ("not valid JSON") and text files kept U+FEFF in their first document."""
    bom = "\ufeff"
    (tmp_path / "a.txt").write_text(bom + "Zeile eins\nZeile zwei\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(bom + json.dumps({"text": "Erstes"}) + "\n" + json.dumps({"text": "Zweites"}),
                                      encoding="utf-8")
    assert list(data.iter_texts(parse_spec(f"txt://{tmp_path}/a.txt?per=line"))) == ["Zeile eins", "Zeile zwei"]
    assert list(data.iter_texts(parse_spec(f"txt://{tmp_path}/a.txt")))[0].startswith("Zeile eins")
    assert [row for _, row in data.iter_rows(parse_spec(f"jsonl://{tmp_path}/b.jsonl"))] == [
        {"text": "Erstes"}, {"text": "Zweites"}]


@pytest.mark.parametrize("make, spec, message", [
    (lambda d: None, "parquet://{d}/missing.parquet", "file not found"),
    (lambda d: None, "parquet://{d}/*.parquet", "no files match"),
    (lambda d: (d / "x").mkdir(), "jsonl://{d}/x", "is a folder"),
    (lambda d: (d / "a.jsonl").write_text('{"text": "a"}\n{"inhalt": "b"}\n'), "jsonl://{d}/a.jsonl",
     "a document has no string 'text' field"),
    (lambda d: (d / "a.txt").write_bytes("gut\n".encode() + "schlecht".encode("latin1") + b"\xff\n"),
     "txt://{d}/a.txt", "a.txt is not valid UTF-8"),
    (lambda d: pq.write_table(pa.table({"inhalt": ["x"]}), d / "a.parquet"), "parquet://{d}/a.parquet",
     "has no column 'text' (columns: inhalt)"),
    (lambda d: (d / "a.jsonl").write_text('{"text": "a"}\n["b"]\n'), "jsonl://{d}/a.jsonl",
     "a.jsonl:2: not an object"),
    (lambda d: (d / "a.jsonl").write_text('{"text": "a"}\nkein JSON\n'), "jsonl://{d}/a.jsonl", "a.jsonl:2: "),
    (lambda d: (pq.write_table(pa.table({"text": ["x"]}), d / "a.parquet"),
                pq.write_table(pa.table({"text": [5]}), d / "b.parquet")), "parquet://{d}/*.parquet",
     "b.parquet: column 'text' holds int64, not text"),
    (lambda d: damaged_parquet(d / "a.parquet"), "parquet://{d}/a.parquet", "a.parquet cannot be read"),
    (lambda d: (pq.write_table(pa.table({"text": ["x"]}), d / "a.parquet"),
                pq.write_table(pa.table({"text": ["y", None, "z"]}), d / "b.parquet")), "parquet://{d}/*.parquet",
     "b.parquet has a document with no string 'text' field (null in 1 of 3 rows)"),
])
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "converted"])
def test_bad_sources_give_clear_errors(tmp_path, make, spec, message, streaming):
    make(tmp_path)
    source = parse_spec(spec.format(d=tmp_path))
    with pytest.raises(DataError) as e:  # converted: datasets reads every file when it opens the source
        list(data.iter_texts(source, data.open_source(source, streaming=streaming, cache_dir=tmp_path / "cache")))
    assert message in str(e.value)


def damaged_parquet(path):
    """A parquet file whose footer reads, and whose second row group's data page does not."""
    pq.write_table(pa.table({"text": [f"Dokument {i} " + "Haus Baum " * 50 for i in range(2000)]}), path,
                   row_group_size=1000, compression="zstd", use_dictionary=False)
    column = pq.read_metadata(path).row_group(1).column(0)
    raw = bytearray(path.read_bytes())
    for i in range(column.data_page_offset + 100, column.data_page_offset + column.total_compressed_size - 100):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_rows_of_a_file_that_is_not_utf8_give_a_clear_error(tmp_path):
    (tmp_path / "s.jsonl").write_bytes('{"messages": "Größe"}\n'.encode("latin1"))
    with pytest.raises(DataError, match="s.jsonl is not valid UTF-8"):
        list(data.iter_rows(parse_spec(f"jsonl://{tmp_path}/s.jsonl")))


def test_hub_unreachable_fails_fast_with_hint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    with pytest.raises(DataError, match=r"hub unreachable .*pass --data"):
        data.open_source(parse_specs(data.DEFAULT_PRETRAIN_SPEC)[0])


def test_hub_offline_mode_gives_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hub unreachable.*pass --data"):
        data.open_source(parse_spec("hf://nanoschnack/does-not-exist-anywhere"))


def test_interleave_follows_weights(tmp_path):
    pq.write_table(pa.table({"text": ["a" * 10] * 100}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["b" * 10] * 100}), tmp_path / "b.parquet")
    docs = data.interleave_documents(parse_specs(
        [f"parquet://{tmp_path}/a.parquet?weight=3 parquet://{tmp_path}/b.parquet"]))
    first = [next(docs)[0] for _ in range(40)]
    assert first.count("a") == 30 and first.count("b") == 10
    assert len(list(docs)) == 160  # nothing lost once one source runs dry


# --- the packed pretraining stream ---------------------------------------------------

class CharTokenizer:
    """One token per character (id = code point + 1), so streams can be read back exactly."""
    bos_id = 0
    token_bytes = np.array([0] + [len(chr(c).encode("utf-8")) for c in range(0x3000)])  # <|bos|>: no text

    def encode_batch(self, texts):
        return [[ord(c) + 1 for c in t] for t in texts]


def write_docs(folder, n_files, docs_per_file, rows_per_group=None, prefix="d"):
    """Parquet files of unique documents; returns the documents in file order."""
    docs = []
    for f in range(n_files):
        texts = [f"{prefix}{f}.{i}:" + "x" * ((7 * i + f) % 23) for i in range(docs_per_file)]
        pq.write_table(pa.table({"text": texts}), folder / f"{prefix}-{f:02d}.parquet", row_group_size=rows_per_group)
        docs += texts
    return docs


def stream_of(docs):
    return [t for d in docs for t in [0] + [ord(c) + 1 for c in d]]


def read_all(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def flat_tokens(batches):
    """Reassemble the token stream from (inputs, targets) batches: each row is inputs + last target."""
    return [t for x, y in batches for row_x, row_y in zip(x.tolist(), y.tolist()) for t in row_x + row_y[-1:]]


def test_packing_is_exact(tmp_path):
    docs = write_docs(tmp_path, 2, 40)
    loader = dataloader.PretrainBatches(parse_specs(f"parquet://{tmp_path}/*.parquet"), CharTokenizer(),
                                  batch_size=3, seq_len=16, loop=False, docs_per_read=5)
    batches = read_all(loader)
    assert all(x.shape == y.shape == (3, 16) for x, y in batches[:-1])
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    expected = stream_of(docs)
    got = flat_tokens(batches)
    assert got == expected[:len(got)]
    assert len(expected) - len(got) < 17  # only the tail shorter than one row is dropped
    documents = "".join(chr(t - 1) if t else "\0" for t in got).split("\0")[1:]
    assert documents[:-1] == docs[:len(documents) - 1]  # BOS starts every document


def test_packing_with_the_real_tokenizer(tmp_path):
    from tok import Tokenizer
    tokenizer = Tokenizer.train([d * 3 for d in write_docs(tmp_path, 1, 30)], vocab_size=320, show_progress=False)
    docs = write_docs(tmp_path, 1, 30)
    loader = dataloader.PretrainBatches(parse_specs(f"parquet://{tmp_path}/*.parquet"), tokenizer, 2, 32, loop=False)
    got = flat_tokens(read_all(loader))
    expected = [t for d in docs for t in [tokenizer.bos_id] + tokenizer.encode(d)]
    assert got == expected[:len(got)] and len(expected) - len(got) < 33


def rank_parts(source, world_size, docs) -> list[list[str]]:
    """Each rank's documents of a source; asserts that the ranks are disjoint and together complete."""
    seen = [list(data.iter_texts(source, dataloader.open_rank_shard(source, r, world_size, quiet=True)))
            for r in range(world_size)]
    for r in range(world_size):
        for q in range(r):
            assert not set(seen[r]) & set(seen[q])
    assert sorted(sum(seen, [])) == sorted(docs)
    return seen


@pytest.mark.parametrize("world_size, n_files, rows_per_group", [
    (2, 2, None), (2, 3, None), (3, 2, None), (3, 3, None), (3, 1, 10), (2, 5, 4), (3, 4, None),
])
def test_ranks_are_disjoint_and_complete(tmp_path, world_size, n_files, rows_per_group):
    docs = write_docs(tmp_path, n_files, 30, rows_per_group)
    rank_parts(parse_spec(f"parquet://{tmp_path}/*.parquet"), world_size, docs)


def test_ranks_pack_disjoint_streams(tmp_path):
    docs = write_docs(tmp_path, 4, 25)
    streams = []
    for rank in range(2):
        loader = dataloader.PretrainBatches(parse_specs(f"parquet://{tmp_path}/*.parquet"), CharTokenizer(), 2, 8,
                                      rank=rank, world_size=2, loop=False)
        text = "".join(chr(t - 1) if t else "\0" for t in flat_tokens(read_all(loader)))
        streams.append(set(text.split("\0")[1:-1]))  # whole documents seen by this rank
    assert not streams[0] & streams[1]
    assert streams[0] | streams[1] <= set(docs) and len(streams[0] | streams[1]) >= len(docs) - 4


def test_mixing_follows_weights(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    write_docs(tmp_path / "a", 1, 400, prefix="a")
    write_docs(tmp_path / "b", 1, 400, prefix="b")
    specs = f"parquet://{tmp_path}/a/*.parquet?weight=3 parquet://{tmp_path}/b/*.parquet"
    loader = dataloader.PretrainBatches(parse_specs(specs), CharTokenizer(), 4, 32, docs_per_read=4)
    batches = [b for _, b in zip(range(60), loader)]
    counts = list(loader.token_counts().values())
    assert abs(counts[0] / sum(counts) - 0.75) < 0.02
    text = "".join(chr(t - 1) if t else "\0" for t in flat_tokens(batches))
    a_chars = sum(len(d) + 1 for d in text.split("\0") if d.startswith("a"))
    assert abs(a_chars / len(text) - 0.75) < 0.05
    again = dataloader.PretrainBatches(parse_specs(specs), CharTokenizer(), 4, 32, docs_per_read=4)
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(batches, again))  # deterministic


def resume_after(make_loader, k, tmp_path):
    """Run k batches, save the state through torch.save, and continue in a fresh loader."""
    loader = make_loader()
    it = iter(loader)
    for _ in range(k):
        next(it)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    del it
    fresh = make_loader()
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"))
    return read_all(fresh)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_is_exact(tmp_path, prefetch):
    write_docs(tmp_path, 3, 20, rows_per_group=8)
    (tmp_path / "small").mkdir()
    write_docs(tmp_path / "small", 1, 5, prefix="s")
    specs = f"parquet://{tmp_path}/*.parquet parquet://{tmp_path}/small/*.parquet?weight=0.5"

    def make_loader():
        return dataloader.PretrainBatches(parse_specs(specs), CharTokenizer(), batch_size=2, seq_len=24,
                                    rank=1, world_size=2, docs_per_read=3, prefetch=prefetch)

    full = [b for _, b in zip(range(40), make_loader())]  # the small source wraps around several times
    for k in (1, 4, 13, 29):  # mid-document and mid-buffer positions, before and after epochs end
        resumed = resume_after(lambda: LimitedLoader(make_loader(), 40 - k), k, tmp_path)
        assert len(resumed) == 40 - k
        for (x, y), (x2, y2) in zip(full[k:], resumed):
            assert torch.equal(x, x2) and torch.equal(y, y2)


class LimitedLoader:
    """A looping loader cut to n batches after a resume, for comparing finite lists."""

    def __init__(self, loader, n):
        self.loader, self.n, self.resumed = loader, n, False

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.resumed and i >= self.n:
                return
            yield batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.resumed = True
        self.loader.load_state_dict(state)


def test_resume_refuses_another_setup(tmp_path):
    write_docs(tmp_path, 2, 10)
    spec = parse_specs(f"parquet://{tmp_path}/*.parquet")
    state = dataloader.PretrainBatches(spec, CharTokenizer(), 2, 8).state_dict()
    for other in (dataloader.PretrainBatches(spec, CharTokenizer(), 2, 8, rank=0, world_size=2),
                  dataloader.PretrainBatches(spec, CharTokenizer(), 2, 8, docs_per_read=32)):  # positions count reads
        with pytest.raises(DataError, match="another setup"):
            other.load_state_dict(state)
    shuffled = parse_specs(f"parquet://{tmp_path}/*.parquet?shuffle=on")
    loader = dataloader.PretrainBatches(shuffled, CharTokenizer(), 2, 8)
    next(iter(loader))
    state = loader.state_dict()
    write_docs(tmp_path, 3, 10)  # a third file behind the same spec: another position, another shard order
    for source in (spec, shuffled):
        with pytest.raises(DataError, match=r"\.parquet(\?shuffle=on)?: its files are not the ones"):
            dataloader.PretrainBatches(source, CharTokenizer(), 2, 8).load_state_dict(state | {"sources": [source[0].spec]})
    del state["files"]  # a state saved before the files were recorded: the shard order still tells
    with pytest.raises(DataError, match=r"\?shuffle=on: a data loader state for another shard order"):
        dataloader.PretrainBatches(shuffled, CharTokenizer(), 2, 8).load_state_dict(state)


def test_resume_over_data_moved_to_another_folder(tmp_path):
    """Data copied to a node's own disk, or a folder renamed, resumes where it stood: the same files by name and
    size under the same options. Another option, or other files, is still refused."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    write_docs(old, 2, 20)

    def make_loader(folder, options=""):
        return dataloader.PretrainBatches(parse_specs(f"parquet://{folder}/*.parquet{options}"), CharTokenizer(),
                                          2, 16, docs_per_read=3)

    full = [b for _, b in zip(range(8), make_loader(old))]
    loader = make_loader(old)
    for _, _batch in zip(range(3), loader):
        pass
    state = loader.state_dict()
    new.mkdir()
    for path in old.glob("*.parquet"):
        (new / path.name).write_bytes(path.read_bytes())
    moved = make_loader(new)
    moved.load_state_dict(state)
    resumed = [b for _, b in zip(range(5), moved)]
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(full[3:], resumed))
    with pytest.raises(DataError, match="another setup"):
        make_loader(new, "?shuffle=on").load_state_dict(state)
    (new / "d-01.parquet").unlink()
    with pytest.raises(DataError, match="its files are not the ones"):
        make_loader(new).load_state_dict(state)
    del state["files"]  # a state saved before files were recorded: only the very same spec resumes
    with pytest.raises(DataError, match="another setup"):
        make_loader(old.parent / "new").load_state_dict(state)


def test_validation_batches_are_fixed(tmp_path):
    """The first max_rows rows of the stream, the same at any batch size and on any number of processes (shared
    out row by row): counted in batches, the set shrank when train.py halved a batch that did not fit."""
    write_docs(tmp_path, 2, 30)
    spec = parse_specs(f"parquet://{tmp_path}/*.parquet")
    a = dataloader.validation_batches(spec, CharTokenizer(), 2, 16, max_rows=10)
    b = dataloader.validation_batches(spec, CharTokenizer(), 2, 16, max_rows=10)
    assert len(a) == 5 and all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, b))
    rows = torch.cat([x for x, _ in a])
    for batch_size in (1, 3, 4, 16):
        other = dataloader.validation_batches(spec, CharTokenizer(), batch_size, 16, max_rows=10)
        assert max(x.shape[0] for x, _ in other) <= batch_size and torch.equal(torch.cat([x for x, _ in other]), rows)
    everything = dataloader.validation_batches(spec, CharTokenizer(), 2, 16, max_rows=10_000)
    assert sum(x.shape[0] for x, _ in everything) == len(stream_of(write_docs(tmp_path, 2, 30))) // 17
    ranks = [dataloader.validation_batches(spec, CharTokenizer(), 3, 16, rank, 2, max_rows=10) for rank in (0, 1)]
    assert [[x.shape[0] for x, _ in r] for r in ranks] == [[3, 2], [3, 2]]  # the same ten rows, shared out
    assert torch.equal(torch.cat([x for r in ranks for x, _ in r]), torch.cat([rows[0::2], rows[1::2]]))


def test_validation_data_without_one_whole_row_is_refused(tmp_path):
    """Less text than one row: no batch, and bits per byte of 0 / 0, once logged as 0.0000."""
    pq.write_table(pa.table({"text": ["Hallo Welt."]}), tmp_path / "val.parquet")
    with pytest.raises(DataError, match=r"no row of 17 tokens .*val\.parquet.*lower --seq-len"):
        dataloader.validation_batches(parse_specs(f"parquet://{tmp_path}/val.parquet"), CharTokenizer(), 2, 16)


def test_loader_errors(tmp_path):
    pq.write_table(pa.table({"text": ["nur eins"]}), tmp_path / "one.parquet")
    spec = parse_specs(f"parquet://{tmp_path}/one.parquet")
    with pytest.raises(DataError, match="no documents for rank 1 of 2"):
        next(iter(dataloader.PretrainBatches(spec, CharTokenizer(), 2, 8, rank=1, world_size=2)))
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match="bad.txt is not valid UTF-8"):
        next(iter(dataloader.PretrainBatches(parse_specs(f"txt://{tmp_path}/bad.txt"), CharTokenizer(), 1, 4)))
    with pytest.raises(DataError, match="both must be at least 1"):
        dataloader.PretrainBatches(spec, CharTokenizer(), 2, 0)
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match="no string 'text' field"):
        next(iter(dataloader.PretrainBatches(parse_specs(f"jsonl://{tmp_path}/a.jsonl"), CharTokenizer(), 1, 4, prefetch=2)))


def test_prefetch_ends_when_the_consumer_leaves_after_a_read_error(tmp_path, monkeypatch):
    """The reader thread fails while its queue is full, and the consumer stops reading: closing the loader
    must not wait forever on a queue nobody empties."""
    write_docs(tmp_path, 2, 40)
    loader = dataloader.PretrainBatches(parse_specs(f"parquet://{tmp_path}/*.parquet"), CharTokenizer(), 1, 8,
                                        prefetch=1)
    failed, next_block, calls = threading.Event(), loader._next_block, []

    def failing_after_two():
        calls.append(1)
        if len(calls) == 3:  # one block taken, one waiting in the full queue
            failed.set()
            raise DataError("a bad row")
        return next_block()

    monkeypatch.setattr(loader, "_next_block", failing_after_two)
    batches = iter(loader)
    next(batches)
    assert failed.wait(60)
    closing = threading.Thread(target=batches.close)
    closing.start()
    closing.join(60)  # it takes a tenth of a second; without the fix, forever
    assert not closing.is_alive()


def test_inspect_cli(tmp_path, capsys):
    from tok import Tokenizer
    docs = write_docs(tmp_path, 1, 50)
    Tokenizer.train(docs, vocab_size=320, show_progress=False).save(tmp_path / "tok")
    prepare.inspect_main(["--data", f"parquet://{tmp_path}/*.parquet", "--tokenizer", str(tmp_path / "tok"),
               "--batch-size", "2", "--seq-len", "16", "--batches", "3"])
    out = capsys.readouterr().out
    assert "document 0" in out and "packed tokens/s" in out


# --- shuffled sources: fair from the first batch --------------------------------------

def doc_file(doc):
    """The file index of a write_docs document ("d7.3:xx" -> 7)."""
    return int(doc.split(".")[0].lstrip("abcdefghijklmnopqrstuvwxyz"))


def test_shuffled_source_mixes_random_shards_from_the_first_documents(tmp_path):
    docs = write_docs(tmp_path, 16, 20)
    first = list(data.iter_texts(parse_spec(f"parquet://{tmp_path}/*.parquet?shuffle=on")))
    assert sorted(first) == sorted(docs)  # every document, once
    order = shards.shard_order(16, data.DEFAULT_SEED)
    assert sorted(order) == list(range(16)) and order != list(range(16))
    k = shards.MIX_STREAMS
    # the first documents: the first document of each of the first MIX_STREAMS shards of the order, in turn
    assert [doc_file(d) for d in first[:k]] == order[:k]
    assert first[:k] == [docs[20 * f] for f in order[:k]]
    assert len({doc_file(d) for d in first[:64]}) == k  # a spread of shards, not the first file
    assert first != docs
    again = list(data.iter_texts(parse_spec(f"parquet://{tmp_path}/*.parquet?shuffle=on")))
    other = list(data.iter_texts(parse_spec(f"parquet://{tmp_path}/*.parquet?seed=1")))
    assert again == first and other != first and sorted(other) == sorted(docs)  # a function of the seed
    assert [doc_file(d) for d in other[:k]] == shards.shard_order(16, 1)[:k]
    assert list(data.iter_texts(parse_spec(f"parquet://{tmp_path}/*.parquet"))) == docs  # local: as named


def test_a_finished_shard_is_replaced_by_the_next_one_in_its_turn(tmp_path):
    write_docs(tmp_path, 3, 4)
    (tmp_path / "long").mkdir()
    write_docs(tmp_path / "long", 1, 10, prefix="L")
    files = sorted(tmp_path.glob("*.parquet")) + [tmp_path / "long" / "L-00.parquet"]
    ds = datasets_stream(files)
    mixed = ShuffledShardsReader(ds, seed=3, streams=2)
    order = shards.shard_order(4, 3)
    by_file = {i: [d for d in mixed if file_of(d, files) == i] for i in range(4)}
    assert all(by_file[i] == read_file(files[i]) for i in range(4))  # each shard in its own order
    # two shards open at a time, one document from each in turn; the long file (10 documents) comes first
    assert order == [3, 2, 1, 0]
    assert [file_of(d, files) for d in mixed] == [3, 2] * 4 + [3, 1] * 4 + [3, 0] * 2 + [0, 0]
    assert sorted(mixed) == sorted(sum((read_file(f) for f in files), []))


def datasets_stream(files):
    import datasets
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)


def read_file(path):
    return pq.read_table(path).column("text").to_pylist()


def file_of(doc, files):
    return next(i for i, f in enumerate(files) if doc in read_file(f))


def ShuffledShardsReader(ds, seed, streams, batch_size=5):
    return [t for b in shards.ShuffledShards(ds, seed, streams=streams).iter(batch_size) for t in b["text"]]


@pytest.mark.parametrize("world_size, n_files, rows_per_group", [
    (2, 8, None), (2, 3, None), (3, 2, None), (3, 9, None), (3, 1, 10), (2, 5, 4),
])
def test_shuffled_ranks_are_disjoint_and_complete(tmp_path, world_size, n_files, rows_per_group):
    docs = write_docs(tmp_path, n_files, 30, rows_per_group)
    seen = rank_parts(parse_spec(f"parquet://{tmp_path}/*.parquet?shuffle=on"), world_size, docs)
    if n_files >= 2 * world_size and n_files % world_size == 0:  # by shard: each rank a spread of its shards
        for r in range(world_size):
            mine = [i for i in shards.shard_order(n_files, data.DEFAULT_SEED) if i % world_size == r]
            k = min(len(mine), shards.MIX_STREAMS)
            assert [doc_file(d) for d in seen[r][:k]] == mine[:k]


@pytest.mark.parametrize("world_size, n_files, docs_per_file", [(2, 5, 1), (3, 4, 2), (2, 9, 3), (3, 7, 5)])
def test_shuffled_ranks_share_evenly_when_the_shards_do_not_divide(tmp_path, world_size, n_files, docs_per_file):
    """Shards that do not divide by the ranks: each rank keeps every W-th document of the mixed stream, so the
    shares differ by one document at most. (Split within each shard, rank 0 got every shard's remainder, and all
    of a shard smaller than W: one document per text file left the other ranks with nothing.)"""
    docs = write_docs(tmp_path, n_files, docs_per_file)
    seen = rank_parts(parse_spec(f"parquet://{tmp_path}/*.parquet?shuffle=on"), world_size, docs)
    assert max(map(len, seen)) - min(map(len, seen)) <= 1, [len(part) for part in seen]


@pytest.mark.parametrize("prefetch, rows, rank, world_size", [(0, 256, 1, 2), (2, 256, 1, 2), (0, 2, 1, 2),
                                                               (0, 2, 2, 3), (2, 256, 2, 3)])
def test_shuffled_resume_is_exact(tmp_path, monkeypatch, prefetch, rows, rank, world_size):
    monkeypatch.setattr(shards.ShuffledShards, "ROWS", rows)  # 2: resume inside a shard's held rows too
    # 40 shards: rank 1 of 2 reads 20 of them, more than MIX_STREAMS open; rank 2 of 3 every third document of all
    write_docs(tmp_path, 20, 7, rows_per_group=4)
    (tmp_path / "small").mkdir()
    write_docs(tmp_path / "small", 3, 3, prefix="s")
    specs = (f"parquet://{tmp_path}/*.parquet?shuffle=on parquet://{tmp_path}/small/*.parquet?seed=5&weight=0.5")

    def make_loader():
        return dataloader.PretrainBatches(parse_specs(specs), CharTokenizer(), batch_size=2, seq_len=24,
                                    rank=rank, world_size=world_size, docs_per_read=3, prefetch=prefetch)

    full = [b for _, b in zip(range(60), make_loader())]  # both sources wrap around (new shard orders)
    for k in (1, 5, 17, 38):
        resumed = resume_after(lambda: LimitedLoader(make_loader(), 60 - k), k, tmp_path)
        assert len(resumed) == 60 - k
        for (x, y), (x2, y2) in zip(full[k:], resumed):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_each_epoch_has_its_own_shard_order(tmp_path):
    docs = write_docs(tmp_path, 6, 2)
    source = parse_spec(f"parquet://{tmp_path}/*.parquet?shuffle=on")
    epochs = [list(data.iter_texts(source, dataloader.open_rank_shard(source, 0, 1, epoch=e))) for e in range(3)]
    assert all(sorted(e) == sorted(docs) for e in epochs)
    assert [[doc_file(d) for d in e[:6]] for e in epochs] == [
        shards.shard_order(6, data.DEFAULT_SEED, e) for e in range(3)]
    assert len({tuple(e) for e in epochs}) == 3
    loader = dataloader.PretrainBatches([source], CharTokenizer(), batch_size=1, seq_len=8, docs_per_read=4)
    text = "".join(chr(t - 1) if t else "\0" for t in flat_tokens([b for _, b in zip(range(40), loader)]))
    assert text.split("\0")[1:13] == epochs[0]  # the loader reads epoch 0 first
    assert loader.handed_out["progress"]["epochs"][0] >= 1
    assert text.split("\0")[13:25] == epochs[1]  # ... and then epoch 1, in its own order


def test_shuffled_state_refuses_another_order(tmp_path):
    write_docs(tmp_path, 4, 5)
    ds = datasets_stream(sorted(tmp_path.glob("*.parquet")))
    reader = shards.ShuffledShards(ds, seed=1)
    next(reader.iter(3))
    with pytest.raises(ValueError, match="another shard order"):  # the loader names the source (test_loader_...)
        shards.ShuffledShards(ds, seed=2).load_state_dict(reader.state_dict())
    with pytest.raises(ValueError, match="predates shuffled sources"):
        shards.ShuffledShards(ds, seed=1).load_state_dict({"examples_iterable": {}, "epoch": 0})


def fake_hub(monkeypatch, files):
    """hf:// specs open local parquet files the way `datasets` streams a hub dataset of several shards."""
    opened = []

    def open_hub(source, streaming=True, cache_dir=None):
        opened.append(source.spec)
        return datasets_stream(files)
    monkeypatch.setattr(data, "open_hub", open_hub)
    return opened


def test_hub_sources_go_through_the_shuffle_for_tok_train_and_eval(tmp_path, monkeypatch):
    docs = write_docs(tmp_path, 16, 10)
    opened = fake_hub(monkeypatch, sorted(tmp_path.glob("*.parquet")))
    spread = shards.shard_order(16, data.DEFAULT_SEED)[:shards.MIX_STREAMS]
    # tok.py reads interleave_documents, evaluation.py's bpb and `inspect` iter_texts
    first = [d for _, d in zip(range(shards.MIX_STREAMS), data.interleave_documents(parse_specs("hf://org/set")))]
    assert [doc_file(d) for d in first] == spread
    # train.py reads PretrainBatches
    loader = dataloader.PretrainBatches(parse_specs("hf://org/set"), CharTokenizer(), batch_size=4, seq_len=32)
    text = "".join(chr(t - 1) if t else "\0" for t in flat_tokens([next(iter(loader))]))
    assert [doc_file(d) for d in text.split("\0")[1:1 + shards.MIX_STREAMS]] == spread
    assert len(opened) == 2
    # shuffle=off reads the hub's order
    assert next(data.iter_texts(parse_spec("hf://org/set?shuffle=off"))) == docs[0]


def test_a_shuffled_state_after_the_last_partial_batch_resumes_at_the_end(tmp_path):
    """The state after a source's last, partial batch is its end: a resume reads no document twice."""
    docs = write_docs(tmp_path, 4, 5)  # 20 documents: batches of 3 end with one of 2
    ds = datasets_stream(sorted(tmp_path.glob("*.parquet")))
    reader = shards.ShuffledShards(ds, seed=1)
    batches = reader.iter(3)
    texts = [t for _ in range(7) for t in next(batches)["text"]]
    assert sorted(texts) == sorted(docs)  # the last batch (2 documents) handed out, the generator not finished
    resumed = shards.ShuffledShards(ds, seed=1)
    resumed.load_state_dict(reader.state_dict())
    assert list(resumed.iter(3)) == []


def test_interleave_counts_characters_not_documents(tmp_path):
    """Equal weights give each source the same characters: three 10-character documents per 30-character one."""
    pq.write_table(pa.table({"text": ["a" * 30] * 50}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["b" * 10] * 150}), tmp_path / "b.parquet")
    docs = data.interleave_documents(parse_specs(f"parquet://{tmp_path}/a.parquet parquet://{tmp_path}/b.parquet"))
    first = [next(docs)[0] for _ in range(40)]
    assert first.count("a") == 10 and first.count("b") == 30


def test_ranks_split_a_parquet_file_by_row_group(tmp_path):
    """One file of 4 row groups on 2 ranks: rank r reads whole row groups r and r + 2 (reshard), not every
    other document of the whole file (which would make each rank parse all of it)."""
    docs = write_docs(tmp_path, 1, 40, rows_per_group=10)
    source = parse_spec(f"parquet://{tmp_path}/*.parquet")
    seen = [list(data.iter_texts(source, dataloader.open_rank_shard(source, r, 2, quiet=True))) for r in range(2)]
    assert seen == [docs[0:10] + docs[20:30], docs[10:20] + docs[30:40]]


def test_empty_parquet_files_are_skipped_and_all_empty_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["Eins", "Zwei"]}), tmp_path / "b.parquet")
    source = parse_spec(f"parquet://{tmp_path}/*.parquet")
    assert list(data.iter_texts(source)) == ["Eins", "Zwei"]
    (tmp_path / "b.parquet").unlink()
    with pytest.raises(DataError, match="have no rows"):
        list(data.iter_texts(parse_spec(f"parquet://{tmp_path}/*.parquet")))


def test_the_text_option_reads_its_column_where_a_text_column_exists_too(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"Metadaten {i}", "body": f"Inhalt {i}"}) + "\n"
                                              for i in range(3)))
    assert list(data.iter_texts(parse_spec(f"jsonl://{tmp_path}/a.jsonl?text=body"))) == [
        "Inhalt 0", "Inhalt 1", "Inhalt 2"]


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "converted"])
def test_jsonl_files_whose_other_keys_differ_are_read(tmp_path, streaming):
    """Only the text field is read: an extra key in one file, or an unused key whose type changes, is no error."""
    rows = {"a.jsonl": [{"text": "Eins", "meta": 1}], "b.jsonl": [{"text": "Zwei", "meta": "x", "extra": 2}],
            "c.jsonl": [{"text": "Drei", "meta": [1]}]}
    for name, lines in rows.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    source = parse_spec(f"jsonl://{tmp_path}/*.jsonl")
    ds = data.open_source(source, streaming=streaming, cache_dir=str(tmp_path / "cache"))
    assert list(data.iter_texts(source, ds)) == ["Eins", "Zwei", "Drei"]


def test_a_jsonl_line_without_the_text_field_is_named_by_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n\n{"text": null}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:3: a document has no string 'text' field \(got NoneType"):
        list(data.iter_texts(parse_spec(f"jsonl://{tmp_path}/*.jsonl")))


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "converted"])
def test_an_all_null_parquet_text_column_is_refused_naming_the_file(tmp_path, streaming):
    """pandas writes an all-None column as type null; datasets would cast the later files' text to null."""
    pq.write_table(pa.table({"text": pa.array([None, None])}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["Eins"]}), tmp_path / "b.parquet")
    source = parse_spec(f"parquet://{tmp_path}/*.parquet")
    with pytest.raises(DataError, match=r"a\.parquet has a document with no string 'text' field \(column type null"):
        list(data.iter_texts(source, data.open_source(source, streaming=streaming, cache_dir=str(tmp_path / "c"))))


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "converted"])
def test_a_dictionary_encoded_text_column_is_text(tmp_path, streaming):
    """pandas writes a category column dictionary-encoded: its values are the documents."""
    pq.write_table(pa.table({"text": pa.array(["Eins", "Zwei", "Eins"]).dictionary_encode()}), tmp_path / "a.parquet")
    source = parse_spec(f"parquet://{tmp_path}/a.parquet")
    assert list(data.iter_texts(source, data.open_source(source, streaming=streaming, cache_dir=str(tmp_path / "c")))) \
        == ["Eins", "Zwei", "Eins"]


@pytest.mark.parametrize("specs, hint", [
    ("parquet://my data/*.parquet", "a space in a path is written %20"),
    ("jsonl://a?b=c.jsonl", "a '?' in a file name is written %3F"),
    ("jsonl://wer?.jsonl", "a '?' in a file name is written %3F"),
])
def test_a_space_or_question_mark_in_a_path_gets_the_percent_hint(specs, hint):
    with pytest.raises(DataError, match=re.escape(hint)):
        parse_specs(specs)


def test_weight_size_counts_a_compressed_file_uncompressed(tmp_path):
    text = "".join(json.dumps({"text": "Wiederholung " * 50}) + "\n" for _ in range(200)).encode()
    (tmp_path / "a.jsonl").write_bytes(text)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(text)
    plain, packed = parse_specs(f"jsonl://{tmp_path}/a.jsonl?weight=size jsonl://{tmp_path}/b.jsonl.gz?weight=size")
    assert packed.size_bytes == plain.size_bytes == len(text)


def test_a_whitespace_only_document_is_no_document_without_an_empty_one_beside_it(tmp_path):
    """A document of spaces or newlines only is dropped like an empty one, also where no empty document comes
    in the same read: a JSONL field and a parquet row."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Eins", "   ", "Zwei"]))
    pq.write_table(pa.table({"text": ["Drei", "\n\t ", "Vier"]}), tmp_path / "b.parquet")
    assert list(data.iter_texts(parse_spec(f"jsonl://{tmp_path}/a.jsonl"))) == ["Eins", "Zwei"]
    assert list(data.iter_texts(parse_spec(f"parquet://{tmp_path}/b.parquet"))) == ["Drei", "Vier"]
