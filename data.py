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
    split=NAME    hf: the split to read (default: train); a parquet folder:
                  train (default) or val (see "Folders" below)
    name=CONFIG   hf only: the dataset config, e.g. deu_Latn
    revision=REV  hf only: a branch, tag or commit of the dataset repo
    per=file|line txt only: one document per file (default) or per line

Folders. `parquet://DIR` names a folder of shards: one written by `python data.py
prepare` (it has a meta.json; training shards, or with ?split=val its validation
shard), nanochat's base_data (shard_NNNNN.parquet, the last one is validation, as
in nanochat), or any folder of *.parquet (all of it is training data).

Everything is streamed through HF `datasets` (streaming=True), so no corpus is
ever loaded whole into memory. `python data.py prepare` (at the end of this file)
turns any spec into such a folder of local shards.
"""
import codecs
import copy
import glob
import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import socket
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import numpy as np
import torch

# The default pretraining mix: real German text on the Hugging Face hub. Web text
# (FineWeb-2), encyclopedic text (Wikipedia) and openly licensed books, news,
# laws and speeches (German Commons), weighted by share of tokens.
DEFAULT_PRETRAIN_SPEC = " ".join([
    "hf://HuggingFaceFW/fineweb-2?name=deu_Latn&split=train&weight=0.6",
    "hf://wikimedia/wikipedia?name=20231101.de&split=train&weight=0.1",
    "hf://coral-nlp/german-commons?split=train&weight=0.3",
])
DEFAULT_VAL_SPEC = "hf://HuggingFaceFW/fineweb-2?name=deu_Latn&split=test"

LOCAL_KINDS = ("parquet", "jsonl", "txt")
KINDS = ("hf",) + LOCAL_KINDS
OPTIONS = {  # which options each kind of source accepts
    "hf": {"text", "weight", "split", "name", "revision"},
    "parquet": {"text", "weight", "split"},
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
    num_docs: int | None = None    # number of documents, where it is known without reading them


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
                            f"run the same `python data.py prepare` command again to resume it")
        if source.split == "val" and not meta["val"]:
            raise DataError(f"{source.spec}: {folder} was prepared without a validation split (--val-frac 0)")
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


def open_hub(source: Source, streaming: bool = True, cache_dir=None):
    """A hub dataset as `datasets` loads it; fails in seconds, with what to do, when the hub is unreachable."""
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as DataError, once
    check_hub_reachable(source)
    try:
        return datasets.load_dataset(source.location, name=source.name, split=source.split,
                                     revision=source.revision, streaming=streaming, cache_dir=cache_dir)
    except (ConnectionError, OSError) as e:
        raise DataError(f"{source.spec}: hub unreachable or dataset not cached ({e}); "
                        f"pass --data with local files, e.g. --data 'parquet://DIR/*.parquet'") from None
    except Exception as e:  # unknown dataset, config or split
        raise DataError(f"{source.spec}: cannot open hub dataset: {e}") from None


def iter_rows(source: Source):
    """(where, row) for every row of a jsonl://, parquet:// or hf:// source, rows as dicts (conversations,
    benchmark tasks). A JSONL line that is not valid JSON comes as (where, the JSONDecodeError), so the
    caller decides whether to count it or to stop."""
    if source.kind == "jsonl":
        for path in resolve_files(source):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            row = e
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


def open_source(source: Source, streaming: bool = True, keep_source: bool = False, cache_dir=None):
    """Open a source as a `datasets` dataset with a `text` column: streaming (IterableDataset,
    the default) or, with streaming=False, converted to datasets' on-disk Arrow cache first.
    keep_source also keeps a `source` column where the data has one (for `prepare`)."""
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
        source.files = resolve_files(source)
        if source.kind != "parquet":  # datasets cannot read empty files; parquet's are dropped below
            source.files = [f for f in source.files if os.path.getsize(f) > 0]
        if source.kind == "parquet":
            common = check_parquet_files(source)
            columns = [source.text] + (["source"] if keep_source and "source" in common - {source.text} else [])
            ds = datasets.load_dataset("parquet", data_files=source.files, columns=columns, **local)
        elif not source.files:
            raise DataError(f"{source.spec}: no text found, all its files are empty (empty dataset)")
        elif source.kind == "jsonl":
            ds = datasets.load_dataset("json", data_files=source.files, **local)
        else:
            source.text = "text"
            ds = datasets.load_dataset("text", data_files=source.files, **local,
                                       sample_by="document" if source.per == "file" else "line")
    if not streaming:
        source.num_docs = len(ds)
    if ds.column_names is not None and source.text not in ds.column_names:
        raise DataError(f"{source.spec}: no column {source.text!r} (columns: {', '.join(ds.column_names)}); "
                        f"pick one with ?text=COLUMN")
    if source.text != "text":
        if "text" in (ds.column_names or ()):
            ds = ds.remove_columns("text")
        ds = ds.rename_column(source.text, "text")
    return ds


def check_parquet_files(source: Source) -> set[str]:
    """Check every parquet file has the text column, reading only the footers; return the
    columns all files have, and count the documents.

    Files with no rows are dropped (datasets cannot read them); none is lost."""
    import pyarrow.parquet as pq
    nonempty, common, rows = [], None, 0
    for path in source.files:
        try:
            meta = pq.read_metadata(path)
        except Exception as e:
            raise DataError(f"{source.spec}: {path} is not a readable parquet file ({e})") from None
        names = meta.schema.to_arrow_schema().names
        if source.text not in names:
            raise DataError(f"{source.spec}: {path} has no column {source.text!r} "
                            f"(columns: {', '.join(names)}); pick one with ?text=COLUMN")
        common = set(names) if common is None else common & set(names)
        rows += meta.num_rows
        if meta.num_rows > 0:
            nonempty.append(path)
    if not nonempty:
        raise DataError(f"{source.spec}: no text found, all {len(source.files)} file(s) have no rows (empty dataset)")
    source.files, source.num_docs = nonempty, rows
    return common


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
            yield (texts, batch.get("source")) if with_source else texts
    except UnicodeDecodeError as e:
        bad = first_undecodable_file(source.files) or "a file"
        raise DataError(f"{source.spec}: {bad} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8") from None
    except pa.ArrowInvalid as e:  # a JSON line or a parquet page that does not parse
        where = first_bad_json_line(source.files) if source.kind == "jsonl" else None
        raise DataError(f"{source.spec}: {where or 'unreadable data'}: {str(e).splitlines()[0]}"
                        + ("; every line must be one JSON object" if where else "")) from None


def first_bad_json_line(files: list[str]) -> str | None:
    """On a JSON parse error, find the file and line (only on that error path)."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    if line.strip():
                        json.loads(line)
                except ValueError:
                    return f"{path}:{number}"
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


