"""The Medusa draft-verify loop as small named steps over any Backend.

prefill -> [draft (heads' top-k at the accepted row) -> lookup (continuations found in the context, for
a hybrid tree's lookup chains) -> candidates (tree) -> verify (one forward) -> accept (greedy | typical)
-> commit (keep the accepted path's KV)] ... Plain autoregressive decoding is the same loop with the
root-only tree; a tree without lookup chains gets an empty lookup. An adaptive tree (`chain0+lookupauto`)
verifies, each step, a prefix of its one chain as long as the context's match promises, holding the
lookup's continuation or the heads' guesses (adaptive.py).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .acceptance import Greedy
from .adaptive import chain_prefixes, chain_step, heads_chain
from .backends.base import Backend, StepOutput
from .errors import MedusaError
from .lookup import propose
from .masks import causal, step_masks
from .tree import TreeBuffers

# A drafter may replace the heads' proposals (tests use an oracle): (context ids, heads' top-k [K, k]) -> [K, k]
Drafter = Callable[[list[int], np.ndarray], np.ndarray]


@dataclass
class Step:
    tokens: list[int]  # emitted by this step (accepted candidates + the base model's next token)
    path: tuple[int, ...]  # ranks of the accepted candidates (the tree choice), () when none or lookup
    source: str = ""  # where the accepted candidates came from: "heads", "lookup", "" when none


def accepted_by_source(steps: Iterable[Step]) -> Counter:
    """Accepted candidate tokens per source over verify steps (the prefill step has no source)."""
    counts: Counter = Counter()
    for step in steps:
        if step.source:
            counts[step.source] += max(len(step.tokens) - 1, 0)
    return counts


def prefill(backend: Backend, prompt: list[int], window: int | None) -> StepOutput:
    """The prompt into the cache, in pieces of at most backend.prefill_chunk tokens (all at once when 0),
    each attending to the pieces before it; the output is the last piece's, at the prompt's last token."""
    if not len(prompt):
        raise MedusaError("empty prompt")
    backend.reset()
    ids = np.asarray(prompt, dtype=np.int64)
    step = backend.prefill_chunk or len(ids)
    for start in range(0, len(ids), step):
        t = min(step, len(ids) - start)
        positions = np.arange(start, start + t, dtype=np.int64)
        masks = step_masks(start, positions, causal(t), window)
        out = backend.forward(ids[start : start + t], positions, masks, np.array([t - 1]), keep_all=True)
    return out


def lookup(tree: TreeBuffers, context: list[int], heads: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Tokens for the tree's lookup chains [chains, length] (empty when it has none), and how many rows
    the context matched. With `heads` (the heads' top-k [K, k]) the unmatched rows hold the heads' top-1
    chain instead of the root token (for trees without heads nodes: see decode's heads_fill)."""
    chains, length = tree.lookup_chains, tree.lookup_length
    filler = heads_chain(heads, length) if chains and heads is not None and heads.shape[0] else None
    return propose(context, chains, length, filler=filler)


def step_source(tree: TreeBuffers, node: int, matched: int) -> str:
    """Where the accepted candidates came from: a lookup row the context did not match holds heads' guesses."""
    source = tree.source(node)
    if source == "lookup" and (tree.tree_indices[node] - tree.lookup_start) // tree.lookup_length >= matched:
        return "heads"
    return source


def candidates(tree: TreeBuffers, root_token: int, draft: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Token of every tree node [N]: the root, each heads node's rank in its head's top-k, the lookup."""
    flat = np.concatenate(([root_token], draft[: tree.depth, : tree.topk].reshape(-1), found.reshape(-1)))
    return flat[tree.tree_indices].astype(np.int64)


def verify(backend: Backend, tree: TreeBuffers, cand: np.ndarray, window: int | None) -> StepOutput:
    positions = backend.length + tree.position_ids
    masks = step_masks(backend.length, positions, tree.attention_mask, window)
    plain = tree.num_nodes == 1
    return backend.forward(cand, positions, masks, np.arange(tree.num_nodes), keep_all=plain)


def decode(
    backend: Backend,
    prompt: list[int],
    tree: TreeBuffers,
    window: int | None,
    acceptance=Greedy(),
    drafter: Drafter | None = None,
    seed: int = 0,
    heads_fill: bool = False,
) -> Iterator[Step]:
    """Yields one Step per forward, forever: the caller stops at EOS, a token budget or a stop string.
    `heads_fill`: on a tree without heads nodes (`chain0+lookup3`), lookup rows the context does not match
    take the heads' top-1 chain, and accepted tokens from those rows count as the heads'.
    An adaptive tree verifies each step the chain adaptive.chain_step picks (a prefix of its chain)."""
    rng = np.random.default_rng(seed)
    fill = heads_fill and tree.depth == 0 and tree.lookup_chains > 0  # one chain: lookup, else heads
    prefixes = chain_prefixes(tree)
    ask = prefixes is not None and fill  # the adaptive chain asks how sure the heads are
    out = prefill(backend, prompt, window)
    token = int(out.next_tokens[-1])
    draft = out.medusa_topk[:, -1]
    confidence = backend.draft_confidence(-1) if ask else None
    context = [*prompt, token]
    yield Step([token], ())
    while True:
        if drafter is not None:
            draft = drafter(context, draft)
        if prefixes is None:
            step = tree
            found, matched = lookup(step, context, draft if fill else None)
        else:
            step, found, matched = chain_step(prefixes, context, draft if fill else None, confidence)
        cand = candidates(step, token, draft, found)
        out = verify(backend, step, cand, window)
        logits = functools.cache(backend.logits)  # to the host at most once a step, only if asked for
        nodes = acceptance.accept(step, cand, out.next_tokens, logits)
        if step.num_nodes > 1:
            backend.commit(nodes)
        last = int(nodes[-1])
        token = acceptance.next_token(last, out.next_tokens, logits, rng)
        emitted = [int(t) for t in cand[nodes[1:]]] + [token]
        draft = out.medusa_topk[:, last]
        confidence = backend.draft_confidence(last) if ask else None
        context += emitted
        source = step_source(step, last, matched) if fill else step.source(last)
        yield Step(emitted, step.path(last), source)
