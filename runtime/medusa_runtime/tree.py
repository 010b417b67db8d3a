"""Medusa sparse candidate trees: validation, buffers for tree attention, presets and greedy construction.

A tree is given as "medusa choices": a list of paths, each path a list of top-k ranks, one per head depth
(``[0, 1]`` = rank-0 token of head 0, then rank-1 token of head 1). Node 0 is the root, the token chosen by
the base model; node ``i >= 1`` is the ``i-1``-th path in sorted order (by depth, then lexicographically).
A hybrid tree (`with_lookup`) appends reserved prompt-lookup chains hanging from the root after those nodes;
their tokens are filled per step (lookup.py), the buffers stay static.
Pure numpy + stdlib, so the runtime imports without torch.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MedusaError

TreePath = tuple[int, ...]

# Sanity limits, checked before anything is built (a tree file is read whole, then its buffers are N x N):
# far beyond any useful tree (Medusa's largest canonical tree has 64 nodes, 4 heads, top-10).
MAX_NODES = 1024  # root and lookup slots included
MAX_DEPTH = 64  # heads (or lookup chain length)
MAX_RANK = 1024  # exclusive: a rank is a head's top-k index
MAX_TREE_FILE_BYTES = 4 << 20
ROOT, HEADS, LOOKUP = 0, 1, 2  # TreeBuffers.sources: where each node's token comes from
SOURCE_NAMES = {HEADS: "heads", LOOKUP: "lookup"}


class TreeError(MedusaError):
    """An invalid tree, tree preset or rank-accuracy file."""


def _fmt(path: Any) -> str:
    return str(list(path)) if isinstance(path, (list, tuple)) else repr(path)


def _short(path: Any, limit: int = 60) -> str:
    """A path for an error message, cut to one readable line."""
    text = _fmt(path)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _sort_key(path: TreePath) -> tuple[int, TreePath]:
    return len(path), path


def validate_choices(choices: Any, num_heads: int | None = None, topk: int | None = None) -> list[TreePath]:
    """Check a list of paths and return it (same order) as tuples; an empty list means root only.

    Raises TreeError naming the first bad path: not a list of ints, empty, negative rank, deeper than
    ``num_heads``, rank >= ``topk``, duplicated, or missing its parent path; or for a tree beyond the
    sanity limits (MAX_NODES, MAX_DEPTH, MAX_RANK), checked first, so a huge tree costs nothing.
    """
    if not isinstance(choices, (list, tuple)):
        raise TreeError(f"medusa choices must be a list of paths, got {type(choices).__name__}")
    if len(choices) >= MAX_NODES:
        raise TreeError(f"tree has {len(choices) + 1} nodes, more than the limit of {MAX_NODES}")
    paths: list[TreePath] = []
    for raw in choices:
        if not isinstance(raw, (list, tuple)):
            raise TreeError(f"medusa choice {_short(raw)} is not a list of integer ranks")
        # depth before the ranks are looked at: a path may be huge
        if num_heads is not None and len(raw) > num_heads:
            raise TreeError(f"medusa choice {_short(raw)} has depth {len(raw)} > {num_heads} heads")
        if len(raw) > MAX_DEPTH:
            raise TreeError(
                f"medusa choice {_short(raw)} has depth {len(raw)}, beyond the limit of {MAX_DEPTH}"
            )
        if not all(_is_int(r) for r in raw):
            raise TreeError(f"medusa choice {raw!r} is not a list of integer ranks")
        path = tuple(int(r) for r in raw)
        if not path:
            raise TreeError("medusa choice [] is empty: every path needs at least one rank")
        if min(path) < 0:
            raise TreeError(f"medusa choice {_fmt(path)} has a negative rank")
        if max(path) >= MAX_RANK:
            raise TreeError(
                f"medusa choice {_short(path)} has rank {max(path)} beyond the limit {MAX_RANK - 1}"
            )
        if topk is not None and max(path) >= topk:
            raise TreeError(f"medusa choice {_fmt(path)} uses rank {max(path)} but top-k is {topk}")
        paths.append(path)
    seen: set[TreePath] = set()
    for path in paths:
        if path in seen:
            raise TreeError(f"medusa choice {_fmt(path)} appears more than once")
        seen.add(path)
    for path in paths:
        if len(path) > 1 and path[:-1] not in seen:
            raise TreeError(f"medusa choice {_fmt(path)} has no parent path {_fmt(path[:-1])}")
    return paths


@dataclass(frozen=True, eq=False)
class TreeBuffers:
    """Static buffers for verifying a candidate tree in one forward pass (arrays are int64 and read-only).

    ``tree_indices`` index the flat candidate vector ``concat([root], topk_ids[0], ..., topk_ids[depth - 1],
    lookup[0], ..., lookup[chains - 1])`` where ``topk_ids[d]`` holds head d's top-``topk`` token ids and
    ``lookup[c]`` the ``lookup_length`` tokens proposed for lookup chain c (hybrid trees only).
    """

    choices: tuple[TreePath, ...]  # sorted heads paths; node i in 1..len(choices) is choices[i - 1]
    num_nodes: int  # root and lookup nodes included
    depth: int  # longest heads path; also the number of heads needed
    num_leaves: int
    topk: int  # max rank + 1 (0 for root only)
    parents: np.ndarray  # [N], root -1
    attention_mask: np.ndarray  # [N, N] bool: i attends j iff j is i or an ancestor of i
    position_ids: np.ndarray  # [N], depth of each node (root 0)
    tree_indices: np.ndarray  # [N]
    retrieve_indices: np.ndarray  # [num_leaves, longest path + 1], node indices root -> leaf, -1 padded
    sources: np.ndarray  # [N]: ROOT, HEADS or LOOKUP, where each node's token comes from
    lookup: tuple[int, int] = (0, 0)  # (chains, length) of the reserved prompt-lookup slots
    adaptive: bool = False  # one lookup chain verified up to a length chosen per step (adaptive.py)

    @property
    def lookup_chains(self) -> int:
        return self.lookup[0]

    @property
    def lookup_length(self) -> int:
        return self.lookup[1]

    @property
    def lookup_start(self) -> int:
        """Where the lookup tokens begin in the flat candidate vector [root, heads' top-k ..., lookup ...]."""
        return 1 + self.depth * self.topk

    def source(self, node: int) -> str:
        """'heads' or 'lookup' for a candidate node, '' for the root."""
        return SOURCE_NAMES.get(int(self.sources[node]), "")

    def path(self, node: int) -> TreePath:
        """The medusa choice of a heads node; () for the root and lookup nodes."""
        return self.choices[node - 1] if self.sources[node] == HEADS else ()

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-serializable description of the tree (the mask as 0/1)."""
        return {
            "num_nodes": self.num_nodes,
            "depth": self.depth,
            "num_leaves": self.num_leaves,
            "topk": self.topk,
            "choices": [list(p) for p in self.choices],
            "lookup": {
                "chains": self.lookup_chains,
                "length": self.lookup_length,
                **({"adaptive": True} if self.adaptive else {}),
            },
            "parents": self.parents.tolist(),
            "attention_mask": self.attention_mask.astype(int).tolist(),
            "position_ids": self.position_ids.tolist(),
            "tree_indices": self.tree_indices.tolist(),
            "retrieve_indices": self.retrieve_indices.tolist(),
            "sources": self.sources.tolist(),
        }


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _assemble(
    choices: tuple[TreePath, ...],
    depth: int,
    topk: int,
    nodes: list[tuple[int, int, int, int]],  # (parent, position, tree index, source), parents first
    lookup: tuple[int, int] = (0, 0),
    adaptive: bool = False,
) -> TreeBuffers:
    """Attention mask, leaves and root-to-leaf paths from the node list (root first, each parent before
    its children)."""
    parents, position_ids, tree_indices, sources = (np.array(col, dtype=np.int64) for col in zip(*nodes))
    num_nodes = len(nodes)
    mask = np.eye(num_nodes, dtype=bool)
    for i in range(1, num_nodes):  # a parent's row is complete before its children's
        mask[i] |= mask[parents[i]]

    leaves = sorted(set(range(num_nodes)) - set(parents.tolist()))
    retrieve = np.full((len(leaves), int(position_ids.max()) + 1), -1, dtype=np.int64)
    for row, leaf in enumerate(leaves):
        chain = np.flatnonzero(mask[leaf])  # ancestors and the leaf itself, root first
        retrieve[row, : len(chain)] = chain

    return TreeBuffers(
        choices=choices,
        num_nodes=num_nodes,
        depth=depth,
        num_leaves=len(leaves),
        topk=topk,
        parents=_frozen(parents),
        attention_mask=_frozen(mask),
        position_ids=_frozen(position_ids),
        tree_indices=_frozen(tree_indices),
        retrieve_indices=_frozen(retrieve),
        sources=_frozen(sources),
        lookup=lookup,
        adaptive=adaptive,
    )


def _heads_nodes(paths: list[TreePath], topk: int) -> list[tuple[int, int, int, int]]:
    index = {path: i for i, path in enumerate([(), *paths])}
    root = (-1, 0, 0, ROOT)
    return [root] + [(index[p[:-1]], len(p), 1 + (len(p) - 1) * topk + p[-1], HEADS) for p in paths]


def build_tree(choices: Any, num_heads: int | None = None, topk: int | None = None) -> TreeBuffers:
    """Validate ``choices`` (see validate_choices) and build the tree-attention buffers."""
    paths = sorted(validate_choices(choices, num_heads, topk), key=_sort_key)
    need_topk = max((max(p) for p in paths), default=-1) + 1
    depth = max((len(p) for p in paths), default=0)
    return _assemble(tuple(paths), depth, need_topk, _heads_nodes(paths, need_topk))


def with_lookup(tree: TreeBuffers, chains: int, length: int, adaptive: bool = False) -> TreeBuffers:
    """The hybrid tree: ``tree``'s heads nodes, then ``chains`` reserved chains of ``length`` prompt-lookup
    nodes hanging from the root (node positions 1..length). Their tokens are filled each step; the buffers
    stay static. A head count or top-k limit does not apply to them; the node count still does.
    ``adaptive``: one chain on the root alone, of which each step verifies the first 1..length nodes
    (decode.py, adaptive.py): still a single chain, so exact on quantized weights too."""
    if tree.lookup_chains:
        raise TreeError("this tree already has lookup chains")
    if not (_is_int(chains) and _is_int(length) and chains >= 1 and length >= 1):
        raise TreeError(f"lookup needs at least one chain of at least one token, got {chains} x {length}")
    if adaptive and (chains != 1 or tree.num_nodes != 1):
        raise TreeError(
            "an adaptive lookup chain is one chain on the root alone (chain0+lookupauto), "
            f"not {chains} chain(s) on a tree of {tree.num_nodes} nodes"
        )
    if length > MAX_DEPTH:
        raise TreeError(f"lookup chains of {length} tokens are beyond the limit of {MAX_DEPTH}")
    if tree.num_nodes + chains * length > MAX_NODES:
        raise TreeError(
            f"tree of {tree.num_nodes} nodes + {chains} x {length} lookup nodes is more than the limit of {MAX_NODES}"
        )
    nodes = _heads_nodes(list(tree.choices), tree.topk)
    first = tree.lookup_start  # the lookup tokens follow the heads' top-k in the flat vector
    for c in range(chains):
        for d in range(length):
            parent = 0 if d == 0 else len(nodes) - 1
            nodes.append((parent, d + 1, first + c * length + d, LOOKUP))
    return _assemble(tree.choices, tree.depth, tree.topk, nodes, (int(chains), int(length)), adaptive)


def _read_json(path: Path, what: str) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_TREE_FILE_BYTES:  # refused before parsing: no useful tree file is this big
            raise TreeError(f"{what} {path} is {size} bytes, more than the limit of {MAX_TREE_FILE_BYTES}")
        return json.loads(path.read_text())
    except OSError as exc:
        raise TreeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TreeError(f"{what} {path} is not valid JSON: {exc}") from None


def available_presets(search_dirs: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Sorted names of the ``*.json`` tree presets found in ``search_dirs``."""
    return sorted({p.stem for d in search_dirs for p in Path(d).glob("*.json")})


def _tree_file(spec: str | os.PathLike[str], search_dirs: list) -> Path | None:
    """The JSON file a spec names: itself when it looks like a path, else the first ``<dir>/<spec>.json``."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file() or any(s in str(spec) for s in ("/", os.sep)):
        return path
    return next((Path(d) / f"{spec}.json" for d in search_dirs if (Path(d) / f"{spec}.json").is_file()), None)


def _named_choices(data: Any, what: str, name: str) -> tuple[str, list[TreePath]]:
    """(name, validated choices) of a tree document: a list of paths or ``{"name", "choices", ...}``."""
    if isinstance(data, dict):
        if "choices" not in data:
            raise TreeError(f"{what} has no 'choices' key")
        name, data = data.get("name", name), data["choices"]
        if not isinstance(name, str) or not name:
            raise TreeError(f"{what} has a 'name' that is not a non-empty string")
    try:
        return name, validate_choices(data)
    except TreeError as exc:
        raise TreeError(f"{what}: {exc}") from None


def load_choices(
    spec: str | os.PathLike[str], search_dirs: Iterable[str | os.PathLike[str]] = ()
) -> tuple[str, list[TreePath]]:
    """Load a tree from a preset name (``<dir>/<name>.json`` in ``search_dirs``) or a JSON file path.

    The file holds a list of paths or ``{"name": ..., "choices": [...], "description": ...}``.
    Returns ``(name, validated choices)``; the name defaults to the file's stem.
    """
    search_dirs = list(search_dirs)
    path = _tree_file(spec, search_dirs)
    if path is None:
        names = ", ".join(available_presets(search_dirs)) or "none"
        raise TreeError(f"unknown tree preset {str(spec)!r}; available presets: {names}")
    return _named_choices(_read_json(path, "tree file"), f"tree file {path}", path.stem)


# lookup.lookup_name's: +lookup8, +lookup2x8, +lookupauto (adaptive: one chain, its length chosen per step)
_LOOKUP_SUFFIX = re.compile(r"\+lookup(\d+(?:x\d+)?|auto\d*)$")


def split_lookup(spec: str) -> tuple[str, str | None]:
    """("chain0", "3") for "chain0+lookup3" ("auto12" for "chain0+lookupauto12"), (spec, None) without a
    lookup suffix."""
    suffix = _LOOKUP_SUFFIX.search(spec)
    return (spec, None) if suffix is None else (spec[: suffix.start()], suffix.group(1))


def resolve_tree(
    spec: str | os.PathLike[str],
    *,
    served: Mapping[str, Any] | None = None,
    search_dirs: Iterable[str | os.PathLike[str]] = (),
    num_heads: int | None = None,
    topk: int | None = None,
    lookup: Any = None,
) -> tuple[str, TreeBuffers]:
    """The one way a tree spec becomes ``(name, buffers)``: for artifacts, the exporter and the CLI.

    ``spec``, tried in this order: a name in ``served`` (name -> choices: an artifact's trees); inline JSON
    (a list of paths, or ``{"name": ..., "choices": ...}``); a JSON file, or a preset in ``search_dirs``
    (see load_choices). A ``+lookupL`` / ``+lookupKxL`` suffix, and ``lookup``, add prompt-lookup chains
    (lookup.add_lookup). The heads part must fit ``num_heads`` heads and top-``topk`` (when given).
    """
    from .lookup import add_lookup  # lookup.py builds on this module

    served, search_dirs, text = served or {}, list(search_dirs), os.fspath(spec)
    suffix = None if text in served else _LOOKUP_SUFFIX.search(text)
    if suffix:
        text = text[: suffix.start()]
    if text in served:
        name, choices = text, served[text]
    elif text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TreeError(f"inline tree {_short(text)} is not valid JSON: {exc}") from None
        name, choices = _named_choices(data, "inline tree", "inline")
    elif _tree_file(text, search_dirs) is not None:
        name, choices = load_choices(text, search_dirs)
    else:
        known = ", ".join([*served, *available_presets(search_dirs)]) or "none"
        raise TreeError(
            f"unknown tree {text!r}: give one of {known}, or a JSON file or inline JSON of choices"
        )
    tree = build_tree(choices)
    if num_heads is not None and tree.depth > num_heads:
        raise TreeError(f"tree {name!r} needs {tree.depth} Medusa heads, {num_heads} available")
    if topk is not None and tree.topk > topk:
        raise TreeError(f"tree {name!r} needs top-{tree.topk} per head, top-{topk} available")
    if suffix:
        name, tree = add_lookup(name, tree, suffix.group(1))
    return add_lookup(name, tree, lookup)


def _check_accuracy(rank_accuracy: Any) -> list[list[float]]:
    """Validate per-head, per-rank accuracies: a non-empty list of non-empty lists of numbers in [0, 1]."""
    if not isinstance(rank_accuracy, (list, tuple, np.ndarray)) or len(rank_accuracy) == 0:
        raise TreeError("rank_accuracy must be a non-empty list (one list of rank accuracies per head)")
    rows: list[list[float]] = []
    for head, row in enumerate(rank_accuracy):
        if not isinstance(row, (list, tuple, np.ndarray)) or len(row) == 0:
            raise TreeError(f"rank_accuracy[{head}] must be a non-empty list of numbers")
        for rank, value in enumerate(row):
            ok = isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
            if not ok or not 0.0 <= float(value) <= 1.0:
                raise TreeError(f"rank_accuracy[{head}][{rank}] = {value!r} is not a probability in [0, 1]")
        rows.append([float(v) for v in row])
    return rows


def load_rank_accuracy(path: str | os.PathLike[str]) -> list[list[float]]:
    """Read ``{"rank_accuracy": [[p_head0_rank0, ...], ...]}`` from a JSON file."""
    data = _read_json(Path(path), "rank-accuracy file")
    if not isinstance(data, dict) or "rank_accuracy" not in data:
        raise TreeError(f"rank-accuracy file {path} must be a JSON object with a 'rank_accuracy' key")
    try:
        return _check_accuracy(data["rank_accuracy"])
    except TreeError as exc:
        raise TreeError(f"rank-accuracy file {path}: {exc}") from None


def _path_value(path: Sequence[int], accuracy: list[list[float]]) -> float:
    return math.prod(accuracy[d][r] for d, r in enumerate(path))


def expected_accept_length(choices: Any, rank_accuracy: Any) -> float:
    """Expected tokens accepted per step: 1 + sum over nodes of the product of their ranks' accuracies."""
    accuracy = _check_accuracy(rank_accuracy)
    paths = validate_choices(choices, num_heads=len(accuracy))
    for path in paths:
        if any(r >= len(accuracy[d]) for d, r in enumerate(path)):
            raise TreeError(f"medusa choice {_fmt(path)} uses a rank with no accuracy in rank_accuracy")
    return 1.0 + math.fsum(_path_value(p, accuracy) for p in paths)


def tree_from_accuracy(rank_accuracy: Any, num_nodes: int) -> list[list[int]]:
    """The Medusa paper's greedy sparse tree with ``num_nodes`` nodes (root included).

    ``rank_accuracy[k][r]`` is the probability that head k's rank-r token is correct (not cumulative).
    Repeatedly adds the child of an existing node with the highest path value (product of accuracies);
    ties go to the shallower, then lexicographically smaller path. Paths are returned in the order added.
    """
    accuracy = _check_accuracy(rank_accuracy)
    max_nodes = 1 + sum(math.prod(len(row) for row in accuracy[: d + 1]) for d in range(len(accuracy)))
    if not _is_int(num_nodes) or not 1 <= num_nodes <= max_nodes:
        raise TreeError(f"num_nodes must be an integer from 1 to {max_nodes} for these heads: {num_nodes!r}")

    heap: list[tuple[float, int, TreePath]] = []

    def push_children(path: TreePath, value: float) -> None:
        if len(path) < len(accuracy):
            for rank, acc in enumerate(accuracy[len(path)]):
                child = (*path, rank)
                heapq.heappush(heap, (-(value * acc), len(child), child))

    push_children((), 1.0)
    chosen: list[list[int]] = []
    while len(chosen) < num_nodes - 1:
        neg_value, _, path = heapq.heappop(heap)
        chosen.append(list(path))
        push_children(path, -neg_value)
    return chosen
