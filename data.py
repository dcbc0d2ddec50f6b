"""
data.py: where nanoschnack's text comes from.

Every stage names its data with the same small grammar, a *dataset spec*:

    hf://HuggingFaceFW/fineweb-2?name=deu_Latn&split=train&weight=0.6
    parquet:///data/pretrain/*/train-*.parquet?text=text
    jsonl://chats/*.jsonl
    txt://books/*.txt?per=line

    <kind>://<location>[?key=value&key=value...]

The location is a hub dataset id (hf) or a local path or glob (parquet, jsonl,
txt; `**` recurses). It ends at the first `?`, and it is percent-decoded like a
URL path, so a `?`, `%` or space inside a path is written `%3F`, `%25`, `%20`.
Several sources are separated by whitespace (which therefore never occurs
unescaped in a spec) or given as repeated flags. Options:

    text=COLUMN   the column holding the document (default: text)
    weight=W      relative sampling weight when mixing sources (default: 1)
    split=NAME    hf only: the split to read (default: train)
    name=CONFIG   hf only: the dataset config, e.g. deu_Latn
    revision=REV  hf only: a branch, tag or commit of the dataset repo
    per=file|line txt only: one document per file (default) or per line

Everything is streamed through HF `datasets` (streaming=True), so no corpus is
ever loaded whole into memory.
"""
import codecs
import glob
import os
import socket
import sys
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

# The default pretraining mix: real German text on the Hugging Face hub.
DEFAULT_PRETRAIN_SPEC = "hf://HuggingFaceFW/fineweb-2?name=deu_Latn&split=train&text=text"

LOCAL_KINDS = ("parquet", "jsonl", "txt")
KINDS = ("hf",) + LOCAL_KINDS
OPTIONS = {  # which options each kind of source accepts
    "hf": {"text", "weight", "split", "name", "revision"},
    "parquet": {"text", "weight"},
    "jsonl": {"text", "weight"},
    "txt": {"weight", "per"},
}


class DataError(Exception):
    """A problem with the user's data or spec; the message says what to do."""


@dataclass
class Source:
    """One parsed dataset spec."""
    spec: str                      # the spec as the user wrote it, for messages
    kind: str                      # hf | parquet | jsonl | txt
    location: str                  # hub id, or a local path/glob
    text: str = "text"
    weight: float = 1.0
    split: str = "train"
    name: str | None = None
    revision: str | None = None
    per: str = "file"
    files: list[str] = field(default_factory=list)  # resolved local files


