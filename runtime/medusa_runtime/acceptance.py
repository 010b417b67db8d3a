"""Choosing the accepted path of a verified tree: greedy (exactly the base model's greedy tokens) or
typical acceptance (Medusa paper, section 2.3.1: accept a candidate whose probability under the base
model exceeds min(posterior_threshold, posterior_alpha * exp(-entropy)))."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import MedusaError
from .tree import TreeBuffers


@dataclass(frozen=True)
class Greedy:
    name = "greedy"

    def accept(self, tree: TreeBuffers, cand: np.ndarray, next_tokens: np.ndarray, logits_fn) -> np.ndarray:
        """Node indices of the longest root-first path whose every token is the base argmax of its parent."""
        paths = tree.retrieve_indices  # [L, depth + 1], -1 padded
        ok = np.zeros(paths.shape, dtype=bool)
        ok[:, 0] = True
        valid = paths[:, 1:] >= 0
        parent_pred = next_tokens[np.maximum(paths[:, :-1], 0)]
        ok[:, 1:] = valid & (cand[np.maximum(paths[:, 1:], 0)] == parent_pred)
        lengths = np.cumprod(ok, axis=1).sum(axis=1)
        best = int(np.argmax(lengths))
        return paths[best, : lengths[best]]

    def next_token(self, node: int, next_tokens: np.ndarray, logits_fn, rng) -> int:
        return int(next_tokens[node])


@dataclass(frozen=True)
class Typical:
    name = "typical"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    temperature: float = 0.7

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise MedusaError(f"temperature {self.temperature}: typical acceptance needs a positive number")
        if not (math.isfinite(self.posterior_threshold) and 0 <= self.posterior_threshold <= 1):
            raise MedusaError(f"posterior threshold {self.posterior_threshold}: must be in [0, 1]")
        if not (math.isfinite(self.posterior_alpha) and self.posterior_alpha >= 0):
            raise MedusaError(f"posterior alpha {self.posterior_alpha}: must be a non-negative number")

    def _probs(self, logits: np.ndarray) -> np.ndarray:
        z = logits / self.temperature
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)

    def accept(self, tree: TreeBuffers, cand: np.ndarray, next_tokens: np.ndarray, logits_fn) -> np.ndarray:
        probs = self._probs(logits_fn())  # [N, V] for every tree node
        entropy = -(probs * np.log(probs + 1e-12)).sum(axis=-1)
        threshold = np.minimum(self.posterior_threshold, self.posterior_alpha * np.exp(-entropy))
        nodes = np.arange(1, tree.num_nodes)
        parents = tree.parents[nodes]
        p = probs[parents, cand[nodes]]
        good = np.concatenate(([True], p > threshold[parents]))
        logp = np.concatenate(([0.0], np.log(p + 1e-12)))
        paths = tree.retrieve_indices
        ok = np.where(paths >= 0, good[np.maximum(paths, 0)], False)
        lengths = np.cumprod(ok, axis=1).sum(axis=1)
        score = np.array([logp[row[:n]].sum() for row, n in zip(paths, lengths)])
        best = max(range(len(paths)), key=lambda i: (lengths[i], score[i]))
        return paths[best, : lengths[best]]

    def next_token(self, node: int, next_tokens: np.ndarray, logits_fn, rng) -> int:
        """Sample from the typical set of the accepted node's distribution (as Medusa does)."""
        probs = self._probs(logits_fn()[node])
        entropy = -(probs * np.log(probs + 1e-12)).sum()
        keep = probs >= min(self.posterior_threshold, self.posterior_alpha * np.exp(-entropy))
        keep[np.argmax(probs)] = True
        probs = np.where(keep, probs, 0.0)
        return int(rng.choice(len(probs), p=probs / probs.sum()))