# -----------------------------------------------------------------------------
# Pretraining batches: shard by rank, tokenize, mix, pack, resume exactly
#
# Sharding. Each rank opens every source and keeps a disjoint part of it with
# `datasets.distributed.split_dataset_by_node`, whose rule is: when the number
# of shards (files, or parquet row groups after `reshard()`) divides by the
# world size, rank r reads shards r, r+W, r+2W, ...; otherwise every rank reads
# all of it and keeps documents r, r+W, r+2W, ... (correct, but each rank then
# parses everything). Together the ranks see every document exactly once.
#
# Packing: plain concatenate-and-split, per source. Each document becomes
# <|bos|> + its tokens; a source's documents are concatenated in order and cut
# into rows of T+1 tokens (row = T inputs + the target of the last one); rows do
# not overlap. No token is lost or duplicated: the only rule is that the one
# (last token of a row -> first token of the next row) prediction per row is
# never trained, and at the end of a non-looping stream each source's tail
# shorter than one row is dropped.
# The trade-off against nanochat's BOS-aligned best-fit packing: best-fit starts
# every row at a document start (no row begins mid-document without context)
# but crops documents to fill rows, throwing tokens away; concatenation keeps
# every token and makes exact resume a matter of remembering one buffer.
#
# Mixing, row by row: the next row always comes from the source that has given
# the fewest tokens relative to its weight ("least tokens consumed"), so the
# token shares follow the weights to within a row, deterministically, with no RNG
# to save, however long a source's documents are (one novel can be 1M tokens).
# A source that runs out starts over (a new epoch) when looping.

