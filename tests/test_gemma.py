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


@pytest.mark.parametrize("name,draft", [("gemma3-270m-medusa", 0), ("gemma3-270m-hydra", 2048)])
def test_simulated_steps_are_the_runtimes_steps(gemma, specbench_prompts, name, draft):
    """simulate.py's steps, computed from the greedy text alone, are the PyTorch runtime's verify steps with
    the shipped heads (Medusa; sequential, drafting along the top-1 chain) and their 16-node tree, on the
    full vocabulary and on a draft vocabulary."""
    from medusa_export.draft_vocab import draft_ids
    from medusa_export.heads import heads_path, resolve_heads
    from medusa_export.models import explicit_model
    from medusa_export.simulate import greedy_continuations, simulate

    c = gemma.config
    heads = resolve_heads(name, c.hidden_size, c.vocab_size).eval()
    decoder = explicit_model(gemma)
    prompts = [gemma.tokenizer.encode(p).ids for p in specbench_prompts[:3]]
    continuations = greedy_continuations(gemma, prompts, 40, "cpu")
    tree = f"{heads_path(name)}/trees/gemma3-270m-16.json"
    drafts = draft_ids(name, draft, c.vocab_size) if draft else None
    runtime = torch_runtime(gemma, heads, tree, max_seq=1024, draft_ids=drafts)
    sims = simulate(decoder, heads, runtime.tree.choices, prompts, continuations, ["x"] * 3, drafts)
    seen = set()
    for prompt, new, sim in zip(prompts, continuations, sims, strict=True):
        res = runtime.generate(prompt, 40)
        assert res.token_ids == new
        assert [len(s.tokens) for s in res.steps[1:]] == sim.steps
        seen |= set(sim.steps)
    assert max(seen) >= 3, seen  # the comparison covers steps that accept several candidates


def test_saved_tokenizer_is_the_same_tokenizer(gemma, specbench_prompts, tmp_path):
    """The artifact's tokenizer.json (merges written "a b", minified) encodes and decodes as the model's own."""
    import json
    import random

    from tokenizers import Tokenizer

    from medusa_export.onnx_export import save_tokenizer

    save_tokenizer(gemma.tokenizer, tmp_path / "tokenizer.json")
    saved = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert isinstance(json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"][0], str)
    rng = random.Random(0)
    texts = [*specbench_prompts, "  \t\n tabs,   spaces\n\n", "<start_of_turn>user\nhi<end_of_turn>\n"]
    texts += ["".join(chr(rng.randint(32, 0x2FFF)) for _ in range(200)) for _ in range(50)]
    for text in texts:
        ids = gemma.tokenizer.encode(text).ids
        assert saved.encode(text).ids == ids
        assert saved.decode(ids) == gemma.tokenizer.decode(ids)
