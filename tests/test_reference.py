"""The PyTorch Medusa decoder: greedy acceptance gives exactly transformers' greedy tokens."""

from __future__ import annotations

import pytest

from conftest import PROMPTS, TINY, oracle_check
from medusa_export.heads import random_heads
from medusa_export.reference import hf_greedy, torch_runtime


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("tree", ["chain3", "tree8", "tree16", "mc_sim_7b_63"])
def test_medusa_greedy_equals_base_greedy_with_oracle_heads(tiny_base, name, tree):
    base = tiny_base(name)
    c = base.config
    runtime = torch_runtime(base, random_heads(4, c.hidden_size, c.vocab_size), tree, max_seq=512)
    kinds, mean = oracle_check(runtime, base, PROMPTS, 40)
    assert {"full", "partial"} <= kinds, kinds
    if tree != "chain3":
        assert "non-first" in kinds, kinds
    assert mean > 1.5


@pytest.mark.parametrize("name", TINY)
def test_real_heads_and_plain_decoding_equal_base_greedy(tiny_base, name):
    """Whatever the heads propose (here random ones), the output is the base model's greedy output."""
    base = tiny_base(name)
    c = base.config
    heads = random_heads(4, c.hidden_size, c.vocab_size, seed=3)
    for tree in (None, "tree16"):
        runtime = torch_runtime(base, heads, tree, max_seq=512)
        for prompt in PROMPTS:
            ids = runtime.encode(prompt)
            assert runtime.generate(ids, 30).token_ids == hf_greedy(base, ids, 30).tokens


def test_typical_acceptance_runs_and_is_seeded(tiny_base):
    from medusa_runtime.acceptance import Typical

    base = tiny_base("tiny-llama")
    c = base.config
    heads = random_heads(4, c.hidden_size, c.vocab_size)
    outs = [
        torch_runtime(base, heads, "tree8", acceptance=Typical()).generate(PROMPTS[0], 30) for _ in range(2)
    ]
    assert outs[0].token_ids == outs[1].token_ids and len(outs[0].token_ids) == 30
