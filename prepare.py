"""
prepare.py: any dataset spec -> local, shuffled, nanochat-compatible parquet shards.

    python prepare.py --data SPEC... --out DIR [--max-shards N] [--nfc --dedup --min-chars N]
    python prepare.py inspect --data SPEC... [--tokenizer out/tokenizer]   # first documents, token counts, speed

A long multi-GPU run should not depend on the hub staying up, so this script
materialises any spec into a folder the loader (and nanochat) reads directly:

  OUT/shard_00000.parquet ... shard_{n-1}   training documents
  OUT/shard_{n}.parquet                      validation: the last shard, as in nanochat
  OUT/meta.json                              from what, with which options, counts, dates

Each shard has columns `text` and `source` (the row's own `source` field where the
data has one, else the spec's location), zstd compression, and row groups of 1024
rows: ranks split a shard by row group, so one giant row group would starve all but
one rank. A shard ends at the first whole row group past --shard-chars characters
(nanochat's rule; 250M is its size) or at exactly --shard-rows rows.

Shuffling a corpus bigger than memory, deterministically. Streaming (the default),
per source: the reading order is permuted with the seed (local parquet: all row
groups of all files, read directly with pyarrow; other kinds: datasets'
IterableDataset.shuffle, files or hub shards, 10 of them read at once, so a hub
source's first shard is a mix of 10 random files, not its first file) and
documents are drawn at random from a buffer of --shuffle-buffer documents. A spec's
shuffle=/seed= options (data.py) are for reading it directly; prepare always
shuffles, with --seed. Memory stays bounded and nothing is
copied, but the shuffle is local: a document moves at most about a buffer ahead,
so a source read from one huge row group stays roughly in order. --no-streaming first
converts each source into datasets' on-disk Arrow cache (OUT/.cache, a full copy,
deleted at the end) and then permutes all of its documents: an exact global
shuffle, as nanochat's repackaging does. Several sources are then interleaved by
weight, characters per weight as the loader mixes them: give weights in proportion
to the sources' sizes (or one glob over all files) for an even mix to the end.

Resume. The document stream is a deterministic function of (specs, their files,
seed, options, datasets version), all recorded in meta.json (each local file by path
and size). A shard is written to NAME.tmp and renamed when complete, so a shard that
exists is whole. An interrupted run, started again with the same command, replays
the stream from the start and skips *writing* the shards that exist (their row
counts are checked against the replay). Replaying costs reading and filtering again,
not compressing and writing; unlike seeking into a shuffled stream, it cannot land
one document off. A complete folder is replayed the same way when a shard it lists
is missing. --out must lie outside the inputs' paths and globs: a rerun would
otherwise read its own shards as documents.

Validation. A document goes to validation when a hash of its text, keyed by the
seed, falls under --val-frac, until the validation shard is full (one shard's size):
the draw needs no lookahead, and identical documents always land on the same side,
so an exact duplicate never leaks from training into validation. Once the shard is
full, copies of its documents are held out of training, counted in meta.json
("filtered": "in_validation"), and so are training documents that equal one of
--val-data SPEC, which takes validation from a held-out spec instead (read first).

Filters, off by default: --nfc (Unicode NFC, so "ö" typed as o + combining
diaeresis equals "ö"), --min-chars N (drop shorter documents, after NFC) and --dedup
(drop exact duplicates: keeps an 8-byte hash per kept document, ~70 bytes of memory
each, e.g. 7 GB for 100M documents).
"""
import argparse
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import sys
import time
import unicodedata
from dataclasses import dataclass

import datasets
import numpy as np

import common
from dataloader import PACKINGS, PretrainBatches
from data import (DEFAULT_PRETRAIN_SPEC, PREPARED_FORMAT, DataError, Source, check_parquet_files,
                  interleave, iter_text_batches, iter_texts, open_source, parse_specs, prepared_meta, resolve_files)
from tok import Tokenizer, parse_count


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
        ("seed", opts.seed, opts.seed >= 0, "0 or more"),
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
    ds = open_source(source, streaming=opts.streaming, keep_source=True, cache_dir=cache_dir, shuffle=False)
    if opts.streaming:  # datasets: shuffled file (shard) order, 10 shards read at once, and a shuffle buffer
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
        yield from ((t, o if isinstance(o, str) else label)  # a blank text is no document (as iter_text_batches)
                    for t, o in zip(text.to_pylist(), origins) if t.strip())


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
    """(text, origin, key) for every document kept: shuffled per source, interleaved by weight,
    filtered. key is a 64-bit hash of the text keyed by the seed: the validation draw (key / 2**64 in [0, 1)),
    and what tells copies of a document apart from other documents."""
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
        yield text, origin, key


