"""
bench/tokenizer.py: our tokenizer (tok.py, HF `tokenizers`) against nanochat's
trainer `rustbpe`, side by side on the same German text.

    pip install rustbpe                   # benchmark only, not a project dependency
    python bench/tokenizer.py             # all wiki train shards, vocab 32768
    python bench/tokenizer.py --max-chars 20M --repeats 3 --data-dir /path/to/data

Measures, for each trainer:
- training time: only the train call, on the same in-memory list of documents
  (wiki train shards, each document cut to 10,000 characters as nanochat does,
  optionally capped in total by --max-chars); reading the data is timed apart.
  The trainers run --repeats times, alternating, and the best (min) time counts,
  since other processes may share the machine.
- bytes/token: UTF-8 bytes / tokens on the held-out wiki val.parquet (NFC text).
- encode throughput: MB/s of batch-encoding that held-out text (best of 10).

Prints a markdown table with the machine and command line and writes the same
to --out if given; bench/RESULTS.md records the runs.
"""
import argparse
import os
import platform
import shlex
import sys
import time
import unicodedata
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # before tokenizers is imported
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import data  # noqa: E402
from tok import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, bytes_per_token, parse_count  # noqa: E402

MAX_DOC_CHARS = 10_000  # nanochat's per-document cap in tok_train.py

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--data-dir", default=os.environ.get("NANOSCHNACK_DATA", str(REPO_ROOT.parent / "shared" / "data")),
                    help="folder holding pretrain/wiki/ (default: $NANOSCHNACK_DATA or ../shared/data)")
parser.add_argument("--vocab-size", type=int, default=32768, help="total vocab size, special tokens included")
parser.add_argument("--max-chars", type=parse_count, default=None, help="cap on training characters, e.g. 20M (default: all)")
parser.add_argument("--repeats", type=int, default=2, help="training runs per trainer; the best time counts")
parser.add_argument("--out", default=None, help="also write the report to this markdown file")
args = parser.parse_args()

wiki = Path(args.data_dir) / "pretrain" / "wiki"
train_files, val_file = sorted(wiki.glob("train-*.parquet")), wiki / "val.parquet"
if not train_files or not val_file.is_file():
    sys.exit(f"error: sample data not found: need {wiki}/train-*.parquet and {val_file}\n"
             f"pass --data-dir DIR or set NANOSCHNACK_DATA to the folder holding pretrain/wiki/")
try:
    import rustbpe
except ImportError:
    rustbpe = None
    print("rustbpe is not installed, so only our tokenizer is measured; for the comparison run: pip install rustbpe",
          file=sys.stderr)

# -----------------------------------------------------------------------------
# Read the documents first, so that only training is timed

t0 = time.perf_counter()
docs, chars = [], 0
max_chars = args.max_chars or float("inf")
for doc in data.iter_texts(data.parse_spec(f"parquet://{wiki}/train-*.parquet")):
    doc = doc[:min(MAX_DOC_CHARS, max_chars - chars)]
    docs.append(doc)
    chars += len(doc)
    if chars >= max_chars:
        break
val = [unicodedata.normalize("NFC", t) for t in data.iter_texts(data.parse_spec(f"parquet://{val_file}"))]
val_bytes = sum(len(t.encode()) for t in val)
read_s = time.perf_counter() - t0
print(f"read {chars:,} chars in {len(docs):,} documents from {len(train_files)} shards, held out {len(val)} "
      f"documents ({val_bytes:,} bytes), in {read_s:.1f}s", file=sys.stderr)

# -----------------------------------------------------------------------------
# Train, alternating between the trainers


def train_ours():
    return Tokenizer.train(docs, args.vocab_size, show_progress=False)


def train_rustbpe():
    tok = rustbpe.Tokenizer()
    # rustbpe's vocab_size counts the 256 bytes plus merges and has no special tokens; nanochat
    # trains it with vocab_size - n_special and appends its specials after. So do we: with our 7
    # specials both vocabularies total args.vocab_size, i.e. both learn the same number of merges.
    # pattern=None keeps rustbpe's default split pattern (GPT-4's).
    tok.train_from_iterator(iter(docs), args.vocab_size - len(SPECIAL_TOKENS))
    return tok


trainers = {"ours (tok.py, HF tokenizers)": train_ours}
if rustbpe:
    trainers["rustbpe (nanochat)"] = train_rustbpe
times = {name: [] for name in trainers}
models = {}
for r in range(args.repeats):
    for name, train in trainers.items():
        t0 = time.perf_counter()
        models[name] = train()
        times[name].append(time.perf_counter() - t0)
        print(f"run {r + 1}/{args.repeats}: {name} trained in {times[name][-1]:.1f}s", file=sys.stderr)

# -----------------------------------------------------------------------------
# Compression and encode speed on the held-out text


def best_time(fn, n=10):
    fn()  # warm-up
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs)


rows = []
for name, model in models.items():
    if name.startswith("ours"):
        vocab = model.vocab_size
        n_tokens = sum(len(ids) for ids in model.encode_batch(val))
        assert abs(bytes_per_token(model, val) - val_bytes / n_tokens) < 1e-9  # val is NFC already
        encode = lambda: model.encode_batch(val)  # noqa: E731
    else:
        vocab = model.vocab_size + len(SPECIAL_TOKENS)
        n_tokens = sum(len(ids) for ids in model.batch_encode(val))
        encode = lambda: model.batch_encode(val)  # noqa: E731
    mb_s = val_bytes / 1e6 / best_time(encode)
    rows.append(f"| {name} | {vocab:,} | {min(times[name]):.1f} | {', '.join(f'{t:.1f}' for t in times[name])} "
                f"| {n_tokens:,} | {val_bytes / n_tokens:.4f} | {mb_s:.1f} |")

cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor())
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
except ImportError:
    gpu = "no GPU (torch not installed)"
versions = f"tokenizers {version('tokenizers')}" + (f", rustbpe {version('rustbpe')}" if rustbpe else "")
report = "\n".join([
    "# Tokenizer training benchmark",
    "",
    f"- command: `{shlex.join(['python', 'bench/tokenizer.py', *sys.argv[1:]])}`",
    f"- machine: {cpu}, {os.cpu_count()} cores, {gpu}; {platform.python_version()}, {versions}; "
    f"load average at the end {os.getloadavg()[0]:.2f} (the machine may be shared, so times are the best of "
    f"{args.repeats} alternating runs)",
    f"- training text: {chars:,} characters in {len(docs):,} documents (each cut to {MAX_DOC_CHARS:,} characters) "
    f"from {len(train_files)} shards of {wiki}; read in {read_s:.1f}s (not included in the times)",
    f"- held out: {val_file.name}, {len(val)} documents, {val_bytes:,} UTF-8 bytes (NFC)",
    "",
    "| trainer | vocab (incl. 7 specials) | train s (best) | train s (all runs) | held-out tokens | held-out bytes/token | encode MB/s |",
    "|---|---:|---:|---:|---:|---:|---:|",
    *rows,
    "",
    f"- ours split pattern: `{SPLIT_PATTERN}`",
    f"- rustbpe split pattern (its default): `{models['rustbpe (nanochat)'].get_pattern()}`" if rustbpe else
    "- rustbpe: not installed (pip install rustbpe)",
    "",
])
print(report)
if args.out:
    Path(args.out).write_text(report)
    print(f"wrote {args.out}", file=sys.stderr)
