"""The explicit family forwards against transformers itself (the oracle), at prefill, decode and tree verify."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY
from medusa_export.models import explicit_model
from medusa_export.models.common import empty_past
from medusa_runtime.masks import causal, step_masks
from medusa_runtime.tree import build_tree


def run(model, ids, positions, visible, past, past_len):
    full, sliding = step_masks(past_len, np.asarray(positions), visible, model.cfg.sliding_window)
    sl = None if sliding is None else torch.from_numpy(sliding)
    with torch.no_grad():
        h, kv = model(torch.tensor([ids]), torch.tensor([positions]), torch.from_numpy(full), sl, past)
        return model.project(h)[0], kv


@pytest.mark.parametrize("name", TINY)
def test_prefill_and_decode_match_transformers(tiny_base, name):
    base = tiny_base(name)
    model = explicit_model(base)
    ids = base.tokenizer.encode("Sliding windows need long prompts: 0123456789 abcdefghij").ids
    with torch.no_grad():
        ref = base.hf(torch.tensor([ids])).logits[0]
    t = len(ids)
    logits, _ = run(model, ids, list(range(t)), causal(t), empty_past(model.cfg, 1, torch.float32), 0)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    # prefix, then token by token on top of the cache
    p = t - 6
    _, kv = run(model, ids[:p], list(range(p)), causal(p), empty_past(model.cfg, 1, torch.float32), 0)
    for j in range(p, t):
        step, new = run(model, ids[j : j + 1], [j], np.ones((1, 1), bool), kv, j)
        kv = [(torch.cat((a, c), 1), torch.cat((b, d), 1)) for (a, b), (c, d) in zip(kv, new)]
        torch.testing.assert_close(step[0], ref[j], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_tree_verify_equals_per_path_forwards(tiny_base, name):
    """Each tree node's logits equal transformers' logits for prefix + that node's path."""
    base = tiny_base(name)
    model = explicit_model(base)
    prefix = base.tokenizer.encode("A tree of candidates over a prefix longer than 8").ids
    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 250, size=tree.num_nodes)
    p = len(prefix)
    _, kv = run(model, prefix, list(range(p)), causal(p), empty_past(model.cfg, 1, torch.float32), 0)
    logits, _ = run(model, tokens.tolist(), (p + tree.position_ids).tolist(), tree.attention_mask, kv, p)
    for node in range(tree.num_nodes):
        path = [n for n in range(tree.num_nodes) if tree.attention_mask[node, n]]
        with torch.no_grad():
            ref = base.hf(torch.tensor([prefix + tokens[path].tolist()])).logits[0, -1]
        torch.testing.assert_close(logits[node], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_wanted_rows_skip_the_last_layer_for_the_others(tiny_base, name):
    """rows=[R]: the hidden states of those rows, as with all rows, and every row's keys/values unchanged
    (the prefill asks for its last row alone; a verify asks for all, in order)."""
    model = explicit_model(tiny_base(name))
    ids = tiny_base(name).tokenizer.encode("Only the last row goes through the last layer's MLP here").ids
    t = len(ids)
    full, sliding = step_masks(0, np.arange(t), causal(t), model.cfg.sliding_window)
    args = (
        torch.tensor([ids]),
        torch.arange(t)[None],
        torch.from_numpy(full),
        None if sliding is None else torch.from_numpy(sliding),
        empty_past(model.cfg, 1, torch.float32),
    )
    with torch.no_grad():
        every, kv = model(*args)
        for rows in ([t - 1], [0, 3, t - 1], list(range(t))):
            some, kv_rows = model(*args, rows=torch.tensor(rows))
            assert some.shape[1] == len(rows)
            torch.testing.assert_close(some[0], every[0, rows], atol=1e-6, rtol=1e-5)
            for (k, v), (k2, v2) in zip(kv, kv_rows):
                assert torch.equal(k, k2) and torch.equal(v, v2)
