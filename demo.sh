#!/usr/bin/env bash
# The offline demo: the whole nanoschnack pipeline at toy scale on CPU, on a
# local folder of German sample data:
#
#   NANOSCHNACK_DATA=../shared/data ./demo.sh      (or: ./demo.sh ../shared/data)
#
# The folder holds pretrain/<source>/train-*.parquet (+ val.parquet), sft/*.jsonl
# (sft/val.jsonl held out) and optionally eval/ud_gsd_dev.txt. Stages: tokenizer
# -> tiny pretraining -> SFT -> evaluation + report card -> one German chat
# answer. Pretraining and SFT run on a time budget (NANOSCHNACK_PRETRAIN_MINUTES,
# NANOSCHNACK_SFT_MINUTES), so the demo takes about the same time on any machine
# and a faster one simply trains more (README, "The demo"). Output: out/ (or
# $NANOSCHNACK_OUT). NANOSCHNACK_DEMO_SCALE=micro runs every stage for a few
# seconds only (the CI smoke test, tests/test_pipeline.py).
set -euo pipefail
DATA=${1:-${NANOSCHNACK_DATA:-}}
# Checked before the first stage: the validation files are read only after the tokenizer (val.parquet) or after
# the whole pretraining (sft/val.jsonl), too late to find them missing.
if [ -z "$DATA" ] || [ ! -d "$DATA/pretrain" ] || ! compgen -G "$DATA/pretrain/*/val.parquet" >/dev/null \
        || [ ! -f "$DATA/sft/val.jsonl" ]; then
    echo "demo.sh: need the sample data folder, one holding pretrain/<source>/train-*.parquet (and a held-out" >&2
    echo "  val.parquet beside them, in one source at least), sft/*.jsonl and the held-out sft/val.jsonl." >&2
    echo "  pass it as  NANOSCHNACK_DATA=/path/to/data ./demo.sh  or  ./demo.sh /path/to/data" >&2
    echo "  (in the nanoschnack workspace it is ../shared/data)" >&2
    exit 2
fi
DATA=$(cd "$DATA" && pwd)  # relative paths are the caller's: made absolute before the cd below
OUT=${NANOSCHNACK_OUT:-}
case $OUT in "" | /*) ;; *) OUT=$PWD/$OUT ;; esac
cd "$(dirname "$0")"
OUT=${OUT:-out}
SCALE=${NANOSCHNACK_DEMO_SCALE:-tiny}
if compgen -G "$OUT/base/ckpt_*.pt" >/dev/null || compgen -G "$OUT/chat/ckpt_*.pt" >/dev/null; then
    echo "demo.sh: $OUT holds an earlier demo's checkpoints; move or delete it (rm -r $OUT), or write this one" >&2
    echo "  elsewhere: NANOSCHNACK_OUT=out2 ./demo.sh" >&2
    exit 2
fi
[ -x .venv/bin/python ] || ./setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
spec() { local p=${1//%/%25}; echo "${p// /%20}"; }  # a path as a dataset spec location

# One spec per source, so the tokenizer and the model see every kind of German text, each
# weighted by the square root of its size (weight=size^0.5): no small source is read many times
# over while a large one is barely started, and the small ones still count (README, "Dataset specs").
PRETRAIN="" VAL=""
for dir in "$DATA"/pretrain/*/; do
    PRETRAIN="$PRETRAIN parquet://$(spec "$dir")train-*.parquet?weight=size^0.5"
    [ -f "$dir/val.parquet" ] && VAL="$VAL parquet://$(spec "$dir")val.parquet"
