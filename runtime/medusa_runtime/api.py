"""The Python API: `MedusaRuntime.open(folder).stream(prompt)` yields text as tokens are accepted;
`.generate(prompt)` returns the whole result with its statistics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .acceptance import Greedy, Typical
from .artifact import Artifact
from .backends import open_backend
from .decode import Drafter, Step, decode
from .errors import MedusaError
from .tree import TreeBuffers, build_tree


def _pending(text: str, stop) -> int:
    """How many trailing characters may still change: a partial UTF-8 sequence or a stop string's prefix."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    steps: list[Step] = field(repr=False)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens per verify step (the prefill step excluded), as the Medusa paper reports it."""
        verify = self.steps[1:]
        return sum(len(s.tokens) for s in verify) / len(verify) if verify else 0.0


class MedusaRuntime:
    """A backend + tokenizer + tree: text in, text out. `MedusaRuntime.open(folder)` for an artifact."""

    def __init__(
        self,
        backend,
        tokenizer,
        tree: TreeBuffers,
        eos_ids,
        window: int | None,
        acceptance: Greedy | Typical = Greedy(),
        tree_name: str = "",
        artifact: Artifact | None = None,
    ):
        self.backend, self.tokenizer, self.tree, self.window = backend, tokenizer, tree, window
        self.artifact = artifact
        self.eos = set(eos_ids)
        self.acceptance, self.tree_name = acceptance, tree_name

    @classmethod
    def open(
        cls,
        folder: str | Path,
        backend: str = "ort-cpu",
        tree: str | None = None,
        medusa: bool = True,
        acceptance: Greedy | Typical = Greedy(),
        **backend_options,
    ) -> MedusaRuntime:
        """Load an artifact folder (exported by `medusa-export onnx`) on one of the runtime backends."""
        from tokenizers import Tokenizer

        artifact = Artifact.load(folder)
        tree_name, buffers = artifact.tree(tree) if medusa else ("plain", build_tree([]))
        impl = open_backend(backend, artifact, max_nodes=buffers.num_nodes, **backend_options)
        tokenizer = Tokenizer.from_file(str(artifact.path("tokenizer")))
        return cls(
            impl,
            tokenizer,
            buffers,
            artifact.eos_token_ids,
            artifact.model["sliding_window"],
            acceptance,
            tree_name,
            artifact,
        )

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt).ids

    def steps(
        self, prompt_ids: list[int], max_new_tokens: int, drafter: Drafter | None = None
    ) -> Iterator[Step]:
        """Decoding steps, cut at EOS (kept) and at max_new_tokens."""
        self._check_capacity(len(prompt_ids), max_new_tokens)
        left = max_new_tokens
        for step in decode(self.backend, prompt_ids, self.tree, self.window, self.acceptance, drafter):
            tokens = step.tokens[:left]
            for i, t in enumerate(tokens):
                if t in self.eos:
                    tokens = tokens[: i + 1]
                    break
            left -= len(tokens)
            yield Step(tokens, step.path)
            if left <= 0 or (tokens and tokens[-1] in self.eos):
                return

    def stream(self, prompt: str, max_new_tokens: int = 128, stop: list[str] | tuple = ()) -> Iterator[str]:
        """Yields text as tokens are accepted; stops at EOS, max_new_tokens or a stop string (not yielded)."""
        ids: list[int] = []
        sent = text = ""
        self.last_stats = (0, 0)  # (tokens, steps) of the latest stream, for callers that report speed
        for step in self.steps(self.encode(prompt), max_new_tokens):
            ids += step.tokens
            self.last_stats = (len(ids), self.last_stats[1] + 1)
            text = self.tokenizer.decode(ids)
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                if cut > len(sent):
                    yield text[len(sent) : cut]
                return
            safe = len(text) - _pending(text, stop)  # hold back a partial UTF-8 sequence or stop string
            if safe > len(sent):
                yield text[len(sent) : safe]
                sent = text[:safe]
        if len(text) > len(sent):  # what was held back, now that nothing follows
            yield text[len(sent) :]

    def generate(
        self, prompt: str | list[int], max_new_tokens: int = 128, drafter: Drafter | None = None
    ) -> Result:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        start = time.perf_counter()
        steps = list(self.steps(ids, max_new_tokens, drafter))
        seconds = time.perf_counter() - start
        tokens = [t for s in steps for t in s.tokens]
        return Result(self.tokenizer.decode(tokens), tokens, len(ids), steps, seconds)

    def _check_capacity(self, prompt_len: int, max_new_tokens: int) -> None:
        cap = self.backend.capacity
        if prompt_len == 0:
            raise MedusaError("empty prompt")
        if prompt_len > cap:
            raise MedusaError(f"prompt of {prompt_len} tokens is longer than max_seq {cap}")
        need = prompt_len + max_new_tokens + self.tree.num_nodes
        if need > cap:
            raise MedusaError(
                f"max-new-tokens {max_new_tokens} is beyond capacity: prompt {prompt_len} + {max_new_tokens} "
                f"+ tree {self.tree.num_nodes} > max_seq {cap} (re-export with a larger --max-seq)"
            )
