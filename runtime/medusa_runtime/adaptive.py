"""Adaptive speculation for one lookup chain (`chain0+lookupauto`, `chain0+lookupautoL`): each step verifies
one chain, the lookup's continuation or the heads' top-1 guesses, only as long as the context's match
promises. Numpy + stdlib only.

On the CPU a verify of L rows costs about 1 + 0.1 L plain steps (4-bit Gemma 3 270M, 2 threads, 300 and
700 tokens of context), while how many of them are accepted depends on how well the lookup matched: over
26 Spec-Bench prompts (BENCHMARKS.md), the share of steps that accept at least 1, 2, 3, 4, 6 ... 24
candidates, by how many of the context's last tokens the continuation follows (lookup.match_length):

- 6 or more (the model copies a passage or repeats itself): 1.00 all the way to 24: the whole chain;
- 4-5: 0.93, 0.57, 0.36, 0.29, 0.07 (4 tokens pay best), 3: 0.70, 0.20, 0 (2-4: 4 for both);
- 2: 0.44, 0.30, 0.24, 0.17, 0.09 (4); 1: 0.37, 0.24, 0.15, 0.09 (3);
- no match, the heads' top-1 guesses: 0.26, 0.06, 0.01 (1).

A one-token match is a weak signal: with the sequential heads its continuation's first token is accepted
less often (0.32) than the heads' top-1 guess where nothing matched (0.35). So where the continuation of a
match of at most WEAK_MATCH tokens starts with another token than the heads' top-1 guess, the step verifies
the heads' guesses instead: 138.4 against 133.0 tok/s (+4%) on 20 prompts held out from that choice
(scripts/chain_policy_ab.py, BENCHMARKS.md round 9).

A step's chain is a prefix of the tree's one chain, so it stays a single chain: every verified row equals
the plain step's row, and the output is plain greedy decoding's (tests/test_cpu_step.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from .lookup import latest_continuation
from .tree import TreeBuffers, build_tree, with_lookup

# chain length by how many context tokens the lookup's continuation follows: none (the heads' top-1
# guesses), 1, 2 ... LONG_MATCH - 1; a match of LONG_MATCH or more gets the tree's whole chain
LENGTH_BY_MATCH = (1, 3, 4, 4, 4, 4)
LONG_MATCH = len(LENGTH_BY_MATCH)
WEAK_MATCH = 1  # a match this short gives way to the heads where they disagree on the first token


def chain_length(matched: int, longest: int) -> int:
    """How many chain tokens to verify after a match of `matched` tokens, from 1 to `longest`."""
    return min(longest if matched >= LONG_MATCH else LENGTH_BY_MATCH[matched], longest)


def heads_chain(heads: np.ndarray, length: int) -> np.ndarray:
    """The heads' top-1 guesses [length] from their top-k [K, k], the last repeated past the K heads."""
    top1 = heads[:length, 0]
    return np.concatenate((top1, np.full(length - len(top1), top1[-1], dtype=top1.dtype)))


def chain_prefixes(tree: TreeBuffers) -> dict[int, TreeBuffers] | None:
    """For an adaptive tree, the fixed chains a step may verify instead ({1..L: chain0+lookup<length>},
    built once per process and length); None for any other tree."""
    return _chains(tree.lookup_length) if tree.adaptive else None


@functools.cache
def _chains(longest: int) -> dict[int, TreeBuffers]:
    root = build_tree([])
    return {n: with_lookup(root, 1, n) for n in range(1, longest + 1)}


def chain_step(
    prefixes: dict[int, TreeBuffers], context: Sequence[int], heads: np.ndarray | None
) -> tuple[TreeBuffers, np.ndarray, int]:
    """The chain this step verifies, its tokens [1, n] and 1 if they are the lookup's continuation, else 0
    (the heads' top-1 guesses from their top-k [K, k]; without `heads`, the last token repeated)."""
    longest = max(prefixes)
    heads = heads if heads is not None and len(heads) else None
    found, matched = latest_continuation(context, longest, cap=LONG_MATCH)
    if found is not None and heads is not None and matched <= WEAK_MATCH and found[0] != heads[0, 0]:
        found, matched = None, 0
    n = chain_length(matched, longest)
    if found is not None:
        chain = found[:n]
    elif heads is not None:
        chain = heads_chain(heads, n)
    else:
        chain = np.full(n, context[-1], dtype=np.int64)
    return prefixes[n], chain[None].astype(np.int64), int(found is not None)
