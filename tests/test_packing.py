"""Tests for dataloader.py's packings: BOS-aligned best-fit against plain concatenation.

Documents here are made of one identifying character and a run of x's, so with the
character tokenizer (one token per character) every piece of a row names the
document it comes from, and its length says whether it was cropped.
"""
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dataloader
from data import DataError, parse_specs
from test_data import CharTokenizer, LimitedLoader, read_all, resume_after


def write_sized_docs(folder, lengths, base, n_files=1, rows_per_group=None, name="d"):
    """Parquet files of documents of the given lengths (in tokens after the BOS); document i starts
    with chr(base + i), so its first token after the BOS is base + i + 1. Returns the documents."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [chr(base + i) + "x" * (n - 1) for i, n in enumerate(lengths)]
    per_file = -(-len(docs) // n_files)
    for f in range(n_files):
        pq.write_table(pa.table({"text": docs[f * per_file:(f + 1) * per_file]}), folder / f"{name}-{f:02d}.parquet",
                       row_group_size=rows_per_group)
    return docs


def random_lengths(n, high, seed):
    return np.random.default_rng(seed).integers(1, high, n).tolist()


def pieces(row):
    """A row's documents: the token lists that start at each BOS."""
    starts = [k for k, t in enumerate(row) if t == 0]
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def rows_of(batches):
    """Every row (T+1 tokens: inputs + the last target) of (inputs, targets) batches."""
    return [x + y[-1:] for xs, ys in batches for x, y in zip(xs.tolist(), ys.tolist())]


def doc_of(piece, docs, base):
    """The index of the document a row piece comes from (None for a lone BOS: a crop to one token)."""
    if len(piece) == 1:
        return None
    i = piece[1] - 1 - base
    assert piece[1:] == [ord(c) + 1 for c in docs[i][:len(piece) - 1]]  # a prefix of that document
    return i


def bestfit(specs, batch_size, seq_len, **kwargs):
    return dataloader.PretrainBatches(parse_specs(specs), CharTokenizer(), batch_size, seq_len, packing="bestfit",
                                      **kwargs)


# --- the algorithm ------------------------------------------------------------------

def nanochat_bestfit(epochs, batch_size, seq_len, buffer_size, n_batches):
    """nanochat/dataloader.py's BOS-aligned best-fit loop (karpathy/nanochat 92d63d4), on token lists,
    with our one change: the buffer is not topped up across the end of an epoch, it drains first."""
    epochs, epoch, buffer, batches, cropped = iter(epochs), [], [], [], 0
    for _ in range(n_batches):
        rows = []
        for _ in range(batch_size):
            row = []
            while len(row) < seq_len + 1:
                while len(buffer) < buffer_size and (epoch or not buffer):
                    epoch = epoch or list(next(epochs))
                    buffer.append(epoch.pop(0))
                remaining = seq_len + 1 - len(row)
                best_idx, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if remaining >= len(doc) > best_len:
                        best_idx, best_len = i, len(doc)
                if best_idx >= 0:
                    row += buffer.pop(best_idx)
                else:
                    doc = buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))
                    row += doc[:remaining]
                    cropped += len(doc) - remaining
            rows.append(row)
        batches.append(rows)
    return batches, cropped


@pytest.mark.parametrize("high, seq_len", [(12, 16), (40, 16), (20, 64)])
def test_bestfit_packs_as_nanochat_does(tmp_path, high, seq_len):
    # short documents (many per row), documents up to 2.5 rows long, and a looping source of 3 epochs
    docs = write_sized_docs(tmp_path, random_lengths(150, high, seed=high), base=0x100)
    n_batches = 3 * sum(len(d) + 1 for d in docs) // (4 * (seq_len + 1))
    loader = bestfit(f"parquet://{tmp_path}/*.parquet", 4, seq_len, buffer_docs=20, docs_per_read=1)
    got = rows_of([b for _, b in zip(range(n_batches), loader)])
    epochs = itertools.repeat([[0] + [ord(c) + 1 for c in d] for d in docs])
    expected, cropped = nanochat_bestfit(epochs, 4, seq_len, 20, n_batches)
    assert got == [row for rows in expected for row in rows]
    assert all(row[0] == 0 for row in got)  # every row starts with BOS
    assert loader.cropped_counts() == {f"parquet://{tmp_path}/*.parquet": cropped} and cropped > 0
    assert loader.handed_out["progress"]["epochs"][0] >= 2


