"""The Python API: `MedusaRuntime.open(folder).stream(prompt)` yields text as tokens are accepted;
`.generate(prompt)` returns the whole result with its statistics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .acceptance import Greedy, Typical
from .artifact import Artifact, release_heap
from .backends import FUSED_BACKENDS, open_backend
from .decode import Drafter, Step, decode
from .errors import MedusaError
from .lookup import LookupSpec, add_lookup
from .tree import TreeBuffers, build_tree


def _pending(text: str, stop) -> int:
    """How many trailing characters may still change: a partial UTF-8 sequence (decoded as U+FFFD), and
    before it any start of a stop string (the partial character may complete it)."""
    whole = text.rstrip("\ufffd")
    partial = len(text) - len(whole)
    held = max((n for s in stop for n in range(1, len(s)) if whole.endswith(s[:n])), default=0)
    return partial + held


class IncrementalText:
    """The text of a growing list of token ids, released so that nothing sent ever changes: a partial UTF-8
    sequence and any start of a stop string are held back; a stop string ends the text (not included)."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = self.sent = ""

    def add(self, tokens: list[int]) -> tuple[str, bool]:
        """(newly releasable text, whether a stop string was reached)."""
        self.ids += tokens
        text = self.text = self.tokenizer.decode(self.ids)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        end, stopped = (cut, True) if cut >= 0 else (len(text) - _pending(text, self.stop), False)
        piece = text[len(self.sent) : end] if end > len(self.sent) else ""
        self.sent += piece
        return piece, stopped

    def flush(self) -> str:
        """What was held back, once nothing follows (never call it after a stop)."""
        piece, self.sent = self.text[len(self.sent) :], self.text
        return piece


