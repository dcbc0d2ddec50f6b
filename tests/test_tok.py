"""Tests for tok.py: the German byte-level BPE tokenizer."""
import copy
import json
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

import data
import tok
from tok import SPECIAL_TOKENS, Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "german.txt"

GERMAN_EXAMPLES = [
    "Straße", "Größe", "„Anführungszeichen“", "‚einfache‘", "»Zitat«", "1.000,50 €",
    "Gedankenstrich – und Auslassung…", "Emojis: 😀🎄👍🏽", "Tabs\tund\nZeilen\n\n  umbrüche\r\n",
    "Ärger Öl Übermut äöüß ÄÖÜẞ", "Café naïve Ångström ŁÓDŹ", "",
]


def fixture_lines() -> list[str]:
    return FIXTURE.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(fixture_lines() * 3, vocab_size=512, show_progress=False)


def pre_tokens(text: str) -> list[str]:
    split = pre_tokenizers.Split(Regex(tok.SPLIT_PATTERN), behavior="isolated")
    return [piece for piece, _ in split.pre_tokenize_str(text)]


# --- lossless round trip ------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_arbitrary_unicode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == tokenizer.normalize(text)
    assert tokenizer.token_bytes[ids].sum() == len(tokenizer.normalize(text).encode("utf-8"))


