#!/usr/bin/env bash
# Pack what bench/gpu.py needs on a GPU machine that cannot reach the internet (an air-gapped cluster node,
# a locked-down cloud image) and already has torch and triton: the wheels of the Python packages such an
# image lacks, and a subset of a data folder for the pipeline section. Run it here, copy both folders there.
#
#   bench/gpu_bundle.sh [DATA]     DATA: the data folder (default $NANOSCHNACK_DATA, else ../shared/data)
#
# Writes .whl/ (wheels) and .gpudata/ (data), both ignored by git, together about 50 MB. On the GPU machine:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   NANOSCHNACK_DATA=.gpudata python3 bench/gpu.py --quick
#
# Settings (environment): PYVER, the GPU machine's Python (default 3.12); MISSING, the packages its image
# lacks (default: what datasets, fastapi and uvicorn need beyond a CUDA image with torch, pyarrow, pandas,
# requests, huggingface_hub, tokenizers and tiktoken: the image this project's GPU checks ran on).
# pip resolves all of datasets, fastapi and uvicorn for that Python, so the versions fit each other, and
# only the wheels named in MISSING are kept: the image's own numpy, pyarrow, torch stay in charge. datasets
# wants a recent pyarrow (5.2: >= 24): on an image with an older one, add pyarrow to MISSING (40 MB more).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
DATA=${1:-${NANOSCHNACK_DATA:-../shared/data}}
PYVER=${PYVER:-3.12}
MISSING=${MISSING:-"datasets dill multiprocess fastapi starlette pydantic pydantic_core annotated_types typing_inspection opentelemetry_api uvicorn"}
PYTHON=${PYTHON:-python3}
[ -d "$DATA/pretrain" ] && [ -f "$DATA/sft/val.jsonl" ] || {
    echo "gpu_bundle.sh: $DATA is not a data folder (pretrain/<source>/*.parquet, sft/val.jsonl); pass one" >&2; exit 2; }

# 1. the wheels, resolved together for the GPU machine's Python, then all but MISSING dropped
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
    -d "$download" datasets fastapi uvicorn
rm -rf .whl && mkdir .whl
for name in $MISSING; do
    # wheel file names spell a project's '-' as '_'; each must be there once
    found=("$download"/"$name"-[0-9]*.whl)
    [ -f "${found[0]}" ] || { echo "gpu_bundle.sh: pip resolved no wheel of $name; check MISSING" >&2; exit 1; }
    cp "${found[@]}" .whl/
done

# 2. the data: each pretraining source's first shard and its validation file, the SFT files but the largest
#    (synthetic.jsonl, 14 MB: the pipeline section's few SFT steps read a few hundred conversations), eval/
rm -rf .gpudata && mkdir -p .gpudata/pretrain .gpudata/sft
for source in "$DATA"/pretrain/*/; do
    name=$(basename "$source")
    mkdir -p ".gpudata/pretrain/$name"
    first=$(ls "$source"train-*.parquet | head -n 1)
    cp "$first" "$source"val.parquet ".gpudata/pretrain/$name/" 2>/dev/null || cp "$first" ".gpudata/pretrain/$name/"
done
find "$DATA/sft" -name '*.jsonl' ! -name synthetic.jsonl -exec cp {} .gpudata/sft/ \;
[ -d "$DATA/eval" ] && cp -r "$DATA/eval" .gpudata/
echo "gpu_bundle.sh: .whl/ $(ls .whl | wc -l) wheels ($(du -sh .whl | cut -f1)), .gpudata/ $(du -sh .gpudata | cut -f1)"
ls .whl
