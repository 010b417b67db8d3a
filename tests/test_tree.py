"""Tests for medusa_runtime.tree: buffers, validation, presets and greedy tree construction."""

from __future__ import annotations

import json
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_runtime.errors import MedusaError
from medusa_runtime.tree import (
    MAX_DEPTH,
    MAX_NODES,
    MAX_RANK,
    MAX_TREE_FILE_BYTES,
    TreeError,
    available_presets,
    build_tree,
    expected_accept_length,
    load_choices,
    load_rank_accuracy,
    tree_from_accuracy,
    validate_choices,
)

TREES_DIR = Path(__file__).resolve().parents[1] / "configs" / "trees"


@st.composite
def prefix_closed_choices(draw: st.DrawFn, max_depth: int = 4, max_rank: int = 4) -> list[list[int]]:
    """A random valid (prefix-closed, duplicate-free) choice list in random order."""
    paths = draw(st.lists(st.lists(st.integers(0, max_rank), min_size=1, max_size=max_depth), max_size=12))
    closed = sorted({tuple(p[:i]) for p in paths for i in range(1, len(p) + 1)})
    return [list(p) for p in draw(st.permutations(closed))]


@st.composite
def accuracies(draw: st.DrawFn) -> list[list[float]]:
    """Per-head, per-rank accuracies with the same number of ranks for every head."""
    heads, ranks = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    prob = st.floats(0.0, 1.0, allow_nan=False)
    return [draw(st.lists(prob, min_size=ranks, max_size=ranks)) for _ in range(heads)]


# --- hand-checked trees ---------------------------------------------------------------------------------


def test_small_tree_by_hand() -> None:
    tree = build_tree([[0, 0], [1], [0]])  # nodes: 0 root, 1 [0], 2 [1], 3 [0, 0]
    assert tree.choices == ((0,), (1,), (0, 0))
    assert (tree.num_nodes, tree.depth, tree.num_leaves, tree.topk) == (4, 2, 2, 2)
    assert tree.parents.tolist() == [-1, 0, 0, 1]
    assert tree.position_ids.tolist() == [0, 1, 1, 2]
    assert tree.tree_indices.tolist() == [0, 1, 2, 3]
    assert tree.attention_mask.astype(int).tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 1, 0, 1],
    ]
    assert tree.retrieve_indices.tolist() == [[0, 2, -1], [0, 1, 3]]
    assert tree.attention_mask.dtype == bool
    assert tree.parents.dtype == tree.retrieve_indices.dtype == np.int64


def test_tree_indices_use_depth_and_rank() -> None:
    tree = build_tree([[1], [0], [1, 2]])  # topk 3: [1, 2] is head 1's rank 2 -> 1 + 1 * 3 + 2
    assert tree.topk == 3
    assert tree.tree_indices.tolist() == [0, 1, 2, 6]
    assert tree.retrieve_indices.tolist() == [[0, 1, -1], [0, 2, 3]]


def test_chain_by_hand() -> None:
    tree = build_tree([[0, 0], [0, 0, 0], [0]])
    assert (tree.num_nodes, tree.depth, tree.num_leaves, tree.topk) == (4, 3, 1, 1)
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.position_ids.tolist() == [0, 1, 2, 3]
    assert tree.tree_indices.tolist() == [0, 1, 2, 3]
    assert np.array_equal(tree.attention_mask, np.tril(np.ones((4, 4), dtype=bool)))
    assert tree.retrieve_indices.tolist() == [[0, 1, 2, 3]]


def test_root_only() -> None:
    tree = build_tree([])
    assert (tree.num_nodes, tree.depth, tree.num_leaves, tree.topk) == (1, 0, 1, 0)
    assert tree.attention_mask.tolist() == [[True]]
    assert tree.retrieve_indices.tolist() == [[0]]
    assert tree.tree_indices.tolist() == [0] and tree.parents.tolist() == [-1]


def test_mc_sim_7b_63() -> None:
    _, choices = load_choices("mc_sim_7b_63", [TREES_DIR])
    tree = build_tree(choices, num_heads=4, topk=10)
    assert (tree.num_nodes, tree.depth, tree.num_leaves, tree.topk) == (64, 4, 42, 10)
    assert tree.retrieve_indices.shape == (42, 5)
    assert tree.tree_indices.max() < 1 + 4 * 10