class PretrainBatches:
    """(inputs, targets) batches of shape (B, T) for one rank, from a weighted mix of sources.

    Iterate it for batches; `state_dict()` describes the position after the last
    batch handed out, and a fresh loader given `load_state_dict(state)` continues
    with exactly the batch the uninterrupted run would have produced next.
    """

    def __init__(self, sources: list[Source], tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, loop: bool = True, docs_per_read: int = 64, prefetch: int = 0):
        self.sources, self.tokenizer = sources, tokenizer
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.loop, self.docs_per_read, self.prefetch = loop, docs_per_read, prefetch
        self.datasets = [open_rank_shard(s, rank, world_size) for s in sources]
        self.readers = [None] * len(sources)
        n = len(sources)
        self.progress = {"states": [None] * n, "epochs": [0] * n, "tokens": [0] * n, "docs": [0] * n,
                         "exhausted": [False] * n}
        # per source: tokens read but not yet handed out (never written in place, so views are snapshots)
        self.pending = [np.empty(0, dtype=np.int32) for _ in sources]
        self.handed_out = self._snapshot()

    # --- reading and packing ---

    def _read_documents(self, i: int) -> list[str] | None:
        """The next documents of source i, or None once it is exhausted (and not looping)."""
        for _ in range(2):
            if self.readers[i] is None:
                self.readers[i] = iter_text_batches(self.sources[i], self.datasets[i], self.docs_per_read)
            docs = next(self.readers[i], None)
            if docs is not None:
                self.progress["states"][i] = copy.deepcopy(self.datasets[i].state_dict())
                return docs
            if self.progress["docs"][i] == 0 and self.progress["epochs"][i] == 0:
                raise DataError(f"{self.sources[i].spec}: no documents for rank {self.rank} of "
                                f"{self.world_size} (empty dataset, or fewer documents than ranks?)")
            if not self.loop:
                return None
            self.progress["epochs"][i] += 1  # start the source over
            self.progress["states"][i] = None
            self.datasets[i] = open_rank_shard(self.sources[i], self.rank, self.world_size, quiet=True)
            self.readers[i] = None
        return None

    def _refill(self, i: int) -> bool:
        """Tokenize the next documents of source i into its buffer; False once it is exhausted."""
        docs = self._read_documents(i)
        if docs is None:
            self.progress["exhausted"][i] = True
            return False
        bos = self.tokenizer.bos_id
        tokens = np.fromiter(itertools.chain.from_iterable(
            [bos] + ids for ids in self.tokenizer.encode_batch(docs)), dtype=np.int32)
        self.progress["docs"][i] += len(docs)
        self.pending[i] = np.concatenate([self.pending[i], tokens])
        return True

    def _next_row(self):
        """The next row of T+1 tokens, from the source with the fewest tokens handed out per weight."""
        row = self.seq_len + 1
        while True:
            live = [i for i in range(len(self.sources)) if not self.progress["exhausted"][i]]
            if not live:
                return None
            i = min(live, key=lambda j: self.progress["tokens"][j] / self.sources[j].weight)
            while len(self.pending[i]) < row and self._refill(i):
                pass
            if len(self.pending[i]) >= row:
                self.progress["tokens"][i] += row
                tokens, self.pending[i] = self.pending[i][:row], self.pending[i][row:]
                return tokens
            # an exhausted, non-looping source: its tail shorter than a row is dropped

    def _next_block(self):
        """The next (rows, T+1) block of tokens and the loader state right after it."""
        rows = [r for r in (self._next_row() for _ in range(self.batch_size)) if r is not None]
        if not rows:  # rows run out only at the end of a non-looping stream
            return None, None
        return np.stack(rows), self._snapshot()

    def _snapshot(self) -> dict:
        return {"progress": copy.deepcopy(self.progress), "pending": list(self.pending)}

    def _to_batch(self, block):
        tokens = torch.from_numpy(block.astype(np.int64))
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        if torch.cuda.is_available():  # ready for .to(device, non_blocking=True)
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    # --- iteration, with optional background prefetching ---

    def __iter__(self):
        if self.prefetch <= 0:
            while (item := self._next_block())[0] is not None:
                self.handed_out = item[1]
                yield self._to_batch(item[0])
            return
        # A background thread reads and tokenizes ahead (both release the GIL);
        # each block travels with the state after it, so state_dict() stays exact.
        ready, stop = queue.Queue(maxsize=self.prefetch), threading.Event()

        def produce():
            try:
                while not stop.is_set():
                    item = self._next_block()
                    item = (self._to_batch(item[0]), item[1]) if item[0] is not None else None
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if item is None:
                        return
            except BaseException as e:  # hand errors to the consumer
                ready.put(e)

        thread = threading.Thread(target=produce, daemon=True, name="data-prefetch")
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                self.handed_out = item[1]
                yield item[0]
        finally:
            stop.set()
            thread.join()

    # --- exact resume ---

    def state_dict(self) -> dict:
        """Where this rank's stream stands after the last batch handed out (torch.save-able)."""
        state = copy.deepcopy(self.handed_out["progress"])
        state.update(sources=[s.spec for s in self.sources], rank=self.rank, world_size=self.world_size,
                     pending=[torch.from_numpy(p.copy()) for p in self.handed_out["pending"]])
        return state

    def load_state_dict(self, state: dict):
        mine = ([s.spec for s in self.sources], self.rank, self.world_size)
        theirs = (state.get("sources"), state.get("rank"), state.get("world_size"))
        if mine != theirs:
            raise DataError(f"data loader state is from another setup (sources, rank, world size) "
                            f"{theirs}, not {mine}; resume with the same --data and number of processes")
        self.progress = {k: list(state[k]) for k in ("states", "epochs", "tokens", "docs", "exhausted")}
        for i, ds_state in enumerate(self.progress["states"]):
            self.datasets[i] = open_rank_shard(self.sources[i], self.rank, self.world_size, quiet=True)
            if ds_state is not None:
                self.datasets[i].load_state_dict(copy.deepcopy(ds_state))
            self.readers[i] = None
        self.pending = [p.numpy().astype(np.int32) for p in state["pending"]]
        self.handed_out = self._snapshot()

    def token_counts(self) -> dict[str, int]:
        """Tokens handed out so far from each source (for the log)."""
        return {s.spec: n for s, n in zip(self.sources, self.handed_out["progress"]["tokens"])}


