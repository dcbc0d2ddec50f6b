#!/usr/bin/env bash
# bench/side_by_side.sh: CPU training throughput of karpathy/nanochat's base_train and
# nanoschnack's train.py, side by side on one machine, same data, same shapes.
#
#   NANOCHAT_DIR=/path/to/nanochat bash bench/side_by_side.sh              # ~8 min of training each
#   NANOCHAT_DIR=... MINUTES=2 bash bench/side_by_side.sh                  # a quick check
#   NANOCHAT_DIR=... NS_ARGS="--compile" REPEATS=3 bash bench/side_by_side.sh
#
# nanochat is not part of this repository: NANOCHAT_DIR is your own checkout of
# github.com/karpathy/nanochat, run as it is (its git state is printed; nothing in it
# is changed). Its Python environment is a separate venv (NANOCHAT_PYTHON, default
# WORK/nanochat-venv, created on first use) with the *same torch as nanoschnack's*
# (nanochat pins 2.9.1; the point is one machine, one torch) plus nanochat's own
# dependencies from PyPI, kernels (CUDA only) excepted.
#
# What both get (made once, cached under WORK):
#   shards     prepare.py --data 'parquet://DATA/pretrain/*/train-*.parquet' (defaults:
#              seed 42, 250M-char shards, 1% validation): shard_NNNNN.parquet, the last
#              one validation, which is exactly nanochat's base_data layout, so both read
#              the same documents (nanochat: NANOCHAT_BASE_DIR/base_data_climbmix -> shards)
#   tokenizers vocab VOCAB (8192), each project's own trainer on the training shards with
#              its defaults (2B-char cap, 10k chars per document): nanoschnack tok.py;
#              nanochat scripts/tok_train.py (rustbpe, from PyPI)
#   shapes     4 layers, width 256, 4 heads of 64, context 256, 4,096 tokens per step,
#              full attention; same number of steps (STEPS) for both, so both see the
#              same number of tokens and finish their learning-rate schedules
#     nanochat    base_train --depth=4 (x aspect ratio 64 = width 256) --head-dim=64
#                 --max-seq-len=256 --window-pattern=L --total-batch-size=4096
#                 --device-batch-size=NC_DEVICE_BATCH (16: 16x256 = 4096, no accumulation)
#                 --num-iterations=STEPS; torch.compile as shipped (on the CPU: inductor + gcc)
#     nanoschnack train.py --preset tiny (as shipped: 8x256 per micro-step, 2 micro-steps)
#                 --max-steps STEPS, plus NS_ARGS
#   both       OMP_NUM_THREADS=THREADS (2), PYTHONUNBUFFERED=1, one after the other (never
#              at the same time); REPEATS>1 alternates the order (nc ns, ns nc, ...)
#
# Only training is timed: mid-run evaluations, samples and checkpoints are moved to the
# end (nanochat --eval-every=-1 --sample-every=-1 --core-metric-every=-1; nanoschnack
# --eval-every/--save-every STEPS --sample-every 0), and nanoschnack logs every step.
#
# Measurement rule (the same for both, from wall-clock stamps on each program's own
# per-step log lines, taken as they are printed):
#   tokens/s   (steps after the first WARMUP=10) x tokens per step / wall time from the
#              line of step WARMUP to the line of the last step. The first 10 steps hold
#              torch.compile (nanochat) and first-touch allocation; data loading stays in.
#   median     tokens per step / the median time between consecutive step lines (robust to
#              bursts of other load on a shared machine); "fastest quarter": / the 25th
#              percentile step time (other load only ever slows a step down, so on a busy
#              machine this is the closest to the uncontended speed)
#   own        tokens / the sum of each program's own per-step timer after step 10
#              (nanochat's dt, nanoschnack's per-step tok/s): a cross-check
#   bpb        held-out bits per byte of each final checkpoint on the *same* first EVAL_DOCS
#              (200) documents of the validation shard, one rule for both (nanoschnack's
#              evaluation.py rule: <|bos|> + tokens, non-overlapping windows of 256
#              predictions, nats / (ln 2 x UTF-8 bytes of the predicted tokens), special
#              tokens excluded), computed by the same code with each project's own loader
# Tokens differ between the two tokenizers; bytes/token of each on those documents is
# shown so tokens/s can be read as bytes/s too.
#
# Two more kinds of nanoschnack run, for issue 27's questions (what does each change of the recipe
# buy, and who learns more in the same minutes):
#   EQUAL_TIME=1  after each nanochat run, nanoschnack again (run nst<r>) for as long as that nanochat
#                 run took from start to exit, compile included: train.py --time-budget (its schedule
#                 follows the clock; its own start-up before the first step is not counted)
#   VARIANTS      "name: flags; name: flags; ...": one nanoschnack run per entry (run ns-<name>), with
#                 NS_ARGS and then the entry's flags, after the pairs; REPEATS=0 runs only these. They get
#                 their own table: tokens/s, held-out bpb and its change against the first entry.
#
# MINUTES sets the length through STEPS, at a nominal NOMINAL_TOK_S: both runs take the same
# number of steps, so on a slower or busier machine each run simply takes longer than MINUTES
# (plus nanochat's compile, ~1-2 min cold; the inductor cache is kept in WORK/inductor_cache).
# On a machine shared with other work the table warns when the load average during a run
# exceeded the CPU count by 0.5: OMP_NUM_THREADS=2 on 2 busy cores slows steps 2-10x.
#
# Settings (environment): NANOCHAT_DIR (required), NANOSCHNACK_DATA (default ../shared/data),
# MINUTES (8), NOMINAL_TOK_S (3500; STEPS = MINUTES x 60 x NOMINAL_TOK_S / 4096), STEPS,
# REPEATS (1), THREADS (2), VOCAB (8192), WARMUP (10), EVAL_DOCS (200), NC_DEVICE_BATCH (16),
# NS_ARGS, NC_ARGS (extra flags), EQUAL_TIME, VARIANTS, WORK (out/side_by_side), NS_PYTHON (.venv/bin/python),
# NANOCHAT_PYTHON, NANOSCHNACK_DIR (default: this script's repository), RUN_TIMEOUT (seconds
# per run, default 4 x MINUTES + 15 min). The result table goes to stdout and
# WORK/runs/<time>/side_by_side.md; the full logs are next to it.
set -euo pipefail
if [ $# -gt 0 ]; then  # it is configured through the environment only: print the header above and stop
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [ "$1" = -h ] || [ "$1" = --help ] || { echo "side_by_side: takes no arguments (got: $*); set the variables above" >&2; exit 2; }
    exit 0
fi
for number in "${MINUTES:-8}" "${STEPS:-0}" "${REPEATS:-1}" "${THREADS:-2}"; do
    [[ $number =~ ^[0-9]+$ ]] || { echo "side_by_side: MINUTES, STEPS, REPEATS and THREADS are whole numbers (got $number)" >&2; exit 2; }
done

REPO=$(cd "${NANOSCHNACK_DIR:-$(dirname "$0")/..}" && pwd)
: "${NANOCHAT_DIR:?set NANOCHAT_DIR to a checkout of github.com/karpathy/nanochat}"
NANOCHAT_DIR=$(cd "$NANOCHAT_DIR" && pwd)
DATA=${NANOSCHNACK_DATA:-$REPO/../shared/data}
MINUTES=${MINUTES:-8}
NOMINAL_TOK_S=${NOMINAL_TOK_S:-3500}
TOKENS_PER_STEP=4096
STEPS=${STEPS:-$(( (MINUTES * 60 * NOMINAL_TOK_S + TOKENS_PER_STEP / 2) / TOKENS_PER_STEP ))}
REPEATS=${REPEATS:-1}
THREADS=${THREADS:-2}
VOCAB=${VOCAB:-8192}
WARMUP=${WARMUP:-10}
EVAL_DOCS=${EVAL_DOCS:-200}
NC_DEVICE_BATCH=${NC_DEVICE_BATCH:-16}
NS_ARGS=${NS_ARGS:-}
NC_ARGS=${NC_ARGS:-}
EQUAL_TIME=${EQUAL_TIME:-0}
VARIANTS=${VARIANTS:-}
WORK=${WORK:-$REPO/out/side_by_side}
NS_PYTHON=${NS_PYTHON:-$REPO/.venv/bin/python}
RUN_TIMEOUT=${RUN_TIMEOUT:-$(( MINUTES * 240 + 900 ))}

die() { echo "side_by_side: $*" >&2; exit 1; }
say() { echo "side_by_side: $*" >&2; }
[ -f "$NANOCHAT_DIR/scripts/base_train.py" ] || die "$NANOCHAT_DIR has no scripts/base_train.py (not a nanochat checkout)"
[ -f "$REPO/train.py" ] || die "$REPO has no train.py (set NANOSCHNACK_DIR)"
[ -x "$NS_PYTHON" ] || die "no nanoschnack Python at $NS_PYTHON (run setup.sh, or set NS_PYTHON)"
compgen -G "$DATA/pretrain/*/train-*.parquet" > /dev/null || die "no $DATA/pretrain/*/train-*.parquet (set NANOSCHNACK_DATA)"
command -v g++ > /dev/null || command -v cc > /dev/null || die "torch.compile on the CPU needs a C++ compiler (g++)"
[ "$REPEATS" -gt 0 ] || [ -n "$VARIANTS" ] || die "REPEATS=0 and no VARIANTS: nothing to run"
[ "$STEPS" -gt $(( WARMUP + 1 )) ] || die "STEPS=$STEPS must exceed WARMUP=$WARMUP + 1"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export OMP_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$WORK/inductor_cache

# --- nanochat's Python: a venv with nanoschnack's torch and nanochat's other dependencies
TORCH_VERSION=$("$NS_PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')
if [ -z "${NANOCHAT_PYTHON:-}" ]; then
    NANOCHAT_PYTHON=$WORK/nanochat-venv/bin/python
    if ! "$NANOCHAT_PYTHON" -c 'import torch, rustbpe, tiktoken, wandb, pyarrow, filelock, psutil, requests' 2>/dev/null; then
        say "creating $WORK/nanochat-venv (torch==$TORCH_VERSION + nanochat's dependencies)"
        "$("$NS_PYTHON" -c 'import sys; print(sys._base_executable)')" -m venv "$WORK/nanochat-venv"
        "$NANOCHAT_PYTHON" -m pip install -q "torch==$TORCH_VERSION"
        "$NANOCHAT_PYTHON" -m pip install -q filelock numpy psutil pyarrow requests rustbpe tiktoken wandb
    fi
fi
NC_TORCH=$("$NANOCHAT_PYTHON" -c 'import torch; print(torch.__version__)')

# --- shared shards, both tokenizers (cached)
SHARDS=$WORK/shards
if ! grep -q '"complete": true' "$SHARDS/meta.json" 2>/dev/null; then
    say "preparing shards in $SHARDS"
    (cd "$REPO" && "$NS_PYTHON" prepare.py --data "parquet://$DATA/pretrain/*/train-*.parquet" --out "$SHARDS")
fi
VAL_SHARD=$(ls "$SHARDS"/shard_*.parquet | sort | tail -1)
NS_TOK=$WORK/ns_tokenizer_$VOCAB
if [ ! -f "$NS_TOK/tokenizer.json" ]; then
    say "training nanoschnack's tokenizer (vocab $VOCAB)"
    (cd "$REPO" && "$NS_PYTHON" tok.py --data "parquet://$SHARDS" --vocab-size "$VOCAB" --out "$NS_TOK")
fi
export NANOCHAT_BASE_DIR=$WORK/nanochat_base_$VOCAB
mkdir -p "$NANOCHAT_BASE_DIR"
ln -sfn "$SHARDS" "$NANOCHAT_BASE_DIR/base_data_climbmix"   # nanochat's data folder (dataset.py)
if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/token_bytes.pt" ]; then
    say "training nanochat's tokenizer (scripts.tok_train, vocab $VOCAB)"
    (cd "$NANOCHAT_DIR" && "$NANOCHAT_PYTHON" -m scripts.tok_train --vocab-size="$VOCAB")
fi

# --- helpers: a line stamper and the held-out evaluator (one file, run in each project's venv)
BIN=$WORK/bin
mkdir -p "$BIN"
cat > "$BIN/stamp.py" <<'EOF'
import sys, time
for line in sys.stdin:
    sys.stdout.write(f"{time.time():.3f}\t{line}")
    sys.stdout.flush()
EOF
cat > "$BIN/heldout_bpb.py" <<'EOF'
"""Bits per byte of a final checkpoint on the first N documents of a parquet file (same rule for both)."""
import argparse, json, math, os, sys
import pyarrow.parquet as pq
import torch
p = argparse.ArgumentParser()
p.add_argument("--kind", choices=["nanoschnack", "nanochat"], required=True)
p.add_argument("--checkpoint", required=True, help="nanoschnack: --out folder; nanochat: model tag")
p.add_argument("--val", required=True)
p.add_argument("--docs", type=int, default=200)
p.add_argument("--seq-len", type=int, default=256)
a = p.parse_args()
texts = pq.read_table(a.val, columns=["text"]).column("text").to_pylist()[:a.docs]
sys.path.insert(0, os.getcwd())  # run from the project's root
if a.kind == "nanoschnack":
    import common
    model, tok, _ = common.load_model(a.checkpoint, "cpu")
    encode, bos, token_bytes = tok.encode_batch, tok.bos_id, torch.as_tensor(tok.token_bytes)
else:
    from nanochat.checkpoint_manager import load_model
    from nanochat.tokenizer import get_token_bytes
    model, tok, _ = load_model("base", torch.device("cpu"), phase="eval", model_tag=a.checkpoint)
    encode, bos, token_bytes = tok.encode, tok.get_bos_token_id(), get_token_bytes("cpu")
model.eval()
rows = []
for ids in encode(texts):
    ids = [bos] + list(ids)
    for s in range(0, len(ids) - 1, a.seq_len):
        w = ids[s:s + a.seq_len + 1]
        rows.append((w[:-1], w[1:]))
rows.sort(key=lambda r: len(r[0]))
nats = n_bytes = 0.0
n_tokens = sum(len(y) for _, y in rows)
with torch.no_grad():
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        L = max(len(x) for x, _ in chunk)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        y = torch.full((len(chunk), L), -1, dtype=torch.long)
        for r, (xi, yi) in enumerate(chunk):
            x[r, :len(xi)] = torch.tensor(xi)
            y[r, :len(yi)] = torch.tensor(yi)
        loss = model(x, y, loss_reduction="none").view(-1).double()
        yv = y.view(-1)
        b = token_bytes[yv.clamp(min=0)].double() * (yv >= 0)
        nats += float((loss * (b > 0)).sum())
        n_bytes += float(b.sum())
print(json.dumps(dict(bpb=nats / (math.log(2) * n_bytes), docs=len(texts), bytes=int(n_bytes), tokens=n_tokens,
                      bytes_per_token=n_bytes / n_tokens)))
EOF

# --- the runs
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUNS=$WORK/runs/$STAMP
mkdir -p "$RUNS"
NC_TAG=side_by_side

begin_run() {  # $1: run name; records the start and samples the load average every 5 s until end_run
    echo "$(date +%s.%N) $(cut -d' ' -f1-3 /proc/loadavg)" > "$RUNS/$1.start"
    (while sleep 5; do cut -d' ' -f1 /proc/loadavg; done > "$RUNS/$1.load") &
    SAMPLER=$!
}
end_run() {  # $1: run name, $2: exit status
    kill "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
    echo "$(date +%s.%N) $(cut -d' ' -f1-3 /proc/loadavg) $2" > "$RUNS/$1.end"
}

run_nanochat() {  # $1: run name
    local log=$RUNS/$1.log rc=0
    rm -rf "$NANOCHAT_BASE_DIR/base_checkpoints/$NC_TAG"
    begin_run "$1"
    (cd "$NANOCHAT_DIR" && timeout -k 30 "$RUN_TIMEOUT" "$NANOCHAT_PYTHON" -m scripts.base_train --run=dummy \
        --device-type=cpu --depth=4 --aspect-ratio=64 --head-dim=64 --max-seq-len=256 --window-pattern=L \
        --device-batch-size="$NC_DEVICE_BATCH" --total-batch-size=$TOKENS_PER_STEP --num-iterations="$STEPS" \
        --eval-every=-1 --core-metric-every=-1 --sample-every=-1 --save-every=-1 --model-tag=$NC_TAG $NC_ARGS 2>&1) \
        | "$NS_PYTHON" "$BIN/stamp.py" > "$log" || rc=$?
    end_run "$1" "$rc"
    say "$1: nanochat exit $rc ($(grep -c $'\tstep ' "$log" || true) step lines)"
    if [ -d "$NANOCHAT_BASE_DIR/base_checkpoints/$NC_TAG" ]; then
        (cd "$NANOCHAT_DIR" && "$NANOCHAT_PYTHON" "$BIN/heldout_bpb.py" --kind nanochat --checkpoint $NC_TAG \
            --val "$VAL_SHARD" --docs "$EVAL_DOCS" 2> "$RUNS/$1.bpb.err" | tail -1 > "$RUNS/$1.bpb.json") || say "$1: held-out eval failed"
        rm -rf "$NANOCHAT_BASE_DIR/base_checkpoints/$NC_TAG"   # model + optimizer, ~140 MB
    fi
}

run_nanoschnack() {  # $1: run name, then extra train.py flags (after NS_ARGS)
    local name=$1 log=$RUNS/$1.log out=$RUNS/$1.out rc=0
    shift
    echo "$NS_ARGS $*" > "$RUNS/$name.args"
    begin_run "$name"
    # shellcheck disable=SC2086
    (cd "$REPO" && timeout -k 30 "$RUN_TIMEOUT" "$NS_PYTHON" train.py --preset tiny --tokenizer "$NS_TOK" \
        --data "parquet://$SHARDS" --val-data "parquet://$SHARDS?split=val" --max-steps "$STEPS" \
        --eval-every "$STEPS" --save-every "$STEPS" --sample-every 0 --log-every 1 --out "$out" $NS_ARGS "$@" 2>&1) \
        | "$NS_PYTHON" "$BIN/stamp.py" > "$log" || rc=$?
    end_run "$name" "$rc"
    say "$name: nanoschnack exit $rc ($(grep -c $'\tstep ' "$log" || true) step lines)"
    if compgen -G "$out/ckpt_*.pt" > /dev/null; then
        (cd "$REPO" && "$NS_PYTHON" "$BIN/heldout_bpb.py" --kind nanoschnack --checkpoint "$out" \
            --val "$VAL_SHARD" --docs "$EVAL_DOCS" 2> "$RUNS/$name.bpb.err" | tail -1 > "$RUNS/$name.bpb.json") || say "$name: held-out eval failed"
        rm -f "$out"/ckpt_*.pt   # ~90 MB each; the log stays
    fi
}

say "STEPS=$STEPS x $TOKENS_PER_STEP tokens, REPEATS=$REPEATS, OMP_NUM_THREADS=$THREADS; logs in $RUNS"
run_equal_time() {  # $1: r; nanoschnack for as long as run nc$1 took
    local minutes
    minutes=$(awk '{ print $1 }' "$RUNS/nc$1.start" "$RUNS/nc$1.end" | paste -sd' ' | awk '{ printf "%.3f", ($2 - $1) / 60 }')
    run_nanoschnack "nst$1" --time-budget "$minutes"
}
for r in $(seq 1 "$REPEATS"); do
    if [ $(( r % 2 )) -eq 1 ]; then run_nanochat "nc$r"; run_nanoschnack "ns$r"
    else run_nanoschnack "ns$r"; run_nanochat "nc$r"; fi
    if [ "$EQUAL_TIME" = 1 ]; then run_equal_time "$r"; fi
done
IFS=';' read -ra VARIANT_LIST <<< "$VARIANTS"
for entry in "${VARIANT_LIST[@]}"; do
    [ -n "${entry// /}" ] || continue
    vname=$(echo "${entry%%:*}" | tr -d ' ')
    # shellcheck disable=SC2086
    run_nanoschnack "ns-$vname" ${entry#*:}
done

# --- the table
git_state() { local d=$1; if git -C "$d" rev-parse HEAD > /dev/null 2>&1; then
    echo "$(git -C "$d" rev-parse HEAD)$( [ -n "$(git -C "$d" status --porcelain --untracked-files=no)" ] && echo ' (with local changes)' || echo ' (clean)')"
    else echo "unknown (not a git checkout)"; fi; }
{
    echo "cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
    echo "cpus=$(env -u OMP_NUM_THREADS nproc) of $(lscpu | sed -n 's/^CPU(s): *//p' | head -1), threads per core $(lscpu | sed -n 's/^Thread(s) per core: *//p')"
    echo "ns_torch=$("$NS_PYTHON" -c 'import torch; print(torch.__version__)')"
    echo "nc_torch=$NC_TORCH"
    echo "nanochat=$(git_state "$NANOCHAT_DIR")"
    echo "nanoschnack=$(git_state "$REPO")"
    echo "cc=$( (g++ --version 2>/dev/null || cc --version) | head -1)"
    echo "steps=$STEPS"; echo "warmup=$WARMUP"; echo "threads=$THREADS"; echo "vocab=$VOCAB"; echo "eval_docs=$EVAL_DOCS"
    echo "val_shard=$VAL_SHARD"; echo "nc_device_batch=$NC_DEVICE_BATCH"; echo "ns_args=$NS_ARGS"; echo "nc_args=$NC_ARGS"
} > "$RUNS/machine.txt"
"$NS_PYTHON" - "$RUNS" <<'EOF' | tee "$RUNS/side_by_side.md"
import json, re, statistics, sys
from pathlib import Path
runs = Path(sys.argv[1])
info = dict(l.split("=", 1) for l in (runs / "machine.txt").read_text().splitlines())
W = int(info["warmup"])
NC = re.compile(r"^step (\d+)/\d+ .*?dt: ([\d.]+)ms \| tok/sec: ([\d,]+)")
NS = re.compile(r"^step\s+([\d,]+)(?:/[\d,]+)? \| loss .*? \| ([\d,]+) tok/s")

def num(s): return float(s.replace(",", ""))

def parse(name):
    kind = "nanochat" if name.startswith("nc") else "nanoschnack"
    stamps, own = {}, {}
    params = tps = bpb_log = None
    for line in (runs / f"{name}.log").read_text(errors="replace").splitlines():
        t, _, text = line.partition("\t")
        t = float(t)
        if kind == "nanochat":
            if m := NC.match(text):
                c = int(m[1]) + 1  # nanochat counts from step 0
                stamps[c], own[c] = t, float(m[2]) / 1000
            elif m := re.match(r"^total\s*: ([\d,]+)", text): params = int(num(m[1]))
            elif m := re.match(r"^Total batch size ([\d,]+)", text): tps = int(num(m[1]))
            elif m := re.search(r"Validation bpb: ([\d.]+)", text): bpb_log = float(m[1])
        else:
            if m := NS.match(text):
                c = int(num(m[1]))
                stamps[c], own[c] = t, None if num(m[2]) == 0 else 1 / num(m[2])  # x tps below
            elif m := re.search(r"\| ([\d,]+) parameters \|", text): params = int(num(m[1]))
            elif m := re.search(r"micro-steps per step of ([\d,]+) tokens", text): tps = int(num(m[1]))
            elif m := re.search(r"validation bits per byte ([\d.]+)", text): bpb_log = float(m[1])
    if kind == "nanoschnack" and tps:
        own = {c: v * tps for c, v in own.items() if v}
    start = float((runs / f"{name}.start").read_text().split()[0])
    end = (runs / f"{name}.end").read_text().split()
    r = dict(kind=kind, steps=max(stamps, default=0), params=params, tps=tps, bpb_log=bpb_log, rc=int(end[-1]),
             wall=float(end[0]) - start, load=(runs / f"{name}.start").read_text().split()[1] + " -> " + end[1])
    last = r["steps"]
    if tps and W in stamps and last > W:
        r["warmup_s"] = stamps[W] - start
        r["tok_s"] = (last - W) * tps / (stamps[last] - stamps[W])
        gaps = [stamps[c] - stamps[c - 1] for c in range(W + 1, last + 1) if c in stamps and c - 1 in stamps]
        r["median_tok_s"] = tps / statistics.median(gaps)
        r["fast_tok_s"] = tps / statistics.quantiles(gaps, n=4)[0] if len(gaps) > 1 else None
        mine = [own[c] for c in range(W + 1, last + 1) if c in own]
        r["own_tok_s"] = len(mine) * tps / sum(mine) if mine else None
    samples = [float(x) for x in (runs / f"{name}.load").read_text().split()] if (runs / f"{name}.load").exists() else []
    r["mean_load"] = statistics.mean(samples) if samples else None
    f = runs / f"{name}.bpb.json"
    if f.exists() and f.read_text().strip():
        r.update({"heldout_" + k: v for k, v in json.loads(f.read_text()).items()})
    return r

names = sorted({p.name.split(".")[0] for p in runs.glob("n[cs]*.log")},
               key=lambda n: float((runs / f"{n}.start").read_text().split()[0]))  # in the order they ran
res = {n: parse(n) for n in names}

def med(kind, key, pattern=r"n[cs]\d+"):  # the pairs; nst<r>: the equal-time runs; ns-<name>: the variants
    vals = [r[key] for n, r in res.items() if r["kind"] == kind and r.get(key) is not None and re.fullmatch(pattern, n)]
    return statistics.median(vals) if vals else None

def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)

print(f"Machine: {info['cpu']}, {info['cpus']}; OMP_NUM_THREADS={info['threads']}; "
      f"torch {info['ns_torch']} (nanoschnack), {info['nc_torch']} (nanochat); {info['cc']}")
print(f"nanochat {info['nanochat']}; nanoschnack {info['nanoschnack']}")
print(f"{info['steps']} steps each, vocab {info['vocab']}; tokens/s over steps {W + 1}..last "
      f"(wall clock between the programs' own step lines); held-out bpb on the first {info['eval_docs']} documents "
      f"of {Path(info['val_shard']).name}. Load average (1/5/15 min) before -> after each run shown: "
      f"the machine may be shared.\n")
tps = med("nanochat", "tps") or med("nanoschnack", "tps")
rows = [
    ("tokens/s (mean, steps after warm-up)", "tok_s", ",.0f", True),
    ("tokens/s (median step)", "median_tok_s", ",.0f", True),
    ("tokens/s (fastest quarter of steps: 25th percentile step time)", "fast_tok_s", ",.0f", True),
    ("tokens/s (own per-step timers)", "own_tok_s", ",.0f", True),
    ("held-out bpb (same documents)", "heldout_bpb", ".4f", False),
    ("bytes/token (tokenizer, those documents)", "heldout_bytes_per_token", ".3f", False),
    ("own-log validation bpb", "bpb_log", ".4f", False),
    ("start-up + first steps incl. compile (s)", "warmup_s", ".0f", False),
    ("steps done", "steps", "d", False),
    ("wall time of the run (s)", "wall", ".0f", False),
    ("parameters", "params", ",d", False),
    ("load average during the run (mean of 5 s samples)", "mean_load", ".2f", False),
]
n_rep = len([r for r in res.values() if r["kind"] == "nanochat"])
if n_rep:
    print(f"| {'median of ' + str(n_rep) + ' runs' if n_rep > 1 else 'metric'} | nanochat base_train (compiled) "
          f"| nanoschnack train.py --preset tiny {info['ns_args']} | nanoschnack / nanochat |")
    print("|---|---:|---:|---:|")
    for label, key, spec, ratio in rows:
        a, b = med("nanochat", key), med("nanoschnack", key)
        if key in ("steps", "params") and a is not None: a = int(a)
        if key in ("steps", "params") and b is not None: b = int(b)
        q = f"{b / a:.2f}x" if ratio and a and b else ""
        print(f"| {label} | {fmt(a, spec)} | {fmt(b, spec)} | {q} |")
    a, b = med("nanochat", "tok_s"), med("nanochat", "heldout_bytes_per_token")
    c, d = med("nanoschnack", "tok_s"), med("nanoschnack", "heldout_bytes_per_token")
    if None not in (a, b, c, d):
        print(f"| bytes/s (mean tokens/s x bytes/token) | {a * b:,.0f} | {c * d:,.0f} | {c * d / (a * b):.2f}x |")
cpus = int(info["cpus"].split()[0])
busy = [n for n, r in res.items() if r.get("mean_load") is not None and r["mean_load"] > cpus + 0.5]
if busy:
    print(f"\n**Warning:** the load average exceeded {cpus + 0.5:g} ({cpus} CPUs) during {', '.join(busy)}: other "
          f"programs shared the CPUs, so tokens/s measure the contention as much as the code. Rerun on an idle "
          f"machine (or with REPEATS=3, which alternates the order) before drawing conclusions.")
if any(re.fullmatch(r"nst\d+", n) for n in res):
    a, b = med("nanochat", "heldout_bpb"), med("nanoschnack", "heldout_bpb", r"nst\d+")
    steps_equal_time = med("nanoschnack", "steps", r"nst\d+")
    print(f"\nEqual wall time: nanoschnack trained for as long as nanochat's run took, start-up and compile included "
          f"(train.py --time-budget): held-out bpb {fmt(b, '.4f')} against nanochat's {fmt(a, '.4f')} "
          f"({fmt(steps_equal_time, '.0f')} steps against {fmt(med('nanochat', 'steps'), '.0f')}).")
variants = [n for n in res if n.startswith("ns-")]
if variants:
    first = res[variants[0]].get("heldout_bpb")
    print(f"\nVariants ({info['steps']} steps each unless their flags say otherwise; flags after NS_ARGS):\n\n"
          "| variant | flags | tokens/s (mean) | tokens/s (median step) | held-out bpb | change |")
    print("|---|---|---:|---:|---:|---:|")
    for n in variants:
        r, bpb = res[n], res[n].get("heldout_bpb")
        change = f"{bpb - first:+.4f}" if None not in (bpb, first) and n != variants[0] else ""
        print(f"| {n[3:]} | `{(runs / f'{n}.args').read_text().strip() or '(none)'}` | {fmt(r.get('tok_s'), ',.0f')} "
              f"| {fmt(r.get('median_tok_s'), ',.0f')} | {fmt(bpb, '.4f')} | {change} |")
print("\nRuns (in order):\n\n| run | steps | tok/s mean | tok/s median | tok/s fastest quarter | held-out bpb "
      "| load avg before -> after (mean) | exit |")
print("|---|---:|---:|---:|---:|---:|---|---:|")
for n, r in res.items():
    print(f"| {n} {r['kind']} | {r['steps']} | {fmt(r.get('tok_s'), ',.0f')} | {fmt(r.get('median_tok_s'), ',.0f')} "
          f"| {fmt(r.get('fast_tok_s'), ',.0f')} | {fmt(r.get('heldout_bpb'), '.4f')} "
          f"| {r['load']} ({fmt(r.get('mean_load'), '.2f')}) | {r['rc']} |")
EOF
say "table: $RUNS/side_by_side.md"