def parse_spec(spec: str) -> Source:
    """Parse one `kind://location?options` spec (see the module docstring)."""
    kind, sep, rest = spec.partition("://")
    if not sep:
        raise DataError(f"bad dataset spec {spec!r}: no '<kind>://' prefix; "
                        f"write e.g. parquet://{spec} (kinds: {', '.join(KINDS)})")
    if kind not in KINDS:
        raise DataError(f"bad dataset spec {spec!r}: unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    location, _, query = rest.partition("?")
    location = unquote(location)
    if not location:
        raise DataError(f"bad dataset spec {spec!r}: empty location after '{kind}://'")
    source = Source(spec=spec, kind=kind, location=location)
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        value = unquote(value)
        if not eq or not value:
            raise DataError(f"bad dataset spec {spec!r}: option {part!r} is not key=value")
        if key not in OPTIONS[kind]:
            raise DataError(f"bad dataset spec {spec!r}: option {key!r} does not apply to {kind}:// "
                            f"(allowed: {', '.join(sorted(OPTIONS[kind]))})")
        if key == "weight":
            try:
                source.weight = float(value)
            except ValueError:
                source.weight = -1.0
            if not source.weight > 0:
                raise DataError(f"bad dataset spec {spec!r}: weight={value!r} must be a positive number")
        elif key == "per" and value not in ("file", "line"):
            raise DataError(f"bad dataset spec {spec!r}: per={value!r} must be 'file' or 'line'")
        else:
            setattr(source, key, value)
    return source


def parse_specs(specs) -> list[Source]:
    """Parse whitespace-separated specs, from one string or a list of strings."""
    if isinstance(specs, str):
        specs = [specs]
    sources = [parse_spec(s) for text in specs for s in text.split()]
    if not sources:
        raise DataError("no dataset spec given: pass e.g. --data 'parquet://DIR/*.parquet'")
    return sources


# -----------------------------------------------------------------------------
# Opening a source as a streaming HF dataset of {"text": str} rows

def resolve_files(source: Source) -> list[str]:
    """Expand a local source's path or glob into a sorted list of files."""
    pattern = os.path.expanduser(source.location)
    if os.path.isdir(pattern):
        raise DataError(f"{source.spec}: {pattern} is a folder; name the files with a glob, "
                        f"e.g. {source.kind}://{pattern.rstrip('/')}/*.{source.kind}")
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        what = "no files match" if glob.has_magic(pattern) else "file not found:"
        raise DataError(f"{source.spec}: {what} {pattern}")
    return files


def check_hub_reachable(source: Source, timeout: float = 3.0):
    """Fail in seconds, not after a minute of retries, when the hub is offline."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = "pass --data with local files, e.g. --data 'parquet://DIR/*.parquet' (see README)"
    if offline:
        return  # datasets then uses its local cache, and says so itself if it has nothing
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise DataError(f"{source.spec}: hub unreachable ({host}: {e}); {hint}") from None


def open_source(source: Source):
    """Open a source as a streaming `datasets.IterableDataset` with a `text` column."""
    import datasets
    datasets.logging.set_verbosity_error()
    if source.kind == "hf":
        check_hub_reachable(source)
        try:
            ds = datasets.load_dataset(source.location, name=source.name, split=source.split,
                                       revision=source.revision, streaming=True)
        except (ConnectionError, OSError) as e:
            raise DataError(f"{source.spec}: hub unreachable or dataset not cached ({e}); "
                            f"pass --data with local files, e.g. --data 'parquet://DIR/*.parquet'") from None
        except Exception as e:  # unknown dataset, config or split
            raise DataError(f"{source.spec}: cannot open hub dataset: {e}") from None
    else:
        source.files = resolve_files(source)
        if source.kind == "parquet":
            check_parquet_files(source)
            ds = datasets.load_dataset("parquet", data_files=source.files, split="train",
                                       streaming=True, columns=[source.text])
        elif source.kind == "jsonl":
            ds = datasets.load_dataset("json", data_files=source.files, split="train", streaming=True)
        else:
            source.text = "text"
            ds = datasets.load_dataset("text", data_files=source.files, split="train", streaming=True,
                                       sample_by="document" if source.per == "file" else "line")
    if ds.column_names is not None and source.text not in ds.column_names:
        raise DataError(f"{source.spec}: no column {source.text!r} (columns: {', '.join(ds.column_names)}); "
                        f"pick one with ?text=COLUMN")
    if source.text != "text":
        ds = ds.rename_column(source.text, "text")
    return ds


def check_parquet_files(source: Source):
    """Check every parquet file has the text column, reading only the footers.

    Files with no rows are dropped (datasets cannot read them); none is lost."""
    import pyarrow.parquet as pq
    nonempty = []
    for path in source.files:
        try:
            meta = pq.read_metadata(path)
        except Exception as e:
            raise DataError(f"{source.spec}: {path} is not a readable parquet file ({e})") from None
        names = meta.schema.to_arrow_schema().names
        if source.text not in names:
            raise DataError(f"{source.spec}: {path} has no column {source.text!r} "
                            f"(columns: {', '.join(names)}); pick one with ?text=COLUMN")
        if meta.num_rows > 0:
            nonempty.append(path)
    if not nonempty:
        raise DataError(f"{source.spec}: no text found, all {len(source.files)} file(s) have no rows (empty dataset)")
    source.files = nonempty


def first_undecodable_file(files: list[str]) -> str | None:
    """On a UnicodeDecodeError, find which file caused it (only on that error path)."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    decoder.decode(chunk)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return path
    return None


def iter_texts(source: Source, ds=None):
    """Yield the documents of one source as strings, with clear errors on bad rows."""
    ds = open_source(source) if ds is None else ds
    try:
        for i, row in enumerate(ds):
            text = row["text"]
            if not isinstance(text, str):
                raise DataError(f"{source.spec}: document {i} has no string {source.text!r} field "
                                f"(got {type(text).__name__}; its fields: {', '.join(row)})")
            yield text
    except UnicodeDecodeError as e:
        bad = first_undecodable_file(source.files) or "a file"
        raise DataError(f"{source.spec}: {bad} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8") from None


def interleave_documents(sources: list[Source]):
    """Yield the documents of several sources, each next from the source that has
    given the fewest characters relative to its weight (deterministic)."""
    sources = list(sources)
    streams = [iter_texts(s) for s in sources]
    consumed = [0.0] * len(sources)
    while streams:
        i = min(range(len(streams)), key=lambda j: consumed[j] / sources[j].weight)
        try:
            doc = next(streams[i])
        except StopIteration:
            del streams[i], consumed[i], sources[i]
            continue
        consumed[i] += len(doc)
        yield doc


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Inspect a dataset spec: print its first documents.")
    parser.add_argument("--data", nargs="+", default=[DEFAULT_PRETRAIN_SPEC], help="dataset spec(s)")
    parser.add_argument("-n", type=int, default=3, help="documents to show per source")
    args = parser.parse_args()
    try:
        for src in parse_specs(args.data):
            print(f"== {src.spec}")
            for i, doc in zip(range(args.n), iter_texts(src)):
                print(f"-- document {i}: {len(doc):,} characters\n{doc[:300]!r}")
    except DataError as e:
        sys.exit(f"error: {e}")
