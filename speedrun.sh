#!/usr/bin/env bash
# speedrun.sh: the full nanoschnack run on one node with 8 GPUs (H100/H200 class),
# from nothing to a German chat model with a report card:
#
#   bash speedrun.sh                 # or: NPROC=4 OUT=/scratch/run1 bash speedrun.sh
#
# Real German hub data (FineWeb-2 deu_Latn + German Wikipedia + German Commons),
# the d20 model (477M parameters with the 32768-token vocabulary), nanochat's
# 12:1 token ratio over the blocks' and lm_head's 435M parameters (5.2B tokens),
# SFT on the German hub chat mix, evaluations and report card: the same stage
# scripts as the CPU demo, other flags.
# Expected time on 8xH100, an ESTIMATE until measured (README, "The speedrun"):
# pretraining 5.2B tokens x 3.24 GFLOP/token = 1.7e19 FLOP, at 40-50% MFU of
# 8 x 989 TFLOP/s: 1.2-1.5 h; data preparation, tokenizer, SFT and evals about
# 1 h more.
# Every stage resumes: run the script again after an interruption.
set -euo pipefail
OUT=${OUT:-}
case $OUT in "" | /*) ;; *) OUT=$PWD/$OUT ;; esac  # a relative OUT is the caller's, made absolute before the cd
cd "$(dirname "$0")"
NPROC=${NPROC:-8}
OUT=${OUT:-out}
if [ -z "${PY:-}" ]; then  # PY=/path/to/python: an interpreter that has the packages already (a GPU image's own torch)
    [ -x .venv/bin/python ] || ./setup.sh
    PY=.venv/bin/python
fi
RUN="$PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

echo "== 0. data: the hub mix as local parquet shards, so a long run does not depend on the hub"
# 200 shards of 250M characters = 50B characters, about 10B tokens: the d20 budget twice over.
PRETRAIN=$($PY -c 'import data; print(data.DEFAULT_PRETRAIN_SPEC)')
$PY prepare.py --data $PRETRAIN --out "$OUT/data/base" --max-shards 200

echo "== 1. tokenizer: 32768 tokens on 2B characters"
if [ -f "$OUT/tokenizer/tokenizer_meta.json" ]; then  # written last; a rerun would train the same again
    echo "$OUT/tokenizer is there already (delete it to train it again)"
else
    $PY tok.py --data "parquet://$OUT/data/base" --max-chars 2B --out "$OUT/tokenizer"
fi

echo "== 2. pretraining: d20, 12 tokens per parameter (train.py's default)"
$RUN train.py --preset d20 --data "parquet://$OUT/data/base" --val-data "parquet://$OUT/data/base?split=val" \
    --tokenizer "$OUT/tokenizer" --out "$OUT/base" --resume

echo "== 3. SFT: German chat mix from the hub + identity conversations"
$RUN sft.py --base "$OUT/base" --out "$OUT/chat" --resume

echo "== 4. evaluation: bits per byte and the German benchmarks; report card"
$RUN evaluation.py --checkpoint "$OUT/base" --bpb-data "parquet://$OUT/data/base?split=val" --limit 2000 --report "$OUT/report.md"
$RUN evaluation.py --checkpoint "$OUT/chat" --bpb-data "parquet://$OUT/data/base?split=val" --limit 2000 --report "$OUT/report.md"

echo "Done: $OUT/report.md. Chat:  $PY chat.py --checkpoint $OUT/chat"
echo "Web (pip install -e .[web] first):  $PY serve.py --checkpoint $OUT/chat --host 0.0.0.0"
