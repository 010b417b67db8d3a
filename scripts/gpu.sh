#!/usr/bin/env bash
# The GPU-host runs behind README/BENCHMARKS.md figures (see ../shared/gpu-host/README.md).
# Run from the repo root on the GPU host after the staged wheels are installed into /tmp/site:
#   bash scripts/gpu.sh train|export|validate|bench|profile [extra options]   (logs and results go to $OUT)
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD:$PWD/runtime HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
ART=${ART:-/tmp/art}
PROMPTS=${PROMPTS:-data/specbench_dev.jsonl}
TREE=${TREE:-gemma3-270m-64}
# the heads trained by `train` on this host when there are some, else the shipped ones
HEADS=${HEADS:-$([ -f "$ART/heads/config.json" ] && echo "$ART/heads" || echo gemma3-270m-medusa)}
cli() { python3 -m medusa_export.cli "$@"; }
mkdir -p "$OUT" "$ART"
# transformers 5.17 (the host's) converts the GGUF tokenizer wrongly: dequantize there, then put this
# machine's good tokenizer.json in place (pack it first: xz -9 -c ~/.cache/medusa-export/gemma3-270m/tokenizer.json
# > .device/data/gemma3-270m-tokenizer.json.xz); load_base() checks it with a known answer.
python3 -c "from medusa_export.models.source import _gemma_cache; print(_gemma_cache())" >/dev/null
xz -dc .device/data/gemma3-270m-tokenizer.json.xz > "${MEDUSA_EXPORT_CACHE:-$HOME/.cache/medusa-export}/gemma3-270m/tokenizer.json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
case "$1" in
  train)  # self-distilled Medusa-1 heads for gemma3-270m (resumes a cut-off run), then trees from their accuracy
    resume=$([ -f "$ART/heads/checkpoint.pt" ] && echo --resume || true)
    cli train gemma3-270m --num-heads 4 --num-layers 1 --device cuda --out "$ART/heads" $resume "${@:2}" 2>&1 \
      | tee -a "$OUT/train.log"
    mkdir -p "$ART/heads/trees"
    for n in 4 8 16 32 64; do
      cli tree --from-accuracy "$ART/heads/accuracy.json" --nodes $n --out "$ART/heads/trees/gemma3-270m-$n.json"
    done
    (cd "$ART/heads" && tar -cf "$OUT/heads.tar" config.json medusa_lm_head.safetensors accuracy.json \
      draft_vocab.json trees) ;;
  export)  # bf16 and fp32 at opset 23 (fused RMSNorm/RoPE/GELU), and bf16 at opset 18 to compare against
    for v in bf16:23 fp32:23 bf16:18; do
      cli onnx gemma3-270m --heads "$HEADS" --dtype "${v%:*}" --opset "${v#*:}" --out "$ART/gemma3-270m-${v/:/-o}" \
        --max-seq 2048 --default-tree "$TREE" "${@:2}" 2>&1 | tail -1
    done ;;
  validate)
    for a in bf16-o23 fp32-o23; do
      cli validate "$ART/gemma3-270m-$a" --prompts "$PROMPTS" --backend ort-cuda --limit 8 --max-new-tokens 64 "${@:2}" \
        2>&1 | tee "$OUT/validate-$a.log" || true
    done ;;
  bench)  # NAME then bench options: $OUT/bench-NAME.json (+ .png, .log)
    cli bench "$ART/gemma3-270m-bf16-o23" --prompts "$PROMPTS" --backend ort-cuda "${@:3}" --out "$OUT/bench-$2.json" \
      2>&1 | tee "$OUT/bench-$2.log" ;;
  profile)  # per-op kernel time and placement, fused (opset 23) and elementary (opset 18) graphs
    for a in bf16-o23 bf16-o18; do
      for mode in --plain ""; do
        python3 scripts/ort_profile.py "$ART/gemma3-270m-$a" --prompts "$PROMPTS" --backend ort-cuda $mode "${@:2}"
      done
    done 2>&1 | tee "$OUT/profile.log" ;;
  *) echo "usage: $0 train|export|validate|bench NAME|profile [extra options]" >&2; exit 2 ;;
esac
