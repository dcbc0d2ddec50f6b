"""Tests for `python data.py prepare` and for reading shard folders (prepared and nanochat's)."""
import json
import os
import shutil
import unicodedata
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import dataloader
import prepare
from data import DataError, parse_spec


def make_corpus(folder, n=3000, files=2):
    """Parquet files of n unique German-ish documents (row groups of 250); returns them in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [f"Dokument {i}: Grüße aus Köln, „Straße“ " + "ä" * (i % 41) for i in range(n)]
    per = -(-n // files)
    for f in range(files):
        part = docs[f * per:(f + 1) * per]
        pq.write_table(pa.table({"text": part, "source": [f"quelle{f}"] * len(part)}),
                       folder / f"in-{f}.parquet", row_group_size=250)
    return docs


def shard_texts(path):
    return pq.read_table(path, columns=["text"])["text"].to_pylist()


def prepared(out):
    """(training documents in shard order, validation documents, meta) of a prepared folder."""
    meta = json.loads((out / "meta.json").read_text())
    train = [t for name in meta["train"]["files"] for t in shard_texts(out / name)]
    val = shard_texts(out / meta["val"]["file"]) if meta["val"] else []
    return train, val, meta


SMALL = dict(shard_chars=30_000, val_frac=0.05, log_every=1e9, log=lambda line: None)


def test_round_trip(tmp_path):
    docs = make_corpus(tmp_path / "in")
    meta = prepare.prepare(f"parquet://{tmp_path}/in/*.parquet", str(tmp_path / "out"), **SMALL)
    train, val, meta2 = prepared(tmp_path / "out")
    assert meta == meta2 and meta["complete"]
    assert Counter(train + val) == Counter(docs)  # every document exactly once
    assert not set(train) & set(val) and 0 < len(val) < 0.1 * len(docs)
    expected = SMALL["val_frac"] * len(docs)  # the hash draw takes val_frac of the documents: binomial, sd ~12
    assert abs(len(val) - expected) < 4 * expected ** 0.5  # half or twice the share is far outside
    assert train != docs[:len(train)] and train != sorted(train)  # shuffled
    first_half = {d for d in docs[:1500]}  # the two input files are mixed within the first shard
    assert 0.2 < sum(d in first_half for d in train[:1024]) / 1024 < 0.8
    # nanochat's reading: all *.parquet sorted, the last one is validation
    names = sorted(p.name for p in (tmp_path / "out").glob("*.parquet"))
    assert names == [f"shard_{i:05d}.parquet" for i in range(len(names))]
    assert names[:-1] == meta["train"]["files"] and names[-1] == meta["val"]["file"]
    assert (meta["train"]["docs"], meta["val"]["docs"]) == (len(train), len(val))
    assert meta["train"]["chars"] + meta["val"]["chars"] == sum(map(len, docs))
    assert meta["data"] == [f"parquet://{tmp_path}/in/*.parquet"] and meta["options"]["seed"] == 42
    assert meta["created"] and meta["finished"] and meta["read"]["docs"] == len(docs)
    table = pq.read_table(tmp_path / "out" / names[0])
    assert table.column_names == ["text", "source"] and set(table["source"].to_pylist()) == {"quelle0", "quelle1"}
    assert pq.read_metadata(tmp_path / "out" / names[0]).row_group(0).column(0).compression == "ZSTD"
    # the loader reads the folder as a spec: training shards, or ?split=val
    assert list(data.iter_texts(parse_spec(f"parquet://{tmp_path}/out"))) == train
    assert list(data.iter_texts(parse_spec(f"parquet://{tmp_path}/out?split=val"))) == val
    with pytest.raises(DataError, match="is the validation shard of a prepared folder; name the folder"):
        data.resolve_files(parse_spec(f"parquet://{tmp_path}/out/*.parquet"))
    assert data.resolve_files(parse_spec(f"parquet://{tmp_path}/out/shard_00000.parquet"))  # a training shard is fine
    # the same seed gives the same shards, another seed another order and split
    prepare.prepare(f"parquet://{tmp_path}/in/*.parquet", str(tmp_path / "again"), **SMALL)
    assert prepared(tmp_path / "again")[:2] == (train, val)
    prepare.prepare(f"parquet://{tmp_path}/in/*.parquet", str(tmp_path / "seed7"), seed=7, **SMALL)
    train7, val7, _ = prepared(tmp_path / "seed7")
    assert Counter(train7 + val7) == Counter(docs) and train7 != train and set(val7) != set(val)


def test_row_groups_and_shard_sizes(tmp_path):
    make_corpus(tmp_path / "in")
    prepare.prepare(f"parquet://{tmp_path}/in/*.parquet", str(tmp_path / "out"), **SMALL)
    _, _, meta = prepared(tmp_path / "out")
    files = meta["train"]["files"]
    assert len(files) >= 3
    for name in files:
        md = pq.read_metadata(tmp_path / "out" / name)
        groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert all(g == 1024 for g in groups[:-1]) and 0 < groups[-1] <= 1024
        if name != files[-1]:  # a full shard: whole row groups, just past the character budget
            entry = next(s for s in meta["shards"] if s["file"] == name)
            assert md.num_rows % 1024 == 0 and entry["chars"] >= 30_000
            assert entry["chars"] - 30_000 < 1024 * 100
    prepare.prepare(f"parquet://{tmp_path}/in/*.parquet", str(tmp_path / "rows"), shard_rows=700, max_shards=3,
                 **{**SMALL, "shard_chars": 1})
    _, _, meta = prepared(tmp_path / "rows")
    assert [s["docs"] for s in meta["shards"]][:3] == [700, 700, 700] and len(meta["train"]["files"]) == 3
    assert meta["val"]["docs"] < 700  # drawn only from what was read for the three shards


def test_interrupted_conversion_resumes_with_identical_shards(tmp_path, monkeypatch):
    make_corpus(tmp_path / "in")
    spec = f"parquet://{tmp_path}/in/*.parquet"
    prepare.prepare(spec, str(tmp_path / "full"), **SMALL)

    close, calls = prepare.ShardWriter.close, []

    def crash_on_third_shard(self, name=None):
        calls.append(self.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed while writing shard 2
        return close(self, name)

    monkeypatch.setattr(prepare.ShardWriter, "close", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(spec, str(tmp_path / "part"), **SMALL)
    monkeypatch.setattr(prepare.ShardWriter, "close", close)
    part = tmp_path / "part"
    assert sorted(p.name for p in part.glob("*.parquet")) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert not json.loads((part / "meta.json").read_text())["complete"]
    with pytest.raises(DataError, match="not finished.*resume"):
        data.resolve_files(parse_spec(f"parquet://{part}"))
    stamps = {p.name: p.stat().st_mtime_ns for p in part.glob("*.parquet")}
    other = tmp_path / "other"  # the same folder with a shard of another run's in it: refused, not taken
    shutil.copytree(part, other)
    pq.write_table(pa.table({"text": ["fremd"]}), other / "shard_00001.parquet")
    with pytest.raises(DataError, match=r"shard_00001.parquet has 1 rows, .* it was written by another run"):
        prepare.prepare(spec, str(other), **SMALL)

    prepare.prepare(spec, str(part), **SMALL)  # the same command again
    full = tmp_path / "full"
    assert sorted(os.listdir(part)) == sorted(os.listdir(full))
    for p in full.glob("*.parquet"):
        assert (part / p.name).read_bytes() == p.read_bytes(), p.name
    assert all((part / name).stat().st_mtime_ns == t for name, t in stamps.items())  # not rewritten
    assert prepared(part)[2]["shards"] == prepared(full)[2]["shards"]
    prepare.prepare(spec, str(part), **SMALL)  # complete: nothing to do
    assert all((part / name).stat().st_mtime_ns == t for name, t in stamps.items())


@pytest.mark.parametrize("options", [
    SMALL,  # 3 training shards of one row group each: every rank keeps every other document
    dict(SMALL, shard_rows=750, val_frac=0),  # 4 shards: rank r reads shards r and r+2
])
def test_two_ranks_over_prepared_shards_are_disjoint_and_complete(tmp_path, options):
    make_corpus(tmp_path / "in")
    prepare.prepare(f"parquet://{tmp_path}/in/*.parquet", str(tmp_path / "out"), **options)
    train, val, meta = prepared(tmp_path / "out")
    specs = [(f"parquet://{tmp_path}/out", train)]
    if meta["val"]:
        specs.append((f"parquet://{tmp_path}/out?split=val", val))
    for spec, expected in specs:
        source = parse_spec(spec)
        seen = [list(data.iter_texts(source, dataloader.open_rank_shard(source, r, 2, quiet=True))) for r in range(2)]
        assert not set(seen[0]) & set(seen[1]) and all(seen)
        assert Counter(seen[0] + seen[1]) == Counter(expected)


def test_nanochat_and_plain_folders(tmp_path):
    nano = tmp_path / "base_data"
    nano.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": [f"s{i}.{j}" for j in range(5)]}), nano / f"shard_{i:05d}.parquet")
    (nano / "shard_00003.parquet.tmp").write_bytes(b"an unfinished download")
    assert data.resolve_files(parse_spec(f"parquet://{nano}")) == [str(nano / f"shard_0000{i}.parquet") for i in (0, 1)]
    assert list(data.iter_texts(parse_spec(f"parquet://{nano}?split=val"))) == [f"s2.{j}" for j in range(5)]
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"text": [name]}), plain / f"{name}.parquet")
    (plain / "meta.json").write_text('{"someone": "else"}')  # not prepare's: read as a plain folder
    assert list(data.iter_texts(parse_spec(f"parquet://{plain}/"))) == ["a", "b"]  # all of it is training
    with pytest.raises(DataError, match="no validation part"):
        data.resolve_files(parse_spec(f"parquet://{plain}?split=val"))
    one = tmp_path / "one"
    one.mkdir()
    pq.write_table(pa.table({"text": ["x"]}), one / "shard_00000.parquet")
    with pytest.raises(DataError, match="one shard only"):
        data.resolve_files(parse_spec(f"parquet://{one}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no .parquet files"):
        data.resolve_files(parse_spec(f"parquet://{tmp_path}/empty"))
    with pytest.raises(DataError, match="split=train .*or split=val"):
        data.resolve_files(parse_spec(f"parquet://{nano}?split=test"))
    with pytest.raises(DataError, match="applies to a folder"):
        data.resolve_files(parse_spec(f"parquet://{nano}/shard_00000.parquet?split=val"))


def test_filters_are_off_by_default_and_work(tmp_path):
    nfd = unicodedata.normalize("NFD", "Grüße aus Österreich")
    docs = [f"Text {i} " + "lang " * 5 for i in range(400)] + ["kurz"] * 3 + ["Doppelt " * 5] * 4 + [nfd, nfd]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "in" / "a.parquet")
    spec = f"parquet://{tmp_path}/in/a.parquet"
    options = dict(SMALL, shard_chars=5_000, val_frac=0.2)
    prepare.prepare(spec, str(tmp_path / "raw"), **options)
    train, val, meta = prepared(tmp_path / "raw")
    assert Counter(train + val) == Counter(docs) and meta["filtered"] == {"too_short": 0, "duplicates": 0, "in_validation": 0}
    for dup in ("kurz", "Doppelt " * 5, nfd):  # identical documents land on the same side
        assert (dup in train) != (dup in val)
    prepare.prepare(spec, str(tmp_path / "clean"), min_chars=10, dedup=True, nfc=True, **options)
    train, val, meta = prepared(tmp_path / "clean")
    nfc = unicodedata.normalize("NFC", nfd)
    assert Counter(train + val) == Counter(docs[:400] + ["Doppelt " * 5, nfc])
    assert meta["filtered"] == {"too_short": 3, "duplicates": 4, "in_validation": 0}
    assert meta["options"] | {"min_chars": 0, "dedup": False, "nfc": False} == prepared(tmp_path / "raw")[2]["options"]


def test_no_copy_of_a_validation_document_is_trained_on(tmp_path):
    # 40 documents, each 3 times; the validation shard (10 rows) fills up while copies of its documents keep
    # coming, drawn for validation by their hash: they are held out, not written to training
    docs = [f"Dokument {i} mit Inhalt" for i in range(40)] * 3
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "in" / "a.parquet")
    prepare.prepare(f"parquet://{tmp_path}/in/a.parquet", str(tmp_path / "out"),
                    **dict(SMALL, shard_rows=10, val_frac=0.3))
    train, val, meta = prepared(tmp_path / "out")
    assert len(val) == 10 and not set(train) & set(val)
    held = meta["filtered"]["in_validation"]
    assert held > 0 and len(train) + len(val) + held == len(docs) and meta["filtered"]["duplicates"] == 0
    # --val-data without --dedup: training copies of its documents are held out as well
    pq.write_table(pa.table({"text": docs[:5]}), tmp_path / "val.parquet")
    prepare.prepare(f"parquet://{tmp_path}/in/a.parquet", str(tmp_path / "given"),
                    val_data=f"parquet://{tmp_path}/val.parquet", **dict(SMALL, shard_rows=10))
    train, val, meta = prepared(tmp_path / "given")
    assert sorted(val) == sorted(docs[:5]) and Counter(train) == Counter(docs[5:40] * 3)
    assert meta["filtered"]["in_validation"] == 15


def test_val_data_and_other_kinds(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"inhalt": f"Zeile {i}", "source": "json"}) + "\n"
                                              for i in range(300)))
    (tmp_path / "b.txt").write_text("".join(f"Satz {i}\n" for i in range(200)))
    pq.write_table(pa.table({"text": ["Zeile 5", "Satz 7", "nur Validierung"]}), tmp_path / "val.parquet")
    prepare.prepare([f"jsonl://{tmp_path}/a.jsonl?text=inhalt", f"txt://{tmp_path}/b.txt?per=line"],
                 str(tmp_path / "out"), val_data=f"parquet://{tmp_path}/val.parquet", dedup=True,
                 **dict(SMALL, shard_chars=1_000))
    train, val, meta = prepared(tmp_path / "out")
    assert sorted(val) == sorted(["Zeile 5", "Satz 7", "nur Validierung"])
    expected = [f"Zeile {i}" for i in range(300) if i != 5] + [f"Satz {i}" for i in range(200) if i != 7]
    assert sorted(train) == sorted(expected)  # --dedup drops training copies of validation documents
    assert meta["filtered"]["duplicates"] == 2 and meta["options"]["val_frac"] == 0
    sources = Counter(pq.read_table(tmp_path / "out" / meta["train"]["files"][0])["source"].to_pylist())
    assert set(sources) == {"json", f"{tmp_path}/b.txt"}  # the row's own source, else the location


def test_no_streaming_shuffles_all_documents(tmp_path):
    docs = make_corpus(tmp_path / "in", n=1500)
    meta = prepare.prepare(f"parquet://{tmp_path}/in/*.parquet", str(tmp_path / "out"), streaming=False,
                        max_shards=1, **SMALL)
    train, val, _ = prepared(tmp_path / "out")
    assert len(meta["train"]["files"]) == 1 and len(train) == 1024
    assert set(train + val) <= set(docs) and not set(train) & set(val)
    assert 0.35 < sum(d in set(docs[:750]) for d in train) / len(train) < 0.65  # drawn from the whole corpus
    assert not (tmp_path / "out" / ".cache").exists()


def test_cli_progress_and_resume_message(tmp_path, capsys):
    make_corpus(tmp_path / "in")
    argv = ["prepare", "--data", f"parquet://{tmp_path}/in/*.parquet", "--out", str(tmp_path / "out"),
            "--shard-chars", "30k", "--val-frac", "0.05", "--log-every", "0"]
    prepare.main(argv[1:])
    out = capsys.readouterr().out
    assert "docs/s" in out and "ETA" in out and "M chars/s" in out and "training shards" in out
    prepare.main(argv[1:])
    assert "complete already" in capsys.readouterr().out


def write(tmp_path, name, table):
    pq.write_table(table, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("make, args, message", [
    (lambda d: None, ["--data", "parquet://{d}/nothing/*.parquet"], "no files match"),
    (lambda d: None, ["--data", "{d}/a.parquet"], "no '<kind>://' prefix"),
    (lambda d: write(d, "a.parquet", pa.table({"inhalt": ["x"]})), ["--data", "parquet://{d}/a.parquet"],
     "has no column 'text' (columns: inhalt)"),
    (lambda d: write(d, "a.parquet", pa.table({"text": ["x", None]})), ["--data", "parquet://{d}/a.parquet"],
     "a document with no string 'text' field"),
    (lambda d: write(d, "a.parquet", pa.table({"text": ["x"]})),
     ["--data", "parquet://{d}/a.parquet", "--text", "body"], "has no column 'body'"),
    (lambda d: write(d, "a.parquet", pa.table({"text": ["kurz"]})),
     ["--data", "parquet://{d}/a.parquet", "--min-chars", "100"], "no training documents (1 read, 1 too short"),
    (lambda d: write(d, "a.parquet", pa.table({"text": ["x"]})),
     ["--data", "parquet://{d}/a.parquet", "--out", "{d}/a.parquet"], "is a file; name a folder"),
    (lambda d: (d / "out").mkdir() or write(d / "out", "mine.parquet", pa.table({"text": ["x"]})),
     ["--data", "parquet://{d}/out/mine.parquet"], "already holds .parquet files and no meta.json"),
    (lambda d: None, ["--data", "parquet://{d}/x.parquet", "--val-frac", "1.5"], "val-frac must be in [0, 1)"),
    (lambda d: [(d / "out").mkdir(), (d / "out" / "meta.json").write_text("{broken"),
                write(d, "x.parquet", pa.table({"text": ["x"]}))],
     ["--data", "parquet://{d}/x.parquet"], "meta.json was not written by prepare (or is damaged)"),
    (lambda d: None, ["--data", "hf://nanoschnack/does-not-exist-anywhere"], "hub unreachable"),
    (lambda d: None, ["--data", "parquet://{d}/x.parquet", "--max-shards", "0"], "max-shards must be positive"),
    (lambda d: None, ["--data", "parquet://{d}/x.parquet", "--seed", "-1"], "seed must be 0 or more"),
])
def test_bad_inputs_give_clear_errors(tmp_path, make, args, message):
    make(tmp_path)
    argv = ["prepare", "--out", "{d}/out", "--log-every", "1e9"] + args
    with pytest.raises(SystemExit) as e:
        prepare.main([a.format(d=tmp_path) for a in argv][1:])
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code


@pytest.mark.parametrize("flag", ["--shard-chars", "--shard-rows", "--shuffle-buffer"])
def test_counts_that_are_not_positive_are_refused_as_flags(tmp_path, capsys, flag):
    """tok.parse_count reads them: 0, a negative count or inf is a usage error naming the flag (inf was a traceback)."""
    for value in ("0", "-5", "inf"):
        with pytest.raises(SystemExit) as e:
            prepare.main(["--data", f"parquet://{tmp_path}/x.parquet", "--out", str(tmp_path / "out"), flag, value])
        assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err, value


def test_resume_with_other_settings_is_refused(tmp_path):
    make_corpus(tmp_path / "in", n=500)
    spec = f"parquet://{tmp_path}/in/*.parquet"
    prepare.prepare(spec, str(tmp_path / "out"), **SMALL)
    with pytest.raises(DataError, match=r"other settings \(options: .*'seed': 42.*'seed': 1"):
        prepare.prepare(spec, str(tmp_path / "out"), seed=1, **SMALL)
    with pytest.raises(DataError, match="other settings"):
        prepare.prepare(spec + "?weight=2", str(tmp_path / "out"), **SMALL)
    with pytest.raises(DataError, match="no files match"):  # a typo: fails before writing anything ...
        prepare.prepare(f"parquet://{tmp_path}/typo/*.parquet", str(tmp_path / "new"), **SMALL)
    prepare.prepare(spec, str(tmp_path / "new"), **SMALL)  # ... so the corrected command starts over
    assert prepared(tmp_path / "new")[2]["data"] == [spec]


def test_cli_error_exits_without_traceback(tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(repo, "data.py"), "prepare", "--data",
                             f"parquet://{tmp_path}/nothing/*.parquet", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0 and result.stderr.startswith("error: ") and "no files match" in result.stderr
    assert "Traceback" not in result.stderr


def test_prepare_real_german_sample(tmp_path, data_dir):
    spec = f"parquet://{data_dir}/pretrain/klexikon/train-*.parquet"
    docs = list(data.iter_texts(parse_spec(spec)))
    meta = prepare.prepare(spec, str(tmp_path / "out"), shard_chars=1_000_000, nfc=True, dedup=True,
                        log_every=1e9, log=lambda line: None)
    train, val, _ = prepared(tmp_path / "out")
    assert meta["read"]["docs"] == len(docs) and len(train) + len(val) == len(docs) - meta["filtered"]["duplicates"]
    assert set(train + val) == {unicodedata.normalize("NFC", d) for d in docs}
    assert set(pq.read_table(tmp_path / "out" / meta["train"]["files"][0])["source"].to_pylist()) == {"klexikon"}


def test_a_hub_source_is_prepared_from_a_spread_of_its_files(tmp_path, monkeypatch):
    """Hub datasets are sorted by source: prepare's first shard must not be the first file's documents."""
    import datasets
    files = []
    for f in range(16):
        files.append(str(tmp_path / f"hub-{f:02d}.parquet"))
        pq.write_table(pa.table({"text": [f"Datei {f}, Dokument {i}" for i in range(40)]}), files[-1])
    monkeypatch.setattr(data, "open_hub", lambda source, streaming=True, cache_dir=None: datasets.load_dataset(
        "parquet", data_files=files, split="train", streaming=True))
    lines = []
    prepare.prepare("hf://org/sorted-by-source?shuffle=on", str(tmp_path / "out"),
                    **{**SMALL, "shuffle_buffer": 4, "shard_rows": 64, "log": lines.append})
    train, val, _ = prepared(tmp_path / "out")
    assert sorted(train + val) == sorted(f"Datei {f}, Dokument {i}" for f in range(16) for i in range(40))
    first_files = {int(t.split(",")[0].split()[1]) for t in train[:32]}
    assert len(first_files) >= 8, first_files  # with a buffer of 4 documents: mixed from many shards
    assert any("prepare shuffles every source with --seed 42" in line for line in lines)


def test_min_chars_keeps_documents_of_exactly_that_length(tmp_path):
    docs = ["x" * 9, "y" * 10, "z" * 11] * 20
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "in" / "a.parquet")
    meta = prepare.prepare(f"parquet://{tmp_path}/in/a.parquet", str(tmp_path / "out"), min_chars=10,
                           **dict(SMALL, val_frac=0))
    train, _, _ = prepared(tmp_path / "out")
    assert Counter(train) == Counter(["y" * 10, "z" * 11] * 20) and meta["filtered"]["too_short"] == 20


def test_each_document_keeps_its_own_source_when_blank_ones_are_dropped(tmp_path):
    rows = [{"text": f"Zeile {i}" if i % 3 else " ", "source": f"quelle{i}"} for i in range(60)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = prepare.prepare(f"jsonl://{tmp_path}/a.jsonl", str(tmp_path / "out"), **dict(SMALL, val_frac=0))
    pairs = [pair for name in meta["train"]["files"]
             for pair in zip(*pq.read_table(tmp_path / "out" / name).to_pydict().values())]
    assert sorted(pairs) == sorted((f"Zeile {i}", f"quelle{i}") for i in range(60) if i % 3)


def test_streaming_reads_a_parquet_sources_row_groups_in_random_order(tmp_path):
    """A source sorted by origin, read with a small shuffle buffer: the first shard comes from random row groups
    (they are read in a seeded permutation, one after the other), not from the start of the file."""
    (tmp_path / "in").mkdir()
    docs = [f"Gruppe {g}, Dokument {i}" for g in range(16) for i in range(10)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "in" / "a.parquet", row_group_size=10)
    prepare.prepare(f"parquet://{tmp_path}/in/a.parquet", str(tmp_path / "out"),
                    **{**SMALL, "shuffle_buffer": 4, "shard_rows": 64})
    train, val, _ = prepared(tmp_path / "out")
    assert sorted(train + val) == sorted(docs)
    groups = {int(t.split(",")[0].split()[1]) for t in train[:32]}
    assert not groups <= set(range(6)), groups  # file order: groups 0-3 only


def interrupt_at_shard(monkeypatch, n: int):
    """Make the n-th ShardWriter.close raise KeyboardInterrupt, as if the run was killed while writing it."""
    close, calls = prepare.ShardWriter.close, []

    def crash(self, name=None):
        calls.append(self.name)
        if len(calls) == n:
            raise KeyboardInterrupt
        return close(self, name)

    monkeypatch.setattr(prepare.ShardWriter, "close", crash)
    return lambda: monkeypatch.setattr(prepare.ShardWriter, "close", close)


@pytest.mark.parametrize("options, change", [
    (SMALL, "fewer"),  # the replay does not fill the shard that exists (its row count would tell, too)
    (dict(SMALL, shard_rows=700), "same count"),  # every shard gets its 700 rows again: only the files tell
])
def test_resume_over_changed_input_files_is_refused(tmp_path, monkeypatch, options, change):
    """Input files changed behind the same spec between the interrupted run and its resume: meta.json records
    each file's path and size, and prepare refuses instead of mixing two document streams in one folder."""
    make_corpus(tmp_path / "in")
    spec = f"parquet://{tmp_path}/in/*.parquet"
    restore = interrupt_at_shard(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(spec, str(tmp_path / "out"), **options)
    restore()
    started = json.loads((tmp_path / "out" / "meta.json").read_text())["files"]
    assert started == [[[str(f), f.stat().st_size] for f in sorted((tmp_path / "in").glob("*.parquet"))]]
    if change == "fewer":
        for f in (tmp_path / "in").glob("*.parquet"):
            f.unlink()
        make_corpus(tmp_path / "in", n=400)  # fewer documents: not one full shard of 1024
    else:  # the second file's documents, reworded: as many rows, other texts
        reworded = [f"Anderes Dokument {i}" for i in range(1500)]
        pq.write_table(pa.table({"text": reworded}), tmp_path / "in" / "in-1.parquet")
    with pytest.raises(DataError, match=r"started from other input files \(\d file\(s\) added, removed or changed in "
                                        r"size, first .*/in-\d.parquet: [\d,]+ bytes then, [\d,]+ now\)"):
        prepare.prepare(spec, str(tmp_path / "out"), **options)
    assert (prepare.files_changed([[["a", 1], ["b", 2]], None], [[["a", 1], ["c", 3]], None])
            == "2 file(s) added, removed or changed in size, first b: removed")


def test_out_inside_the_inputs_is_refused_before_anything_is_written(tmp_path):
    """A glob that reaches --out would read the shards written so far as documents when the same command is run
    again (a resume then duplicates and loses documents): refused at once, by name."""
    make_corpus(tmp_path / "corpus" / "in")
    out = tmp_path / "corpus" / "prep"
    corpus = f"parquet://{tmp_path}/corpus"
    for inputs, val_inputs in [(f"{corpus}/**/*.parquet", None), (f"{corpus}/*/*.parquet", None),
                               (f"parquet://{out}", None),  # the folder itself
                               (f"{corpus}/in/*.parquet", f"{corpus}/*/*.parquet")]:  # --val-data too
        with pytest.raises(DataError, match=r"would read prepare's own output in .*/prep \(--out lies inside its path "
                                            r"or glob\).*choose an --out outside it"):
            prepare.prepare(inputs, str(out), val_data=val_inputs, **SMALL)
        assert not out.exists()
    spec = f"parquet://{tmp_path}/corpus/**/*.parquet"
    hidden = tmp_path / "corpus" / ".prep"  # glob's ** skips folders whose names start with a dot: not an input
    prepare.prepare(spec, str(hidden), **SMALL)
    assert data.resolve_files(parse_spec(spec)) == [str(f) for f in sorted((tmp_path / "corpus" / "in").iterdir())]
    prepare.prepare(f"parquet://{tmp_path}/corpus/in/*.parquet", str(out), **SMALL)  # a sibling folder is fine


def test_a_source_smaller_than_the_shuffle_buffer_is_shuffled_too(tmp_path):
    """One row group, fewer documents than --shuffle-buffer: the buffer never fills, and its documents must
    still come out in a random order, not the file's."""
    docs = [f"Dokument {i}: Grüße aus Köln" for i in range(300)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "in" / "a.parquet")
    prepare.prepare(f"parquet://{tmp_path}/in/a.parquet", str(tmp_path / "out"), **SMALL)
    train, val, _ = prepared(tmp_path / "out")
    assert Counter(train + val) == Counter(docs)
    assert train != [d for d in docs if d not in set(val)]


def test_val_data_fills_one_shard_and_is_counted_as_read(tmp_path):
    """--val-data bigger than a shard: the validation shard takes one shard's worth (the rest of it is not
    validation, so its training copies are kept), and meta.json counts what was read from it too."""
    docs = [f"Dokument {i} mit Inhalt" for i in range(40)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"text": [f"Validierung {i}" for i in range(30)] + docs[:5]}), tmp_path / "val.parquet")
    meta = prepare.prepare(f"parquet://{tmp_path}/in/a.parquet", str(tmp_path / "out"),
                           val_data=f"parquet://{tmp_path}/val.parquet", **dict(SMALL, shard_rows=10))
    train, val, meta = prepared(tmp_path / "out")
    assert len(val) == 10 and set(val) < {f"Validierung {i}" for i in range(30)} | set(docs[:5])
    assert Counter(train) == Counter(d for d in docs if d not in set(val))
    assert meta["read"]["docs"] >= len(docs) + len(val)  # the 40 training documents, and the validation ones read