def test_bestfit_accounts_for_every_token(tmp_path):
    """One pass over a finite source: each document is in a row whole, or its head ends a row and its
    tail is counted as cropped, or it is in the last, partial row (dropped, counted); no document twice."""
    lengths = random_lengths(300, 30, seed=1)
    docs = write_sized_docs(tmp_path, lengths, base=0x100, n_files=3)
    row = 17
    loader = bestfit(f"parquet://{tmp_path}/*.parquet", 3, row - 1, loop=False, buffer_docs=16, docs_per_read=5)
    rows = rows_of(read_all(loader))
    seen, lone_bos = [], 0
    for r in rows:
        assert len(r) == row and r[0] == 0
        for k, piece in enumerate(pieces(r)):
            i = doc_of(piece, docs, 0x100)
            if i is None:  # a document cropped to its BOS: unidentifiable
                lone_bos += 1
            else:
                seen.append(i)
                assert len(piece) == lengths[i] + 1 or k == len(pieces(r)) - 1  # only a row's last piece is cropped
    assert len(seen) == len(set(seen))
    unseen = len(docs) - len(seen)  # cropped to a lone BOS, or in the dropped last row
    assert unseen >= lone_bos
    cropped = loader.cropped_counts()[f"parquet://{tmp_path}/*.parquet"]
    assert len(rows) * row + cropped == sum(n + 1 for n in lengths)  # nothing lost silently
    assert cropped <= len(rows) * max(lengths) + row - 1  # at most one crop per row (< a document) + the last row


def test_bestfit_with_the_real_tokenizer(tmp_path, small_tokenizer):
    tokenizer = small_tokenizer
    words = ["Haus", "Baum", "Straße", "fährt", "schön", "Bundestag", "über", "Gesetz"]
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, rng.integers(1, 30))) + f" {i}" for i in range(120)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    encoded = {tuple(tokenizer.encode(d)): d for d in docs}
    loader = dataloader.PretrainBatches(parse_specs(f"parquet://{tmp_path}/a.parquet"), tokenizer, 2, 32,
                                        loop=False, packing="bestfit", buffer_docs=10)
    rows = [x + y[-1:] for xs, ys in read_all(loader) for x, y in zip(xs.tolist(), ys.tolist())]
    assert rows and all(r[0] == tokenizer.bos_id for r in rows)
    for r in rows:
        starts = [k for k, t in enumerate(r) if t == tokenizer.bos_id] + [len(r)]
        for a, b in zip(starts, starts[1:]):
            piece = tuple(r[a + 1:b])  # a whole document, or the head of one at the row's end
            assert piece in encoded or (b == len(r) and any(e[:len(piece)] == piece for e in encoded))


# --- the cropped tokens against concatenation -----------------------------------------

@pytest.mark.parametrize("high", [8, 60])
def test_cropped_fraction_against_concat(tmp_path, high):
    """One pass over a source. Concatenation drops only the tail shorter than a row. Best fit crops at
    least every document's excess over a row (it cannot fit whole) and at most one document's tokens
    per row (one crop per row, of a document of at most `high` tokens), plus the last partial row."""
    lengths = random_lengths(400, high, seed=high)  # + the BOS: documents of 2 .. high tokens
    write_sized_docs(tmp_path, lengths, base=0x100)
    spec, read, row = f"parquet://{tmp_path}/*.parquet", sum(n + 1 for n in lengths), 17
    cropped, rows = {}, {}
    for packing in ("concat", "bestfit"):
        loader = dataloader.PretrainBatches(parse_specs(spec), CharTokenizer(), 4, row - 1, loop=False,
                                            packing=packing, buffer_docs=32)
        rows[packing] = len(rows_of(read_all(loader)))
        cropped[packing] = loader.cropped_counts()[spec]
        assert rows[packing] * row + cropped[packing] == read  # every token read is in a row or counted
    assert cropped["concat"] < row
    excess = sum(max(n + 1 - row, 0) for n in lengths)
    assert max(excess, 1) <= cropped["bestfit"] <= rows["bestfit"] * (high - 1) + row - 1


