"""Hybrid candidate trees: the heads' tree plus prompt-lookup chains, verified in the same forward pass.

Lookup proposals (medusa_runtime.lookup), the hybrid buffers (tree.with_lookup), acceptance across both
sources, and exactness: greedy output with lookup chains is the base model's greedy output, token for token.
"""

from __future__ import annotations

import json
from collections import Counter
from io import StringIO

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import PROMPTS, SPECBENCH, TINY, OracleDrafter, oracle_check
from medusa_runtime.acceptance import Greedy
from medusa_runtime.api import MedusaRuntime
from medusa_runtime.decode import accepted_by_source, candidates
from medusa_runtime.errors import MedusaError
from medusa_runtime.lookup import SCAN, add_lookup, lookup_name, parse_lookup, propose
from medusa_runtime.tree import (
    HEADS,
    LOOKUP,
    MAX_NODES,
    TreeError,
    build_tree,
    with_lookup,
)
from medusa_runtime.tree import (
    ROOT as ROOT_NODE,
)
from test_tree import prefix_closed_choices

# the second half repeats the first: a model that copies it is helped by the lookup
REPEAT = (
    "alpha beta gamma delta epsilon zeta eta theta. alpha beta gamma delta epsilon zeta eta theta. alpha beta"
)


# --- the lookup spec --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        (None, (0, 0)),
        (0, (0, 0)),
        ("0", (0, 0)),
        (4, (1, 4)),
        ("4", (1, 4)),
        ("2x3", (2, 3)),
        ((3, 2), (3, 2)),
    ],
)
def test_parse_lookup(spec, want) -> None:
    assert parse_lookup(spec) == want


@pytest.mark.parametrize("spec", ["x", "2x", "ax3", "0x3", "2x0", -1, "1x2x3", 2.5j])
def test_parse_lookup_rejects(spec) -> None:
    with pytest.raises(TreeError) as info:
        parse_lookup(spec)
    assert "\n" not in str(info.value)


def test_lookup_names() -> None:
    assert (lookup_name(0, 0), lookup_name(1, 8), lookup_name(2, 4)) == ("", "+lookup8", "+lookup2x4")
    tree = build_tree([[0]])
    assert add_lookup("t", tree, None) == ("t", tree)
    name, hybrid = add_lookup("t", tree, "2x3")
    assert name == "t+lookup2x3" and hybrid.num_nodes == 2 + 6


# --- proposals ---------------------------------------------------------------------------------------------


def test_propose_copies_the_continuation_of_the_longest_most_recent_match() -> None:
    # last 3 tokens [1, 2, 3] occurred at 0: propose what followed
    assert propose([1, 2, 3, 9, 8, 1, 2, 3], 1, 3)[0].tolist() == [[9, 8, 1]]
    # [1, 2] occurred twice: the most recent first, then the older, distinct continuation
    assert propose([1, 2, 8, 1, 2, 9, 1, 2], 2, 3)[0].tolist() == [[9, 1, 2], [8, 1, 2]]
    # the 3-gram match wins over a more recent 1-gram match; the 2-gram's continuation is the same one
    ctx = [7, 1, 2, 5, 3, 2, 6, 7, 1, 2]
    assert propose(ctx, 1, 3)[0].tolist() == [[5, 3, 2]]
    assert propose(ctx, 2, 3)[0].tolist() == [[5, 3, 2], [6, 7, 1]]


def test_propose_continues_a_repetition_past_the_end_of_the_context() -> None:
    assert propose([4, 5, 4, 5], 1, 5)[0].tolist() == [[4, 5, 4, 5, 4]]
    assert propose([3, 3], 1, 4)[0].tolist() == [[3, 3, 3, 3]]