def open_rank_shard(source: Source, rank: int, world_size: int, quiet: bool = False):
    """This rank's disjoint part of a source (see the sharding rule above)."""
    from datasets.distributed import split_dataset_by_node
    ds = open_source(source)
    if world_size == 1:
        return ds
    if ds.num_shards % world_size:
        ds = ds.reshard()  # parquet: one shard per row group, often enough to divide evenly
    if ds.num_shards % world_size and not quiet and rank == 0:
        print(f"note: {source.spec} has {ds.num_shards} shards, not a multiple of {world_size} ranks: "
              f"every rank reads all of it and keeps one document in {world_size}", file=sys.stderr)
    return split_dataset_by_node(ds, rank=rank, world_size=world_size)


def validation_batches(sources: list[Source], tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                       world_size: int = 1, max_batches: int = 20) -> list:
    """A fixed, deterministic list of this rank's validation batches (read once, kept in memory)."""
    loader = PretrainBatches(sources, tokenizer, batch_size, seq_len, rank, world_size, loop=False)
    return list(itertools.islice(loader, max_batches))


# -----------------------------------------------------------------------------
# python data.py prepare: any spec -> local, nanochat-compatible parquet shards
#
# A long multi-GPU run should not depend on the hub staying up, so `prepare`
# materialises any spec into a folder the loader (and nanochat) reads directly:
#
#   OUT/shard_00000.parquet ... shard_{n-1}   training documents
#   OUT/shard_{n}.parquet                      validation: the last shard, as in nanochat
#   OUT/meta.json                              from what, with which options, counts, dates
#
# Each shard has columns `text` and `source` (the row's own `source` field where the
# data has one, else the spec's location), zstd compression, and row groups of 1024
# rows: ranks split a shard by row group, so one giant row group would starve all but
# one rank. A shard ends at the first whole row group past --shard-chars characters
# (nanochat's rule; 250M is its size) or at exactly --shard-rows rows.
#
# Shuffling a corpus bigger than memory, deterministically. Streaming (the default),
# per source: the reading order is permuted with the seed (local parquet: all row
# groups of all files, read directly with pyarrow; other kinds: datasets'
# IterableDataset.shuffle, files or hub shards) and documents are drawn at random
# from a buffer of --shuffle-buffer documents. Memory stays bounded and nothing is
# copied, but the shuffle is local: a document moves at most about a buffer ahead,
# so a source read from one huge row group stays roughly in order. --no-streaming first
# converts each source into datasets' on-disk Arrow cache (OUT/.cache, a full copy,
# deleted at the end) and then permutes all of its documents: an exact global
# shuffle, as nanochat's repackaging does. Several sources are then interleaved by
# weight, characters per weight as the loader mixes them: give weights in proportion
# to the sources' sizes (or one glob over all files) for an even mix to the end.
#
# Resume. The document stream is a deterministic function of (specs, seed, options,
# datasets version), all recorded in meta.json. A shard is written to NAME.tmp and
# renamed when complete, so a shard that exists is whole. An interrupted run, started
# again with the same command, replays the stream from the start and skips *writing*
# the shards that exist (their row counts are checked against the replay). Replaying
# costs reading and filtering again, not compressing and writing; unlike seeking into
# a shuffled stream, it cannot land one document off.
#
# Validation. A document goes to validation when a hash of its text, keyed by the
# seed, falls under --val-frac, until the validation shard is full (one shard's size):
# the draw needs no lookahead, and identical documents always land on the same side,
# so an exact duplicate never leaks from training into validation. --val-data SPEC
# takes validation from a held-out spec instead (read first, so --dedup also drops
# training documents that equal a validation document).
#
# Filters, off by default: --nfc (Unicode NFC, so "ö" typed as o + combining
# diaeresis equals "ö"), --min-chars N (drop shorter documents, after NFC) and --dedup
# (drop exact duplicates: keeps an 8-byte hash per kept document, ~70 bytes of memory
# each, e.g. 7 GB for 100M documents).

PREPARED_FORMAT = "nanoschnack-prepared-1"
ROW_GROUP = 1024


