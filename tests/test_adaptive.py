"""Adaptive speculation (`chain0+lookupauto`): one chain (the lookup's continuation or the heads' guesses)
whose verified length is chosen each step from how well the context matched (medusa_runtime.adaptive). The spelling, the policy's choices on
constructed contexts, and exactness: greedy output is the base model's greedy output, token for token."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import PROMPTS, OracleDrafter
from medusa_runtime import lookup
from medusa_runtime.adaptive import (
    LENGTH_BY_MATCH,
    LONG_MATCH,
    MATCH_ONLY,
    POLICY,
    ChainPolicy,
    chain_length,
    chain_prefixes,
    chain_step,
    heads_length,
)
from medusa_runtime.api import MedusaRuntime
from medusa_runtime.lookup import (
    AUTO_LENGTH,
    best_continuation,
    lookup_name,
    lookup_plan,
    match_length,
    parse_lookup,
)
from medusa_runtime.tree import TreeError, build_tree, resolve_tree, split_lookup, with_lookup

SERVED = {"chain0": [], "chain2": [[0], [0, 0]]}
# the second half repeats the first: a model that copies it is helped by the lookup
REPEAT = (
    "alpha beta gamma delta epsilon zeta eta theta. alpha beta gamma delta epsilon zeta eta theta. alpha beta"
)

# --- the spelling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "want"),
    [("auto", (1, AUTO_LENGTH, True)), ("auto8", (1, 8, True)), ("3", (1, 3, False)), (None, (0, 0, False))],
)
def test_lookup_plan(spec, want) -> None:
    assert lookup_plan(spec) == want
    assert parse_lookup(spec) == want[:2]  # older callers see one chain of the longest length


@pytest.mark.parametrize("spec", ["auto0", "autox", "auto-3", "auto8x2", "2xauto"])
def test_lookup_plan_rejects(spec) -> None:
    with pytest.raises(TreeError) as info:
        lookup_plan(spec)
    assert "\n" not in str(info.value)


def test_the_adaptive_spelling_names_and_resolves_a_tree() -> None:
    assert lookup_name(1, 12, adaptive=True) == "+lookupauto12"
    assert split_lookup("chain0+lookupauto12") == ("chain0", "auto12")
    assert split_lookup("chain0+lookupauto") == ("chain0", "auto")
    assert split_lookup("chain0+lookup3") == ("chain0", "3")  # the fixed spellings are unchanged
    name, tree = resolve_tree("chain0+lookupauto", served=SERVED)
    assert name == f"chain0+lookupauto{AUTO_LENGTH}" and tree.adaptive and tree.lookup == (1, AUTO_LENGTH)
    assert tree.num_nodes == 1 + AUTO_LENGTH  # the backend's scratch and the capacity check see the longest
    name, tree = resolve_tree("chain0", served=SERVED, lookup="auto6")
    assert (name, tree.num_nodes, tree.adaptive) == ("chain0+lookupauto6", 7, True)
    assert tree.to_json_dict()["lookup"] == {"chains": 1, "length": 6, "adaptive": True}
    fixed = resolve_tree("chain0+lookup6", served=SERVED)[1]
    assert not fixed.adaptive and fixed.to_json_dict()["lookup"] == {"chains": 1, "length": 6}


def test_an_adaptive_chain_hangs_from_the_root_alone() -> None:
    """With heads nodes beside it the tree would branch, which is not exact on quantized weights."""
    with pytest.raises(TreeError, match="root alone"):
        resolve_tree("chain2+lookupauto", served=SERVED)
    with pytest.raises(TreeError, match="root alone"):
        with_lookup(build_tree([]), 2, 4, adaptive=True)


# --- the policy --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "matched"),
    [
        ([1, 2, 3, 4, 5], 0),  # the last token never occurred before
        ([7, 1, 2, 9, 2], 1),  # "2" once, preceded by 1 there and by 9 here
        ([5, 1, 2, 3, 9, 1, 2, 3], 3),  # the 3-gram, then 5 against 9
        ([4, 5, 1, 2, 3, 9, 4, 5, 1, 2, 3], 5),  # extended back beyond the 3-gram
        ([5, 1, 2, 3, 7, 9, 1, 2, 3, 8, 5, 1, 2, 3], 4),  # the older occurrence that agrees longer
        ([9, 1, 2, 3, 7, 9, 1, 2, 3, 8, 9, 1, 2, 3], 4),  # of two that agree as long, the most recent
        ([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7], 6),  # capped at 6 below (LONG_MATCH)
        ([3, 3, 3], 2),  # an overlapping repeat: occurrence [3, 3] at 0, nothing before it
    ],
)
def test_match_length(context, matched) -> None:
    assert match_length(context, cap=6) == matched


def test_best_continuation_follows_the_longest_agreement(monkeypatch) -> None:
    found, matched = best_continuation([5, 1, 2, 3, 7, 9, 1, 2, 3, 8, 5, 1, 2, 3], 3, cap=6)
    assert found.tolist() == [7, 9, 1] and matched == 4
    found, matched = best_continuation([9, 1, 2, 3, 7, 9, 1, 2, 3, 8, 9, 1, 2, 3], 3, cap=6)
    assert found.tolist() == [8, 9, 1] and matched == 4  # a tie: the most recent
    assert best_continuation([1, 2, 3], 2) == (None, 0)
    monkeypatch.setattr(lookup, "SCAN", 1)  # the most recent occurrence only, as before round 13
    assert best_continuation([5, 1, 2, 3, 7, 9, 1, 2, 3, 8, 5, 1, 2, 3], 3, cap=6)[1] == 3


def test_chain_length_follows_the_match() -> None:
    """No match: one heads' guess; a short match: a few tokens; a long one (the model copies): the whole
    chain. Never more than the tree's chain."""
    assert chain_length(LONG_MATCH, 16) == chain_length(LONG_MATCH + 9, 16) == 16
    assert chain_length(LONG_MATCH, 5) == 5
    assert chain_length(0, 16) == LENGTH_BY_MATCH[0] == 1
    assert chain_length(1, 16) == LENGTH_BY_MATCH[1] and chain_length(1, 2) == 2
    assert chain_length(3, 16) == LENGTH_BY_MATCH[3]
    assert all(1 <= n for n in LENGTH_BY_MATCH)