def test_propose_pads_with_the_last_token_when_nothing_matches() -> None:
    assert propose([5, 6, 7], 2, 3)[0].tolist() == [[7, 7, 7], [7, 7, 7]]
    assert propose([5], 1, 2)[0].tolist() == [[5, 5]]
    assert propose([1, 2, 1], 3, 2)[0].tolist() == [[2, 1], [1, 1], [1, 1]]  # one match, two rows of padding
    empty, matched = propose([1, 2, 1], 0, 4)
    assert empty.shape == (0, 4) and empty.dtype == np.int64 and matched == 0
    # rows without a match take a filler (the heads' guesses) and the matched count says which are whose
    rows, matched = propose([1, 2, 1], 3, 2, filler=np.array([8, 9]))
    assert rows.tolist() == [[2, 1], [8, 9], [8, 9]] and matched == 1


def _copies(ctx: list[int], n: int, length: int) -> list[list[int]]:
    """Every continuation of an earlier occurrence of the last n tokens, most recent first (by brute force)."""
    last = len(ctx) - n
    starts = [s for s in range(last - 1, -1, -1) if n >= 1 and ctx[s : s + n] == ctx[last:]]
    return [np.resize(np.array(ctx[s + n :]), length).tolist() for s in starts]


@settings(max_examples=300)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.integers(1, 3), st.integers(1, 6))
def test_propose_matches_a_brute_force_search(ctx: list[int], chains: int, length: int) -> None:
    """Distinct continuations, longest suffix first, then most recent (SCAN occurrences per length), padded."""
    want: list[list[int]] = []
    for n in (3, 2, 1):
        if n < len(ctx):
            for cont in _copies(ctx, n, length)[:SCAN]:
                if cont not in want and len(want) < chains:
                    want.append(cont)
    want += [[ctx[-1]] * length] * (chains - len(want))
    assert propose(ctx, chains, length)[0].tolist() == want


# --- hybrid buffers --------------------------------------------------------------------------------------


def test_hybrid_buffers_by_hand() -> None:
    tree = with_lookup(build_tree([[0], [1], [0, 0]]), 1, 3)  # heads 0..3, lookup chain 4 -> 5 -> 6
    assert (tree.num_nodes, tree.depth, tree.num_leaves, tree.topk, tree.lookup) == (7, 2, 3, 2, (1, 3))
    assert tree.choices == ((0,), (1,), (0, 0))
    assert tree.parents.tolist() == [-1, 0, 0, 1, 0, 4, 5]
    assert tree.position_ids.tolist() == [0, 1, 1, 2, 1, 2, 3]
    assert tree.tree_indices.tolist() == [0, 1, 2, 3, 5, 6, 7]  # lookup after 1 + depth * topk = 5
    assert tree.sources.tolist() == [ROOT_NODE, HEADS, HEADS, HEADS, LOOKUP, LOOKUP, LOOKUP]
    assert tree.attention_mask.astype(int)[6].tolist() == [1, 0, 0, 0, 1, 1, 1]
    assert tree.attention_mask.astype(int)[3].tolist() == [1, 1, 0, 1, 0, 0, 0]
    assert tree.retrieve_indices.tolist() == [[0, 2, -1, -1], [0, 1, 3, -1], [0, 4, 5, 6]]
    assert (tree.path(3), tree.source(3), tree.path(5), tree.source(5), tree.source(0)) == (
        (0, 0),
        "heads",
        (),
        "lookup",
        "",
    )
    data = json.loads(json.dumps(tree.to_json_dict()))
    assert data["lookup"] == {"chains": 1, "length": 3} and data["sources"] == tree.sources.tolist()


def test_lookup_on_the_root_only_tree_is_prompt_lookup_decoding() -> None:
    tree = with_lookup(build_tree([]), 2, 2)
    assert tree.parents.tolist() == [-1, 0, 1, 0, 3]
    assert tree.tree_indices.tolist() == [0, 1, 2, 3, 4]
    assert tree.retrieve_indices.tolist() == [[0, 1, 2], [0, 3, 4]]
    assert (tree.depth, tree.topk) == (0, 0)  # needs no heads


