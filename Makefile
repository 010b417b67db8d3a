# medusa-export: every command a newcomer needs. Python work happens in .venv (made by `make install`).
SHELL := /bin/bash
PY ?= .venv/bin/python
CLI := .venv/bin/medusa-export
PROMPTS ?= data/specbench_dev.jsonl
ART ?= artifacts
# sequential (Hydra-style) heads trained on the 585 seed prompts of configs/train_seeds.jsonl: on the 4-bit CPU
# artifact 3.23 accepted tokens/step against 3.17 for gemma3-270m-hydra (349 seeds), 105.9 against 101.3 tok/s
# (BENCHMARKS.md, round 12); the GPU host keeps its own default (gpu.sh)
HEADS ?= gemma3-270m-hydra-v2
# on the CPU the heads project onto the 4,096 most frequent tokens of their training text (98.3% of it)
CPU_DRAFT ?= 4096
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export PYTHONUNBUFFERED := 1

.PHONY: install demo test pytest validate lint bench clean

install: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU build on local disk; the GPU host brings its own
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The main job on the real model: export Gemma 3 270M + its shipped Medusa heads as the CPU artifact (the GGUF's
# own 4-bit blocks), generate, prove Medusa's output is the artifact's plain greedy output token for token (and
# report agreement with transformers fp32), then time Medusa against plain decoding (the speedup line).
demo: install $(ART)/gemma3-270m-int4/artifact.json
	$(CLI) generate $(ART)/gemma3-270m-int4 --prompt "Once upon a time, in a small village by the sea," --max-new-tokens 64
	$(CLI) validate $(ART)/gemma3-270m-int4 --prompts $(PROMPTS) --limit 8 --max-new-tokens 64
	$(CLI) bench $(ART)/gemma3-270m-int4 --prompts data/demo_prompts.jsonl --max-new-tokens 64 --runs 2 --no-hf

test: install
	$(PY) -m pytest
	$(MAKE) validate
	$(CLI) bench $(ART)/gemma3-270m --prompts $(PROMPTS) --limit 2 --max-new-tokens 16 --out $(ART)/bench-smoke.json --force

pytest: install
	$(PY) -m pytest

$(ART)/gemma3-270m/artifact.json: | install
	$(CLI) onnx gemma3-270m --heads $(HEADS) --out $(ART)/gemma3-270m --max-seq 2048 --default-tree gemma3-270m-4 \
	  --draft-vocab $(CPU_DRAFT)

# 4-bit weights carried from the GGUF, 8-bit heads; chains keep Medusa = plain exact on quantized weights (on the
# CPU one prompt-lookup chain, verified up to 12 tokens a step as the match promises: runtime adaptive.py)
$(ART)/gemma3-270m-int4/artifact.json: | install
	$(CLI) onnx gemma3-270m --heads $(HEADS) --out $(ART)/gemma3-270m-int4 --max-seq 2048 --weights int4 \
	  --draft-vocab $(CPU_DRAFT) --default-tree-cpu chain0+lookupauto12 --default-tree-gpu chain4

$(ART)/tiny-%/artifact.json: | install
	$(CLI) onnx tiny-$* --heads random:4 --out $(ART)/tiny-$* --max-seq 2048

# Token-for-token proof on the CPU: the three tiny architectures and Gemma 3 270M fp32 against transformers (with
# and without prompt-lookup branches), then the 4-bit artifact against its own plain decoding; 8 prompts x 64 tokens.
validate: install $(ART)/tiny-llama/artifact.json $(ART)/tiny-qwen2/artifact.json $(ART)/tiny-gemma3/artifact.json $(ART)/gemma3-270m/artifact.json $(ART)/gemma3-270m-int4/artifact.json
	for m in tiny-llama tiny-qwen2 tiny-gemma3; do \
	  $(CLI) validate $(ART)/$$m --prompts $(PROMPTS) --limit 8 --max-new-tokens 64 --tree mc_sim_7b_63 || exit 1; done
	$(CLI) validate $(ART)/gemma3-270m --prompts $(PROMPTS) --limit 8 --max-new-tokens 64
	$(CLI) validate $(ART)/gemma3-270m --prompts $(PROMPTS) --limit 8 --max-new-tokens 64 --lookup 4
	$(CLI) validate $(ART)/gemma3-270m-int4 --prompts $(PROMPTS) --limit 8 --max-new-tokens 64

lint: install
	$(PY) -m ruff check medusa_export runtime tests
	$(PY) -m ruff format --check medusa_export runtime tests

bench: install $(ART)/gemma3-270m/artifact.json
	$(CLI) bench $(ART)/gemma3-270m --prompts $(PROMPTS) --backend ort-cpu --limit 8 --max-new-tokens 64 --out $(ART)/bench-cpu.json --force

clean:
	rm -rf $(ART)
