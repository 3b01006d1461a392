#!/usr/bin/env bash
# The pipeline one stage at a time, each a command that reads and writes plain files, so any of them can be
# looked at, edited or swapped for your own tool's output (a LIMPQ pickle for sens.json, a hand-edited
# plan.json). `mpqc compile` runs the same stages in one go. Run from the repository root after `mpqc demo`:
#
#   bash examples/stages.sh [MODEL] [OUT]
set -euo pipefail
MODEL=${1:-mpqc-demo/digits_cnn.pt}
OUT=${2:-out/stages}
ARCH=(--arch mpqc.compiler.zoo:digits_cnn)
mkdir -p "$OUT"

# 1. the graph: layers, shapes, MACs, parameters
mpqc inspect "$MODEL" "${ARCH[@]}"
# 2. how much each layer's loss grows at each width, from data (one fisher pass)
mpqc sensitivity "$MODEL" "${ARCH[@]}" --data digits --method fisher -o "$OUT/sens.json"
# 3. the best widths under the budget, priced by the target's cost models
mpqc search "$MODEL" "${ARCH[@]}" --target bitserial --sensitivity "$OUT/sens.json" --avg-bits W3A4 \
    -o "$OUT/plan.json"
# 4. quantization-aware fine-tuning at the plan's widths
mpqc finetune "$MODEL" "${ARCH[@]}" --plan "$OUT/plan.json" --data digits --epochs 2 -o "$OUT/model_q.pt"
# 5. a QDQ ONNX file, checked against the fake-quant model in onnxruntime
mpqc export "$MODEL" "${ARCH[@]}" --plan "$OUT/plan.json" --checkpoint "$OUT/model_q.pt" --data digits \
    -o "$OUT/model.onnx"
