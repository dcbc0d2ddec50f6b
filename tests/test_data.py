"""Tests for data.py: dataset specs and reading sources."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
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
])
def test_bad_specs_name_the_offending_part(spec, message):
    with pytest.raises(DataError, match="bad dataset spec") as e:
        parse_spec(spec)
    assert message in str(e.value) and repr(spec) in str(e.value)


def test_no_spec_at_all():
    with pytest.raises(DataError, match="no dataset spec"):
        parse_specs(["  "])


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


@pytest.mark.parametrize("make, spec, message", [
    (lambda d: None, "parquet://{d}/missing.parquet", "file not found"),
    (lambda d: None, "parquet://{d}/*.parquet", "no files match"),
    (lambda d: (d / "x").mkdir(), "jsonl://{d}/x", "is a folder"),
    (lambda d: (d / "a.jsonl").write_text('{"text": "a"}\n{"inhalt": "b"}\n'), "jsonl://{d}/a.jsonl",
     "document 1 has no string 'text' field"),
    (lambda d: (d / "a.txt").write_bytes("gut\n".encode() + "schlecht".encode("latin1") + b"\xff\n"),
     "txt://{d}/a.txt", "a.txt is not valid UTF-8"),
    (lambda d: pq.write_table(pa.table({"inhalt": ["x"]}), d / "a.parquet"), "parquet://{d}/a.parquet",
     "has no column 'text' (columns: inhalt)"),
])
def test_bad_sources_give_clear_errors(tmp_path, make, spec, message):
    make(tmp_path)
    with pytest.raises(DataError) as e:
        list(data.iter_texts(parse_spec(spec.format(d=tmp_path))))
    assert message in str(e.value)


def test_hub_unreachable_fails_fast_with_hint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    with pytest.raises(DataError, match=r"hub unreachable .*pass --data"):
        data.open_source(parse_spec(data.DEFAULT_PRETRAIN_SPEC))


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