@dataclass
class PrepareOptions:
    """How `prepare` shuffles, shards, splits and filters (all recorded in meta.json)."""
    seed: int = 42
    shard_chars: int = 250_000_000  # a shard ends at the first whole row group past this many characters
    shard_rows: int | None = None   # or at exactly this many rows
    max_shards: int | None = None   # training shards to write; None: all
    text: str | None = None         # the text column, for every source (else each spec's text=)
    streaming: bool = True          # False: exact global shuffle through datasets' on-disk cache
    shuffle_buffer: int = 10_000    # documents, streaming only
    val_frac: float = 0.01          # share of documents drawn for validation (up to one shard)
    min_chars: int = 0              # filters, off by default
    dedup: bool = False
    nfc: bool = False


def check_prepare_options(opts: PrepareOptions):
    problems = [f"{name} must be {rule} (got {value!r})" for name, value, ok, rule in [
        ("shard_chars", opts.shard_chars, opts.shard_chars > 0, "positive"),
        ("shard_rows", opts.shard_rows, opts.shard_rows is None or opts.shard_rows > 0, "positive"),
        ("max_shards", opts.max_shards, opts.max_shards is None or opts.max_shards > 0, "positive (or all)"),
        ("shuffle_buffer", opts.shuffle_buffer, opts.shuffle_buffer > 0, "positive"),
        ("val_frac", opts.val_frac, 0 <= opts.val_frac < 1, "in [0, 1)"),
        ("min_chars", opts.min_chars, opts.min_chars >= 0, "0 or more"),
    ] if not ok]
    if problems:
        raise DataError("bad prepare options: " + "; ".join(problems).replace("_", "-"))


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


class ShardWriter:
    """One shard, written a row group at a time to a .tmp file that is renamed when complete.
    On a resumed run a shard that already exists is only counted, and checked, not rewritten."""

    def __init__(self, folder: str, name: str | None, tmp_name: str | None = None):
        self.folder, self.name = folder, name
        self.exists = name is not None and os.path.exists(os.path.join(folder, name))
        self.tmp = os.path.join(folder, (tmp_name or name) + ".tmp")
        self.texts, self.origins, self.docs, self.chars = [], [], 0, 0
        self.writer = None

    def add(self, text: str, origin: str):
        self.texts.append(text)
        self.origins.append(origin)
        self.docs, self.chars = self.docs + 1, self.chars + len(text)
        if len(self.texts) == ROW_GROUP:
            self.flush()

    def full(self, opts: PrepareOptions) -> bool:
        if opts.shard_rows:
            return self.docs >= opts.shard_rows
        return self.chars >= opts.shard_chars and self.docs % ROW_GROUP == 0  # whole row groups only

    def flush(self):
        if self.texts and not self.exists:
            import pyarrow as pa
            import pyarrow.parquet as pq
            table = pa.table({"text": pa.array(self.texts, pa.string()),
                              "source": pa.array(self.origins, pa.string())})
            if self.writer is None:  # as nanochat: zstd, no dictionary or statistics for the text
                self.writer = pq.ParquetWriter(self.tmp, table.schema, compression="zstd", compression_level=3,
                                               use_dictionary=["source"], write_statistics=["source"])
            self.writer.write_table(table, row_group_size=ROW_GROUP)
        self.texts, self.origins = [], []

    def close(self, name: str | None = None) -> dict:
        """Finish the shard as NAME (default: the name it was opened with); its entry for meta.json."""
        import pyarrow.parquet as pq
        name = name or self.name
        self.flush()
        path = os.path.join(self.folder, name)
        if self.exists:
            rows = pq.read_metadata(path).num_rows
            if rows != self.docs:
                raise DataError(f"{path} has {rows} rows, but resuming this conversion puts {self.docs} "
                                f"documents into it: it was written by another run; delete the folder and start over")
        else:
            self.writer.close()
            os.replace(self.tmp, path)
        return {"file": name, "docs": self.docs, "chars": self.chars}


def read_shuffled(source: Source, opts: PrepareOptions, cache_dir: str | None):
    """(text, origin) for every document of one source, in a seeded random order (see above)."""
    label = source.location + (f"/{source.name}" if source.name else "")
    if opts.streaming and source.kind == "parquet":  # read directly, row group by row group
        rng = np.random.default_rng(opts.seed)
        yield from buffer_shuffle(read_row_groups(source, rng, label), opts.shuffle_buffer, rng)
        return
    ds = open_source(source, streaming=opts.streaming, keep_source=True, cache_dir=cache_dir)
    if opts.streaming:  # datasets: shuffled file (shard) order and a shuffle buffer
        ds = ds.shuffle(seed=opts.seed, buffer_size=opts.shuffle_buffer)
    else:  # a permutation of all documents
        ds = ds.shuffle(seed=opts.seed)
    for texts, origins in iter_text_batches(source, ds, batch_size=256, with_source=True):
        origins = origins or [None] * len(texts)
        yield from zip(texts, [o if isinstance(o, str) else label for o in origins])