def test_buffers_are_read_only_and_json_serializable() -> None:
    tree = build_tree([[0], [1], [0, 0]])
    with pytest.raises(ValueError):
        tree.attention_mask[0, 1] = True
    data = json.loads(json.dumps(tree.to_json_dict()))
    assert data["attention_mask"][3] == [1, 1, 0, 1]
    assert data["choices"] == [[0], [1], [0, 0]]
    assert data["retrieve_indices"] == tree.retrieve_indices.tolist()
    for key in ("num_nodes", "depth", "num_leaves", "topk", "position_ids", "tree_indices", "parents"):
        assert key in data


# --- properties over random valid trees ----------------------------------------------------------------


@settings(max_examples=200)
@given(prefix_closed_choices())
def test_tree_properties(choices: list[list[int]]) -> None:
    tree = build_tree(choices)
    n, mask, parents = tree.num_nodes, tree.attention_mask, tree.parents
    nodes = [(), *tree.choices]
    assert n == len(choices) + 1 and list(tree.choices) == sorted(nodes[1:], key=lambda p: (len(p), p))
    assert mask.diagonal().all()
    assert np.array_equal(mask, np.tril(mask))
    for i in range(1, n):
        expected = mask[parents[i]].copy()
        expected[i] = True
        assert np.array_equal(mask[i], expected)
        assert nodes[parents[i]] == nodes[i][:-1]
        assert tree.tree_indices[i] == 1 + (len(nodes[i]) - 1) * tree.topk + nodes[i][-1]
    # independent check: j is visible from i iff node j's path is a prefix of node i's path
    prefix = [[nodes[i][: len(nodes[j])] == nodes[j] for j in range(n)] for i in range(n)]
    assert mask.tolist() == prefix
    assert np.array_equal(tree.position_ids, mask.sum(axis=1) - 1)

    leaves = [i for i in range(n) if i not in parents]
    assert tree.num_leaves == len(leaves) == len(tree.retrieve_indices)
    assert tree.retrieve_indices.shape == (len(leaves), tree.depth + 1)
    last_nodes = []
    for row in tree.retrieve_indices.tolist():
        path = [i for i in row if i >= 0]
        assert row == path + [-1] * (len(row) - len(path))
        assert path[0] == 0 and all(parents[b] == a for a, b in pairwise(path))
        last_nodes.append(path[-1])
    assert last_nodes == leaves  # every leaf exactly once, in sorted order


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choices", "kwargs", "fragment"),
    [
        ([[0], [1, 0]], {}, "[1, 0]"),  # missing prefix [1]
        ([[0], [0, 0, 0]], {}, "[0, 0, 0]"),  # missing prefix [0, 0]
        ([[0], [1], [0]], {}, "[0]"),  # duplicate
        ([[0], []], {}, "[]"),  # empty path
        ([[0], [-1]], {}, "[-1]"),  # negative rank
        ([[0], [0, "a"]], {}, "[0, 'a']"),  # non-int rank
        ([[0], [0, 1.0]], {}, "[0, 1.0]"),  # float rank
        ([[True]], {}, "[True]"),  # bool rank
        ([[0], 3], {}, "3"),  # path not a list
        ([[0], [0, 0], [0, 0, 0]], {"num_heads": 2}, "[0, 0, 0]"),  # too deep
        ([[0], [4]], {"topk": 4}, "[4]"),  # rank >= topk
    ],
)
def test_bad_choices_rejected(choices: list, kwargs: dict, fragment: str) -> None:
    with pytest.raises(TreeError) as info:
        build_tree(choices, **kwargs)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert isinstance(info.value, MedusaError)


def test_choices_must_be_a_list() -> None:
    with pytest.raises(TreeError, match="list of paths"):
        validate_choices("[[0]]")


def test_validate_keeps_order_and_accepts_limits() -> None:
    assert validate_choices([[1], [0], (1, 3)], num_heads=2, topk=4) == [(1,), (0,), (1, 3)]
    assert validate_choices([]) == []


# --- presets and files --------------------------------------------------------------------------------


def test_presets_all_load_and_validate() -> None:
    names = available_presets([TREES_DIR])
    expected = {"mc_sim_7b_63", "chain0", "chain1", "chain2", "chain3", "chain4", "tree4", "tree8", "tree16"}
    assert expected <= set(names)
    for name in names:
        data = json.loads((TREES_DIR / f"{name}.json").read_text())
        assert data["name"] == name and data["description"]
        loaded_name, choices = load_choices(name, [TREES_DIR])
        assert loaded_name == name
        build_tree(choices, num_heads=4, topk=10)
    for n in range(1, 5):
        tree = build_tree(load_choices(f"chain{n}", [TREES_DIR])[1])
        assert (tree.num_nodes, tree.depth, tree.num_leaves, tree.topk) == (n + 1, n, 1, 1)
    for n in (4, 8, 16):
        assert build_tree(load_choices(f"tree{n}", [TREES_DIR])[1]).num_nodes == n


