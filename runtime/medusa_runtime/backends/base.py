"""The backend interface: a forward over new tokens, and a commit of the rows to keep in the cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class StepOutput:
    next_tokens: np.ndarray  # [R] int64: the base model's argmax at each projected row
    medusa_topk: np.ndarray  # [K, R, topk] int64: each head's top-k at each projected row


class Backend(ABC):
    """Owns the KV cache (`length` tokens of `capacity`) and runs the exported graph on top of it.

    forward() computes T new tokens whose keys/values go straight into the cache when `keep_all`
    (prefill, plain decoding) or into a scratch area otherwise (tree verify), from which commit()
    appends the accepted rows. Only token ids cross to the host; logits() is the exception, for
    typical acceptance and validation.
    """

    length: int = 0
    capacity: int
    prefill_chunk: int = 0  # a prompt goes in pieces of at most this many tokens (0: all at once)

    def reset(self) -> None:
        self.length = 0

    @abstractmethod
    def forward(
        self,
        input_ids: np.ndarray,  # [T] int64
        positions: np.ndarray,  # [T] int64
        masks: tuple[np.ndarray, np.ndarray | None],  # full, sliding: [1, 1, T, length + T] float32
        rows: np.ndarray,  # [R] int64: which of the T positions to project to logits
        keep_all: bool,
    ) -> StepOutput:
        """Run the graph for T tokens on top of the cached `length` tokens."""

    @abstractmethod
    def commit(self, rows: np.ndarray) -> None:
        """Append the last (non keep_all) forward's KV rows `rows` (indices into its T tokens) to the cache."""

    @abstractmethod
    def logits(self) -> np.ndarray:
        """The last forward's base logits [R, V] float32, copied to the host."""

    def draft_confidence(self, row: int) -> np.ndarray | None:
        """Each head's top-1 softmax probability [K] at projected row `row` of the last forward, or None
        where the backend does not tell (the adaptive chain then goes by the context's match alone)."""
        return None