def read_row_groups(source: Source, rng, label: str):
    """(text, origin) of a local parquet source, its row groups read in a random order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    source.files = resolve_files(source)
    check_parquet_files(source)
    groups = []
    for path in source.files:
        meta = pq.read_metadata(path)
        columns = [source.text] + (["source"] if "source" in meta.schema.names and source.text != "source" else [])
        groups += [(path, g, columns) for g in range(meta.num_row_groups)]
    for k in rng.permutation(len(groups)):
        path, g, columns = groups[k]
        table = pq.ParquetFile(path).read_row_group(g, columns=columns)
        text = table.column(source.text)
        if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)) or text.null_count:
            raise DataError(f"{source.spec}: {path} has a document with no string {source.text!r} field "
                            f"(column type {text.type}, {text.null_count} nulls)")
        origins = table.column("source").to_pylist() if "source" in columns else [None] * len(table)
        yield from zip(text.to_pylist(), [o if isinstance(o, str) else label for o in origins])


def buffer_shuffle(items, size: int, rng):
    """Items in a random order, drawn from a buffer of `size` items (deterministic given rng)."""
    buffer, draws = [], iter(())
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = next(draws, None)
        if i is None:  # random indices in blocks: one numpy call per 1024 items
            draws = iter(rng.integers(0, size, 1024).tolist())
            i = next(draws)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def prepared_documents(sources: list[Source], opts: PrepareOptions, seen: set, counts: dict, cache_dir=None):
    """(text, origin, u) for every document kept: shuffled per source, interleaved by weight,
    filtered. u in [0, 1) is a hash of the text keyed by the seed: the validation draw."""
    streams = [read_shuffled(s, opts, cache_dir) for s in sources]
    salt = str(opts.seed).encode()
    for text, origin in interleave(streams, [s.weight for s in sources], size=lambda doc: len(doc[0])):
        counts["read"] += 1
        counts["read_chars"] += len(text)
        if opts.nfc:
            text = unicodedata.normalize("NFC", text)
        if len(text) < opts.min_chars:
            counts["too_short"] += 1
            continue
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest()
        key = int.from_bytes(digest, "little")
        if opts.dedup:
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
        yield text, origin, key / 2**64


class Progress:
    """Log lines with documents, characters, rates and, where the total is known, an ETA."""

    def __init__(self, sources: list[Source], opts: PrepareOptions, every: float, log):
        self.sources, self.opts, self.every, self.log = sources, opts, every, log
        self.start = self.last = time.time()

    def fraction(self, counts: dict, written: dict) -> float | None:
        """How far along the run is: by documents read when the sources' sizes are known,
        by training characters or rows written when --max-shards bounds it."""
        known = [s.num_docs for s in self.sources]
        guesses = [counts["read"] / sum(known)] if known and None not in known and sum(known) else []
        if self.opts.max_shards:
            if self.opts.shard_rows:
                guesses.append(written["docs"] / (self.opts.max_shards * self.opts.shard_rows))
            else:
                guesses.append(written["chars"] / (self.opts.max_shards * self.opts.shard_chars))
        return min(1.0, max(guesses)) if guesses else None

    def __call__(self, counts: dict, written: dict, shards: int, force: bool = False):
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last, seconds = now, max(now - self.start, 1e-9)
        line = (f"prepare: {counts['read']:,} docs, {counts['read_chars'] / 1e6:,.1f}M chars read | "
                f"{shards} training shards | {counts['read'] / seconds:,.0f} docs/s, "
                f"{counts['read_chars'] / seconds / 1e6:,.2f}M chars/s | {format_seconds(seconds)}")
        fraction = self.fraction(counts, written)
        if fraction:
            line += f" | {fraction:.1%}, ETA {format_seconds(seconds * (1 - fraction) / fraction)}"
        self.log(line)


def format_seconds(s: float) -> str:
    return f"{s:.0f}s" if s < 60 else f"{s / 60:.1f}m" if s < 3600 else f"{s / 3600:.1f}h"


def start_meta(out: str, settings: dict) -> dict:
    """Open OUT for a conversion: a new folder, or one this same conversion started (resume)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file; name a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create folder {out} ({e}); choose another --out") from None
    if os.path.exists(os.path.join(out, "meta.json")):
        meta = prepared_meta(out)
        if meta is None:
            raise DataError(f"{out}/meta.json was not written by prepare (or is damaged); "
                            f"choose a new or empty --out, or delete {out} to start over")
        theirs = {k: meta.get(k) for k in settings}
        if theirs == settings:
            return meta  # resume it, or it is complete already
        if meta["complete"] or glob.glob(os.path.join(glob.escape(out), "shard_*.parquet")):
            diff = ", ".join(f"{k}: {theirs[k]!r} there, {settings[k]!r} now"
                             for k in settings if theirs[k] != settings[k])
            raise DataError(f"{out} holds a conversion with other settings ({diff}); "
                            f"use another --out, or delete {out} to start over")
        # else a run that failed before its first shard (a typo in --data?): start over
    elif glob.glob(os.path.join(glob.escape(out), "*.parquet")):
        raise DataError(f"{out} already holds .parquet files and no meta.json (not written by prepare); "
                        f"choose a new or empty --out")
    meta = {"format": PREPARED_FORMAT, "complete": False, **settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_meta(out, meta)
    return meta


def write_meta(out: str, meta: dict):
    tmp = os.path.join(out, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, os.path.join(out, "meta.json"))


def prepare(data, out: str, val_data=None, log_every: float = 10.0, log=print, **options) -> dict:
    """Write the documents of spec(s) `data` into shards in folder `out` (see above); returns meta.json's content.

    Options are the fields of PrepareOptions. Run again with the same arguments to resume."""
    import datasets
    out = os.fspath(out)
    opts = PrepareOptions(**options)
    check_prepare_options(opts)
    sources = parse_specs(data)
    val_sources = parse_specs(val_data) if val_data else []
    if val_sources:
        opts.val_frac = 0.0  # validation comes from --val-data
    for s in sources + val_sources:
        if opts.text and s.kind != "txt":
            s.text = opts.text
    settings = {"data": [s.spec for s in sources], "val_data": [s.spec for s in val_sources] or None,
                "options": vars(opts).copy(), "datasets_version": datasets.__version__}
    meta = start_meta(out, settings)
    if meta["complete"]:
        log(f"prepare: {out} is complete already ({len(meta['train']['files'])} training shards)")
        return meta
    if glob.glob(os.path.join(glob.escape(out), "shard_*.parquet")):
        log(f"prepare: resuming {out}: replaying the stream; shards already written are checked, not rewritten")
    cache_dir = None if opts.streaming else os.path.join(out, ".cache")
    counts = {"read": 0, "read_chars": 0, "too_short": 0, "duplicates": 0}
    seen = set()  # hashes of the documents kept (--dedup)
    val = ShardWriter(out, None, tmp_name="val.parquet")
    for text, origin, _ in prepared_documents(val_sources, opts, seen, counts, cache_dir):
        if val.full(opts):
            break
        val.add(text, origin)

    progress = Progress(sources, opts, log_every, log)
    train_counts = {"read": 0, "read_chars": 0, "too_short": 0, "duplicates": 0}
    shards, shard, written = [], None, {"docs": 0, "chars": 0}
    for text, origin, u in prepared_documents(sources, opts, seen, train_counts, cache_dir):
        if u < opts.val_frac and not val.full(opts):
            val.add(text, origin)
            continue
        if shard is None:
            shard = ShardWriter(out, shard_name(len(shards)))
        shard.add(text, origin)
        written["docs"], written["chars"] = written["docs"] + 1, written["chars"] + len(text)
        if shard.full(opts):
            shards.append(shard.close())
            shard = None
            meta["shards"] = shards  # what is done so far, for a look while it runs
            write_meta(out, meta)
            progress(train_counts, written, len(shards), force=True)
            if len(shards) == opts.max_shards:
                break
        progress(train_counts, written, len(shards))
    if shard is not None:
        shards.append(shard.close())
    if not shards:
        raise DataError(f"{' '.join(s.spec for s in sources)}: no training documents "
                        f"({train_counts['read']} read, {train_counts['too_short']} too short, "
                        f"{train_counts['duplicates']} duplicates, the rest drawn for validation)")
    progress(train_counts, written, len(shards), force=True)

    if val.docs:
        val_entry = val.close(shard_name(len(shards)))  # the last shard, as nanochat expects
    else:
        val_entry = None
        if val_sources or opts.val_frac:
            log("warning: no validation documents (raise --val-frac, or check --val-data); "
                "nanochat would take the last training shard for validation")
    for key in counts:
        counts[key] += train_counts[key]
    meta.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                row_group_size=ROW_GROUP, shards=shards + ([val_entry] if val_entry else []),
                train={"files": [s["file"] for s in shards], "docs": sum(s["docs"] for s in shards),
                       "chars": sum(s["chars"] for s in shards)},
                val=val_entry, filtered={"too_short": counts["too_short"], "duplicates": counts["duplicates"]},
                read={"docs": counts["read"], "chars": counts["read_chars"]})
    write_meta(out, meta)
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    log(f"prepare: wrote {out}: {len(shards)} training shards, {meta['train']['docs']:,} documents, "
        f"{meta['train']['chars']:,} characters; validation {meta['val']['file'] + ', ' if val_entry else ''}"
        f"{val.docs:,} documents, {val.chars:,} characters")
    return meta