def test_hybrid_tree_limits() -> None:
    tree = build_tree([[0]])
    with pytest.raises(TreeError, match="already"):
        with_lookup(with_lookup(tree, 1, 2), 1, 2)
    with pytest.raises(TreeError, match="limit"):
        with_lookup(tree, 64, 64)
    with pytest.raises(TreeError, match="limit"):
        with_lookup(tree, 1, 65)
    assert with_lookup(tree, 15, 64).num_nodes == 2 + 15 * 64 <= MAX_NODES
    for bad in ((0, 3), (1, 0), (True, 2)):
        with pytest.raises(TreeError):
            with_lookup(tree, *bad)


@settings(max_examples=100)
@given(prefix_closed_choices(), st.integers(1, 3), st.integers(1, 6))
def test_hybrid_tree_properties(choices: list[list[int]], chains: int, length: int) -> None:
    heads = build_tree(choices)
    tree = with_lookup(heads, chains, length)
    n_heads = heads.num_nodes
    assert tree.num_nodes == n_heads + chains * length
    # the heads part is unchanged
    for name in ("parents", "position_ids", "tree_indices"):
        assert np.array_equal(getattr(tree, name)[:n_heads], getattr(heads, name))
    assert np.array_equal(tree.attention_mask[:n_heads, :n_heads], heads.attention_mask)
    assert (
        not tree.attention_mask[:n_heads, n_heads:].any()
        and not tree.attention_mask[n_heads:, 1:n_heads].any()
    )
    assert np.array_equal(tree.position_ids, tree.attention_mask.sum(axis=1) - 1)
    # lookup tokens follow the heads' flat candidates, one distinct slot each
    slots = tree.tree_indices[n_heads:]
    assert slots.tolist() == list(
        range(1 + heads.depth * heads.topk, 1 + heads.depth * heads.topk + chains * length)
    )
    # every root-to-leaf path is a parent chain; the lookup chains are the last leaves
    assert tree.num_leaves == (heads.num_leaves if heads.num_nodes > 1 else 0) + chains  # the root no more
    for row in tree.retrieve_indices[-chains:]:
        assert (
            row[0] == 0
            and (tree.sources[row[1:]] == LOOKUP).all()
            and len(row) == max(length, heads.depth) + 1
        )


# --- candidates and acceptance ---------------------------------------------------------------------------


def test_candidates_put_lookup_tokens_in_their_slots() -> None:
    tree = with_lookup(build_tree([[0], [1], [0, 0]]), 1, 3)
    draft = np.arange(100, 140).reshape(4, 10)  # 4 heads x top-10, more than the tree uses
    cand = candidates(tree, 7, draft, np.array([[50, 51, 52]]))
    assert cand.tolist() == [7, 100, 101, 110, 50, 51, 52]


def test_greedy_takes_the_longest_path_across_sources_ties_to_the_heads() -> None:
    tree = with_lookup(build_tree([[0], [0, 0]]), 1, 3)  # heads 0 -> 1 -> 2, lookup 0 -> 3 -> 4 -> 5
    cand = np.array([10, 11, 99, 11, 12, 13])
    # base argmax after each node: the truth is 10 11 12 13 14
    nxt = np.array([11, 12, 0, 12, 13, 14])
    assert Greedy().accept(tree, cand, nxt, None).tolist() == [0, 3, 4, 5]
    cand = np.array([10, 11, 12, 11, 12, 98])  # both reach length 2: the heads path
    assert Greedy().accept(tree, cand, nxt, None).tolist() == [0, 1, 2]