def test_the_adaptive_chains_are_prefixes_of_the_tree_chain() -> None:
    tree = with_lookup(build_tree([]), 1, 8, adaptive=True)
    prefixes = chain_prefixes(tree)
    assert sorted(prefixes) == list(range(9))
    assert prefixes[0].num_nodes == 1 and prefixes[0].lookup == (0, 0)  # the root alone: a plain step
    for n, sub in list(prefixes.items())[1:]:
        assert sub.num_nodes == n + 1 and sub.lookup == (1, n) and not sub.adaptive
        assert (sub.attention_mask == tree.attention_mask[: n + 1, : n + 1]).all()
        assert (sub.position_ids == tree.position_ids[: n + 1]).all()
    assert chain_prefixes(with_lookup(build_tree([]), 1, 3)) is None  # a fixed chain is verified whole


def _heads(*top1: int) -> np.ndarray:
    """Heads' top-k [K, 2] whose top-1 guesses are `top1`."""
    return np.array([[t, 0] for t in top1], dtype=np.int64)


def test_chain_step_picks_the_lookup_or_the_heads() -> None:
    """A match's continuation (as long as chain_length says), the heads' guesses where nothing matched or
    where a weak match disagrees with the heads' first guess, the last token without heads."""
    prefixes = chain_prefixes(with_lookup(build_tree([]), 1, 8, adaptive=True))

    def step(context, heads):
        tree, chain, matched = chain_step(prefixes, context, heads)
        assert tree is prefixes[chain.shape[1]] and chain.dtype == np.int64
        return chain[0].tolist(), matched

    heads = _heads(50, 51, 52, 53)
    assert step([1, 2, 3, 4, 5], heads) == ([50], 0)  # no match
    assert step([1, 2, 3, 4, 5], None) == ([5], 0)
    weak = [7, 1, 2, 9, 2]  # "2" matched once, followed by 9: a weak match
    assert POLICY.weak_match >= 1 and match_length(weak, cap=LONG_MATCH) == 1
    assert step(weak, _heads(9, 51, 52, 53)) == ([9, 2, 9][: LENGTH_BY_MATCH[1]], 1)  # they agree
    assert step(weak, heads) == ([50], 0)  # they disagree: the heads
    assert step(weak, None) == ([9, 2, 9][: LENGTH_BY_MATCH[1]], 1)
    passage = list(range(10, 30))
    copying = passage + [99] + passage[:LONG_MATCH]
    assert step(copying, heads) == (passage[LONG_MATCH : LONG_MATCH + 8], 1)  # a long match: never the heads