def test_val_data_beyond_one_shard_loses_no_document_with_dedup(tmp_path):
    """--val-data beyond one shard, with --dedup: every document is in one split. (The document read to find
    the validation shard full was marked as seen but not kept: its training copy was dropped as a duplicate.)"""
    val_docs = [f"Validierung {i}" for i in range(11)]
    pq.write_table(pa.table({"text": val_docs}), tmp_path / "val.parquet")
    pq.write_table(pa.table({"text": [f"Training {i}" for i in range(30)] + val_docs}), tmp_path / "train.parquet")
    prepare.prepare(f"parquet://{tmp_path}/train.parquet", str(tmp_path / "out"),
                    val_data=f"parquet://{tmp_path}/val.parquet", dedup=True, **dict(SMALL, shard_rows=10))
    train, val, meta = prepared(tmp_path / "out")
    assert len(val) == 10
    assert set(train) | set(val) == {f"Training {i}" for i in range(30)} | set(val_docs)
    assert meta["filtered"]["duplicates"] == 10  # the training copies of the validation documents only


def test_a_folder_of_an_older_prepare_is_left_alone_but_not_resumed(tmp_path, monkeypatch):
    """meta.json of an older prepare.py records no input files: complete, it is read and left alone as before;
    unfinished (or missing a shard) it cannot be replayed exactly, and prepare says so."""
    make_corpus(tmp_path / "in", n=1500)
    spec = f"parquet://{tmp_path}/in/*.parquet"

    def as_older_version(out):
        meta = json.loads((out / "meta.json").read_text())
        del meta["files"]
        (out / "meta.json").write_text(json.dumps(meta))

    prepare.prepare(spec, str(tmp_path / "done"), **dict(SMALL, shard_rows=500))
    as_older_version(tmp_path / "done")
    assert prepare.prepare(spec, str(tmp_path / "done"), **dict(SMALL, shard_rows=500))["complete"]
    assert data.resolve_files(parse_spec(f"parquet://{tmp_path}/done"))
    (tmp_path / "done" / "shard_00001.parquet").unlink()
    with pytest.raises(DataError, match=r"done was started by an older prepare.py, which recorded no input files.*"
                                        r"delete .*done and prepare it again"):
        prepare.prepare(spec, str(tmp_path / "done"), **dict(SMALL, shard_rows=500))

    restore = interrupt_at_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(spec, str(tmp_path / "part"), **dict(SMALL, shard_rows=500))
    restore()
    as_older_version(tmp_path / "part")
    with pytest.raises(DataError, match="started by an older prepare.py"):
        prepare.prepare(spec, str(tmp_path / "part"), **dict(SMALL, shard_rows=500))


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_blank_documents_are_skipped_streaming_or_not(tmp_path, kind):
    """An empty or whitespace-only text is no document (README), on every path: streaming parquet is read with
    pyarrow directly, the rest through datasets; both write the same documents and count the same."""
    texts = [f"Dokument {i}" if i % 4 else ("" if i % 8 else "  \n ") for i in range(400)]
    if kind == "parquet":
        pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    else:
        (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    results = []
    for streaming in (True, False):
        out = tmp_path / f"out-{streaming}"
        prepare.prepare(f"{kind}://{tmp_path}/a.{kind}", str(out), streaming=streaming, **dict(SMALL, shard_rows=100))
        train, val, meta = prepared(out)
        assert Counter(train + val) == Counter(t for t in texts if t.strip())
        results.append((sorted(val), meta["read"], meta["train"]["docs"], meta["val"]["docs"], meta["filtered"]))
    assert results[0] == results[1] and results[0][1]["docs"] == 300


def test_a_missing_shard_of_a_complete_folder_is_written_again(tmp_path, capsys):
    """The loader says "prepare the folder again" for a shard meta.json lists that is not there: the same
    command replays the stream and writes the missing shards, byte-identical, leaving the others alone."""
    make_corpus(tmp_path / "in")
    argv = ["--data", f"parquet://{tmp_path}/in/*.parquet", "--out", str(tmp_path / "out"), "--shard-chars", "30k",
            "--val-frac", "0.05", "--log-every", "1e9"]
    prepare.main(argv)
    out = tmp_path / "out"
    train, val, meta = prepared(out)
    lost = {name: (out / name).read_bytes() for name in (meta["train"]["files"][1], meta["val"]["file"])}
    for name in lost:
        (out / name).unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    with pytest.raises(DataError, match="is missing .meta.json lists it.; prepare the folder again"):
        data.resolve_files(parse_spec(f"parquet://{out}"))
    capsys.readouterr()
    prepare.main(argv)
    assert f"lacks {', '.join(lost)}, listed in its meta.json" in capsys.readouterr().out
    assert all((out / name).read_bytes() == content for name, content in lost.items())
    assert all((out / name).stat().st_mtime_ns == t for name, t in stamps.items())  # not rewritten
    assert prepared(out)[:2] == (train, val)
    again = prepared(out)[2]
    assert again["complete"] and again == meta | {"finished": again["finished"]}
    # a shard that is there with other rows than recorded was changed by someone else: refused, with a fix
    first = out / meta["train"]["files"][0]
    pq.write_table(pa.table({"text": ["fremd"] * 5}), first)
    with pytest.raises(SystemExit, match=rf"error: {first} has 5 rows, but meta.json records \d+: it changed after "
                                         r"prepare wrote it; delete it and run the same command again"):
        prepare.main(argv)
    first.unlink()
    prepare.main(argv)
    assert prepared(out)[:2] == (train, val)


def test_the_seed_orders_a_parquet_sources_documents(tmp_path):
    """--seed draws the order of a local parquet source's documents (its row groups are read in a seeded
    permutation, then buffer-shuffled), not only the validation draw: two seeds give the same documents in
    two orders, the same seed the same order again."""
    (tmp_path / "in").mkdir()
    docs = [f"Gruppe {g}, Dokument {i}" for g in range(16) for i in range(10)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "in" / "a.parquet", row_group_size=10)
    orders = {}
    for seed, out in ((1, "a"), (2, "b"), (1, "c")):
        prepare.prepare(f"parquet://{tmp_path}/in/a.parquet", str(tmp_path / out),
                        **{**SMALL, "val_frac": 0.0, "seed": seed, "shard_rows": 64})
        orders[out] = prepared(tmp_path / out)[0]
    assert sorted(orders["a"]) == sorted(orders["b"]) == sorted(docs)
    assert orders["a"] == orders["c"] and orders["a"] != orders["b"]