def test_load_choices_from_path(tmp_path: Path) -> None:
    plain = tmp_path / "mine.json"
    plain.write_text("[[0], [0, 0], [1]]")
    assert load_choices(str(plain)) == ("mine", [(0,), (0, 0), (1,)])
    named = tmp_path / "other.json"
    named.write_text(json.dumps({"name": "nice", "choices": [[0]]}))
    assert load_choices(named, [TREES_DIR]) == ("nice", [(0,)])


def test_load_choices_errors(tmp_path: Path) -> None:
    with pytest.raises(TreeError, match="unknown tree preset 'nope'.*chain1.*mc_sim_7b_63"):
        load_choices("nope", [TREES_DIR])
    with pytest.raises(TreeError, match="cannot read"):
        load_choices(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[[0], [2, 0]]")
    with pytest.raises(TreeError, match=r"bad\.json.*\[2, 0\]"):
        load_choices(bad)
    bad.write_text("{not json")
    with pytest.raises(TreeError, match="not valid JSON"):
        load_choices(bad)
    bad.write_text('{"name": "x"}')
    with pytest.raises(TreeError, match="no 'choices'"):
        load_choices(bad)


# --- greedy construction from accuracies --------------------------------------------------------------


def test_tree_from_accuracy_by_hand() -> None:
    acc = [[0.6, 0.2, 0.1], [0.5, 0.1]]
    # values: [0] .6, [1] .2, [2] .1, [0,0] .3, [0,1] .06, [1,0] .1 (tie with [2]: shallower first)
    assert tree_from_accuracy(acc, 1) == []
    assert tree_from_accuracy(acc, 5) == [[0], [0, 0], [1], [2]]
    assert tree_from_accuracy(acc, 6) == [[0], [0, 0], [1], [2], [1, 0]]
    assert expected_accept_length([[0], [0, 0]], acc) == pytest.approx(1.9)


def test_tree_from_accuracy_errors(tmp_path: Path) -> None:
    assert len(tree_from_accuracy([[0.5, 0.5], [0.5]], 5)) == 4  # every possible node
    with pytest.raises(TreeError, match="from 1 to 5"):
        tree_from_accuracy([[0.5, 0.5], [0.5]], 6)
    with pytest.raises(TreeError, match="num_nodes"):
        tree_from_accuracy([[0.5]], 0)
    with pytest.raises(TreeError, match=r"rank_accuracy\[1\]\[0\]"):
        tree_from_accuracy([[0.5], [1.5]], 2)
    with pytest.raises(TreeError, match="non-empty"):
        tree_from_accuracy([], 1)
    with pytest.raises(TreeError, match=r"\[0, 1\]"):
        expected_accept_length([[0], [0, 1]], [[0.5], [0.5]])
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"rank_accuracy": [[0.5, 0.25]]}))
    assert load_rank_accuracy(path) == [[0.5, 0.25]]
    path.write_text(json.dumps({"accuracy": []}))
    with pytest.raises(TreeError, match="'rank_accuracy' key"):
        load_rank_accuracy(path)
    path.write_text(json.dumps({"rank_accuracy": [["x"]]}))
    with pytest.raises(TreeError, match=r"acc\.json"):
        load_rank_accuracy(path)


@settings(max_examples=200)
@given(accuracies(), st.data())
def test_tree_from_accuracy_properties(acc: list[list[float]], data: st.DataObject) -> None:
    heads, ranks = len(acc), len(acc[0])
    max_nodes = 1 + sum(ranks ** (d + 1) for d in range(heads))
    num_nodes = data.draw(st.integers(1, min(max_nodes, 40)))
    choices = tree_from_accuracy(acc, num_nodes)
    assert len(choices) == num_nodes - 1
    tree = build_tree(choices, num_heads=heads, topk=ranks)  # valid and prefix-closed
    assert tree.num_nodes == num_nodes
    length = expected_accept_length(choices, acc)

    if num_nodes - 1 <= heads:  # the rank-0 chain of the same size
        assert length >= expected_accept_length([[0] * (i + 1) for i in range(num_nodes - 1)], acc) - 1e-12
    if num_nodes < max_nodes:  # nested, so the expected length never drops
        bigger = tree_from_accuracy(acc, num_nodes + 1)
        assert bigger[:-1] == choices
        assert expected_accept_length(bigger, acc) >= length