def test_the_heads_probabilities_set_their_chain_and_overrule_short_matches() -> None:
    """With each head's top-1 probability: the heads' chain runs while their product stays above KEEP (none:
    the root alone); sure heads overrule a disagreeing match shorter than LONG_MATCH, never a longer one."""
    prefixes = chain_prefixes(with_lookup(build_tree([]), 1, 8, adaptive=True))
    heads = _heads(50, 51, 52, 53)

    def step(context, confidence, policy=POLICY):
        tree, chain, found = chain_step(prefixes, context, heads, np.array(confidence), policy)
        assert tree is prefixes[chain.shape[1]]
        return chain[0].tolist(), found

    assert POLICY.keep == 0.4 and POLICY.confident == 0.7
    nothing = [1, 2, 3, 4, 5]
    assert step(nothing, [0.9, 0.8, 0.5, 0.9]) == ([50, 51], 0)  # 0.9, 0.72, then 0.36
    assert step(nothing, [0.99, 0.99, 0.99, 0.99]) == ([50, 51, 52, 53], 0)
    assert step(nothing, [0.3, 0.9, 0.9, 0.9]) == ([], 0)  # unsure: the root alone
    assert step(nothing, [0.3, 0.9, 0.9, 0.9], MATCH_ONLY) == ([50], 0)  # round 9: one guess regardless
    assert heads_length(None, 0.4, 8) == heads_length(np.ones(4), None, 8) == LENGTH_BY_MATCH[0]
    assert heads_length(np.ones(4), 0.4, 3) == 3  # never past the tree's chain
    short = [5, 1, 2, 3, 9, 1, 2, 3]  # a 3-token match, continued by 9
    assert match_length(short, cap=LONG_MATCH) == 3
    assert step(short, [0.6, 0.9, 0.9, 0.9]) == ([9, 1, 2, 3][: LENGTH_BY_MATCH[3]], 1)  # not sure enough
    assert step(short, [0.8, 0.9, 0.2, 0.9]) == ([50, 51], 0)  # sure and disagreeing: the heads
    assert step(short, [0.8, 0.9, 0.2, 0.9], ChainPolicy(confident=None)) == ([9, 1, 2, 3], 1)
    passage = list(range(10, 30))
    copying = passage + [99] + passage[:LONG_MATCH]
    # a long match: never the heads, however sure they are
    assert step(copying, [0.99] * 4) == (passage[LONG_MATCH : LONG_MATCH + 8], 1)
    agreeing = [5, 1, 2, 3, 50, 1, 2, 3]
    assert step(agreeing, [0.99] * 4) == ([50, 1, 2, 3], 1)


# --- decoding ----------------------------------------------------------------------------------------------


def _recording(runtime: MedusaRuntime) -> list[int]:
    """Token counts of the backend's forwards, from now on."""
    from medusa_export.bench import TimedBackend

    runtime.backend = TimedBackend(runtime.backend)
    return runtime.backend.forward_tokens


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama"])
def test_adaptive_chain_is_plain_greedy_and_verifies_the_chosen_length(
    name, tiny_base, tiny_artifact
) -> None:
    """Medusa with `chain0+lookupauto8` = transformers' greedy decoding, token for token, with oracle heads
    (the unmatched steps' guesses) and the lookup; every verify is one of the lengths chain_step picks from."""
    from medusa_export.reference import hf_greedy

    rt = MedusaRuntime.open(tiny_artifact(name), tree="chain0+lookupauto8")
    assert rt.tree_name == "chain0+lookupauto8" and rt.tree.adaptive
    base = tiny_base(name)
    sizes = _recording(rt)
    seen: set[int] = set()
    for prompt in [*PROMPTS[:3], REPEAT]:
        ids = rt.encode(prompt)
        want = hf_greedy(base, ids, 40).tokens
        sizes.clear()
        got = rt.generate(ids, 40, drafter=OracleDrafter(len(ids), want, base.config.vocab_size))
        assert got.token_ids == want
        context = ids + got.steps[0].tokens
        for step, size in zip(got.steps[1:], sizes[1:]):  # sizes[0]: the prefill
            matched = match_length(context, cap=LONG_MATCH)
            # the match's length, or where a shorter match may give way to the heads, 0 to K of their guesses
            heads = set(range(len(rt.backend.draft_confidence(0)) + 1)) if matched < LONG_MATCH else set()
            assert size - 1 in {chain_length(matched, 8)} | heads
            context += step.tokens
        seen.update(sizes[1:])
    assert len(seen) > 1  # the length did change from step to step
    # the heads' top-1 probabilities at a row of the last forward: the softmax of their logits there
    logits = rt.backend.last_outputs[1].numpy()[:, 0, 0].astype(np.float64)
    want = np.exp(logits.max(-1)) / np.exp(logits).sum(-1)
    np.testing.assert_allclose(rt.backend.draft_confidence(0), want, rtol=1e-5)


def test_adaptive_chain_without_heads_and_with_typical_acceptance(tiny_artifact) -> None:
    """medusa=False (no heads: unmatched steps verify the root token) and typical acceptance walk the
    same per-step trees."""
    from medusa_runtime.acceptance import Typical

    folder = tiny_artifact("tiny-gemma3")
    plain = MedusaRuntime.open(folder, medusa=False)
    bare = MedusaRuntime.open(folder, medusa=False, lookup="auto")
    assert bare.tree_name == f"plain+lookupauto{AUTO_LENGTH}"
    ids = bare.encode(REPEAT)
    assert bare.generate(ids, 40).token_ids == plain.generate(ids, 40).token_ids
    typical = MedusaRuntime.open(folder, tree="chain0+lookupauto", acceptance=Typical())
    runs = [typical.generate(REPEAT, 30) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 30
