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
    weight=W      relative sampling weight when mixing sources (default: 1: every source
                  gives the same number of tokens); weight=size (local files only): the
                  source's size in bytes of text, so every source is read about as many
                  times over as the others; weight=size^P: the size to the power P
                  (size^0.5: its square root; see "Mixing by size" below)
    split=NAME    hf: the split to read (default: train); a parquet folder:
                  train (default) or val (see "Folders" below)
    name=CONFIG   hf only: the dataset config, e.g. deu_Latn
    revision=REV  hf only: a branch, tag or commit of the dataset repo
    per=file|line txt only: one document per file (default) or per line
    shuffle=on|off read the source's shards (files) in a seeded random order,
                  MIX_STREAMS of them at once (default: on for hf, off for local
                  files, which are read in the order named; see "Fair from the
                  first batch" below)
    seed=N        the seed of that order (default: 42; implies shuffle=on)

Folders. `parquet://DIR` names a folder of shards: one written by `python prepare.py`
(it has a meta.json; training shards, or with ?split=val its validation
shard), nanochat's base_data (shard_NNNNN.parquet, the last one is validation, as
in nanochat), or any folder of *.parquet (all of it is training data).

Fair from the first batch: a shuffled source (hf:// by default) is read in a seeded
random shard order, MIX_STREAMS shards at once (shards.py, `ShuffledShards`).

Mixing by size. Equal weights give every source the same tokens, so a 1 MB source is
read dozens of times over while a 100 MB one is barely started, and the model learns the
small one by heart. weight=size weights a local source by its bytes of text (a parquet
file's text column, read once at the start: 1.5 s of CPU for the 390 MB of the sample data;
a JSONL or text file's bytes): the mix then
reads like the data, every source about equally far into its epochs (train.py logs
how many epochs each source went through). Sources with weight=size and sources with
numbers can be mixed: the numbers then count bytes too, so write numbers everywhere or
size everywhere. weight=size^P (0 < P <= 1) is the middle way multilingual models take for
their languages: size^0.5 gives a 1 MB source a tenth of a 100 MB one's tokens instead of a
hundredth, so small sources are read faster than big ones but not many times over (the
demo's mix, README "Dataset specs").

Everything is streamed through HF `datasets` (streaming=True), so no corpus is
ever loaded whole into memory. prepare.py turns any spec into such a folder of
local shards; dataloader.py makes packed, rank-sharded pretraining batches of it.
"""
import codecs
import glob
import hashlib
import json
import math
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from shards import ShuffledShards

# The default pretraining mix: real German text on the Hugging Face hub, weighted by
# share of tokens (see README, "The default mix"): web text (FineWeb-2, 60%: the
# broadest, most current German), encyclopedic text (Wikipedia, 10%: dense facts,
# clean prose) and openly licensed books, news, laws, speeches and science (German
# Commons, 30%). Each is read in a seeded random shard order (shuffle=on is the hub
# default), so every share is a fair sample of its source from the first batch on.
DEFAULT_PRETRAIN_SPEC = " ".join([
    "hf://HuggingFaceFW/fineweb-2?name=deu_Latn&split=train&weight=0.6",
    "hf://wikimedia/wikipedia?name=20231101.de&split=train&weight=0.1",
    "hf://coral-nlp/german-commons?split=train&weight=0.3",
])
DEFAULT_VAL_SPEC = "hf://HuggingFaceFW/fineweb-2?name=deu_Latn&split=test"

LOCAL_KINDS = ("parquet", "jsonl", "txt")
KINDS = ("hf",) + LOCAL_KINDS
OPTIONS = {  # which options each kind of source accepts
    "hf": {"text", "weight", "split", "name", "revision", "shuffle", "seed"},
    "parquet": {"text", "weight", "split", "shuffle", "seed"},
    "jsonl": {"text", "weight", "shuffle", "seed"},
    "txt": {"weight", "per", "shuffle", "seed"},
}
DEFAULT_SEED = 42  # the seed of a shuffled source's shard order


class DataError(Exception):
    """A problem with the user's data or spec; the message says what to do.

    Where what to do depends on the stage's flags (a hub that can't be reached),
    that part is kept apart as `hint`, so a stage with other flags can say its own."""

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(f"{problem}; {hint}" if hint else problem)
        self.problem, self.hint = problem, hint


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
    shuffle: bool | None = None    # None: the kind's default (on for hf, off for local files)
    seed: int = DEFAULT_SEED
    files: list[str] = field(default_factory=list)  # resolved local files
    num_docs: int | None = None    # number of documents, where it is known without reading them
    weight_by_size: bool = False   # weight=size or size^P: the weight becomes (bytes of text) ** size_power
    size_power: float = 1.0
    size_bytes: int = 0            # with weight_by_size: the bytes of text (text_bytes)

    @property
    def shuffled(self) -> bool:
        """Whether the source is read in a seeded random shard order (ShuffledShards)."""
        return self.kind == "hf" if self.shuffle is None else self.shuffle


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
        question = "" if kind == "hf" else "; a '?' in a file name is written %3F"
        if not eq or not value:
            raise DataError(f"bad dataset spec {spec!r}: option {part!r} is not key=value{question}")
        if key not in OPTIONS[kind]:
            raise DataError(f"bad dataset spec {spec!r}: option {key!r} does not apply to {kind}:// "
                            f"(allowed: {', '.join(sorted(OPTIONS[kind]))}){question}")
        if key == "weight" and value.startswith("size"):
            if kind == "hf":
                raise DataError(f"bad dataset spec {spec!r}: weight=size needs local files (parquet, jsonl, txt); "
                                f"give the hub source a number, e.g. weight=0.5")
            power = value[len("size^"):] if value.startswith("size^") else "1" if value == "size" else ""
            try:
                source.size_power = float(power)
            except ValueError:
                source.size_power = -1.0
            if not 0 < source.size_power <= 1:
                raise DataError(f"bad dataset spec {spec!r}: weight={value!r}: write size, or size^P with P "
                                f"above 0 and at most 1 (size^0.5: the square root of the size)")
            source.weight_by_size = True
        elif key == "weight":
            try:
                source.weight = float(value)
            except ValueError:
                source.weight = -1.0
            if not 0 < source.weight < math.inf:
                raise DataError(f"bad dataset spec {spec!r}: weight={value!r} must be a positive number, 'size' "
                                f"or 'size^P'")
        elif key == "per" and value not in ("file", "line"):
            raise DataError(f"bad dataset spec {spec!r}: per={value!r} must be 'file' or 'line'")
        elif key == "shuffle":
            if value not in ("on", "off"):
                raise DataError(f"bad dataset spec {spec!r}: shuffle={value!r} must be 'on' or 'off'")
            source.shuffle = value == "on"
        elif key == "seed":
            if not (value.isascii() and value.isdigit()):  # "²".isdigit() is True, and int() refuses it
                raise DataError(f"bad dataset spec {spec!r}: seed={value!r} must be a whole number, 0 or more")
            source.seed = int(value)
        else:
            setattr(source, key, value)
    keys = {part.partition("=")[0] for part in query.split("&")}
    if "seed" in keys:
        if source.shuffle is False:
            raise DataError(f"bad dataset spec {spec!r}: seed= orders a shuffled source, but shuffle=off; drop one")
        source.shuffle = True
    return source


def parse_specs(specs, flag: str = "--data") -> list[Source]:
    """Parse whitespace-separated specs, from one string or a list of strings; `flag` names where they came from."""
    if isinstance(specs, str):
        specs = [specs]
    pieces = [s for text in specs for s in text.split()]
    for before, piece in zip(pieces, pieces[1:]):
        if "://" not in piece:  # whitespace separates specs, so a path with a space arrives cut in two
            raise DataError(f"bad dataset spec {before + ' ' + piece!r}: whitespace separates specs, so this is "
                            f"cut into {before!r} and {piece!r}; a space in a path is written %20 "
                            f"(README, Dataset specs)")
    sources = [parse_spec(s) for s in pieces]
    if not sources:
        raise DataError(f"no dataset spec given: pass e.g. {flag} 'parquet://DIR/*.parquet'")
    for source in sources:
        if source.weight_by_size:
            source.size_bytes = text_bytes(source)
            source.weight = float(source.size_bytes) ** source.size_power
    return sources


def text_bytes(source: Source) -> int:
    """A local source's size in bytes of text (weight=size): the UTF-8 bytes of a parquet file's text
    column, one row group at a time (the metadata's sizes count dictionary pages and encodings too);
    a JSONL or text file's size; a compressed one's size uncompressed, counted by reading it through once
    (gzip's own size field counts modulo 4 GiB)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for path in resolve_files(source):
        if source.kind != "parquet":
            total += uncompressed_size(path)
            continue
        file = pq.ParquetFile(path)
        if source.text not in file.schema_arrow.names:
            raise DataError(f"{source.spec}: {path} has no column {source.text!r} (columns: "
                            f"{', '.join(file.schema_arrow.names)}); name it with ?text=COLUMN")
        for group in range(file.num_row_groups):
            column = file.read_row_group(group, columns=[source.text]).column(0)
            total += pc.sum(pc.binary_length(column)).as_py() or 0
    if not total:
        raise DataError(f"{source.spec}: weight=size, but its files hold no text; give it a number")
    return total


def uncompressed_size(path: str) -> int:
    """A file's size in bytes, decompressed where its suffix says it is compressed (.gz, .bz2, .xz, ...)."""
    from fsspec.utils import infer_compression
    if infer_compression(path) is None:
        return os.path.getsize(path)
    total = 0
    with open_decompressed(path) as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return total


# -----------------------------------------------------------------------------
# Opening a source as a streaming HF dataset of {"text": str} rows

def resolve_files(source: Source) -> list[str]:
    """Expand a local source's path, glob or (parquet) folder into a sorted list of files."""
    pattern = os.path.expanduser(source.location)
    if os.path.isdir(pattern):
        if source.kind != "parquet":
            raise DataError(f"{source.spec}: {pattern} is a folder; name the files with a glob, "
                            f"e.g. {source.kind}://{pattern.rstrip('/')}/*.{source.kind}")
        return folder_files(source, pattern)
    if source.split != "train":
        raise DataError(f"{source.spec}: split={source.split} applies to a folder (parquet://DIR?split=val), "
                        f"not to files; name the validation files themselves")
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        what = "no files match" if glob.has_magic(pattern) else "file not found:"
        raise DataError(f"{source.spec}: {what} {pattern}")
    check_not_validation(source, files)
    return files


def check_not_validation(source: Source, files: list[str]):
    """Refuse a glob that takes a prepared folder's validation shard for training data."""
    for folder in {os.path.dirname(f) for f in files}:
        if (meta := prepared_meta(folder)) is not None:
            val = (meta.get("val") or {}).get("file")
            if val and os.path.join(folder, val) in files:
                raise DataError(f"{source.spec}: {os.path.join(folder, val)} is the validation shard of a "
                                f"prepared folder; name the folder instead: parquet://{folder} for training, "
                                f"parquet://{folder}?split=val for validation")


SHARD_NAME = re.compile(r"shard_\d{5,}\.parquet")  # nanochat's (and prepare's) shard files


def folder_files(source: Source, folder: str) -> list[str]:
    """The training (split=train) or validation (split=val) files of a folder of shards:
    a prepared folder (its meta.json lists both), nanochat's base_data (shard_NNNNN.parquet;
    nanochat keeps the last shard for validation), or any folder of *.parquet (all training)."""
    if source.split not in ("train", "val"):
        raise DataError(f"{source.spec}: split={source.split!r}: a folder has split=train (default) or split=val")
    if (meta := prepared_meta(folder)) is not None:
        if not meta.get("complete"):
            raise DataError(f"{source.spec}: {folder} is not finished (meta.json says incomplete); "
                            f"run the same `python prepare.py` command again to resume it")
        if source.split == "val" and not meta["val"]:
            raise DataError(f"{source.spec}: {folder} has no validation shard (prepared with --val-frac 0, or none "
                            f"was drawn); prepare it again with a larger --val-frac, or with --val-data")
        names = meta["train"]["files"] if source.split == "train" else [meta["val"]["file"]]
        files = [os.path.join(folder, n) for n in names]
        for f in files:
            if not os.path.isfile(f):
                raise DataError(f"{source.spec}: {f} is missing (meta.json lists it); prepare the folder again")
        return files
    files = sorted(glob.glob(os.path.join(glob.escape(folder), "*.parquet")))  # *.tmp are unfinished writes
    if not files:
        raise DataError(f"{source.spec}: {folder} has no .parquet files (and no meta.json); "
                        f"write it with `python data.py prepare --out {folder}`")
    if all(SHARD_NAME.fullmatch(os.path.basename(f)) for f in files):  # nanochat's base_data
        if len(files) < 2:
            raise DataError(f"{source.spec}: {folder} holds one shard only, and as in nanochat the last shard "
                            f"is validation: there is no training shard; add shards, or name the file itself")
        return files[:-1] if source.split == "train" else files[-1:]
    if source.split == "val":
        raise DataError(f"{source.spec}: {folder} has neither meta.json nor nanochat's shard_NNNNN.parquet names, "
                        f"so it has no validation part; name the validation files with a glob instead")
    return files


def prepared_meta(folder: str) -> dict | None:
    """A prepared folder's meta.json, or None for any other folder (also one with a meta.json of its own)."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == PREPARED_FORMAT else None


LOCAL_DATA_HINT = "pass --data with local files, e.g. --data 'parquet://DIR/*.parquet' (see README)"


def check_hub_reachable(source: Source, timeout: float = 3.0):
    """Fail in seconds, not after a minute of retries, when the hub is offline."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline:
        return  # datasets then uses its local cache, and says so itself if it has nothing
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise DataError(f"{source.spec}: hub unreachable ({host}: {e})", LOCAL_DATA_HINT) from None


def open_hub(source: Source, streaming: bool = True, cache_dir=None):
    """A hub dataset as `datasets` loads it; fails in seconds, with what to do, when the hub is unreachable."""
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as DataError, once
    check_hub_reachable(source)
    try:
        return datasets.load_dataset(source.location, name=source.name, split=source.split,
                                     revision=source.revision, streaming=streaming, cache_dir=cache_dir)
    except (ConnectionError, OSError) as e:
        raise DataError(f"{source.spec}: hub unreachable or dataset not cached ({e})", LOCAL_DATA_HINT) from None
    except Exception as e:  # unknown dataset, config or split
        raise DataError(f"{source.spec}: cannot open hub dataset: {e}") from None


def open_local_files(source: Source, keep_source: bool, local: dict):
    """A parquet://, jsonl:// or txt:// source's files as a `datasets` dataset. Converted to the on-disk cache
    (streaming=False), every file is read here, so a file that cannot be read is a DataError here."""
    import datasets
    source.files = resolve_files(source)
    if source.kind != "parquet":  # datasets cannot read empty files; parquet's are dropped below
        source.files = [f for f in source.files if os.path.getsize(f) > 0]
    try:
        if source.kind == "parquet":
            common = check_parquet_files(source)
            columns = [source.text] + (["source"] if keep_source and "source" in common - {source.text} else [])
            return datasets.load_dataset("parquet", data_files=source.files, columns=columns, **local)
        if not source.files:
            raise DataError(f"{source.spec}: no text found, all its files are empty (empty dataset)")
        if source.kind == "jsonl":
            return open_jsonl(source, keep_source, local)
        source.text = "text"
        return datasets.load_dataset("text", data_files=source.files, **local, encoding="utf-8-sig",  # no BOM text
                                     sample_by="document" if source.per == "file" else "line")
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, DataError):  # jsonl_documents found a bad line
            raise cause from None
        error = None if cause is None else read_error(source, cause)
        if error is None:
            raise
        raise error from None


def iter_rows(source: Source):
    """(where, row) for every row of a jsonl://, parquet:// or hf:// source, rows as dicts (conversations,
    benchmark tasks). A JSONL line that is not valid JSON comes as (where, the JSONDecodeError), so the
    caller decides whether to count it or to stop."""
    if source.kind == "jsonl":
        for path in resolve_files(source):
            for n, row in iter_json_lines(source, path):
                yield f"{path}:{n}", row
    elif source.kind == "parquet":
        for n, (_, row) in enumerate(iter_parquet_rows(source)):
            yield f"{source.spec}#{n}", row
    elif source.kind == "hf":
        try:
            for n, row in enumerate(open_hub(source)):
                yield f"{source.spec}#{n}", row
        except (ConnectionError, OSError) as e:
            raise DataError(f"{source.spec}: hub connection lost while reading ({e})") from None
    else:
        raise DataError(f"{source.spec}: rows come from jsonl://, parquet:// or hf:// sources, not {source.kind}://")


def open_decompressed(path: str):
    """A file opened for reading bytes, decompressed by its suffix (.gz, .bz2, .xz, .zst, ...) as `datasets`
    does for pretraining files."""
    import fsspec
    return fsspec.open(path, "rb", compression="infer").open()


def iter_json_lines(source: Source, path: str):
    """(line number, row) for every non-blank line of a JSONL file; a line that is not valid JSON comes as
    its JSONDecodeError. Decoded line by line, so a byte that is not UTF-8 is named with its own line."""
    with open_decompressed(path) as f:
        for n, line in enumerate(f, 1):
            try:
                line = line.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte order mark is not line 1's JSON
            except UnicodeDecodeError as e:
                raise not_utf8(source, path, f"{e.reason}, line {n:,}") from None
            if line.strip():
                try:
                    yield n, json.loads(line.rstrip("\r\n"))  # a column, not "line 2", in a parse error
                except json.JSONDecodeError as e:
                    yield n, e


def jsonl_documents(files: list[str], source: Source, keep_source: bool):
    """The text field (and the `source` field, for prepare) of every line of JSONL files, with file:line
    errors. Only these fields are read, so other keys may differ between files, as they do in real dumps."""
    for path in files:
        for n, row in iter_json_lines(source, path):
            if not isinstance(row, dict):
                what = (f"not valid JSON ({row.msg} at column {row.colno})" if isinstance(row, json.JSONDecodeError)
                        else "not an object")
                raise DataError(f"{source.spec}: {path}:{n}: {what}; every line must be one JSON object")
            text = row.get(source.text)
            if not isinstance(text, str):
                raise DataError(f"{source.spec}: {path}:{n}: a document has no string {source.text!r} field "
                                f"({'it is missing' if source.text not in row else 'got ' + type(text).__name__}; "
                                f"fields: {', '.join(row)}); "
                                f"name the text field with ?text=FIELD")
            document = {source.text: text}
            if keep_source:
                origin = row.get("source")
                document["source"] = origin if isinstance(origin, str) else None
            yield document


def open_jsonl(source: Source, keep_source: bool, local: dict):
    """A jsonl:// source as a dataset of its text field (jsonl_documents), one shard per file."""
    import datasets
    columns = [source.text] + (["source"] if keep_source and source.text != "source" else [])
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    kwargs = dict(files=source.files, source=source, keep_source=keep_source)
    if local["streaming"]:
        return datasets.IterableDataset.from_generator(jsonl_documents, features=features, gen_kwargs=kwargs)
    # the cache is keyed by the files' state: a file changed since it was converted is converted again
    state = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in source.files]
    fingerprint = hashlib.sha256(repr((state, columns, source.spec)).encode()).hexdigest()[:32]
    return datasets.Dataset.from_generator(jsonl_documents, features=features, gen_kwargs=kwargs,
                                           cache_dir=local["cache_dir"], fingerprint=fingerprint)


def open_source(source: Source, streaming: bool = True, keep_source: bool = False, cache_dir=None,
                shuffle: bool = True, epoch: int = 0):
    """Open a source as a `datasets` dataset with a `text` column: streaming (IterableDataset,
    the default) or, with streaming=False, converted to datasets' on-disk Arrow cache first.
    keep_source also keeps a `source` column where the data has one (for `prepare`).
    A shuffled source (source.shuffled) comes streaming as ShuffledShards for `epoch`,
    unless shuffle=False (the caller orders it itself: open_rank_shard, prepare)."""
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as DataError, once
    local = dict(split="train", streaming=streaming, cache_dir=cache_dir)
    if source.kind == "hf":
        ds = open_hub(source, streaming, cache_dir)
        try:
            source.num_docs = ds.info.splits[source.split].num_examples or None
        except (AttributeError, KeyError, TypeError):
            pass
    else:
        ds = open_local_files(source, keep_source, local)
    if not streaming:
        source.num_docs = len(ds)
    if ds.column_names is not None and source.text not in ds.column_names:
        raise DataError(f"{source.spec}: no column {source.text!r} (columns: {', '.join(ds.column_names)}); "
                        f"pick one with ?text=COLUMN")
    if source.text != "text":
        if "text" in (ds.column_names or ()):
            ds = ds.remove_columns("text")
        ds = ds.rename_column(source.text, "text")
    if shuffle and streaming and source.shuffled:
        ds = ShuffledShards(ds, source.seed, epoch)
    return ds


def check_parquet_files(source: Source) -> set[str]:
    """Check every parquet file has the text column, reading only the footers; return the
    columns all files have, and count the documents.

    Files with no rows are dropped (datasets cannot read them); none is lost."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    nonempty, common, rows = [], None, 0
    for path in source.files:
        try:
            meta = pq.read_metadata(path)
        except Exception as e:
            raise DataError(f"{source.spec}: {path} is not a readable parquet file ({e})") from None
        schema = meta.schema.to_arrow_schema()
        names = schema.names
        if source.text not in names:
            raise DataError(f"{source.spec}: {path} has no column {source.text!r} "
                            f"(columns: {', '.join(names)}); pick one with ?text=COLUMN")
        kind = schema.field(source.text).type
        if pa.types.is_dictionary(kind):  # pandas' category dtype; datasets reads its values as strings
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise DataError(f"{source.spec}: {path}: column {source.text!r} holds {kind}, not text; "
                            f"pick the text column with ?text=COLUMN")
        if pa.types.is_null(kind) and meta.num_rows > 0:  # pandas writes an all-None column so
            raise DataError(f"{source.spec}: {path} has a document with no string {source.text!r} field "
                            f"(column type null: all {meta.num_rows:,} values are null); fill the column, "
                            f"or leave the file out of the spec")
        if nulls := null_count(meta, source.text):
            raise DataError(f"{source.spec}: {path} has a document with no string {source.text!r} field (null in "
                            f"{nulls:,} of {meta.num_rows:,} rows); fill or drop those rows, or leave the file out")
        common = set(names) if common is None else common & set(names)
        rows += meta.num_rows
        if meta.num_rows > 0:
            nonempty.append(path)
    if not nonempty:
        raise DataError(f"{source.spec}: no text found, all {len(source.files)} file(s) have no rows (empty dataset)")
    source.files, source.num_docs = nonempty, rows
    return common


def null_count(meta, column: str) -> int:
    """Rows of a parquet file with null in `column`, from its footer's statistics (0 where a writer kept none)."""
    return sum(chunk.statistics.null_count for g in range(meta.num_row_groups) for j in range(meta.num_columns)
               if (chunk := meta.row_group(g).column(j)).path_in_schema == column and chunk.is_stats_set
               and chunk.statistics.has_null_count)


def iter_parquet_rows(source: Source):
    """(file, row dict) for every row of local parquet files, with a clear error on an unreadable file."""
    import pyarrow.parquet as pq
    for path in resolve_files(source):
        try:
            file = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{source.spec}: {path} is not a readable parquet file ({e})") from None
        for batch in file.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield path, row


def check_folder(path, flag: str = "--out"):
    """Exit with one error line now if output folder `path` could not be created or written (a file in
    its way, no permission), not after hours of work. Creates nothing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    problem = ("is a file, not a folder" if not os.path.isdir(existing) else
               "is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None)
    if problem:
        raise SystemExit(f"error: {flag} {path}: {existing} {problem}; choose another {flag}")


def make_folder(path, flag: str = "--out"):
    """Create an output folder, or exit with one error line that says why it cannot be."""
    check_folder(path, flag)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create folder {path} ({e}); choose another {flag}") from None


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


def iter_text_batches(source: Source, ds, batch_size: int, with_source: bool = False):
    """Lists of documents from a dataset, with clear errors on bad rows and bad files.
    with_source: (texts, the rows' `source` fields or None) instead."""
    import pyarrow as pa
    try:
        for batch in ds.iter(batch_size=batch_size):
            texts = batch["text"]
            if not all(isinstance(t, str) for t in texts):
                bad = next(t for t in texts if not isinstance(t, str))
                raise DataError(f"{source.spec}: a document has no string {source.text!r} field "
                                f"(got {type(bad).__name__}; fields: {', '.join(batch)})")
            origins = batch.get("source")
            if not all(t.strip() for t in texts):  # a blank line or an empty field is no document
                kept = [i for i, t in enumerate(texts) if t.strip()]
                texts, origins = [texts[i] for i in kept], origins and [origins[i] for i in kept]
            yield (texts, origins) if with_source else texts
    except (ValueError, pa.ArrowException, OSError) as e:
        error = read_error(source, e)
        if error is None:
            raise
        raise error from None


def not_utf8(source: Source, path, detail: str) -> DataError:
    return DataError(f"{source.spec}: {path} is not valid UTF-8 ({detail}); convert it, e.g. iconv -f latin1 -t utf-8")


def read_error(source: Source, e: Exception) -> DataError | None:
    """The DataError for a local source's files that cannot be read (not UTF-8, a damaged parquet page), naming
    the file; None for any other error (a JSONL file's bad lines are named by jsonl_documents as it reads).
    It reads the files again to find the bad one, on this error path only."""
    import pyarrow as pa
    if source.kind == "hf":
        return None
    if isinstance(e, UnicodeDecodeError):
        bad = first_undecodable_file(source.files) or "a file"
        return not_utf8(source, bad, f"{e.reason} at byte {e.start}")
    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
    if source.kind == "parquet" and isinstance(e, (OSError, pa.ArrowException)):  # pyarrow: OSError for a bad page
        bad = first_unreadable_parquet(source.files, source.text)
        if bad is None:
            return None
        return DataError(f"{source.spec}: {bad} cannot be read, its data is damaged or gone ({first_line}); "
                         f"replace the file, or leave it out of the spec")
    return None


def first_unreadable_parquet(files: list[str], column: str) -> str | None:
    """The first parquet file whose text column cannot be read whole (only on the error path)."""
    import pyarrow.parquet as pq
    for path in files:
        try:
            pq.read_table(path, columns=[column])
        except Exception:
            return path
    return None


def iter_texts(source: Source, ds=None):
    """Yield the documents of one source as strings."""
    ds = open_source(source) if ds is None else ds
    for texts in iter_text_batches(source, ds, batch_size=256):
        yield from texts


def interleave_documents(sources: list[Source]):
    """Yield the documents of several sources, each next from the source that has
    given the fewest characters relative to its weight (deterministic)."""
    return interleave([iter_texts(s) for s in sources], [s.weight for s in sources])


def interleave(streams: list, weights: list[float], size=len):
    """Merge streams, each next item from the stream that has given the least size(item) per weight."""
    streams, weights = list(streams), list(weights)
    consumed = [0.0] * len(streams)
    while streams:
        i = min(range(len(streams)), key=lambda j: consumed[j] / weights[j])
        try:
            item = next(streams[i])
        except StopIteration:
            del streams[i], consumed[i], weights[i]
            continue
        consumed[i] += size(item)
        yield item


PREPARED_FORMAT = "nanoschnack-prepared-1"  # meta.json of a folder written by prepare.py


# -----------------------------------------------------------------------------
# python data.py ...: moved to prepare.py (kept as an alias; run, not imported, so no import cycle)

if __name__ == "__main__":
    args = sys.argv[1:]
    args = args[1:] if args[:1] == ["prepare"] else ["inspect", *args]
    os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare.py"),
                              *args])