# --- the runtime: exact, and the lookup gets accepted -------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_medusa_with_lookup_equals_base_greedy(tiny_base, tiny_artifact, name):
    from medusa_export.reference import hf_greedy

    base = tiny_base(name)
    lookup_tokens = 0
    for medusa, lookup in ((True, 3), (True, "2x4"), (False, 4)):
        rt = MedusaRuntime.open(tiny_artifact(name), tree="tree8", medusa=medusa, lookup=lookup)
        assert rt.tree.lookup_chains and "+lookup" in rt.tree_name
        for prompt in [*PROMPTS, REPEAT]:
            ids = rt.encode(prompt)
            res = rt.generate(ids, 40)
            assert res.token_ids == hf_greedy(base, ids, 40).tokens, (lookup, prompt)
            counts = accepted_by_source(res.steps)
            # accepted = 1 + heads + lookup per verify step
            assert sum(len(s.tokens) for s in res.steps[1:]) == len(res.steps) - 1 + sum(counts.values())
            lookup_tokens += counts["lookup"]
            if not medusa:
                assert counts["heads"] == 0
    assert lookup_tokens > 0


@pytest.mark.parametrize("name", TINY)
def test_oracle_heads_with_lookup_chains_stay_exact(tiny_base, tiny_artifact, name):
    """Oracle heads accept often and deep; the lookup chains compete with them in the same tree (short
    chains, so that heads paths still win often enough to show every kind of acceptance)."""
    rt = MedusaRuntime.open(tiny_artifact(name), tree="mc_sim_7b_63", lookup="2x2")
    kinds, mean = oracle_check(rt, tiny_base(name), [*PROMPTS, REPEAT], 40)
    assert {"full", "partial", "non-first"} <= kinds, kinds
    assert mean > 1.5


def test_lookup_is_accepted_on_a_repeating_prompt_and_raises_acceptance(tiny_artifact):
    folder = tiny_artifact("tiny-gemma3")
    heads_only = MedusaRuntime.open(folder, tree="tree8")
    hybrid = MedusaRuntime.open(folder, tree="tree8", lookup=4)
    ids = hybrid.encode(REPEAT)
    with_lookup_res, without = hybrid.generate(ids, 48), heads_only.generate(ids, 48)
    assert with_lookup_res.token_ids == without.token_ids
    assert accepted_by_source(with_lookup_res.steps)["lookup"] > 0
    assert accepted_by_source(without.steps)["lookup"] == 0
    assert with_lookup_res.mean_accepted > without.mean_accepted
    assert any(s.source == "lookup" and s.path == () for s in with_lookup_res.steps)


def test_kv_capacity_counts_the_lookup_nodes(tiny_artifact):
    folder = tiny_artifact("tiny-llama")
    plain = MedusaRuntime.open(folder, tree="tree8")
    hybrid = MedusaRuntime.open(folder, tree="tree8", lookup="2x3")
    assert hybrid.tree.num_nodes == plain.tree.num_nodes + 6
    ids = plain.encode(PROMPTS[0])
    fits = plain.backend.capacity - len(ids) - plain.tree.num_nodes
    assert len(plain.generate(ids, fits).token_ids) == fits
    with pytest.raises(MedusaError, match=f"tree {hybrid.tree.num_nodes}"):
        hybrid.generate(ids, fits)


def test_validate_with_lookup(tiny_artifact, tmp_path):
    from medusa_export.validate import validate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in (PROMPTS[0], REPEAT)))
    out = StringIO()
    folder = tiny_artifact("tiny-qwen2")
    ok = validate(folder, prompts, max_new_tokens=24, tree="tree8", out=out, lookup=3)
    text = out.getvalue()
    assert ok, text
    assert "tree tree8+lookup3" in text and "from lookup" in text and "2/2 prompts identical" in text


