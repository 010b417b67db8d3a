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
match of at most ChainPolicy.weak_match tokens starts with another token than the heads' top-1 guess, the
step verifies the heads' guesses instead: 138.4 against 133.0 tok/s (+4%) on 20 prompts held out from that
choice (scripts/chain_policy_ab.py, BENCHMARKS.md round 9).

Where the backend reports how sure the heads are (Backend.draft_confidence: each head's top-1 softmax
probability at the accepted row; the ort-cpu backend does), the heads' chain is as long as the product of
those probabilities stays above ChainPolicy.keep (0 to K guesses: an unsure step verifies the root alone, a
plain step), and heads sure of their first guess (above ChainPolicy.confident) also overrule a match shorter
than LONG_MATCH whose continuation starts elsewhere: +4% median, +3% geometric mean on the same 20 held-out
prompts (BENCHMARKS.md round 11).

A step's chain is a prefix of the tree's one chain, so it stays a single chain: every verified row equals
the plain step's row, and the output is plain greedy decoding's (tests/test_cpu_step.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .lookup import best_continuation
from .tree import TreeBuffers, build_tree, with_lookup

# chain length by how many context tokens the lookup's continuation follows: none (the heads' top-1
# guesses), 1, 2 ... LONG_MATCH - 1; a match of LONG_MATCH or more gets the tree's whole chain
LENGTH_BY_MATCH = (1, 3, 4, 4, 4, 4)
LONG_MATCH = len(LENGTH_BY_MATCH)


@dataclass(frozen=True)
class ChainPolicy:
    """When the heads' guesses replace a match's continuation, and how many of them a step verifies."""

    weak_match: int = 1  # a match this short gives way to the heads where they disagree on the first token
    # with the heads' probabilities (None: not used, the rule above and LENGTH_BY_MATCH[0] guesses):
    confident: float | None = 0.7  # a first guess this probable overrules any match shorter than LONG_MATCH
    keep: float | None = 0.4  # the heads' chain goes on while the product of their probabilities stays above


POLICY = ChainPolicy()
MATCH_ONLY = ChainPolicy(confident=None, keep=None)  # round 9's rule: the match alone decides


def chain_length(matched: int, longest: int) -> int:
    """How many chain tokens to verify after a match of `matched` tokens, from 1 to `longest`."""
    return min(longest if matched >= LONG_MATCH else LENGTH_BY_MATCH[matched], longest)


def heads_length(confidence: np.ndarray | None, keep: float | None, longest: int) -> int:
    """How many of the heads' guesses to verify: while the product of their top-1 probabilities
    `confidence` [K] stays above `keep` (0 to K), or LENGTH_BY_MATCH[0] without them."""
    if confidence is None or keep is None:
        return chain_length(0, longest)
    return min(int(np.count_nonzero(np.cumprod(confidence) > keep)), longest)


def heads_chain(heads: np.ndarray, length: int) -> np.ndarray:
    """The heads' top-1 guesses [length] from their top-k [K, k], the last repeated past the K heads."""
    top1 = heads[:length, 0]
    if len(top1) == length:
        return top1
    return np.concatenate((top1, np.full(length - len(top1), top1[-1], dtype=top1.dtype)))


def chain_prefixes(tree: TreeBuffers) -> dict[int, TreeBuffers] | None:
    """For an adaptive tree, the fixed chains a step may verify instead ({0: the root alone, 1..L:
    chain0+lookup<length>}, built once per process and length); None for any other tree."""
    return _chains(tree.lookup_length) if tree.adaptive else None


@functools.cache
def _chains(longest: int) -> dict[int, TreeBuffers]:
    root = build_tree([])
    return {0: root} | {n: with_lookup(root, 1, n) for n in range(1, longest + 1)}


def chain_step(
    prefixes: dict[int, TreeBuffers],
    context: Sequence[int],
    heads: np.ndarray | None,
    confidence: np.ndarray | None = None,
    policy: ChainPolicy | None = None,  # None: the module's POLICY, read at each call
) -> tuple[TreeBuffers, np.ndarray, int]:
    """The chain this step verifies, its tokens [1, n] and 1 if they are the lookup's continuation, else 0
    (the heads' top-1 guesses from their top-k [K, k], as many as their probabilities `confidence` [K]
    promise; without `heads`, the last token repeated). n may be 0: the root alone, a plain step."""
    policy = policy or POLICY
    longest = max(prefixes)
    heads = heads if heads is not None and len(heads) else None
    confidence = confidence if heads is not None else None
    found, matched = best_continuation(context, longest, cap=LONG_MATCH)
    if found is not None and heads is not None and found[0] != heads[0, 0]:
        sure = confidence is not None and policy.confident is not None and confidence[0] > policy.confident
        if matched <= policy.weak_match or (sure and matched < LONG_MATCH):
            found, matched = None, 0
    if found is not None:
        chain = found[: chain_length(matched, longest)]
    elif heads is not None:
        chain = heads_chain(heads, heads_length(confidence, policy.keep, longest))
    else:
        chain = np.full(chain_length(0, longest), context[-1], dtype=np.int64)
    return prefixes[len(chain)], chain[None].astype(np.int64), int(found is not None)
