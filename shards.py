"""
shards.py: a sharded source read fairly from the first batch, and resumed exactly.

Fair from the first batch. A hub dataset's files are sorted by name, and the names
follow its sources or dates (German Commons starts with OCR'd 19th-century books), so
reading them in order would feed a run one corner of the corpus for billions of
tokens. A shuffled source (hf:// by default) is therefore read as `ShuffledShards`:
its shards in a seeded random permutation (a new one each epoch), MIX_STREAMS shards
open at once, one document from each in turn, so the first batch already mixes
documents from MIX_STREAMS random files. The order is a pure function of (seed,
epoch, shards), and the state records which shards are open and how far each has
been read, so a resumed run continues exactly (no shuffle buffer, whose content
could not be restored).

data.py opens a shuffled source as ShuffledShards; dataloader.py resumes it (a state
for another order is a ValueError here, a DataError naming the source there).
"""
import copy

import numpy as np

MIX_STREAMS = 8    # shards of a shuffled source read at once (datasets' own shuffle reads 10)


class ShuffledShards:
    """A streaming dataset read in a seeded random shard order, `streams` shards at a time.

    The shards (files, or row groups after reshard) are permuted with
    numpy.random.default_rng([seed, epoch]), the same permutation on every rank.
    With world_size ranks, rank r keeps shards r, r+W, r+2W, ... (by index, the rule of
    split_dataset_by_node) when the shard count divides by W. Of this rank's shards in that
    order, the first `streams` are opened, and documents are taken one from each open
    shard in turn; a finished shard is replaced, in its place in the turn, by the next
    unopened one. So the first documents already come from `streams` random shards.
    When the shard count does not divide, every rank reads the whole mixed stream, the same
    on every rank, and keeps its documents r, r+W, ... of it: a split within each shard
    instead gave rank 0 one more document of every shard with a remainder, and the other
    ranks nothing of a shard holding fewer than W (one text file per document).

    The order depends on nothing but (seed, epoch, shards), so state_dict() -- the next
    shard to open, whose turn it is, per open shard its `datasets` state before the
    rows it holds plus how many of those were handed out, and how many documents of the
    mixed stream were read -- resumes exactly.
    It offers what the readers use of a datasets.IterableDataset: iter(batch_size),
    state_dict(), load_state_dict(), num_shards, column_names.
    """

    ROWS = 256  # rows read from an open shard at a time

    def __init__(self, ds, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 streams: int = MIX_STREAMS):
        self.ds, self.seed, self.epoch, self.rank, self.world_size = ds, seed, epoch, rank, world_size
        self.streams = streams
        self.by_shard = ds.num_shards % world_size == 0
        order = shard_order(ds.num_shards, seed, epoch)
        self.order = [i for i in order if i % world_size == rank] if self.by_shard else order
        self.start = {"next": 0, "turn": 0, "open": [], "read": 0}  # where iter() starts
        self.state = copy.deepcopy(self.start)            # after the last batch handed out

    @property
    def num_shards(self) -> int:
        return self.ds.num_shards

    @property
    def column_names(self):
        return self.ds.column_names

    def _identity(self) -> dict:
        # -2: the per-document split of the mixed stream (by_shard states, which it did not change, stay -1's)
        return {"format": "shuffled-shards-1" if self.by_shard else "shuffled-shards-2", "seed": self.seed, "epoch": self.epoch, "shards": self.ds.num_shards,
                "rank": self.rank, "world_size": self.world_size, "streams": self.streams}

    def state_dict(self) -> dict:
        return {**self._identity(), **copy.deepcopy(self.state)}

    def load_state_dict(self, state: dict):
        mine = self._identity()
        theirs = {k: state.get(k) for k in mine} if isinstance(state, dict) else None
        if theirs != mine:
            raise ValueError(f"a data loader state for another shard order ({theirs}, now {mine}): the source's "
                            f"shards, seed or streams changed, or the state predates shuffled sources; resume "
                            f"with the same data, seed and code, or start the data stream afresh")
        self.start = {"read": 0, **{k: copy.deepcopy(state[k]) for k in ("next", "turn", "open", "read") if k in state}}
        self.state = copy.deepcopy(self.start)

    def _open_shard(self, k: int, before=None):
        """The k-th shard of this rank's order, as a dataset, positioned at `before` (None: its start)."""
        shard = self.ds.shard(num_shards=self.ds.num_shards, index=self.order[k])
        if before is not None:
            shard.load_state_dict(copy.deepcopy(before))
        return shard

    def iter(self, batch_size: int):
        """Batches {column: [values]} of up to batch_size rows, in the mixed order."""
        position = copy.deepcopy(self.start)
        slots = [_OpenShard(k, before, offset, self._open_shard(k, before)) for k, before, offset in position["open"]]
        next_k, turn, read = position["next"], position["turn"], position["read"]
        if next_k == 0 and not slots:
            while len(slots) < self.streams and next_k < len(self.order):
                slots.append(_OpenShard(next_k, None, 0, self._open_shard(next_k)))
                next_k += 1
        batch, rows = {}, 0
        while slots:
            turn %= len(slots)
            row = slots[turn].next_row(self.ROWS)
            if row is None:  # this shard is done: the next one takes its place, or the slot closes
                if next_k < len(self.order):
                    slots[turn] = _OpenShard(next_k, None, 0, self._open_shard(next_k))
                    next_k += 1
                else:
                    del slots[turn]
                continue
            turn += 1
            mine = self.by_shard or read % self.world_size == self.rank  # `read`: the mixed stream's documents before
            read += 1
            if not mine:
                continue
            for column, value in row.items():
                batch.setdefault(column, []).append(value)
            rows += 1
            if rows == batch_size:
                self.state = {"next": next_k, "turn": turn % len(slots),
                              "open": [[s.k, copy.deepcopy(s.before), s.offset] for s in slots], "read": read}
                yield batch
                batch, rows = {}, 0
        self.state = {"next": next_k, "turn": 0, "open": [], "read": read}
        if rows:
            yield batch


class _OpenShard:
    """One open shard of ShuffledShards: rows come from `held`, a batch read after state `before`,
    of which `offset` rows were handed out."""

    def __init__(self, k: int, before, offset: int, dataset):
        self.k, self.before, self.offset, self.dataset = k, before, offset, dataset
        self.batches, self.held = None, None

    def next_row(self, rows: int) -> dict | None:
        if self.batches is None:
            self.batches = self.dataset.iter(batch_size=rows)
        while self.held is None or self.offset >= len(next(iter(self.held.values()))):
            if self.held is not None:  # all of it handed out: the position is now after it
                self.before, self.offset = self.dataset.state_dict(), 0
            self.held = next(self.batches, None)
            if self.held is None:
                return None
        row = {column: values[self.offset] for column, values in self.held.items()}
        self.offset += 1
        return row


def shard_order(num_shards: int, seed: int, epoch: int = 0) -> list[int]:
    """The seeded random order of a shuffled source's shards in one epoch (the same on every rank)."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()
