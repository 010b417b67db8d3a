#!/usr/bin/env bash
# The GPU-host runs behind README/BENCHMARKS.md figures. The host needs onnxruntime-gpu, gguf and the model
# staged onto it first (this workplace stages them as wheels; elsewhere: pip install -e ".[gpu]").
# Run from the repo root on the GPU host after the staged wheels are installed into /tmp/site:
#   bash scripts/gpu.sh SUBCOMMAND [options]; this round: train, prepare, gqa, validate-fp32, validate-lookup, step,
#   speed, lookup, serve, simulate, heads-ab   (logs and results go to $OUT)
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD:$PWD/runtime HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
ART=${ART:-/tmp/art}
PROMPTS=${PROMPTS:-data/specbench_dev.jsonl}
TREE=${TREE:-gemma3-270m-64}
# the heads trained by `train` on this host when there are some, else the shipped sequential heads (round 10:
# +3% over gemma3-270m-medusa on the fused CUDA-graph step, `heads-ab`)
HEADS=${HEADS:-$([ -f "$ART/heads/config.json" ] && echo "$ART/heads" || echo gemma3-270m-hydra)}
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
  prepare)  # the artifacts of this round: bf16 and fp32 (DTYPES), with the fused step graphs (--gpu-step);
            # the bf16 plain step attends through GroupQueryAttention (PLAIN_ATTENTION, default gqa; fp32 has no
            # CUDA kernel for it); the heads draft from the DRAFT most frequent tokens of their training text
            # (default 8192: 99.8% of the shipped heads' text; 0: the whole vocabulary); the artifact's default
            # tree is TREE plus 2 prompt-lookup chains of 8 (the `speed` headline's tree)
    for d in ${DTYPES:-bf16 fp32}; do
      a="$ART/gemma3-270m-$d-step"
      plain=$([ "$d" != fp32 ] && echo "--plain-attention ${PLAIN_ATTENTION:-gqa}" || true)
      [ -f "$a/artifact.json" ] || cli onnx gemma3-270m --heads "$HEADS" --dtype $d --out "$a" --max-seq 2048 \
        --default-tree "$TREE+lookup2x8" --draft-vocab "${DRAFT:-8192}" --gpu-step $plain 2>&1 | tail -3
    done ;;
  heads-ab)  # HEADS_B [PER_CATEGORY]: bf16 fused-step artifacts of HEADS and HEADS_B, each with its own TREE +
             # lookup 2x8, their Medusa decoding timed interleaved on the CUDA-graph step (bench --compare)
    for h in "$HEADS" "$2"; do HEADS=$h ART="$ART/$(basename "$h")" DTYPES=bf16 bash "$0" prepare; done
    cli bench "$ART/$(basename "$HEADS")/gemma3-270m-bf16-step" --compare "$ART/$(basename "$2")/gemma3-270m-bf16-step" \
      --prompts "$PROMPTS" --backend ort-cuda-graph --per-category "${3:-4}" --max-new-tokens 64 --runs 3 --no-hf \
      --out "$OUT/bench-heads-ab.json" 2>&1 | tee "$OUT/bench-heads-ab.log" ;;
  validate-fp32)  # N: fp32 token identity on the GPU (TF32 off), host loop and fused CUDA-graph step
    python3 -c "
