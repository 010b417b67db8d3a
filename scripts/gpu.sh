#!/usr/bin/env bash
# The GPU-host runs behind README/BENCHMARKS.md figures (see ../shared/gpu-host/README.md).
# Run from the repo root on the GPU host after the staged wheels are installed into /tmp/site:
#   bash scripts/gpu.sh train|export|validate|bench      (logs and results go to $OUT)
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD:$PWD/runtime HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
ART=${ART:-/tmp/art}
export HEADS=${HEADS:-gemma3-270m-medusa}
PROMPTS=${PROMPTS:-.device/data/specbench_dev.jsonl}
cli() { python3 -m medusa_export.cli "$@"; }
mkdir -p "$OUT" "$ART"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
case "$1" in
  train)  # self-distilled Medusa-1 heads for gemma3-270m, then trees from the measured accuracies
    cli train gemma3-270m --num-heads 4 --num-layers 1 --device cuda --out "$ART/heads" "${@:2}" 2>&1 | tee "$OUT/train.log"
    cli tree --from-accuracy "$ART/heads/accuracy.json" --nodes 16 --out "$ART/heads/gemma3-270m-16.json"
    cli tree --from-accuracy "$ART/heads/accuracy.json" --nodes 64 --out "$ART/heads/gemma3-270m-64.json"
    (cd "$ART/heads" && tar -cf "$OUT/heads.tar" --exclude='*.pt' --exclude='data*' --exclude='checkpoint*' .) ;;
  export)  # bf16 and fp32 artifacts of gemma3-270m + heads
    for dt in bf16 fp32; do
      cli onnx gemma3-270m --heads "$HEADS" --dtype "$dt" --out "$ART/gemma3-270m-$dt" --max-seq 2048 --default-tree gemma3-270m-64 "${@:2}" 2>&1 | tail -3
    done ;;
  validate)
    for dt in bf16 fp32; do
      cli validate "$ART/gemma3-270m-$dt" --prompts "$PROMPTS" --backend ort-cuda --limit 8 --max-new-tokens 64 "${@:2}" \
        2>&1 | tee "$OUT/validate-$dt.log" || true
    done ;;
  bench)
    cli bench "$ART/gemma3-270m-bf16" --prompts "$PROMPTS" --backend ort-cuda "${@:2}" --out "$OUT/bench-gpu.json" \
      2>&1 | tee "$OUT/bench-gpu.log" ;;
  all)  # one call: train, export, validate, bench (each stage time-boxed so later ones still run)
    timeout 230 bash "$0" train --num-samples 2000 --max-new-tokens 192 --epochs 2 || echo "train stage: rc $?"
    [ -f "$ART/heads/config.json" ] || HEADS=random:4
    HEADS=$HEADS timeout 150 bash "$0" export || echo "export stage: rc $?"
    timeout 80 bash "$0" validate || echo "validate stage: rc $?"
    timeout 110 bash "$0" bench --tree "$ART/heads/gemma3-270m-64.json" --per-category 1 --max-new-tokens 96 \
      || echo "bench stage: rc $?" ;;
  *) echo "usage: $0 train|export|validate|bench [extra options]" >&2; exit 2 ;;
esac
