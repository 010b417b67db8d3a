"""simulate.py: acceptance from the greedy text, checked against trees drafted node by node (Medusa and
sequential heads, tiny model). Its agreement with the runtime's own steps is in test_gemma.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medusa_export.heads import random_heads
from medusa_export.models import explicit_model
from medusa_export.simulate import accepted_at, true_ranks, walk
from medusa_export.train_data import hidden_states

CHOICES = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0, 0]]


def drafted_tree(decoder, heads, hidden: torch.Tensor, root: int, parents: str) -> dict[tuple, int]:
    """Every node's token, drafted node by node: node p's token is rank p[-1] of head len(p)-1, which for
    sequential heads reads its parent's token ("path") or the rank-0 node's at the parent's depth ("chain",
    one top-k per depth, as graph.py drafts)."""
    tokens: dict[tuple, int] = {(): root}
    weight, embed = decoder.lm_head_weight(), decoder.embed_weight()
    for path in sorted(map(tuple, CHOICES), key=len):
        depth = len(path) - 1
        parent = tokens[path[:-1] if parents == "path" else (0,) * depth]
        prev = embed[torch.full((heads.num_heads, 1), parent)] if heads.sequential else None
        with torch.no_grad():
            logits = heads.logits(hidden[None], weight, prev)[depth, 0]
        tokens[path] = int(torch.topk(logits, 3).indices[path[-1]])
    return tokens


@pytest.mark.parametrize("sequential,parents", [(False, "chain"), (True, "chain"), (True, "path")])
def test_accepted_length_is_the_drafted_trees(tiny_base, sequential, parents):
    base = tiny_base("tiny-llama")
    decoder = explicit_model(base)
    c = base.config
    heads = random_heads(4, c.hidden_size, c.vocab_size, seed=5, scale=3.0, sequential=sequential).eval()
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(24):
        prefix = rng.integers(3, c.vocab_size, size=int(rng.integers(4, 12))).tolist()
        hidden = hidden_states(decoder, torch.tensor([prefix]))[0, -1]
        root = int(rng.integers(3, c.vocab_size))
        tree = drafted_tree(decoder, heads, hidden, root, parents)
        node = list(tree)[int(rng.integers(len(tree)))]  # the path the text follows, then leaves the tree
        future = [tree[node[:i]] for i in range(1, len(node) + 1)]
        children = {tree[p] for p in tree if len(p) == len(node) + 1 and p[:-1] == node}
        junk = next(t for t in rng.integers(3, c.vocab_size, size=50).tolist() if t not in children)
        ranks = true_ranks(decoder, heads, prefix, [root, *future, junk], parents=parents)
        assert accepted_at(ranks, CHOICES)[0] == len(node), (trial, node)
        seen.add(len(node))
    assert seen >= {0, 1, 2, 3}, seen
    if sequential:  # the parent's token matters: the same heads without it draft another tree
        plain = random_heads(4, c.hidden_size, c.vocab_size, seed=5, scale=3.0).eval()
        assert drafted_tree(decoder, plain, hidden, root, parents) != tree


def test_walk_steps_through_the_text_and_cuts_the_last_step():
    # offsets 0..9 of a 10-token continuation: the prefill emitted token 0, 9 are left
    accepted = np.array([2, 9, 9, 0, 1, 9, 3, 9, 9, 9])
    assert walk(accepted, 10) == [3, 1, 2, 3]  # offsets 0, 3, 4, 6: the last step is cut from 4 to 3
    assert walk(accepted, 1) == []
    assert accepted_at(np.array([[0, 1, 0, 5], [1, 0, 9, 9], [3, 0, 0, 0]]), CHOICES).tolist() == [3, 2, 0]