def prepare_main(argv):
    import argparse
    from tok import parse_count
    p = argparse.ArgumentParser(prog="data.py prepare", description="Write dataset spec(s) into local, "
                                "shuffled, nanochat-compatible parquet shards (resumable: run it again).")
    p.add_argument("--data", nargs="+", required=True, help="dataset spec(s) to convert")
    p.add_argument("--out", required=True, help="folder to write shard_NNNNN.parquet and meta.json into")
    p.add_argument("--val-data", nargs="+", help="held-out spec(s) for the validation shard (instead of --val-frac)")
    p.add_argument("--val-frac", type=float, default=0.01,
                   help="share of documents drawn for the validation shard, up to one shard's size (0: none)")
    p.add_argument("--seed", type=int, default=42, help="shuffle and validation draw")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-chars", type=parse_count, default=250_000_000,
                      help="characters per shard, rounded up to whole row groups of 1024 rows (default 250M)")
    size.add_argument("--shard-rows", "--rows-per-shard", type=parse_count, help="rows per shard instead")
    p.add_argument("--max-shards", "--num-shards", type=int, default=-1,
                   help="training shards to write; -1: all (default)")
    p.add_argument("--text", "--text-column", help="text column of every source (else each spec's ?text=)")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True,
                   help="stream with a shuffle buffer (default), or --no-streaming: on-disk cache, exact shuffle")
    p.add_argument("--shuffle-buffer", type=parse_count, default=10_000, help="documents (streaming)")
    p.add_argument("--min-chars", type=int, default=0, help="filter: drop documents shorter than this")
    p.add_argument("--dedup", action="store_true", help="filter: drop exact duplicate documents")
    p.add_argument("--nfc", action="store_true", help="filter: Unicode NFC normalisation")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    try:
        prepare(args.data, args.out, val_data=args.val_data, log_every=args.log_every, seed=args.seed,
                shard_chars=args.shard_chars, shard_rows=args.shard_rows, text=args.text,
                max_shards=None if args.max_shards == -1 else args.max_shards, streaming=args.streaming,
                shuffle_buffer=args.shuffle_buffer, val_frac=args.val_frac, min_chars=args.min_chars,
                dedup=args.dedup, nfc=args.nfc)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # disk full, a folder that is not writable
        for tmp in glob.glob(os.path.join(glob.escape(args.out), "*.tmp")):  # unfinished writes: free their space
            os.remove(tmp)
        sys.exit(f"error: cannot write {args.out} ({e}); free disk space or choose another --out, then run "
                 f"the same command again to resume (finished shards are kept)")
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command again to resume (finished shards are kept)")


