"""Prompt lookup: candidate continuations copied from the context (prompt + generated so far), for the
reserved lookup chains of a hybrid tree (tree.with_lookup). Numpy + stdlib only.

Each step the last n tokens of the context (the root token included), n from MAX_NGRAM down to 1, are
searched for earlier in the context; the tokens that followed an occurrence (the most recent first) fill one
chain. A continuation that runs into the end of the context goes on as an overlapping copy (the repetition
it has found repeats), so a match always fills its whole chain. Chains without a match are filled with the
heads' top-1 guesses when the tree has no heads nodes of its own and the runtime drafts with heads
(`chain0+lookup3`: one chain, from the lookup when the context has a match, else from the heads), otherwise
with the root token (a token that repeats). Any token is safe: greedy acceptance keeps a candidate only
when it equals the base model's own argmax. `chain0+lookupauto` (adaptive.py) verifies, each step, one chain
from the occurrence whose preceding tokens agree longest with the context's (best_continuation), only as
much of it as that agreement promises (`match_length`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tree import TreeBuffers, TreeError, with_lookup

MAX_NGRAM = 3  # longest suffix searched for
SCAN = 8  # occurrences looked at per n-gram length, at most, when looking for distinct continuations
AUTO = "auto"  # the adaptive spelling: +lookupauto, +lookupauto<L> (at most L tokens a step)
AUTO_LENGTH = (
    12  # an adaptive chain's longest verify when the spelling gives none (measured best, BENCHMARKS.md)
)

LookupSpec = int | str | tuple[int, int] | None


def parse_lookup(spec: LookupSpec) -> tuple[int, int]:
    """(chains, length) from ``L`` (one chain of L tokens), ``"KxL"``, ``(K, L)``, ``"auto[L]"`` (one
    adaptive chain of at most L tokens); None or 0 for none."""
    return lookup_plan(spec)[:2]


def lookup_plan(spec: LookupSpec) -> tuple[int, int, bool]:
    """(chains, length, adaptive): parse_lookup's, and whether the spelling is ``auto[L]``."""
    if isinstance(spec, str) and spec.startswith(AUTO):
        digits = spec[len(AUTO) :]
        if digits and not (digits.isdigit() and int(digits) >= 1):
            raise TreeError(f"lookup {spec!r} is not auto or autoL (an adaptive chain of at most L tokens)")
        return 1, int(digits) if digits else AUTO_LENGTH, True
    return (*_fixed_lookup(spec), False)


def _fixed_lookup(spec: LookupSpec) -> tuple[int, int]:
    if spec is None or spec == 0 or spec == "0" or spec == "":
        return 0, 0
    try:
        if isinstance(spec, tuple):
            chains, length = spec
        elif isinstance(spec, str) and "x" in spec:
            chains, length = (int(part) for part in spec.split("x"))
        else:
            chains, length = 1, int(spec)
    except (TypeError, ValueError):
        raise TreeError(f"lookup {spec!r} is not L (one chain of L tokens) or KxL (K chains)") from None
    if isinstance(chains, bool) or isinstance(length, bool) or chains < 1 or length < 1:
        raise TreeError(f"lookup {spec!r} needs at least one chain of at least one token")
    return int(chains), int(length)


def lookup_name(chains: int, length: int, adaptive: bool = False) -> str:
    """The suffix a hybrid tree's name gets: '+lookup8' (one chain), '+lookup2x8', '+lookupauto12'."""
    if not chains:
        return ""
    if adaptive:
        return f"+lookup{AUTO}{length}"
    return f"+lookup{length}" if chains == 1 else f"+lookup{chains}x{length}"


def add_lookup(name: str, tree: TreeBuffers, spec: LookupSpec) -> tuple[str, TreeBuffers]:
    """The tree (and its name) with the lookup chains of ``spec`` appended; unchanged for no lookup."""
    chains, length, adaptive = lookup_plan(spec)
    if not chains:
        return name, tree
    return name + lookup_name(chains, length, adaptive), with_lookup(tree, chains, length, adaptive)


def _occurrences(ctx: np.ndarray, n: int) -> np.ndarray:
    """Start positions i < len - n where ctx[i:i+n] equals the last n tokens, most recent first."""
    last = len(ctx) - n
    hits = np.ones(last, dtype=bool)
    for j in range(n):
        hits &= ctx[j : last + j] == ctx[last + j]
    return np.flatnonzero(hits)[::-1]


def best_continuation(
    context: Sequence[int], length: int, max_ngram: int = MAX_NGRAM, cap: int = 64
) -> tuple[np.ndarray | None, int]:
    """The continuation [length] of the context's longest suffix n-gram (n <= max_ngram) found earlier in it,
    from the occurrence whose preceding tokens agree longest with the context's own (of the SCAN most
    recent; the most recent on a tie), and that agreement, match_length (up to `cap`); (None, 0) without a
    match. The longest agreement rather than the most recent occurrence: +0.8% accepted tokens per unit of
    step cost, better on both halves of 240 prompts (scripts/chain_replay.py, BENCHMARKS.md round 13)."""
    ctx = np.asarray(context, dtype=np.int64)
    for n in range(min(max_ngram, len(ctx) - 1), 0, -1):
        best_end, best = 0, 0
        for start in _occurrences(ctx, n)[:SCAN]:
            end, m = int(start) + n, n  # the occurrence ends at `end`, before the context's end
            while m < min(cap, end) and ctx[end - m - 1] == ctx[-m - 1]:
                m += 1
            if m > best:
                best_end, best = end, m
                if m >= cap:  # no older occurrence can agree longer
                    break
        if best:
            return np.resize(ctx[best_end:], length), best
    return None, 0


def match_length(context: Sequence[int], max_ngram: int = MAX_NGRAM, cap: int = 64) -> int:
    """How many of the context's last tokens best_continuation's occurrence follows: the longest suffix
    n-gram (n <= max_ngram), extended back while the tokens before it agree too, up to `cap`; 0 when the
    context has no match."""
    return best_continuation(context, 1, max_ngram, cap)[1]


def continuations(
    context: Sequence[int], chains: int, length: int, max_ngram: int = MAX_NGRAM
) -> list[np.ndarray]:
    """Up to `chains` distinct continuations [length] of the context's suffix found earlier in it, longer
    suffix matches first, then the most recent."""
    ctx = np.asarray(context, dtype=np.int64)
    found: list[np.ndarray] = []
    seen: set[bytes] = set()
    for n in range(min(max_ngram, len(ctx) - 1), 0, -1):
        for start in _occurrences(ctx, n)[:SCAN]:
            cont = np.resize(ctx[start + n :], length)  # an overlapping copy past the end of the context
            key = cont.tobytes()
            if key not in seen:
                seen.add(key)
                found.append(cont)
            if len(found) == chains:
                return found
    return found


def propose(
    context: Sequence[int],
    chains: int,
    length: int,
    max_ngram: int = MAX_NGRAM,
    filler: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """([chains, length] int64, matched rows): the continuations, one a row; rows without a match hold
    `filler` ([length], e.g. the heads' top-1 guesses) or else the last token."""
    out = np.empty((chains, length), dtype=np.int64)
    if not chains:
        return out, 0
    found = continuations(context, chains, length, max_ngram)
    out[:] = context[-1] if filler is None else filler
    for row, cont in enumerate(found):
        out[row] = cont
    return out, len(found)