# --- the mix, the ranks, resume ---------------------------------------------------------

@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_mix_follows_weights_in_trained_tokens(tmp_path, packing):
    """Source a: short documents; b: documents up to 4 rows long, so best fit crops mostly b. The
    shares of the tokens in the rows still follow the weights 3:1: the row-by-row rule keeps each
    source within n_sources rows of its share at any time (each row from one source)."""
    write_sized_docs(tmp_path / "a", random_lengths(500, 10, seed=2), base=0x100)
    write_sized_docs(tmp_path / "b", random_lengths(200, 130, seed=3), base=0x1000)
    specs = f"parquet://{tmp_path}/a/*.parquet?weight=3 parquet://{tmp_path}/b/*.parquet"
    row = 33
    loader = dataloader.PretrainBatches(parse_specs(specs), CharTokenizer(), 4, row - 1, docs_per_read=4,
                                        packing=packing, buffer_docs=24)
    batches = [batch for _, batch in zip(range(50), loader)]
    counts = list(loader.token_counts().values())
    total = sum(counts)
    assert total == 50 * 4 * row
    assert abs(counts[0] - 0.75 * total) <= 2 * row
    if packing == "bestfit":
        by_source = [0, 0]
        for r in rows_of(batches):
            assert r[0] == 0
            sources = {p[1] > 0x1000 for p in pieces(r) if len(p) > 1}  # True: source b
            assert len(sources) == 1  # a row holds documents of one source; its first piece names it
            by_source[sources.pop()] += row
        assert by_source == counts
        cropped = list(loader.cropped_counts().values())
        assert cropped[1] > 10 * cropped[0]


def decode_pieces(rows, base_of):
    """(source, document) of every identifiable row piece."""
    found = []
    for r in rows:
        for piece in pieces(r):
            if len(piece) > 1:
                base = max(b for b in base_of if piece[1] - 1 >= b)
                found.append((base_of[base], piece[1] - 1 - base))
    return found


@pytest.mark.parametrize("world_size, n_files, rows_per_group", [(2, 4, None), (3, 2, None), (2, 1, 16)])
def test_bestfit_ranks_read_disjoint_documents(tmp_path, world_size, n_files, rows_per_group):
    docs = write_sized_docs(tmp_path, random_lengths(120, 25, seed=4), base=0x100, n_files=n_files,
                            rows_per_group=rows_per_group)
    seen = []
    for rank in range(world_size):
        loader = bestfit(f"parquet://{tmp_path}/*.parquet", 2, 16, rank=rank, world_size=world_size, loop=False,
                         buffer_docs=8)
        rows = rows_of(read_all(loader))
        assert all(r[0] == 0 for r in rows)
        found = [i for _, i in decode_pieces(rows, {0x100: "d"})]
        assert len(found) == len(set(found))
        seen.append(set(found))
    for r in range(world_size):
        for q in range(r):
            assert not seen[r] & seen[q]  # no document on two ranks
    assert len(set().union(*seen)) > 0.8 * len(docs)  # and between them, most of the documents in rows


