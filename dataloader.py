"""
dataloader.py: pretraining batches. Shard by rank, tokenize, mix, pack, resume exactly.

    loader = PretrainBatches(data.parse_specs(SPEC), tokenizer, batch_size=32, seq_len=2048, rank=r, world_size=W)
    for inputs, targets in loader: ...          # (B, T) each; loader.state_dict() resumes exactly

Sharding. Each rank opens every source and keeps a disjoint part of it with
`datasets.distributed.split_dataset_by_node`, whose rule is: when the number
of shards (files, or parquet row groups after `reshard()`) divides by the
world size, rank r reads shards r, r+W, r+2W, ...; otherwise every rank reads
all of it and keeps documents r, r+W, r+2W, ... (correct, but each rank then
parses everything). Together the ranks see every document exactly once.

Packing, per source, one of two (`packing=`):

- "concat" (the default): plain concatenate-and-split. Each document becomes
  <|bos|> + its tokens; a source's documents are concatenated in order and cut
  into rows of T+1 tokens (row = T inputs + the target of the last one); rows do
  not overlap. No token is lost or duplicated: the only rule is that the one
  (last token of a row -> first token of the next row) prediction per row is
  never trained, and at the end of a non-looping stream each source's tail
  shorter than one row is dropped. A row usually starts mid-document, and its
  first tokens attend back into the end of an unrelated document.
- "bestfit": nanochat's BOS-aligned best-fit packing. Every row starts with a
  document's <|bos|>. A source keeps a buffer of at least `buffer_docs` tokenized
  documents; a row is filled by repeatedly taking the largest buffered document
  that fits the space left whole; when none fits, the shortest one is cropped:
  its first (space left) tokens end the row and the rest of it is discarded.
  Nothing is padded, and no token but a cropped document's tail is lost (plus,
  at the end of a non-looping stream, the last row that cannot be filled); both
  are counted per source (`cropped_counts()`). A document longer than a row is
  kept in the buffer only up to a row's worth of tokens (all a crop can use),
  with its full length for the choices, so memory and the saved state stay
  bounded. Unlike nanochat (one endless stream), a source's buffer is not
  topped up across the end of an epoch: it drains first, so a source with fewer
  documents than the buffer is not read several times over to fill it. Long
  documents lose the most: a novel gives a row's worth of its opening per epoch
  and the rest is discarded.
The trade-off: best-fit starts every row at a document start (no token sees an
unrelated document as context) but throws away tokens; concatenation keeps every
token and makes exact resume a matter of remembering one buffer per source.

Mixing, row by row (either packing; a row holds one source's tokens): the next
row always comes from the source that has given the fewest tokens relative to
its weight ("least tokens consumed"), so the token shares follow the weights to
within a row, deterministically, with no RNG to save, however long a source's
documents are (one novel can be 1M tokens). A source that runs out starts over
(a new epoch) when looping. Tokens count as given when they are in a row: a
source's cropped tokens do not count towards its share (they are not trained
on); it reads more documents to keep its share.
"""
import bisect
import copy
import dataclasses
import itertools
import os
import queue
import sys
import threading

import numpy as np
import torch

from data import DataError, Source, iter_text_batches, open_source, parse_spec, text_bytes
from shards import ShuffledShards

PACKINGS = ("concat", "bestfit")

# Documents read from a source at a time. A source's saved position (its `datasets` state) counts batches of
# this size, so a stream is resumed only by a loader that reads batches of the same size.
DOCS_PER_READ = 64


def same_options(a: Source, b: Source) -> bool:
    """Whether two specs read the same way, wherever their files lie: the same kind and options."""
    where = {"spec", "location", "files", "num_docs", "size_bytes"}
    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(Source) if f.name not in where)


