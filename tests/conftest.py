"""Shared fixtures: tiny base models and their exported artifacts, made once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")
ROOT = Path(__file__).resolve().parent.parent
SPECBENCH = ROOT.parent / "shared" / "data" / "specbench_dev.jsonl"
# prompts long enough to cross tiny-gemma3's sliding window of 8 (byte tokens)
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, then",
    "Medusa heads guess tokens ahead; verify them in one pass.",
    "1, 2, 3, 4, 5, 6, 7, 8,",
]


@pytest.fixture(scope="session")
def tiny_base():
    from medusa_export.models import load_base

    cache = {}

    def get(name: str, dtype: str = "fp32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = load_base(name, dtype)
        return cache[name, dtype]

    return get


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """Exported tiny artifacts with 4 random heads: get(name) -> folder."""
    from medusa_export.onnx_export import export_onnx

    cache = {}

    def get(name: str, dtype: str = "fp32"):
        if (name, dtype) not in cache:
            out = tmp_path_factory.mktemp("art") / f"{name}-{dtype}"
            cache[name, dtype] = export_onnx(name, "random:4", out, dtype=dtype, max_seq=256, quiet=True)
        return cache[name, dtype]

    return get


@pytest.fixture(scope="session")
def specbench_prompts():
    rows = [json.loads(line) for line in SPECBENCH.read_text().splitlines() if line.strip()]
    return [r["turns"][0] for r in rows]


def acceptance_kinds(steps, tree) -> set[str]:
    """Which kinds of acceptance the verify steps show: none, partial, full (a whole deepest path), non-first."""
    kinds = set()
    for step in steps[1:]:
        n = len(step.tokens) - 1  # accepted candidates
        if len(step.path) < n:  # cut by EOS / budget: not informative
            continue
        kinds.add("none" if n == 0 else "full" if n == tree.depth else "partial")
        if any(r > 0 for r in step.path):
            kinds.add("non-first")
    return kinds


def oracle_check(runtime, base, prompts, max_new_tokens, seed=0):
    """Runs Medusa with oracle drafts on each prompt; asserts equality with transformers' greedy output.
    Returns (acceptance kinds seen, mean accepted tokens per step)."""
    from medusa_export.reference import OracleDrafter, hf_greedy

    kinds, accepted = set(), []
    for i, prompt in enumerate(prompts):
        ids = runtime.encode(prompt)
        ref = hf_greedy(base, ids, max_new_tokens)
        drafter = OracleDrafter(len(ids), ref.tokens, base.config.vocab_size, seed=seed + i)
        res = runtime.generate(ids, max_new_tokens, drafter=drafter)
        assert res.token_ids == ref.tokens, f"prompt {i}: Medusa output differs from base greedy"
        kinds |= acceptance_kinds(res.steps, runtime.tree)
        accepted.append(res.mean_accepted)
    return kinds, sum(accepted) / len(accepted)