# -----------------------------------------------------------------------------
# python data.py: inspect a spec

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    import argparse
    from tok import Tokenizer
    parser = argparse.ArgumentParser(description="Inspect dataset specs: first documents, token counts, "
                                                 "and packed-batch throughput. (`python data.py prepare "
                                                 "--help`: convert specs into local shards.)")
    parser.add_argument("--data", nargs="+", default=[DEFAULT_PRETRAIN_SPEC], help="dataset spec(s)")
    parser.add_argument("--tokenizer", default="out/tokenizer", help="tokenizer folder (from tok.py)")
    parser.add_argument("-n", "--docs", type=int, default=2, help="documents to show per source")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=50, help="batches to time")
    parser.add_argument("--prefetch", type=int, default=0, help="batches to prepare in a background thread")
    args = parser.parse_args(argv)
    try:
        tokenizer = Tokenizer.load(args.tokenizer)
        sources = parse_specs(args.data)
        for source in sources:
            print(f"== {source.spec}")
            for i, doc in zip(range(args.docs), iter_texts(source)):
                print(f"-- document {i}: {len(doc):,} characters, {len(tokenizer.encode(doc)):,} tokens\n"
                      f"{doc[:300]!r}")
        loader = PretrainBatches(sources, tokenizer, args.batch_size, args.seq_len, prefetch=args.prefetch)
        start, tokens = time.time(), 0
        for step, (inputs, _) in zip(range(args.batches), loader):
            tokens += inputs.numel()
        seconds = time.time() - start
        print(f"== {step + 1} batches of {args.batch_size}x{args.seq_len}: {tokens / seconds:,.0f} packed tokens/s")
        for spec, n in loader.token_counts().items():
            print(f"   {n:>12,} tokens  {spec}")
    except (DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