@pytest.mark.parametrize("prefetch, shuffle", [(0, "off"), (2, "off"), (0, "on")])
def test_bestfit_resume_is_exact(tmp_path, prefetch, shuffle):
    write_sized_docs(tmp_path / "big", random_lengths(60, 40, seed=5), base=0x100, n_files=4, rows_per_group=6)
    write_sized_docs(tmp_path / "small", random_lengths(7, 30, seed=6), base=0x1000)
    specs = (f"parquet://{tmp_path}/big/*.parquet?shuffle={shuffle} "
             f"parquet://{tmp_path}/small/*.parquet?weight=0.5")

    def make_loader():
        return bestfit(specs, 2, 24, rank=1, world_size=2, docs_per_read=3, buffer_docs=5, prefetch=prefetch)

    uninterrupted = make_loader()
    full = [b for _, b in zip(range(40), uninterrupted)]  # the small source wraps around several times
    assert uninterrupted.handed_out["progress"]["epochs"][1] >= 2
    for k in (1, 4, 13, 29):  # mid-buffer, before and after epochs end
        resumed = resume_after(lambda: LimitedLoader(make_loader(), 40 - k), k, tmp_path)
        assert len(resumed) == 40 - k
        for (x, y), (x2, y2) in zip(full[k:], resumed):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_bestfit_state_keeps_a_row_per_long_document_and_the_counters(tmp_path):
    write_sized_docs(tmp_path, [500, 3, 900, 4, 700, 2] * 5, base=0x100)
    spec = f"parquet://{tmp_path}/*.parquet"
    loader = bestfit(spec, 2, 16, buffer_docs=6, docs_per_read=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    buffer = state["buffers"][0]
    assert len(buffer["lengths"]) >= 5 and buffer["tokens"].numel() <= 17 * len(buffer["lengths"])
    assert max(buffer["lengths"].tolist()) > 17  # the full length is kept for the choices
    fresh = bestfit(spec, 2, 16, buffer_docs=6, docs_per_read=2)
    fresh.load_state_dict(state)
    assert fresh.cropped_counts() == loader.cropped_counts() and fresh.token_counts() == loader.token_counts()
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip([next(it) for _ in range(3)], itertools.islice(fresh, 3)))


def test_packing_states_refuse_another_setup(tmp_path):
    write_sized_docs(tmp_path, random_lengths(30, 10, seed=7), base=0x100)
    spec = f"parquet://{tmp_path}/*.parquet"
    state = bestfit(spec, 2, 8).state_dict()
    with pytest.raises(DataError, match="--packing"):
        dataloader.PretrainBatches(parse_specs(spec), CharTokenizer(), 2, 8).load_state_dict(state)
    with pytest.raises(DataError, match="resume with the same --seq-len"):
        bestfit(spec, 2, 16).load_state_dict(state)
    with pytest.raises(DataError, match="unknown packing 'greedy'"):
        dataloader.PretrainBatches(parse_specs(spec), CharTokenizer(), 2, 8, packing="greedy")


def test_concat_state_from_before_the_packing_option_still_loads(tmp_path):
    write_sized_docs(tmp_path, random_lengths(80, 20, seed=8), base=0x100)
    spec = parse_specs(f"parquet://{tmp_path}/*.parquet")
    loader = dataloader.PretrainBatches(spec, CharTokenizer(), 2, 8, docs_per_read=3)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    del state["packing"], state["cropped"]  # what an older checkpoint holds
    fresh = dataloader.PretrainBatches(spec, CharTokenizer(), 2, 8, docs_per_read=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip([next(it) for _ in range(4)], itertools.islice(fresh, 4)))


