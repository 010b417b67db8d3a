"""Adaptive speculation for one lookup chain (`chain0+lookupauto`, `chain0+lookupautoL`): each step verifies
only as many candidates as the context's match promises. Numpy + stdlib only.

On the CPU a verify of L rows costs about 1 + 0.1 L plain steps (4-bit Gemma 3 270M, 2 threads, 300 and
700 tokens of context), while how many of them are accepted depends on how well the lookup matched: over
26 Spec-Bench prompts (BENCHMARKS.md), the share of steps that accept at least 1, 2, 3, 4, 6 ... 24
candidates, by how many of the context's last tokens the continuation follows (lookup.match_length):

- 6 or more (the model copies a passage or repeats itself): 1.00 all the way to 24: the whole chain;
- 4-5: 0.93, 0.57, 0.36, 0.29, 0.07 (4 tokens pay best), 3: 0.70, 0.20, 0 (2-4: 4 for both);
- 2: 0.44, 0.30, 0.24, 0.17, 0.09 (4); 1: 0.37, 0.24, 0.15, 0.09 (3);
- no match, the heads' top-1 guesses: 0.26, 0.06, 0.01 (1).

A step's chain is a prefix of the tree's one chain, so it stays a single chain: every verified row equals
the plain step's row, and the output is plain greedy decoding's (tests/test_cpu_step.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from .lookup import match_length
from .tree import TreeBuffers, build_tree, with_lookup

# chain length by how many context tokens the lookup's continuation follows: none (the heads' top-1
# guesses), 1, 2 ... LONG_MATCH - 1; a match of LONG_MATCH or more gets the tree's whole chain
LENGTH_BY_MATCH = (1, 3, 4, 4, 4, 4)
LONG_MATCH = len(LENGTH_BY_MATCH)


def chain_length(context: Sequence[int], longest: int) -> int:
    """How many chain tokens to verify this step, from 1 to `longest` (LENGTH_BY_MATCH)."""
    matched = match_length(context, cap=LONG_MATCH)
    return min(longest if matched >= LONG_MATCH else LENGTH_BY_MATCH[matched], longest)


def chain_prefixes(tree: TreeBuffers) -> dict[int, TreeBuffers] | None:
    """For an adaptive tree, the fixed chains a step may verify instead ({1..L: chain0+lookup<length>},
    built once per process and length); None for any other tree."""
    return _chains(tree.lookup_length) if tree.adaptive else None


@functools.cache
def _chains(longest: int) -> dict[int, TreeBuffers]:
    root = build_tree([])
    return {n: with_lookup(root, 1, n) for n in range(1, longest + 1)}


def step_tree(
    tree: TreeBuffers, prefixes: dict[int, TreeBuffers] | None, context: Sequence[int]
) -> TreeBuffers:
    """The tree this step verifies: `tree` itself, or for an adaptive tree the chain of chain_length."""
    if prefixes is None:
        return tree
    return prefixes[chain_length(context, tree.lookup_length)]
