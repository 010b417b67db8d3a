"""Shared fixtures: tiny base models and their exported artifacts, made once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TINY = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")
ROOT = Path(__file__).resolve().parent.parent
SPECBENCH = ROOT / "data" / "specbench_dev.jsonl"
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
    from medusa_export.reference import hf_greedy

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


class OracleDrafter:
    """Drafts from a known future: head k proposes the true token k+2 ahead of the context at a rank drawn
    from a seeded schedule (rank 0 most often, sometimes rank 1 or 2, sometimes not at all), with distinct
    wrong tokens in the other slots. Greedy acceptance must still give exactly the base greedy output."""

    def __init__(
        self,
        prompt_len: int,
        future: list[int],
        vocab: int,
        seed: int = 0,
        rank_probs=(0.6, 0.15, 0.05),
    ):
        self.prompt_len, self.future, self.vocab, self.seed = prompt_len, future, vocab, seed
        self.rank_probs = rank_probs

    def __call__(self, context: list[int], heads_topk: np.ndarray) -> np.ndarray:
        k_heads, topk = heads_topk.shape
        done = len(context) - self.prompt_len  # generated tokens so far; the root is future[done - 1]
        rng = np.random.default_rng([self.seed, done])
        draft = np.empty((k_heads, topk), dtype=np.int64)
        for k in range(k_heads):
            pos = done + k
            truth = self.future[pos] if pos < len(self.future) else -1
            wrong = rng.choice(self.vocab - 1, size=topk, replace=False)
            wrong = np.where(wrong >= truth, wrong + 1, wrong) if truth >= 0 else wrong  # never the truth
            draft[k] = wrong
            r = rng.choice(len(self.rank_probs) + 1, p=[*self.rank_probs, 1 - sum(self.rank_probs)])
            if truth >= 0 and r < min(len(self.rank_probs), topk):
                draft[k, r] = truth
        return draft