def test_a_reading_position_carries_over_from_concat_to_bestfit(tmp_path):
    """sft.py's text rows: concatenated rows, then best-fit rows read on from where they stopped. The best-fit
    rows are exactly a best-fit loader's over the documents after the last one the concatenated rows began;
    the tail of the document the last concatenated row cut counts as cropped, so no token is lost silently."""
    lengths = random_lengths(120, 30, seed=3)
    write_sized_docs(tmp_path / "all", lengths, base=0x100)
    spec = f"parquet://{tmp_path}/all/*.parquet"
    concat = dataloader.PretrainBatches(parse_specs(spec), CharTokenizer(), 1, 16, loop=False, docs_per_read=8)
    starts = np.cumsum([0] + [n + 1 for n in lengths]).tolist()  # where each document begins in the stream
    n_rows = next(n for n in range(9, 60) if n * 17 not in starts)  # past the first read of 8, inside a document
    batches = iter(concat)
    head = rows_of([next(batches) for _ in range(n_rows)])
    read = n_rows * 17
    j = next(k for k, s in enumerate(starts) if s > read)  # the first document the concatenated rows did not begin
    write_sized_docs(tmp_path / "rest", lengths[j:], base=0x100 + j)  # documents j, j+1, ... with their own names
    # a buffer bigger than the source: both loaders hold every remaining document before their first row
    fresh = bestfit(f"parquet://{tmp_path}/rest/*.parquet", 1, 16, loop=False, buffer_docs=1000)
    expected = rows_of(read_all(fresh))
    carried = bestfit(spec, 1, 16, loop=False, buffer_docs=1000, docs_per_read=8)
    carried.continue_reading(concat.state_dict())
    tail = rows_of(read_all(carried))
    assert tail == expected and all(row[0] == 0 for row in tail)
    cropped = carried.cropped_counts()[spec]
    assert cropped == starts[j] - read + fresh.cropped_counts()[f"parquet://{tmp_path}/rest/*.parquet"]
    assert (len(head) + len(tail)) * 17 + cropped == starts[-1]
    assert carried.token_counts()[spec] == (len(head) + len(tail)) * 17  # the counters go on too


def test_a_reading_position_carries_over_from_bestfit_to_concat(tmp_path):
    """The other way: the documents waiting in the best-fit buffer are concatenated, shortest first (as the
    buffer orders them; a long one only its first row's worth, the rest counted as cropped), then the
    documents not read yet."""
    lengths = random_lengths(120, 30, seed=4)
    docs = write_sized_docs(tmp_path, lengths, base=0x100)
    spec = f"parquet://{tmp_path}/*.parquet"
    loader = bestfit(spec, 1, 16, loop=False, buffer_docs=1000, docs_per_read=8)  # holds every document
    batches = iter(loader)
    head = rows_of([next(batches) for _ in range(3)])
    taken = {doc_of(piece, docs, 0x100) for row in head for piece in pieces(row)}
    left = sorted((i for i in range(len(docs)) if i not in taken), key=lambda i: (lengths[i], i))
    stream = [t for i in left for t in ([0] + [ord(c) + 1 for c in docs[i]])[:17]]
    carried = dataloader.PretrainBatches(parse_specs(spec), CharTokenizer(), 1, 16, loop=False, docs_per_read=8)
    carried.continue_reading(loader.state_dict())
    tail = rows_of(read_all(carried))
    assert tail == [stream[k:k + 17] for k in range(0, len(stream) - 16, 17)]
    assert (len(head) + len(tail)) * 17 + carried.cropped_counts()[spec] == sum(n + 1 for n in lengths)


@pytest.mark.parametrize("lengths", [[3, 4, 5], [16, 3, 4, 5]])  # no row; one whole row first
def test_bestfit_counts_the_last_partial_row_as_cropped(tmp_path, lengths):
    """A finite source whose last documents fit a row whole but do not fill it: that row is not handed out, and
    its tokens count as cropped, so the rows and the cropped count still add up to every token read."""
    write_sized_docs(tmp_path, lengths, base=0x100)
    spec = f"parquet://{tmp_path}/*.parquet"
    loader = bestfit(spec, 1, 16, loop=False, buffer_docs=1)
    rows = rows_of(read_all(loader))
    assert len(rows) * 17 + loader.cropped_counts()[spec] == sum(n + 1 for n in lengths)
    assert loader.cropped_counts()[spec] == sum(n + 1 for n in lengths[-3:])  # the last three: 15 of a row's 17