def test_bench_reports_acceptance_per_source(tiny_artifact, tmp_path):
    from test_cli import cli

    prompts = tmp_path / "p.jsonl"
    rows = [json.loads(line) for line in SPECBENCH.read_text().splitlines()[:2]]
    prompts.write_text(
        "\n".join(json.dumps({"prompt": r["turns"][0][:80], "category": r["category"]}) for r in rows)
        + "\n"
        + json.dumps({"prompt": REPEAT, "category": "repeat"})
    )
    out = tmp_path / "bench.json"
    args = ("--prompts", prompts, "--max-new-tokens", "16", "--no-hf", "--tree", "tree8", "--lookup", "4")
    proc = cli("bench", tiny_artifact("tiny-gemma3"), *args, "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"medusa", "plain", "heads"} and result["identical_outputs"] == 3
    assert result["tree"] == "tree8+lookup4" and result["lookup"] == {"chains": 1, "length": 4}
    medusa, heads = result["methods"]["medusa"], result["methods"]["heads"]
    src = medusa["accepted_by_source"]
    assert medusa["accepted"] == pytest.approx(1 + src["heads"] + src["lookup"])
    assert src["lookup"] > 0 and heads["accepted_by_source"]["lookup"] == 0
    for cat, value in medusa["accepted_by_category"].items():
        cs = medusa["accepted_by_category_source"][cat]
        assert value == pytest.approx(1 + cs["heads"] + cs["lookup"])
    assert "speedup_vs_heads" in result
    assert "1 + heads" in proc.stdout and "heads-only tree" in proc.stdout.splitlines()[-1]


# --- the real model -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma_lookup_is_exact_and_accepted_on_a_copying_prompt():
    """Asked to repeat a list, gemma3-270m copies from its prompt: the lookup chain is accepted, and the
    output is plain decoding's, token for token (PyTorch reference backend, the shipped heads)."""
    from medusa_export.heads import resolve_heads
    from medusa_export.models import load_base
    from medusa_export.reference import torch_runtime

    prompt = (
        "Repeat the following list exactly, one item per line.\n"
        "Ottawa, Canberra, Wellington, Reykjavik, Montevideo, Ulaanbaatar, Nairobi, Kathmandu\n\n"
    )
    base = load_base("gemma3-270m")
    heads = resolve_heads("gemma3-270m-medusa", base.config.hidden_size, base.config.vocab_size)
    hybrid = torch_runtime(base, heads, "gemma3-270m-4", max_seq=512, lookup=4)
    plain = torch_runtime(base, heads, None, max_seq=512)
    res = hybrid.generate(prompt, 48)
    assert hybrid.tree_name == "gemma3-270m-4+lookup4"
    assert res.token_ids == plain.generate(prompt, 48).token_ids
    assert accepted_by_source(res.steps)["lookup"] > 0, res.text


def test_typical_acceptance_uses_the_hybrid_tree_too(tiny_artifact):
    """Typical acceptance walks the same buffers (parents, retrieve indices): lookup paths are accepted."""
    from medusa_runtime.acceptance import Typical

    rt = MedusaRuntime.open(tiny_artifact("tiny-gemma3"), tree="tree8", acceptance=Typical(), lookup=4)
    runs = [rt.generate(REPEAT, 40) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 40
    assert accepted_by_source(runs[0].steps)["lookup"] > 0


def test_a_lookup_only_chain_takes_the_heads_guesses_when_the_context_has_no_match(tiny_base, tiny_artifact):
    """`chain0+lookup3` (the quantized default): one chain, filled by the lookup when the context matches,
    else by the heads' top-1 guesses; exact either way, and steps say which source was accepted. Without
    heads (medusa=False) the unmatched chain keeps the root token."""
    from medusa_export.reference import hf_greedy

    folder = tiny_artifact("tiny-gemma3")
    rt = MedusaRuntime.open(folder, tree="chain0+lookup3")
    bare = MedusaRuntime.open(folder, medusa=False, lookup=3)
    assert rt.heads_fill and not bare.heads_fill and rt.tree.depth == 0
    base = tiny_base("tiny-gemma3")
    sources = Counter()
    for prompt in PROMPTS[:3]:
        ids = rt.encode(prompt)
        want = hf_greedy(base, ids, 40).tokens
        oracle = OracleDrafter(len(ids), want, base.config.vocab_size, rank_probs=(0.9,))
        got = rt.generate(ids, 40, drafter=oracle)
        assert got.token_ids == want == bare.generate(ids, 40).token_ids
        sources.update(accepted_by_source(got.steps))
    assert sources["heads"] > 0