import onnxruntime as ort; ort.preload_dlls()
from medusa_runtime.api import MedusaRuntime
rt = MedusaRuntime.open('$ART/gemma3-270m-fp32-step', backend='ort-cuda')
print('CUDA EP options: use_tf32 =', rt.backend.session.get_provider_options()['CUDAExecutionProvider'].get('use_tf32'))
" 2>&1 | grep use_tf32 | tee "$OUT/tf32.log"
    for b in ort-cuda ort-cuda-graph; do
      cli validate "$ART/gemma3-270m-fp32-step" --prompts "$PROMPTS" --backend $b --limit "${2:-48}" \
        --max-new-tokens 64 2>&1 | tee "$OUT/validate-fp32-$b.log" | tail -3 || true
    done ;;
  validate-lookup)  # fp32 token identity of heads + prompt-lookup chains on the fused CUDA-graph step
    cli validate "$ART/gemma3-270m-fp32-step" --prompts "$PROMPTS" --backend ort-cuda-graph --lookup "${2:-2x8}" \
      --limit "${3:-48}" --max-new-tokens 64 2>&1 | tee "$OUT/validate-lookup-fp32.log" | tail -3 || true ;;
  gqa)  # what com.microsoft GroupQueryAttention does here (share-buffer in place, window convention), with and
        # without a CUDA graph
    for g in "" --cuda-graph; do python3 scripts/gqa_check.py --device cuda --dtype fp16 $g; done 2>&1 \
      | tee "$OUT/gqa-check.log" ;;
  step)  # per-step table: plain, 16/32/64 nodes; host loop vs fused vs fused + CUDA graph; kernels (costliest by
         # name), host time, nodes; DTYPES="bf16 fp32" by default
    for d in ${DTYPES:-bf16 fp32}; do
      python3 scripts/gpu_step_probe.py "$ART/gemma3-270m-$d-step" --out "$OUT/step-probe-$d.json" "${@:2}" 2>&1 \
        | grep -v "ScatterND with reduction\|No registered plugin EP" | tee "$OUT/step-probe-$d.log"
    done ;;
  speed)  # the headline: Medusa (heads; heads + lookup 2x8) and plain on the fused step + CUDA graph vs ONNX Runtime
          # GenAI with CUDA graphs (its own builder, bf16), same prompt ids, interleaved, median of 3 runs; then
          # acceptance per category
    python3 scripts/peers.py "$ART/gemma3-270m-bf16-step" --prompts "$PROMPTS" --per-category 2 --max-new-tokens 96 \
      --runs 3 --device cuda --backend ort-cuda-graph --tree "$TREE" --cuda-graph --systems medusa,lookup,plain,genai \
      --lookup 2x8 \
      --work /tmp/peers --out "$OUT/peers-gpu.json" 2>&1 | tee "$OUT/peers-gpu.log" || true
    cli bench "$ART/gemma3-270m-bf16-step" --prompts "$PROMPTS" --backend ort-cuda-graph --tree "$TREE" \
      --per-category 2 --max-new-tokens 96 --runs 3 --no-hf --out "$OUT/bench-graph.json" 2>&1 | tee "$OUT/bench-graph.log" ;;
  lookup)  # heads + prompt lookup on the fused CUDA-graph step: L, then prompts per category (default: all 240)
    per=$([ -n "${3:-}" ] && echo "--per-category $3" || true)
    cli bench "$ART/gemma3-270m-bf16-step" --prompts "$PROMPTS" --backend ort-cuda-graph --tree "$TREE" \
      --lookup "${2:-2x8}" $per --max-new-tokens 64 --no-hf --out "$OUT/bench-lookup.json" 2>&1 \
      | tee "$OUT/bench-lookup.log" ;;
  serve)  # aggregate throughput of `medusa-export serve` at 1/4/16 concurrent streams (up to 8 workers). The host
          # lacks the server's packages: stage them as wheels too (fastapi==0.165.0 starlette==1.10.0
          # uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-doc==0.0.7 annotated-types==0.8.0
          # typing-inspection==0.4.5 h11==0.16.0 anyio==4.16.0 httpx==0.28.1 httpcore==1.0.9 sniffio==1.3.1
          # idna==3.20 certifi==2026.10.19.post1 typing_extensions==4.16.0
          # opentelemetry-api==1.45.2: fastapi 0.165 imports it; the first GPU serve run failed without it)
    python3 scripts/serve_load.py "$ART/gemma3-270m-bf16-step" --backend "${2:-ort-cuda-graph}" \
      --concurrency 1,4,16 --requests 8 --max-tokens 64 --max-workers 8 --long-tokens 1500 \
      --out "$OUT/serve-load.json" 2>&1 | tee "$OUT/serve-load.log" ;;
  simulate)  # HEADS (comma-separated names or folders) [options]: accepted tokens/step of each heads-only tree
             # (its trees/$TREE.json) on the base model's greedy text, fp32, by category
             # (scripts/simulate_acceptance.py); the heads draft from the DRAFT most frequent tokens, as `prepare`
             # exports them
    python3 scripts/simulate_acceptance.py "${2:-gemma3-270m-medusa}" --prompts "$PROMPTS" --tree "$TREE" \
      --draft-vocab "${DRAFT:-8192}" --device cuda --batch 64 --out "$OUT/simulate.json" "${@:3}" 2>&1 \
      | tee "$OUT/simulate.log" ;;
  *) echo "usage: $0 train|export|validate|bench NAME|profile|prepare|gqa|validate-fp32 [N]|validate-lookup [L] [N]|step|speed|lookup [L] [PER_CATEGORY]|serve [BACKEND]|simulate HEADS" >&2; exit 2 ;;
esac