class TextStream:
    """An iterator of text pieces (see MedusaRuntime.stream) that counts what it decoded so far."""

    def __init__(self, pieces: Iterator[str], stats: dict):
        self._pieces, self._stats = pieces, stats

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop decoding now (frees the runtime for the next call)."""
        self._pieces.close()

    @property
    def num_tokens(self) -> int:
        return self._stats["tokens"]

    @property
    def num_steps(self) -> int:
        return self._stats["steps"]

    @property
    def mean_accepted(self) -> float:
        """Tokens per verify step (the prefill step excluded)."""
        steps = self.num_steps - 1
        return (self.num_tokens - 1) / steps if steps > 0 else 0.0

    @property
    def first_token_s(self) -> float | None:
        """Seconds from the first `next()` to the first token decoded (the prompt's prefill); None before."""
        return self._stats.get("first_token_s")


def decode_tokens_per_s(tokens: int, seconds: float, first_token_s: float) -> float:
    """Tokens after the first over the time after it: the decode loop's speed, without the prefill (0 when
    there is none)."""
    after = seconds - first_token_s
    return (tokens - 1) / after if after > 0 and tokens > 1 else 0.0


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    steps: list[Step] = field(repr=False)
    seconds: float
    first_token_s: float = 0.0  # the prompt's prefill and the first token, within `seconds`

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens over the whole call, the prefill included."""
        return len(self.token_ids) / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return decode_tokens_per_s(len(self.token_ids), self.seconds, self.first_token_s)

    @property
    def mean_accepted(self) -> float:
        """Tokens per verify step (the prefill step excluded), as the Medusa paper reports it."""
        verify = self.steps[1:]
        return sum(len(s.tokens) for s in verify) / len(verify) if verify else 0.0


class MedusaRuntime:
    """A backend + tokenizer + tree: text in, text out. `MedusaRuntime.open(folder)` for an artifact.

    Thread safety: a runtime owns one KV cache, so it decodes one request at a time. Calls from several
    threads are safe: each generation holds the runtime's lock from its first step to its last (a
    stream until it is exhausted or closed), and the others wait. A thread that starts a generation while
    its own stream is still open gets a MedusaError (it would wait for itself forever). For requests in
    parallel, open one runtime per worker (the `serve` command keeps such a pool).

    `acceptance` and `seed` may be given per call (`steps`, `generate`, `stream`); without them the runtime's
    `acceptance` and seed 0 (typical acceptance then repeats its samples; `seed=None` draws fresh ones).
    """

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
        heads_fill: bool = False,
    ):
        self.backend, self.tokenizer, self.tree, self.window = backend, tokenizer, tree, window
        self.artifact = artifact
        # unmatched lookup chains of a tree without heads nodes take the heads' guesses (decode.heads_fill)
        self.heads_fill = heads_fill
        self.eos = set(eos_ids)
        self.acceptance, self.tree_name = acceptance, tree_name
        self.vocab_size = artifact.model["vocab_size"] if artifact else tokenizer.get_vocab_size()
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread decoding now

    @classmethod
    def open(
        cls,
        folder: str | Path,
        backend: str = "ort-cpu",
        tree: str | None = None,
        medusa: bool = True,
        acceptance: Greedy | Typical = Greedy(),
        lookup: LookupSpec = None,
        **backend_options,
    ) -> MedusaRuntime:
        """Load an artifact folder (exported by `medusa-export onnx`) on one of the runtime backends.
        `lookup` adds prompt-lookup chains to the tree: L (one chain of L tokens), "KxL", or "auto[L]" (one
        chain verified up to a length chosen each step, adaptive.py); see lookup.py."""
        from tokenizers import Tokenizer

        artifact = Artifact.load(folder)
        if medusa:
            tree_name, buffers = artifact.tree(tree, backend, lookup=lookup)
        else:
            tree_name, buffers = add_lookup("plain", build_tree([]), lookup)
        try:  # before the backend: parsing a large tokenizer.json leaves freed heap that release_heap returns
            tokenizer = Tokenizer.from_file(str(artifact.path("tokenizer")))
        except Exception as exc:  # tokenizers raises its own Exception types
            raise MedusaError(
                f"{artifact.path('tokenizer')} is not a tokenizer: {str(exc).splitlines()[0][:120]}"
            ) from None
        release_heap()
        if backend in FUSED_BACKENDS and buffers.adaptive:
            raise MedusaError(
                f"{tree_name} verifies a length chosen each step, which {backend}'s fixed step graph cannot: "
                "use ort-cpu or ort-cuda, or a fixed chain (e.g. chain0+lookup12)"
            )
        impl = open_backend(backend, artifact, max_nodes=buffers.num_nodes, **backend_options)
        release_heap()
        return cls(
            impl,
            tokenizer,
            buffers,
            artifact.eos_token_ids,
            artifact.model["sliding_window"],
            acceptance,
            tree_name,
            artifact,
            heads_fill=medusa,
        )

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt, or a list of token ids checked against the vocabulary."""
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise MedusaError("prompt is not valid Unicode text (it holds a lone surrogate)") from None
            return self.tokenizer.encode(prompt).ids
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and prompt.dtype.kind in "iu":
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise MedusaError(f"prompt must be text or a list of token ids, not {type(prompt).__name__}")
        bad = [t for t in prompt if type(t) is not int or not 0 <= t < self.vocab_size]
        if bad:
            raise MedusaError(f"prompt token {bad[0]!r} is not a token id in [0, {self.vocab_size})")
        return list(prompt)

    def steps(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        drafter: Drafter | None = None,
        acceptance: Greedy | Typical | None = None,
        seed: int | None = 0,
    ) -> Iterator[Step]:
        """Decoding steps, cut at EOS (kept) and at max_new_tokens. The request is checked now; the steps hold
        the runtime's lock from the first to the last."""
        self.check_request(len(prompt_ids), max_new_tokens)
        acceptance = self.acceptance if acceptance is None else acceptance
        return self._steps(prompt_ids, max_new_tokens, drafter, acceptance, seed)

    def _steps(self, prompt_ids, max_new_tokens, drafter, acceptance, seed) -> Iterator[Step]:
        if self._holder == threading.get_ident():
            raise MedusaError(
                "this thread is already decoding on this runtime: finish or close that stream first"
            )
        left = int(max_new_tokens)
        with self._lock:
            self._holder = threading.get_ident()
            try:
                for step in self._loop(prompt_ids, drafter, acceptance, seed):
                    tokens = step.tokens[:left]
                    for i, t in enumerate(tokens):
                        if t in self.eos:
                            tokens = tokens[: i + 1]
                            break
                    left -= len(tokens)
                    yield Step(tokens, step.path, step.source)
                    if left <= 0 or (tokens and tokens[-1] in self.eos):
                        return
            finally:
                self._holder = None

    def _loop(self, prompt_ids: list[int], drafter: Drafter | None, acceptance, seed) -> Iterator[Step]:
        """decode.decode, or fused_decode.decode over a fused-step backend (greedy only)."""
        if getattr(self.backend, "fused", False):
            from . import fused_decode

            if not isinstance(acceptance, Greedy):
                raise MedusaError(
                    "fused-step backends accept greedily only: use ort-cuda/ort-cpu for typical"
                )
            return fused_decode.decode(self.backend, prompt_ids, self.tree, self.window, drafter)
        return decode(
            self.backend,
            prompt_ids,
            self.tree,
            self.window,
            acceptance,
            drafter,
            seed=seed,
            heads_fill=self.heads_fill,
        )

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        stop: list[str] | tuple = (),
        acceptance: Greedy | Typical | None = None,
        seed: int | None = 0,
    ) -> TextStream:
        """Text as tokens are accepted; stops at EOS, max_new_tokens or a stop string (not yielded).
        The returned iterator also counts tokens and steps (`num_tokens`, `mean_accepted`)."""
        stop = () if stop is None else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise MedusaError("stop must be a list of strings")
        stats = {"tokens": 0, "steps": 0}
        steps = self.steps(self.encode(prompt), max_new_tokens, acceptance=acceptance, seed=seed)
        return TextStream(self._pieces(steps, stop, stats), stats)

    def _pieces(self, steps: Iterator[Step], stop, stats: dict) -> Iterator[str]:
        text = IncrementalText(self.tokenizer, stop)
        start = time.perf_counter()
        for step in steps:
            if "first_token_s" not in stats:
                stats["first_token_s"] = time.perf_counter() - start
            stats["tokens"], stats["steps"] = stats["tokens"] + len(step.tokens), stats["steps"] + 1
            piece, stopped = text.add(step.tokens)
            if piece:
                yield piece
            if stopped:
                return
        tail = text.flush()
        if tail:
            yield tail

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        drafter: Drafter | None = None,
        acceptance: Greedy | Typical | None = None,
        seed: int | None = 0,
    ) -> Result:
        ids = self.encode(prompt)
        start = time.perf_counter()
        steps, first = [], 0.0
        for step in self.steps(ids, max_new_tokens, drafter, acceptance, seed):
            first = first or time.perf_counter() - start
            steps.append(step)
        seconds = time.perf_counter() - start
        tokens = [t for s in steps for t in s.tokens]
        return Result(self.tokenizer.decode(tokens), tokens, len(ids), steps, seconds, first)

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse (MedusaError) a request this runtime's KV capacity cannot hold."""
        cap = self.backend.capacity
        integer = isinstance(max_new_tokens, (int, np.integer)) and not isinstance(max_new_tokens, bool)
        if not integer or max_new_tokens < 1:
            raise MedusaError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
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