class PretrainBatches:
    """(inputs, targets) batches of shape (B, T) for one rank, from a weighted mix of sources.

    Iterate it for batches; `state_dict()` describes the position after the last
    batch handed out, and a fresh loader given `load_state_dict(state)` continues
    with exactly the batch the uninterrupted run would have produced next.
    """

    def __init__(self, sources: list[Source], tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, loop: bool = True, docs_per_read: int = DOCS_PER_READ, prefetch: int = 0,
                 packing: str = "concat", buffer_docs: int = 1000):
        if packing not in PACKINGS:
            raise DataError(f"unknown packing {packing!r}: use one of {', '.join(PACKINGS)}")
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batches of {batch_size} rows of {seq_len} tokens: both must be at least 1")
        self.sources, self.tokenizer = sources, tokenizer
        self.token_bytes = np.asarray(tokenizer.token_bytes)  # UTF-8 bytes per token id (passes_read)
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.loop, self.docs_per_read, self.prefetch = loop, docs_per_read, prefetch
        self.packing, self.buffer_docs = packing, buffer_docs  # buffer_docs: bestfit's choice (nanochat: 1000)
        self.datasets = [open_rank_shard(s, rank, world_size) for s in sources]
        self.readers = [None] * len(sources)
        n = len(sources)
        # bytes: UTF-8 bytes of the text handed out, per source (passes_read)
        self.progress = {"states": [None] * n, "epochs": [0] * n, "tokens": [0] * n, "docs": [0] * n,
                         "exhausted": [False] * n, "cropped": [0] * n, "bytes": [0] * n}
        # per source: tokens read but not yet handed out. concat: one array (never written in place, so
        # views are snapshots); bestfit: a BestFitBuffer of documents (copied for snapshots)
        self.pending = [self._empty_pending() for _ in sources]
        self.handed_out = self._snapshot()
        self._share_bytes = {}  # source index -> its bytes of text / world size (passes_read)

    # --- reading and packing ---

    def _read_documents(self, i: int, start_over: bool = True) -> list[str] | None:
        """The next documents of source i, or None once it is exhausted (and not looping, or not
        `start_over`: then the next call starts the new epoch)."""
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
            if not self.loop or not start_over:
                return None
            self.progress["epochs"][i] += 1  # start the source over
            self.progress["states"][i] = None
            self.datasets[i] = open_rank_shard(self.sources[i], self.rank, self.world_size, quiet=True,
                                               epoch=self.progress["epochs"][i])  # shuffled: a new shard order
            self.readers[i] = None
        return None

    def _refill(self, i: int, start_over: bool = True) -> bool:
        """Tokenize the next documents of source i into its buffer; False once it is exhausted (or at
        the end of an epoch, if not `start_over`)."""
        docs = self._read_documents(i, start_over)
        if docs is None:
            if start_over or not self.loop:
                self.progress["exhausted"][i] = True
            return False
        bos = self.tokenizer.bos_id
        self.progress["docs"][i] += len(docs)
        if self.packing == "bestfit":
            for ids in self.tokenizer.encode_batch(docs):
                self.pending[i].add(bos, ids)
            return True
        tokens = np.fromiter(itertools.chain.from_iterable(
            [bos] + ids for ids in self.tokenizer.encode_batch(docs)), dtype=np.int32)
        self.pending[i] = np.concatenate([self.pending[i], tokens])
        return True

    def _next_row(self):
        """The next row of T+1 tokens, from the source with the fewest tokens handed out per weight."""
        while True:
            live = [i for i in range(len(self.sources))
                    if not self.progress["exhausted"][i] or (self.packing == "bestfit" and len(self.pending[i]))]
            if not live:
                return None
            i = min(live, key=lambda j: self.progress["tokens"][j] / self.sources[j].weight)
            tokens = self._concat_row(i) if self.packing == "concat" else self._bestfit_row(i)
            if tokens is not None:
                self.progress["tokens"][i] += len(tokens)
                self.progress["bytes"][i] += int(self.token_bytes[tokens].sum())
                return tokens
            # else source i is exhausted (not looping) and has given its last row

    def _concat_row(self, i: int):
        """The next T+1 tokens of source i's stream; None at its end (the tail shorter than a row is dropped)."""
        row = self.seq_len + 1
        while len(self.pending[i]) < row and self._refill(i):
            pass
        if len(self.pending[i]) < row:
            self.progress["cropped"][i] += len(self.pending[i])
            self.pending[i] = self._empty_pending()
            return None
        tokens, self.pending[i] = self.pending[i][:row], self.pending[i][row:]
        return tokens

    def _bestfit_row(self, i: int):
        """T+1 tokens of whole documents of source i, best fit, the last one cropped to fill the row;
        None at the end of a non-looping stream (its last, partial row is dropped)."""
        row, buffer = self.seq_len + 1, self.pending[i]
        pieces, filled = [], 0
        while filled < row:
            # the buffer never holds two epochs: it drains before the next epoch is read, so a source
            # smaller than the buffer is not read several times over (and held twice) to fill it
            while (len(buffer) < self.buffer_docs and not self.progress["exhausted"][i]
                   and self._refill(i, start_over=not len(buffer))):
                pass
            if not len(buffer):
                self.progress["cropped"][i] += filled
                return None
            tokens, cropped = buffer.take(row - filled)
            pieces.append(tokens)
            filled += len(tokens)
            self.progress["cropped"][i] += cropped
        return np.concatenate(pieces)

    def _empty_pending(self):
        return np.empty(0, dtype=np.int32) if self.packing == "concat" else BestFitBuffer(self.seq_len + 1)

    def _next_block(self):
        """The next (rows, T+1) block of tokens and the loader state right after it; at the end of a
        non-looping stream (None, the final state: its counters hold the tails dropped at the end)."""
        rows = [r for r in (self._next_row() for _ in range(self.batch_size)) if r is not None]
        return np.stack(rows) if rows else None, self._snapshot()

    def _snapshot(self) -> dict:
        pending = list(self.pending) if self.packing == "concat" else [b.copy() for b in self.pending]
        return {"progress": copy.deepcopy(self.progress), "pending": pending}

    def _to_batch(self, block):
        tokens = torch.from_numpy(block.astype(np.int64))
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        if torch.cuda.is_available():  # ready for .to(device, non_blocking=True)
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def _blocks(self):
        """The (rows, T+1) blocks in this thread, each one counted as handed out when it is yielded."""
        while True:
            block, self.handed_out = self._next_block()
            if block is None:
                return
            yield block

    def rows(self):
        """The stream as rows of T + 1 tokens (numpy), in the order __iter__ batches them, unprefetched: for
        whoever wants the rows themselves, not training batches (sft.py's text rows)."""
        for block in self._blocks():
            yield from block

    # --- iteration, with optional background prefetching ---

    def __iter__(self):
        if self.prefetch <= 0:
            yield from map(self._to_batch, self._blocks())
            return
        # A background thread reads and tokenizes ahead (both release the GIL);
        # each block travels with the state after it, so state_dict() stays exact.
        ready, stop = queue.Queue(maxsize=self.prefetch), threading.Event()

        def hand_over(item):  # unless the consumer has left: then nobody empties the queue
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    pass

        def produce():
            try:
                while not stop.is_set():
                    block, state = self._next_block()
                    hand_over((None if block is None else self._to_batch(block), state))
                    if block is None:
                        return
            except BaseException as e:  # hand errors to the consumer
                hand_over(e)

        thread = threading.Thread(target=produce, daemon=True, name="data-prefetch")
        thread.start()
        try:
            while True:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                batch, self.handed_out = item
                if batch is None:
                    return
                yield batch
        finally:
            stop.set()
            thread.join()

    # --- exact resume ---

    def _files(self) -> list:
        """Each local source's files as [name, bytes] (None for a hub source): a saved position holds only
        over the same files."""
        return [None if s.kind == "hf" else [[os.path.basename(f), os.path.getsize(f)] for f in s.files]
                for s in self.sources]

    def state_dict(self) -> dict:
        """Where this rank's stream stands after the last batch handed out (torch.save-able)."""
        state = copy.deepcopy(self.handed_out["progress"])
        state.update(sources=[s.spec for s in self.sources], rank=self.rank, world_size=self.world_size,
                     packing=self.packing, docs_per_read=self.docs_per_read, files=self._files())
        if self.packing == "concat":
            state["pending"] = [torch.from_numpy(p.copy()) for p in self.handed_out["pending"]]
        else:
            state["buffers"] = [b.state_dict() for b in self.handed_out["pending"]]
        return state

    def _moved_only(self, state: dict) -> bool:
        """Whether the saved specs differ from these only in where local files lie (data copied to a node's own
        disk, a folder renamed): the same kind and options, and files recorded, which load_state_dict then
        compares by name and size. Specs are compared as written otherwise (hub ids, older states)."""
        saved = state.get("sources") or []
        if len(saved) != len(self.sources) or not state.get("files"):
            return False
        return all(then == now.spec or (now.kind != "hf" and same_options(parse_spec(then), parse_spec(now.spec)))
                   for then, now in zip(saved, self.sources))

    def load_state_dict(self, state: dict):
        mine = ([s.spec for s in self.sources], self.rank, self.world_size, self.packing, self.docs_per_read)
        theirs = (state.get("sources"), state.get("rank"), state.get("world_size"), state.get("packing", "concat"),
                  state.get("docs_per_read", DOCS_PER_READ))
        if self._moved_only(state):
            mine = (theirs[0], *mine[1:])
        if mine != theirs:
            raise DataError(f"data loader state is from another setup (sources, rank, world size, packing, documents "
                            f"per read) {theirs}, not {mine}; resume with the same --data, --packing and number of "
                            f"processes")
        files = self._files()
        saved_files = state.get("files") or files  # states saved before files were recorded: not checked
        changed = [(s.spec, was) for s, was, then, now in zip(self.sources, state["sources"], saved_files, files)
                   if then != now]
        if changed:
            spec, was = changed[0]
            raise DataError(f"{spec}: its files are not the ones the data loader state was saved with"
                            + ("" if was == spec else f", at {was}") + ": added, removed, renamed or changed in "
                            "size, so its position would be another document's; resume with the same --data and "
                            "files, or start the data stream afresh")
        self.progress = {k: list(state[k]) for k in ("states", "epochs", "tokens", "docs", "exhausted")}
        for key in ("cropped", "bytes"):  # older states: not counted
            self.progress[key] = list(state.get(key, [0] * len(self.sources)))
        for i, ds_state in enumerate(self.progress["states"]):
            self.datasets[i] = open_rank_shard(self.sources[i], self.rank, self.world_size, quiet=True,
                                               epoch=self.progress["epochs"][i])
            if ds_state is not None:
                try:
                    self.datasets[i].load_state_dict(copy.deepcopy(ds_state))
                except ValueError as e:  # ShuffledShards: a state for another shard order
                    raise DataError(f"{self.sources[i].spec}: {e}") from None
            self.readers[i] = None
        if self.packing == "concat":
            self.pending = [p.numpy().astype(np.int32) for p in state["pending"]]
        else:
            self.pending = [BestFitBuffer.from_state(b, self.seq_len + 1) for b in state["buffers"]]
        self.handed_out = self._snapshot()

    def continue_reading(self, state: dict):
        """load_state_dict for a state saved by a loader with either packing: the same documents come next,
        and the tokens it had read but not handed out are repacked into this loader's buffers, so the reading
        position carries over from one packing to the other (sft.py's text rows, half of each). concat ->
        bestfit: the whole documents of its buffer go into the best-fit buffer, and the tail of the document
        it was cutting rows from (before its first <|bos|>) counts as cropped; bestfit -> concat: the buffered
        documents are concatenated, shortest first, their tails beyond a row (never kept) counted as cropped."""
        theirs = state.get("packing", "concat")
        if theirs == self.packing:
            return self.load_state_dict(state)
        if theirs not in PACKINGS:
            raise DataError(f"data loader state has an unknown packing {theirs!r}")
        state, bos = dict(state, packing=self.packing), self.tokenizer.bos_id
        cropped = list(state.get("cropped", [0] * len(self.sources)))
        if self.packing == "bestfit":
            state["buffers"] = []
            for i, pending in enumerate(state.pop("pending")):
                tokens, buffer = pending.numpy(), BestFitBuffer(self.seq_len + 1)
                starts = np.flatnonzero(tokens == bos)
                cropped[i] += int(starts[0]) if len(starts) else len(tokens)
                for doc in np.split(tokens, starts)[1:]:
                    buffer.add(bos, doc[1:].tolist())
                state["buffers"].append(buffer.state_dict())
        else:
            state["pending"] = []
            for i, saved in enumerate(state.pop("buffers")):
                buffer = BestFitBuffer.from_state(saved, saved["row"])
                cropped[i] += sum(max(n - buffer.row, 0) for n in buffer.lengths)
                state["pending"].append(torch.from_numpy(np.concatenate([np.empty(0, np.int32)] + buffer.docs)))
            # a drained source with documents left in its buffer: concat reads on until its stream ends
            state["exhausted"] = [gone and not len(p) for gone, p in zip(state["exhausted"], state["pending"])]
        state["cropped"] = cropped
        self.load_state_dict(state)

    def token_counts(self) -> dict[str, int]:
        """Tokens handed out so far from each source (for the log)."""
        return {s.spec: n for s, n in zip(self.sources, self.handed_out["progress"]["tokens"])}

    def passes_read(self) -> dict[str, float]:
        """How many times each source was read through so far, on this rank's share of it: the bytes of text
        handed out against the source's size (local files; an hf:// source's size is unknown, so it counts
        whole passes only). With equal-token weights a small source repeats while a big one is barely started
        (README, mixing). A JSONL file's size counts the JSON around the text too, and best-fit's cropped
        tokens are never handed out, so either reads a little low."""
        progress = self.handed_out["progress"]
        passes = {}
        for i, source in enumerate(self.sources):
            if source.kind == "hf":
                passes[source.spec] = float(progress["epochs"][i])
                continue
            if i not in self._share_bytes:  # read once, on the first call (1.5 s for the sample data's 390 MB)
                size = source.size_bytes if source.weight_by_size else text_bytes(source)
                self._share_bytes[i] = size / self.world_size
            passes[source.spec] = round(progress["bytes"][i] / self._share_bytes[i], 3)
        return passes

    def cropped_counts(self) -> dict[str, int]:
        """Tokens read from each source but never handed out: best-fit's cropped document tails, and the
        last partial row of a non-looping stream (either packing)."""
        return {s.spec: n for s, n in zip(self.sources, self.handed_out["progress"]["cropped"])}