def progress_line(progress: common.Progress, sources: list[Source], opts: PrepareOptions, counts: dict,
                  written: dict, shards: int, force: bool = False):
    """A progress line: documents and characters read, shards written, rates, and an ETA where the end is known
    (by documents read when the sources' sizes are known, by what is written when --max-shards bounds it)."""
    known = [s.num_docs for s in sources]
    guesses = [counts["read"] / sum(known)] if known and None not in known and sum(known) else []
    if opts.max_shards:
        if opts.shard_rows:
            guesses.append(written["docs"] / (opts.max_shards * opts.shard_rows))
        else:
            guesses.append(written["chars"] / (opts.max_shards * opts.shard_chars))
    seconds = max(time.time() - progress.start, 1e-9)
    progress.update(counts["read"], f" | {counts['read_chars'] / 1e6:,.1f}M chars read, "
                    f"{counts['read_chars'] / seconds / 1e6:,.2f}M chars/s | {shards} training shards",
                    fraction=min(1.0, max(guesses)) if guesses else None, force=force)


def check_out(out: str, sources: list[Source]):
    """Refuse an --out that is a file, or that a source's path or glob reaches: a rerun (resume) would read
    the shards written so far as documents. Checked by name, before anything is written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file; name a folder")
    folder = os.path.realpath(out)
    ours = [os.path.join(folder, shard_name(0)), os.path.join(folder, "meta.json")]
    for s in sources:
        pattern = os.path.realpath(os.path.expanduser(s.location))
        if s.kind != "hf" and (pattern == folder or any(glob_reaches(pattern, path) for path in ours)):
            raise DataError(f"{s.spec} would read prepare's own output in {out} (--out lies inside its path or "
                            f"glob): a rerun would take the shards written so far as documents; choose an --out "
                            f"outside it")


def glob_reaches(pattern: str, path: str) -> bool:
    """Whether glob.glob(pattern, recursive=True) would list `path` (both absolute) were it there: name by
    name, `**` standing for any number of folders; as glob, a wildcard skips names that start with a dot."""
    def match(parts, names):
        if not parts or not names:
            return parts == names or parts == ["**"]
        if parts[0] == "**":
            return match(parts[1:], names) or (not names[0].startswith(".") and match(parts, names[1:]))
        hidden = names[0].startswith(".") and not parts[0].startswith(".")
        return not hidden and fnmatch.fnmatchcase(names[0], parts[0]) and match(parts[1:], names[1:])
    return match(pattern.split(os.sep), path.split(os.sep))


def input_files(sources: list[Source]) -> list:
    """Each local source's files as [path, bytes] (None for a hub source), recorded in meta.json: the stream
    is replayed (resume) only over the same files."""
    return [None if s.kind == "hf" else [[f, os.path.getsize(f)] for f in resolve_files(s)] for s in sources]


def start_meta(out: str, settings: dict) -> dict:
    """Open OUT for a conversion: a new folder, or one this same conversion started (resume)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create folder {out} ({e}); choose another --out") from None
    if os.path.exists(os.path.join(out, "meta.json")):
        meta = prepared_meta(out)
        if meta is None:
            raise DataError(f"{out}/meta.json was not written by prepare (or is damaged); "
                            f"choose a new or empty --out, or delete {out} to start over")
        if meta["complete"] or glob.glob(os.path.join(glob.escape(out), "shard_*.parquet")):
            check_same_conversion(out, meta, settings)
            return meta  # resume it, or it is complete already
        # else a run that failed before its first shard (a typo in --data?): start over
    elif glob.glob(os.path.join(glob.escape(out), "*.parquet")):
        raise DataError(f"{out} already holds .parquet files and no meta.json (not written by prepare); "
                        f"choose a new or empty --out")
    meta = {"format": PREPARED_FORMAT, "complete": False, **settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_meta(out, meta)
    return meta


def check_same_conversion(out: str, meta: dict, settings: dict):
    """Refuse to go on with OUT under other settings, or over other input files, than it was started with.
    (An older prepare.py recorded no files: prepare() refuses to replay such a folder.)"""
    theirs = {k: meta.get(k) for k in settings if k != "files"}
    diff = ", ".join(f"{k}: {theirs[k]!r} there, {settings[k]!r} now" for k in theirs if theirs[k] != settings[k])
    if diff:
        raise DataError(f"{out} holds a conversion with other settings ({diff}); "
                        f"use another --out, or delete {out} to start over")
    if "files" in meta and meta["files"] != settings["files"]:
        raise DataError(f"{out} was started from other input files ({files_changed(meta['files'], settings['files'])}),"
                        f" and its shards would mix two document streams; resume with the files it was started "
                        f"with, or delete {out} to start over")


def files_changed(then: list, now: list) -> str:
    """How two records of input_files differ, e.g. "2 file(s) added, removed or changed in size, first
    in/b.parquet: added"."""
    old = {path: size for files in then for path, size in files or []}
    new = {path: size for files in now for path, size in files or []}
    changed = sorted(path for path in old.keys() | new.keys() if old.get(path) != new.get(path))
    if not changed:
        return "the same files, given to other sources"
    first = changed[0]
    how = ("added" if first not in old else "removed" if first not in new
           else f"{old[first]:,} bytes then, {new[first]:,} now")
    return f"{len(changed)} file(s) added, removed or changed in size, first {first}: {how}"


def missing_shards(out: str, meta: dict) -> list[str]:
    """The shards a complete folder's meta.json lists that are not there. A shard that is there with other
    rows than recorded is refused: the replay would find it "written by another run"."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    missing = []
    for entry in meta["shards"]:
        path = os.path.join(out, entry["file"])
        if not os.path.exists(path):
            missing.append(entry["file"])
            continue
        try:
            rows = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException):
            rows = None
        if rows != entry["docs"]:
            found = "is not a readable parquet file" if rows is None else f"has {rows} rows"
            raise DataError(f"{path} {found}, but meta.json records {entry['docs']}: it changed after prepare "
                            f"wrote it; delete it and run the same command again to write it anew")
    return missing


FINISHED = ("finished", "row_group_size", "shards", "train", "val", "filtered", "read")  # meta.json of a complete run


def write_meta(out: str, meta: dict):
    tmp = os.path.join(out, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, os.path.join(out, "meta.json"))


def prepare(data, out: str, val_data=None, log_every: float = 10.0, log=print, **options) -> dict:
    """Write the documents of spec(s) `data` into shards in folder `out` (see above); returns meta.json's content.

    Options are the fields of PrepareOptions. Run again with the same arguments to resume."""
    out = os.fspath(out)
    opts = PrepareOptions(**options)
    check_prepare_options(opts)
    sources = parse_specs(data)
    val_sources = parse_specs(val_data, "--val-data") if val_data else []
    if val_sources:
        opts.val_frac = 0.0  # validation comes from --val-data
    for s in sources + val_sources:
        if opts.text and s.kind != "txt":
            s.text = opts.text
        if s.shuffle is not None:
            log(f"note: {s.spec}: prepare shuffles every source with --seed {opts.seed}; the spec's "
                f"shuffle=/seed= apply where the spec is read directly (tok.py, train.py)")
    check_out(out, sources + val_sources)
    settings = {"data": [s.spec for s in sources], "val_data": [s.spec for s in val_sources] or None,
                "options": vars(opts).copy(), "datasets_version": datasets.__version__,
                "files": input_files(sources + val_sources)}
    meta = start_meta(out, settings)
    missing = missing_shards(out, meta) if meta["complete"] else []
    if meta["complete"] and not missing:
        log(f"prepare: {out} is complete already ({len(meta['train']['files'])} training shards)")
        return meta
    if "files" not in meta:  # and its streaming read of parquet kept blank documents: another stream
        raise DataError(f"{out} was started by an older prepare.py, which recorded no input files, so it cannot be "
                        f"resumed (or its missing shards rewritten) exactly; delete {out} and prepare it again")
    if missing:  # replayed as an interrupted run
        log(f"prepare: {out} lacks {', '.join(missing)}, listed in its meta.json: replaying the stream to write "
            f"what is missing; the training shards there are checked, not rewritten")
        meta = {k: v for k, v in meta.items() if k not in FINISHED}
        meta["complete"] = False
        write_meta(out, meta)
    elif glob.glob(os.path.join(glob.escape(out), "shard_*.parquet")):
        log(f"prepare: resuming {out}: replaying the stream; shards already written are checked, not rewritten")
    cache_dir = None if opts.streaming else os.path.join(out, ".cache")
    counts = {"read": 0, "read_chars": 0, "too_short": 0, "duplicates": 0, "in_validation": 0}
    seen = set()  # hashes of the documents kept (--dedup)
    val, val_keys = ShardWriter(out, None, tmp_name="val.parquet"), set()  # val_keys: its documents' hashes
    for text, origin, key in prepared_documents(val_sources, opts, seen, counts, cache_dir):
        val.add(text, origin)
        val_keys.add(key)
        if val.full(opts):  # before reading the next document: one read is kept (--dedup has it as seen)
            break

    progress = common.Progress("prepare", unit=" docs", every=log_every, log=log)
    train_counts = {"read": 0, "read_chars": 0, "too_short": 0, "duplicates": 0, "in_validation": 0}
    shards, shard, written = [], None, {"docs": 0, "chars": 0}
    for text, origin, key in prepared_documents(sources, opts, seen, train_counts, cache_dir):
        if key / 2**64 < opts.val_frac and not val.full(opts):
            val.add(text, origin)
            val_keys.add(key)
            continue
        if key in val_keys:  # a copy of a validation document (once that shard is full, or from --val-data)
            train_counts["in_validation"] += 1
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
            progress_line(progress, sources, opts, train_counts, written, len(shards), force=True)
            if len(shards) == opts.max_shards:
                break
        progress_line(progress, sources, opts, train_counts, written, len(shards))
    if shard is not None:
        shards.append(shard.close())
    if not shards:
        raise DataError(f"{' '.join(s.spec for s in sources)}: no training documents "
                        f"({train_counts['read']} read, {train_counts['too_short']} too short, "
                        f"{train_counts['duplicates']} duplicates, the rest drawn for validation)")
    progress_line(progress, sources, opts, train_counts, written, len(shards), force=True)

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
                val=val_entry, filtered={key: counts[key] for key in ("too_short", "duplicates", "in_validation")},
                read={"docs": counts["read"], "chars": counts["read_chars"]})
    write_meta(out, meta)
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    log(f"prepare: wrote {out}: {len(shards)} training shards, {meta['train']['docs']:,} documents, "
        f"{meta['train']['chars']:,} characters; validation {meta['val']['file'] + ', ' if val_entry else ''}"
        f"{val.docs:,} documents, {val.chars:,} characters"
        + (f"; {counts['in_validation']:,} copies of validation documents held out of training"
           if counts["in_validation"] else ""))
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description="Write dataset spec(s) into local, "
                                "shuffled, nanochat-compatible parquet shards (resumable: run it again).",
                                epilog="python prepare.py inspect --data SPEC...: look at a spec instead (first "
                                       "documents, token counts, packing speed; its own --help)")
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
        cache = os.path.join(args.out, ".cache")
        sys.exit(f"error: {e}" + (f"\n({cache} keeps the sources converted so far for the next run; delete it "
                                  f"to free the space)" if os.path.isdir(cache) else ""))
    except OSError as e:  # disk full, a folder that is not writable (unreadable input is a DataError)
        for tmp in glob.glob(os.path.join(glob.escape(args.out), "*.tmp")):  # unfinished writes: free their space
            os.remove(tmp)
        sys.exit(f"error: cannot write {args.out} ({e}); free disk space or choose another --out, then run "
                 f"the same command again to resume (finished shards are kept)")
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command again to resume (finished shards are kept)")


# -----------------------------------------------------------------------------
# python prepare.py inspect: look at a spec

def inspect_main(argv=None):
    parser = argparse.ArgumentParser(prog="prepare.py inspect", description="Inspect dataset specs: first documents, token counts, "
                                                 "and packed-batch throughput. (`python prepare.py "
                                                 "--help`: convert specs into local shards.)")
    parser.add_argument("--data", nargs="+", default=[DEFAULT_PRETRAIN_SPEC], help="dataset spec(s)")
    parser.add_argument("--tokenizer", default="out/tokenizer", help="tokenizer folder (from tok.py)")
    parser.add_argument("-n", "--docs", type=int, default=2, help="documents to show per source")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=50, help="batches to time")
    parser.add_argument("--prefetch", type=int, default=0, help="batches to prepare in a background thread")
    parser.add_argument("--packing", default="concat", choices=PACKINGS,
                        help="how documents become rows (dataloader.py); bestfit also prints the tokens it crops")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.docs < 0 or args.prefetch < 0:
        parser.error("--batches must be at least 1, --docs and --prefetch 0 or more")
    try:
        tokenizer = Tokenizer.load(args.tokenizer)
        sources = parse_specs(args.data)
        for source in sources:
            print(f"== {source.spec}")
            for i, doc in zip(range(args.docs), iter_texts(source)):
                print(f"-- document {i}: {len(doc):,} characters, {len(tokenizer.encode(doc)):,} tokens\n"
                      f"{doc[:300]!r}")
        loader = PretrainBatches(sources, tokenizer, args.batch_size, args.seq_len, prefetch=args.prefetch,
                                 packing=args.packing)
        start, tokens = time.time(), 0
        for step, (inputs, _) in zip(range(args.batches), loader):
            tokens += inputs.numel()
        seconds = time.time() - start
        print(f"== {step + 1} batches of {args.batch_size}x{args.seq_len}: {tokens / seconds:,.0f} packed tokens/s")
        given, cropped = loader.token_counts(), loader.cropped_counts()
        for spec, n in given.items():
            read = n + cropped[spec]
            print(f"   {n:>12,} tokens  {spec}" + (f"  (+{cropped[spec]:,} cropped: {cropped[spec] / max(read, 1):.1%} "
                                                     f"of those read)" if args.packing == "bestfit" else ""))
        if args.packing == "bestfit":
            total_cropped = sum(cropped.values())
            print(f"   cropped: {total_cropped / max(sum(given.values()) + total_cropped, 1):.1%} of the tokens read")
    except (DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["inspect"]:
        inspect_main(sys.argv[2:])
    else:
        main()
