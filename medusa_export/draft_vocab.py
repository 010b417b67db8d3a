"""Draft vocabulary: the most frequent token ids of the heads' training text, stored next to the heads.

For a 262k vocabulary the heads' projection dominates a verify step on CPU; restricting the heads (not
the base model) to the N most frequent tokens cuts it by V/N while verification stays exact.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from medusa_runtime.errors import MedusaError

from .fsutil import atomic_file

FILE = "draft_vocab.json"


def write_draft_vocab(folder: Path, sequences: Iterable[list[int]], keep: int = 65536) -> list[int]:
    """Count token ids over `sequences`; write the `keep` most frequent (ties by id) to folder/draft_vocab.json.
    Returns those ids, most frequent first."""
    counts = Counter()
    for seq in sequences:
        counts.update(seq)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]
    path = Path(folder) / FILE
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"ids": [i for i, _ in ranked], "counts": [c for _, c in ranked]}))
    return [i for i, _ in ranked]


def draft_ids(heads_spec: str, size: int, vocab_size: int):
    """The first `size` ids of the heads' draft vocabulary as an int64 tensor, or None for the full vocabulary.
    `size` 0 takes the size the heads were trained on (recorded in their config.json), if any."""
    import torch

    from .heads import CONFIG_FILE, _read_config, heads_path

    folder = Path(heads_path(heads_spec))
    size = size or int(_read_config(folder / CONFIG_FILE).get("draft_vocab", 0))
    if not size or size >= vocab_size:
        return None
    path = folder / FILE
    if not path.is_file():
        raise MedusaError(
            f"--draft-vocab needs {FILE} next to the heads (written by `medusa-export train`); {path} is missing"
        )
    ids = json.loads(path.read_text())["ids"]
    if len(ids) < size:
        raise MedusaError(f"{path} ranks {len(ids)} tokens, fewer than --draft-vocab {size}")
    if max(ids[:size]) >= vocab_size:
        raise MedusaError(f"{path} holds ids beyond the model's vocabulary of {vocab_size}")
    return torch.tensor(ids[:size], dtype=torch.int64)
