#!/usr/bin/env bash
# One pipeline step: prune a checkpoint, export it to ONNX (verified against PyTorch) and, with ENGINE=1,
# build a TensorRT engine with sparse kernels enabled. Fails (non-zero exit) at the first failing command.
#
# Usage: tools/prune_export.sh SRC DST [secateurs prune flags...]
#   e.g. tools/prune_export.sh ckpt/ out/ --heads 0.25 --ffn 0.3 --nm 2:4
# Writes DST/ (checkpoint + report.json + report.html) and DST.onnx (and DST.engine with ENGINE=1).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 SRC DST [secateurs prune flags...]" >&2
    exit 2
fi
src=$1
dst=${2%/}
shift 2
secateurs prune "$src" --out "$dst" --quiet "$@"
secateurs export "$dst" --onnx "$dst.onnx" --quiet
if [[ "${ENGINE:-0}" == 1 ]]; then
    # TensorRT 11 takes precision from the file: an FP16 export lets 2:4 layers run sparse FP16 kernels
    secateurs export "$dst" --onnx "$dst.fp16.onnx" --dtype fp16 --quiet
    secateurs engine "$dst.fp16.onnx" --out "$dst.engine" --sparse --quiet
fi
echo "$dst/report.html $dst.onnx"