class BestFitBuffer:
    """One source's documents waiting for best-fit packing (each <|bos|> + tokens), sorted by length.

    `take(space)` gives the largest document of length <= space whole; if none is that
    short, the shortest document's first `space` tokens, the rest of it cropped away
    (nanochat's rule). A document longer than a row keeps only a row's worth of
    tokens here (a crop never uses more) but its full length, which decides the
    choices and counts its cropped tokens.
    """

    def __init__(self, row: int, lengths=(), docs=()):
        self.row, self.lengths, self.docs = row, list(lengths), list(docs)

    def __len__(self):
        return len(self.lengths)

    def add(self, bos: int, ids: list[int]):
        length = len(ids) + 1
        k = bisect.bisect_right(self.lengths, length)  # after the equally long ones: order of arrival
        self.lengths.insert(k, length)
        self.docs.insert(k, np.array([bos] + ids[:self.row - 1], dtype=np.int32))

    def take(self, space: int):
        """(tokens for the row, number of tokens cropped away)."""
        k = bisect.bisect_right(self.lengths, space) - 1  # the largest that fits ...
        k = bisect.bisect_left(self.lengths, self.lengths[max(k, 0)])  # (or none: the shortest), oldest first
        length, doc = self.lengths.pop(k), self.docs.pop(k)
        return doc[:space], max(length - space, 0)

    def copy(self):
        return BestFitBuffer(self.row, self.lengths, self.docs)

    def state_dict(self) -> dict:
        tokens = np.concatenate(self.docs) if self.docs else np.empty(0, dtype=np.int32)
        return {"row": self.row, "lengths": torch.tensor(self.lengths, dtype=torch.int64),
                "tokens": torch.from_numpy(tokens)}

    @classmethod
    def from_state(cls, state: dict, row: int):
        if state["row"] != row:
            raise DataError(f"data loader state packs rows of {state['row']} tokens, not {row}; "
                            f"resume with the same --seq-len")
        lengths = state["lengths"].tolist()
        stops = np.cumsum([min(n, row) for n in lengths], dtype=np.int64)
        docs = np.split(state["tokens"].numpy().astype(np.int32), stops[:-1]) if lengths else []
        return cls(row, lengths, docs)