@pytest.mark.parametrize("text", GERMAN_EXAMPLES)
def test_round_trip_german_examples(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text  # all examples are NFC already


def test_nfc_makes_combining_and_precomposed_equal(tokenizer):
    combining, precomposed = "Gro\u0308\u00dfe", "Größe"
    assert combining != precomposed
    assert tokenizer.normalize(combining) == unicodedata.normalize("NFC", combining) == precomposed
    assert tokenizer.encode(combining) == tokenizer.encode(precomposed)


def test_tiktoken_encoding_equals_hf_tokenizers(tokenizer, data_dir):
    """We encode with tiktoken for speed; it must cut German text exactly as HF's BPE does."""
    import data
    source = data.parse_spec(f"parquet://{data_dir}/pretrain/klexikon/val.parquet")
    texts = fixture_lines() + GERMAN_EXAMPLES + list(data.iter_texts(source))
    hf_ids = [e.ids for e in tokenizer.hf.encode_batch(texts, add_special_tokens=False)]
    assert tokenizer.encode_batch(texts) == hf_ids


def test_encode_batch_equals_encode(tokenizer):
    texts = fixture_lines() + GERMAN_EXAMPLES
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


# --- the German split pattern ---------------------------------------------------

@pytest.mark.parametrize("text, pieces", [
    ("Die Straße", ["Die", " Straße"]),
    ("Größe Ärger", ["Größe", " Ärger"]),
    ("„Anführungszeichen“", ["„Anführungszeichen", "“"]),
    ("sagte: »Nein«", ["sagte", ":", " »", "Nein", "«"]),
    ("1.000,50 €", ["1", ".", "000", ",", "50", " €"]),
    ("1234567", ["123", "456", "7"]),
    ("geht's", ["geht", "'s"]),                  # no English contraction rule
    ("we're", ["we", "'re"]),
    ("q\u0307 x", ["q\u0307", " x"]),            # combining mark without a precomposed form stays in the word
    ("\u0301!", ["\u0301", "!"]),                # a stray mark is a word of its own, never a prefix
    ("Ende…", ["Ende", "…"]),
    ("a – b", ["a", " –", " b"]),
    ("Zeile\n\n  neu", ["Zeile", "\n\n", " ", " neu"]),
    ("a\tb", ["a", "\tb"]),
])
def test_split_pattern_for_german(text, pieces):
    assert pre_tokens(text) == pieces
    assert "".join(pieces) == text


def test_no_token_mixes_letters_with_digits(tokenizer):
    for token_bytes in tokenizer.id_to_bytes:
        text = token_bytes.decode("utf-8", errors="ignore")
        assert not (any(c.isalpha() for c in text) and any(c.isdigit() for c in text)), text


# --- special tokens -------------------------------------------------------------

def test_special_tokens_only_via_explicit_api(tokenizer):
    ids = set(tokenizer.special.values())
    assert len(ids) == len(SPECIAL_TOKENS)
    text = "Hallo <|user_start|>du<|assistant_end|> " + " ".join(SPECIAL_TOKENS)
    encoded = tokenizer.encode(text)
    assert not ids & set(encoded)
    assert tokenizer.decode(encoded) == text
    assert not ids & {i for row in tokenizer.encode_batch([text, BOS_TEXT]) for i in row}
    for name, i in tokenizer.special.items():
        assert tokenizer.decode([i]) == name
        assert tokenizer.token_bytes[i] == 0


BOS_TEXT = "<|bos|>"


def test_save_load_keeps_behaviour(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    text = "„Größe“ <|bos|> 1.000,50 €"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.bos_id not in loaded.encode(text)
    assert loaded.special == tokenizer.special


def test_load_missing_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one with"):
        Tokenizer.load(tmp_path / "nope")


# --- streaming decoder ------------------------------------------------------------

def test_stream_decoder_never_emits_half_characters(tokenizer):
    text = "Größe 😀 „Zitat“ 👍🏽 ẞ"
    ids = tokenizer.encode(text)
    # the test is only meaningful if some character really is split over tokens
    assert any(b and (b[-1] & 0xC0 == 0xC0 or b[0] & 0xC0 == 0x80) for b in map(tokenizer.id_to_bytes.__getitem__, ids))
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_skips_special_tokens(tokenizer):
    decoder = tokenizer.stream_decoder()
    ids = [tokenizer.bos_id] + tokenizer.encode("Hallo") + [tokenizer.special["<|assistant_end|>"]]
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "Hallo"


# --- training ---------------------------------------------------------------------

def test_training_is_deterministic():
    texts = fixture_lines() * 3
    a = Tokenizer.train(texts, vocab_size=448, show_progress=False)
    b = Tokenizer.train(list(texts), vocab_size=448, show_progress=False)
    assert a.hf.to_str() == b.hf.to_str()
    assert a.vocab_size == 448


@pytest.mark.parametrize("vocab_size, message", [(256, "too small"), (300, "too small"), (1000, "multiple of 64")])
def test_bad_vocab_size(vocab_size, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.train(["a"], vocab_size=vocab_size, show_progress=False)


def write_parquet(path: Path, texts, column="text"):
    pq.write_table(pa.table({column: texts}), path)
    return path


def test_cli_trains_and_saves(tmp_path, capsys):
    lines = fixture_lines() * 10  # 300 documents: every 100th is held out
    write_parquet(tmp_path / "a.parquet", lines)
    out = tmp_path / "tok"
    tok.main(["--data", f"parquet://{tmp_path}/*.parquet", "--vocab-size", "512", "--out", str(out)])
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    assert meta["vocab_size"] == Tokenizer.load(out).vocab_size == 512
    assert meta["heldout_documents"] == 3 and meta["documents"] == 297
    assert meta["chars"] == sum(map(len, lines)) - sum(len(lines[i]) for i in (99, 199, 299))
    assert "bytes/token" in capsys.readouterr().out


def test_cli_caps_characters(tmp_path, capsys):
    write_parquet(tmp_path / "a.parquet", ["x" * 5000, "Größe " * 1000])
    out = tmp_path / "tok"
    tok.main(["--data", f"parquet://{tmp_path}/a.parquet", "--vocab-size", "320", "--out", str(out),
              "--max-chars", "4k", "--max-doc-chars", "3000"])
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    assert meta["chars"] == 4000 and meta["documents"] == 2
    # so little text has too few pairs to merge for 320 tokens: said, since the model takes the odd size
    assert meta["vocab_size"] < 320 and f"warning: the text gave only {meta['vocab_size']} tokens of the 320 asked" \
        in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--max-doc-chars", "-20"), ("--max-chars", "0"), ("--max-chars", "inf"),
                                         ("--max-chars", "1e400"), ("--max-doc-chars", "nan")])
def test_cli_refuses_counts_that_are_not_positive(tmp_path, capsys, flag, value):
    """--max-doc-chars -20 cut 20 characters off every document, silently; inf was a traceback (OverflowError)."""
    with pytest.raises(SystemExit):
        tok.main(["--data", f"txt://{FIXTURE}", "--vocab-size", "320", "--out", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "count" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_with_nothing_held_out_writes_json(tmp_path):
    """Under 100 documents nothing is held out: the compression is null in tokenizer_meta.json (it was NaN, which
    JSON parsers other than Python's refuse)."""
    write_parquet(tmp_path / "a.parquet", [f"Satz Nummer {i} über Größe." for i in range(30)])
    tok.main(["--data", f"parquet://{tmp_path}/a.parquet", "--vocab-size", "320", "--out", str(tmp_path / "tok")])
    text = (tmp_path / "tok" / "tokenizer_meta.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in tokenizer_meta.json"))[
        "heldout_bytes_per_token"] is None


def test_cli_closes_the_half_read_documents(tmp_path, monkeypatch):
    """tok.py stops reading at --max-chars, then closes the document stream itself, in the main thread and
    before the interpreter's teardown, where a half-read pyarrow stream can abort the process."""
    events = []

    def documents(sources):
        try:
            for i in range(10_000):
                yield f"Dokument {i}: " + "Größe und Maß " * 20
        finally:
            events.append("closed")  # GeneratorExit: closed with its frame, not left to the garbage collector

    monkeypatch.setattr(data, "interleave_documents", documents)
    monkeypatch.setattr(tok.gc, "collect", lambda: events.append("collected"))
    tokenizer = tok.main(["--data", f"txt://{FIXTURE}", "--vocab-size", "320", "--out", str(tmp_path / "o"),
                          "--max-chars", "20k"])
    assert tokenizer.vocab_size == 320 and events == ["closed", "collected"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "file not found"),
    (lambda d: write_parquet(d / "in.parquet", [], column="text"), "no text found"),
    (lambda d: write_parquet(d / "in.parquet", ["Hallo"], column="inhalt"), "no column 'text'"),
    (lambda d: (d / "in.parquet").write_text("kein parquet"), "not a readable parquet file"),
])
def test_cli_bad_input_gives_clear_error(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        tok.main(["--data", f"parquet://{tmp_path}/in.parquet", "--vocab-size", "512", "--out", str(tmp_path / "o")])
    assert str(exit_info.value).startswith("error:") and message in str(exit_info.value)
    assert not (tmp_path / "o").exists()


def test_cli_too_small_vocab(tmp_path):
    with pytest.raises(SystemExit, match="too small"):
        tok.main(["--data", f"txt://{FIXTURE}", "--vocab-size", "192", "--out", str(tmp_path / "o")])


# --- on real German sample text ------------------------------------------------------

def test_compression_beats_bytes_on_german_sample(data_dir):
    import data
    source = data.parse_spec(f"parquet://{data_dir}/pretrain/klexikon/train-00000.parquet")
    docs = list(data.iter_texts(source))
    train, heldout = docs[:-100], docs[-100:]
    tokenizer = Tokenizer.train(train, vocab_size=4096, show_progress=False)
    compression = tok.bytes_per_token(tokenizer, heldout)
    # a byte-level tokenizer gives exactly 1.0 byte/token; BPE on German should give > 3
    assert compression > 3.0, compression


def test_cli_help_names_the_real_default_data(capsys):
    import data
    with pytest.raises(SystemExit):
        tok.main(["--help"])
    out = capsys.readouterr().out
    assert "data.DEFAULT_PRETRAIN_SPEC" in out
    for spec in data.DEFAULT_PRETRAIN_SPEC.split():
        assert f"\n  {spec}\n" in out  # each source whole, on its own line
    assert "FineWeb-2 deu_Latn on the hub" not in out  # the old, wrong default


def test_encode_batch_normalizes_like_encode(tokenizer):
    """encode_batch (what packing and bytes_per_token use) must NFC-normalise like encode: same ids."""
    combining = ["Gro\u0308\u00dfe", "Cafe\u0301 na\u0131\u0308ve"]
    assert tokenizer.encode_batch(combining) == [tokenizer.encode(t) for t in combining]
    assert tokenizer.encode_batch(combining)[0] == tokenizer.encode("Größe")


def test_decode_of_broken_utf8_replaces_instead_of_raising(tokenizer):
    """A model can emit ids that cut a character in two; decode shows U+FFFD, it never raises."""
    ids = tokenizer.encode("𝄞")
    assert len(ids) > 1  # the rare character is split over byte tokens in this small vocabulary
    assert tokenizer.decode(ids[:-1]) == "\ufffd"
    lone = tokenizer.id_to_bytes.index(b"\xff")  # a byte that is never valid UTF-8
    assert tokenizer.decode([lone] + tokenizer.encode("Hallo")) == "\ufffdHallo"


def test_stream_decoder_replaces_broken_utf8_and_flushes_a_cut_character(tokenizer):
    """Streaming: an invalid byte shows U+FFFD at once; a character left incomplete at the end shows
    U+FFFD on flush(), rather than vanishing or raising."""
    decoder = tokenizer.stream_decoder()
    lone = tokenizer.id_to_bytes.index(b"\xff")
    assert decoder.push(lone) == "\ufffd"
    ids = tokenizer.encode("𝄞")
    assert "".join(decoder.push(i) for i in ids[:-1]) == ""  # held back: incomplete
    assert decoder.flush() == "\ufffd"


def test_failed_save_keeps_the_old_tokenizer_and_leaves_no_temp_file(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    before = (tmp_path / "tokenizer.json").read_text()

    class FullDisk:
        def save(self, path):
            with open(path, "w") as f:
                f.write('{"half written')
            raise Exception("No space left on device")

    broken = copy.copy(tokenizer)
    broken.hf = FullDisk()
    with pytest.raises(OSError, match="cannot write"):
        broken.save(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


def test_load_damaged_file_gives_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": kaputt')
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_load_accepts_the_json_file_itself(tokenizer, tmp_path):
    """common.py loads `path / "tokenizer.json"`: a file path works as well as its folder."""
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.encode("„Größe“ 1.000,50 €") == tokenizer.encode("„Größe“ 1.000,50 €")
    assert loaded.special == tokenizer.special


def test_tokenizer_without_special_tokens_is_refused():
    """A tokenizer.json not made by tok.py (no chat tokens) is refused with the reason, not a TypeError later."""
    with pytest.raises(ValueError, match="lacks the special tokens"):
        Tokenizer.from_json(HFTokenizer(models.BPE()).to_str())


def test_saved_tokenizer_json_normalizes_for_other_tools(tokenizer, tmp_path):
    """tokenizer.json (what export.py hands to transformers) carries the NFC normalizer: HF's own encoder
    gives the ids tok.py trained with for text typed with combining marks."""
    tokenizer.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode("Gro\u0308\u00dfe", add_special_tokens=False).ids == tokenizer.encode("Größe")


def test_cli_blank_documents_give_clear_error(tmp_path):
    """Rows that are all empty or blank: no tokenizer trained on nothing is saved."""
    write_parquet(tmp_path / "in.parquet", ["", "   ", ""])
    with pytest.raises(SystemExit, match="no text found"):
        tok.main(["--data", f"parquet://{tmp_path}/in.parquet", "--vocab-size", "320", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "tokenizer.json").exists()