@settings(max_examples=200)
@given(accuracies(), st.data())
def test_tree_from_accuracy_beats_any_tree_of_same_size(acc: list[list[float]], data: st.DataObject) -> None:
    other = data.draw(prefix_closed_choices(max_depth=len(acc), max_rank=len(acc[0]) - 1))
    greedy = tree_from_accuracy(acc, len(other) + 1)
    assert expected_accept_length(greedy, acc) >= expected_accept_length(other, acc) - 1e-12


def test_a_heads_folders_own_trees_are_served_with_those_heads_only(tmp_path):
    """Trees built from a heads folder's accuracy live in its trees/ and are served whenever those heads
    are exported (found by name too); other heads get the generic presets only."""
    from medusa_export.onnx_export import DEFAULT_TREES, _served_trees, tree_dirs

    heads = tmp_path / "my-heads"
    (heads / "trees").mkdir(parents=True)
    (heads / "trees" / "mine-3.json").write_text(json.dumps({"choices": [[0], [1]]}))
    served = _served_trees(None, 4, str(heads))
    assert list(served) == [*DEFAULT_TREES, "mine-3"] and served["mine-3"].choices == ((0,), (1,))
    assert list(_served_trees(None, 4, "random:4")) == list(DEFAULT_TREES)
    assert "gemma3-270m-64" in _served_trees(None, 4, "gemma3-270m-medusa")  # the shipped heads' own
    assert list(_served_trees(["mine-3"], 4, str(heads))) == ["mine-3"]
    assert tree_dirs(str(heads))[0] == heads / "trees"


# --- limits: refused in one line, before anything is built (issue 10) -------------------------------------


@pytest.mark.parametrize(
    "text", ["[[0], [1e30]]", "[[0], [1000000000000000000000000000000]]", "[[0], [0, 2e400]]"]
)
def test_absurd_rank_in_a_tree_file_is_a_one_line_tree_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(TreeError) as info:
        build_tree(load_choices(path)[1])
    assert "\n" not in str(info.value) and "t.json" in str(info.value)


def test_rank_limit() -> None:
    with pytest.raises(TreeError, match=r"rank 1000000000000000000000000000000 beyond the limit"):
        build_tree([[10**30]])
    with pytest.raises(TreeError, match="beyond the limit"):
        build_tree([[MAX_RANK]])
    assert build_tree([[MAX_RANK - 1]]).topk == MAX_RANK


def test_huge_trees_are_refused_before_any_buffer_is_built(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(TreeError, match=f"10001 nodes, more than the limit of {MAX_NODES}"):
        build_tree([[0]] * 10_000)  # the count is checked before the paths are looked at
    with pytest.raises(TreeError, match=f"depth 10000, beyond the limit of {MAX_DEPTH}"):
        build_tree([[0] * 10_000])
    with pytest.raises(TreeError, match="depth 10000 > 4 heads"):
        build_tree([[0] * 10_000], num_heads=4)
    with pytest.raises(TreeError, match="limit"):
        build_tree([[0] * d for d in range(1, MAX_NODES + 1)])  # a chain of MAX_NODES + 1 nodes
    # a 1,500-node chain file (3.4 MB) is parsed, then refused by its node count
    chain = tmp_path / "chain.json"
    chain.write_text(json.dumps([[0] * d for d in range(1, 1501)]))
    with pytest.raises(TreeError, match="1501 nodes"):
        load_choices(chain)
    # a 10,000-node chain file would be ~150 MB: anything over the size limit is refused before parsing
    big = tmp_path / "big.json"
    with open(big, "w") as f:
        f.write("[" + "[0]," * (MAX_TREE_FILE_BYTES // 4) + "[0]]")
    with pytest.raises(TreeError, match="more than the limit"):
        load_choices(big)
    assert time.perf_counter() - start < 5
    assert (
        build_tree([[0] * d for d in range(1, MAX_DEPTH + 1)]).depth == MAX_DEPTH
    )  # the limit itself is fine


def test_huge_tree_file_through_the_runtime_is_refused_quickly(tmp_path: Path, tiny_artifact) -> None:
    """`--tree FILE` with a 1,500-node chain: one line, in well under a second of tree work."""
    from medusa_runtime.api import MedusaRuntime

    folder = tiny_artifact("tiny-llama")
    chain = tmp_path / "chain.json"
    chain.write_text(json.dumps([[0] * d for d in range(1, 1501)]))
    start = time.perf_counter()
    with pytest.raises(MedusaError) as info:
        MedusaRuntime.open(folder, tree=str(chain))
    assert "limit" in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 5
