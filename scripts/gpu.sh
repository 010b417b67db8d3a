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
# transformers 5.17 (the host's) converts the GGUF tokenizer wrongly: dequantize there, then put this
# machine's good tokenizer.json in place (pack it first: xz -9 -c ~/.cache/medusa-export/gemma3-270m/tokenizer.json
# > .device/data/gemma3-270m-tokenizer.json.xz); load_base() checks it with a known answer.
python3 -c "from medusa_export.models.source import _gemma_cache; print(_gemma_cache())" >/dev/null
xz -dc .device/data/gemma3-270m-tokenizer.json.xz > "${MEDUSA_EXPORT_CACHE:-$HOME/.cache/medusa-export}/gemma3-270m/tokenizer.json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
case "$1" in
  train)  # self-distilled Medusa-1 heads for gemma3-270m, then trees from the measured accuracies
    cli train gemma3-270m --num-heads 4 --num-layers 1 --device cuda --out "$ART/heads" "${@:2}" 2>&1 | tee "$OUT/train.log"
    (cd "$ART/heads" && tar -cf "$OUT/heads.tar" config.json medusa_lm_head.safetensors accuracy.json draft_vocab.json) ;;
  export)  # bf16 and fp32 artifacts of gemma3-270m + heads
    for dt in bf16 fp32; do
      cli onnx gemma3-270m --heads "$HEADS" --dtype "$dt" --out "$ART/gemma3-270m-$dt" --max-seq 2048 "${@:2}" 2>&1 | tail -3
    done ;;
  validate)
    for dt in bf16 fp32; do
      cli validate "$ART/gemma3-270m-$dt" --prompts "$PROMPTS" --backend ort-cuda --limit 8 --max-new-tokens 64 "${@:2}" \
        2>&1 | tee "$OUT/validate-$dt.log" || true
    done ;;
  bench)
    cli bench "$ART/gemma3-270m-bf16" --prompts "$PROMPTS" --backend ort-cuda "${@:2}" --out "$OUT/bench-gpu.json" \
      2>&1 | tee "$OUT/bench-gpu.log" ;;
  *) echo "usage: $0 train|export|validate|bench [extra options]" >&2; exit 2 ;;
esac