def open_rank_shard(source: Source, rank: int, world_size: int, quiet: bool = False, epoch: int = 0):
    """This rank's disjoint part of a source (see the sharding rule above), in a seeded
    random shard order for `epoch` if the source is shuffled (ShuffledShards)."""
    from datasets.distributed import split_dataset_by_node
    ds = open_source(source, shuffle=False)
    if world_size > 1 and ds.num_shards % world_size:
        ds = ds.reshard()  # parquet: one shard per row group, often enough to divide evenly
    if world_size > 1 and ds.num_shards % world_size and not quiet and rank == 0:
        print(f"note: {source.spec} has {ds.num_shards} shards, not a multiple of {world_size} ranks: "
              f"every rank reads all of it and keeps one document in {world_size}", file=sys.stderr)
    if source.shuffled:
        return ShuffledShards(ds, source.seed, epoch, rank, world_size)
    return ds if world_size == 1 else split_dataset_by_node(ds, rank=rank, world_size=world_size)


def validation_batches(sources: list[Source], tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                       world_size: int = 1, max_rows: int = 80) -> list:
    """A fixed, deterministic list of this rank's validation batches (read once, kept in memory): the first
    max_rows rows of the whole stream (concatenated: no token cropped), rank r taking rows r, r + W, ..., in
    batches of up to batch_size. So the validation set, and the bits per byte all-reduced over it, are the same on
    any number of processes and at any batch size (train.py halves the batch when a step does not fit in memory;
    counted in batches, that halved the set). A stream without one whole row is a DataError: its bits per byte
    would be 0 / 0."""
    loader = PretrainBatches(sources, tokenizer, batch_size, seq_len, loop=False)
    rows = list(itertools.islice(((x, y) for inputs, targets in loader for x, y in zip(inputs, targets)), max_rows))
    if not rows:
        raise DataError(f"no row of {seq_len + 1} tokens in {' '.join(s.spec for s in sources)} (the sequence length "
                        f"+ 1): too little text to measure on", "give more text or lower --seq-len")
    mine = rows[rank::world_size]
    return [tuple(torch.stack(part) for part in zip(*mine[i:i + batch_size])) for i in range(0, len(mine), batch_size)]
