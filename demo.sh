#!/usr/bin/env bash
# The offline demo: the whole nanoschnack pipeline at toy scale on CPU, on a
# local copy of German sample data (a folder holding pretrain/<source>/*.parquet).
#
#   NANOSCHNACK_DATA=../shared/data ./demo.sh      (or: ./demo.sh ../shared/data)
#
# Stages so far: tokenizer, tiny pretraining (~10 min on 2 cores). Output goes to out/.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${1:-${NANOSCHNACK_DATA:-}}
if [ -z "$DATA" ] || [ ! -d "$DATA/pretrain" ]; then
    echo "demo.sh: need the sample data folder (one holding pretrain/<source>/train-*.parquet)." >&2
    echo "  pass it as NANOSCHNACK_DATA=/path/to/data ./demo.sh  or  ./demo.sh /path/to/data" >&2
    echo "  (in the nanoschnack workspace it is ../shared/data)" >&2
    exit 2
fi
DATA=$(cd "$DATA" && pwd)
./setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python

# One spec per source, so the tokenizer sees every kind of German text.
PRETRAIN=""
for dir in "$DATA"/pretrain/*/; do dir=${dir//%/%25}; PRETRAIN="$PRETRAIN parquet://${dir// /%20}train-*.parquet"; done

echo "== 1. tokenizer (byte-level BPE, 8192 tokens, 20M characters)"
$PY tok.py --data $PRETRAIN --vocab-size 8192 --max-chars 20M --out out/tokenizer

echo "== 2. pretraining (tiny preset: 4 layers, width 256, 60 steps of 4096 tokens)"
$PY train.py --preset tiny --data $PRETRAIN --val-data "parquet://${DATA// /%20}/pretrain/wiki/val.parquet" \
    --tokenizer out/tokenizer --out out/base