done
# Every conversation file but the held-out val.jsonl and the plays: in plays.jsonl the "assistant" is a
# character of a play (asked "Wer sind Sie?" it answers "Ich bin die Witwe ..."), which teaches a small
# model to be someone else rather than nanoschnack; without them as many answers end (README, "SFT")
SFT=""
for file in "$DATA"/sft/*.jsonl; do
    case $(basename "$file") in val.jsonl | plays.jsonl) continue ;; esac
    SFT="$SFT jsonl://$(spec "$file")"
done
SFT_VAL="jsonl://$(spec "$DATA")/sft/val.jsonl"
BPB="$VAL"  # held-out German: every source's validation file, and UD German-GSD's sentences
[ -f "$DATA/eval/ud_gsd_dev.txt" ] && BPB="txt://$(spec "$DATA")/eval/ud_gsd_dev.txt?per=line $VAL"

if [ "$SCALE" = micro ]; then
    TOK=(--vocab-size 512 --max-chars 300k)
    TRAIN=(--preset nano --seq-len 128 --max-steps 4 --eval-every 4)
    TUNE=(--preset tiny --max-steps 3 --device-batch-size 2 --examples-per-step 4 --eval-every 3 --val-conversations 8)
    EVAL=(--limit 16 --max-bytes 20000)
else
    TOK=(--vocab-size 8192 --max-chars 20M)
    TRAIN=(--preset tiny --model demo --time-budget "${NANOSCHNACK_PRETRAIN_MINUTES:-11}")  # gpt.py: why width 128
    TUNE=(--preset tiny --time-budget "${NANOSCHNACK_SFT_MINUTES:-4}")
    EVAL=(--limit 200 --max-bytes 100000)  # 100 KB of each: a minute on a slow 2-core CPU, all of it 9 minutes
fi
STAGE_START=$SECONDS DEMO_START=$SECONDS
stage_done() {  # each stage says how long it took
    local s=$((SECONDS - STAGE_START))
    echo "-- $1 took $((s / 60)) min $((s % 60)) s"
    STAGE_START=$SECONDS
}

echo "== 1. tokenizer: byte-level BPE on German text"
$PY tok.py --data "$PRETRAIN" "${TOK[@]}" --out "$OUT/tokenizer"
stage_done "tokenizer"

echo "== 2. pretraining: a small GPT on the German mix ($SCALE)"
$PY train.py "${TRAIN[@]}" --data "$PRETRAIN" --val-data "$VAL" --tokenizer "$OUT/tokenizer" --out "$OUT/base"
stage_done "pretraining"

echo "== 3. SFT: German conversations + nanoschnack's identity"
# 45% of the rows are pretraining text, so the chat model keeps its German: the base model's own mix,
# continued where its pretraining stopped (--text-data base), half of them rows that each begin a document
# (--text-bestfit 0.5), so it keeps how a text begins too (README, "SFT")
$PY sft.py "${TUNE[@]}" --base "$OUT/base" --data "$SFT" --val-data "$SFT_VAL" --text-data base --text-frac 0.45 \
    --text-bestfit 0.5 --out "$OUT/chat"
stage_done "SFT"

echo "== 4. evaluation: bits per byte on held-out German text, report card"
$PY evaluation.py --checkpoint "$OUT/chat" --local-only --tasks bpb --bpb-data "$BPB" "${EVAL[@]}"
stage_done "evaluation"

echo "== 5. a German chat answer"
echo "> Wer bist du?"
# greedy, each repeated token penalised (OpenAI's frequency_penalty) and no 4 tokens said twice
# (transformers' no_repeat_ngram_size): a tiny model otherwise loops
$PY chat.py --checkpoint "$OUT/chat" --prompt "Wer bist du?" --temperature 0 --frequency-penalty 1.0 \
    --no-repeat-ngram-size 4 --max-new-tokens 64
stage_done "chat"

echo
echo "The whole demo took $(((SECONDS - DEMO_START) / 60)) min $(((SECONDS - DEMO_START) % 60)) s."
echo "Done. The report card is $OUT/report.md. Chat with the model:"
echo "  .venv/bin/python chat.py --checkpoint $OUT/chat"
echo "or in the browser (http://127.0.0.1:8000):"
echo "  .venv/bin/python serve.py --checkpoint $OUT/chat"
