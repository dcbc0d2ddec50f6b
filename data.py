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
import copy
import glob
import itertools
import os
import queue
import socket
import sys
import threading
import time
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


def iter_text_batches(source: Source, ds, batch_size: int):
    """Lists of documents from a dataset, with clear errors on bad rows and bad files."""
    try:
        for batch in ds.iter(batch_size=batch_size):
            texts = batch["text"]
            if not all(isinstance(t, str) for t in texts):
                bad = next(t for t in texts if not isinstance(t, str))
                raise DataError(f"{source.spec}: a document has no string {source.text!r} field "
                                f"(got {type(bad).__name__}; fields: {', '.join(batch)})")
            yield texts
    except UnicodeDecodeError as e:
        bad = first_undecodable_file(source.files) or "a file"
        raise DataError(f"{source.spec}: {bad} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8") from None


def iter_texts(source: Source, ds=None):
    """Yield the documents of one source as strings."""
    ds = open_source(source) if ds is None else ds
    for texts in iter_text_batches(source, ds, batch_size=256):
        yield from texts


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
# python data.py: inspect a spec

def main(argv=None):
    import argparse
    from tok import Tokenizer
    parser = argparse.ArgumentParser(description="Inspect dataset specs: first documents, token counts, "
                                                 "and packed-batch throughput.")
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
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
