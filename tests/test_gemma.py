"""The real model: Gemma 3 270M (from the PyPI GGUF, dequantized), on the first 8 Spec-Bench prompts."""

from __future__ import annotations

import pytest

from conftest import oracle_check
from medusa_export.heads import random_heads
from medusa_export.reference import torch_runtime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from medusa_export.models import load_base

    return load_base("gemma3-270m")


def test_gemma_medusa_greedy_equals_base_greedy_with_oracle_heads(gemma, specbench_prompts):
    c = gemma.config
    runtime = torch_runtime(gemma, random_heads(3, c.hidden_size, c.vocab_size), "tree8", max_seq=1024)
    kinds, mean = oracle_check(runtime, gemma, specbench_prompts[:8], 64)
    assert {"full", "partial", "non-first"} <= kinds, kinds
    assert mean > 2.0, mean
