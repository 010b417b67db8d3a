"""Additive attention masks for one forward over T new tokens on top of P cached tokens (numpy only).

Cached slot j holds position j (the runtime compacts accepted tokens), so a key's position is its slot
for the past, and `positions` for the new tokens. A query attends to the whole past, and to those new
tokens that `visible` allows (causal for a prompt, ancestors for a tree). Sliding-window layers also
require q_pos - k_pos < window, as transformers does.
"""

from __future__ import annotations

import numpy as np

MASKED = np.finfo(np.float32).min


def causal(t: int) -> np.ndarray:
    return np.tril(np.ones((t, t), dtype=bool))


def step_masks(
    past_len: int, positions: np.ndarray, visible: np.ndarray, sliding_window: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Full-attention and sliding-window masks [1, 1, T, P+T] float32 (0 where allowed)."""
    t = len(positions)
    allowed = np.concatenate((np.ones((t, past_len), dtype=bool), visible.astype(bool)), axis=1)
    full = np.where(allowed, 0.0, MASKED).astype(np.float32)[None, None]
    if sliding_window is None:
        return full, None
    key_pos = np.concatenate((np.arange(past_len), positions))
    near = (positions[:, None] - key_pos[None, :]) < sliding_window
    sliding = np.where(allowed & near, 0.0, MASKED).astype(np.float32)[None, None]
    return full, sliding
