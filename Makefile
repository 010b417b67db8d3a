# medusa-export: every command a newcomer needs. Python work happens in .venv (made by `make install`).
SHELL := /bin/bash
PY ?= .venv/bin/python
CLI := .venv/bin/medusa-export
PROMPTS ?= data/specbench_dev.jsonl
ART ?= artifacts
HEADS ?= gemma3-270m-medusa
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

# The main job on the real model: export Gemma 3 270M + its shipped Medusa heads, generate, validate.
demo: install $(ART)/gemma3-270m/artifact.json
	$(CLI) generate $(ART)/gemma3-270m --prompt "Explain why the sky is blue in two sentences." --max-new-tokens 64
	$(CLI) generate $(ART)/gemma3-270m --no-medusa --prompt "Explain why the sky is blue in two sentences." --max-new-tokens 64
	$(CLI) validate $(ART)/gemma3-270m --prompts $(PROMPTS) --limit 8 --max-new-tokens 64

test: install
	$(PY) -m pytest
	$(MAKE) validate
	$(CLI) bench $(ART)/gemma3-270m --prompts $(PROMPTS) --limit 2 --max-new-tokens 16 --out $(ART)/bench-smoke.json

pytest: install
	$(PY) -m pytest

$(ART)/gemma3-270m/artifact.json: | install
	$(CLI) onnx gemma3-270m --heads $(HEADS) --out $(ART)/gemma3-270m --max-seq 2048 --default-tree gemma3-270m-4 \
	  --draft-vocab $(CPU_DRAFT)

$(ART)/tiny-%/artifact.json: | install
	$(CLI) onnx tiny-$* --heads random:4 --out $(ART)/tiny-$* --max-seq 2048

# Token-for-token proof on the CPU (fp32): the three tiny architectures, then Gemma 3 270M, 8 prompts x 64 tokens.
validate: install $(ART)/tiny-llama/artifact.json $(ART)/tiny-qwen2/artifact.json $(ART)/tiny-gemma3/artifact.json $(ART)/gemma3-270m/artifact.json
	for m in tiny-llama tiny-qwen2 tiny-gemma3; do \
	  $(CLI) validate $(ART)/$$m --prompts $(PROMPTS) --limit 8 --max-new-tokens 64 --tree mc_sim_7b_63 || exit 1; done
	$(CLI) validate $(ART)/gemma3-270m --prompts $(PROMPTS) --limit 8 --max-new-tokens 64

lint: install
	$(PY) -m ruff check medusa_export runtime tests
	$(PY) -m ruff format --check medusa_export runtime tests

bench: install $(ART)/gemma3-270m/artifact.json
	$(CLI) bench $(ART)/gemma3-270m --prompts $(PROMPTS) --backend ort-cpu --limit 8 --max-new-tokens 64 --out $(ART)/bench-cpu.json

clean:
	rm -rf $(ART)
