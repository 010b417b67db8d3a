"""Acceptance of heads + tree, measured on the base model's greedy text without running the draft-verify loop.

Greedy decoding's output depends on the base model alone. So on a prompt's greedy continuation g, the
step at position t (the root token g[t+1] known) accepts the deepest tree path (r_0, ..., r_d) such that at
every depth i the true token g[t+2+i] has rank r_i in head i's draft logits at t. The loop then moves to
t + 1 + accepted, as the runtime does, and cuts the last step at EOS or the token budget.

A sequential (Hydra-style) head i reads a token before its target. As the runtime drafts (graph.py,
`parents="chain"`), that is the top-1 token of head i-1 (head 0: the root), so one top-k per depth serves
the whole tree. `parents="path"` gives each head the true g[t+1+i] instead: what drafting every node from
its own parent's token would accept, the bound for a runtime that did.

The result is the runtime's own steps: `tests/test_gemma.py` checks them step for step against the PyTorch
runtime, Medusa and sequential heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medusa_runtime.errors import MedusaError

from .train_objective import (
    IGNORE,
    MAX_RANK,
    draft_remap,
    head_offsets,
    previous_tokens,
    shifted_targets,
    target_ranks,
    to_draft,
)

if TYPE_CHECKING:
    import torch

    from .heads import MedusaHeads
    from .models.common import ExplicitDecoder


@dataclass
class Simulated:
    category: str
    prompt_tokens: int
    steps: list[int]  # tokens emitted by each verify step (accepted candidates + the base model's token)

    @property
    def mean_accepted(self) -> float:
        """Tokens per verify step, as `Result.mean_accepted` counts them."""
        return sum(self.steps) / len(self.steps) if self.steps else 0.0


def greedy_continuations(
    base, prompts: list[list[int]], max_new_tokens: int, device, batch: int = 1
) -> list[list[int]]:
    """The base model's greedy continuation of each prompt (cut after EOS), `batch` prompts of similar
    length at a time (left-padded; 1: unpadded, as `reference.hf_greedy`)."""
    from .train_data import GenJob, generate_batch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        jobs = [GenJob(i, None, None) for i in rows]
        new = generate_batch(base, [prompts[i] for i in rows], jobs, max_new_tokens, device)
        for i, tokens in zip(rows, new, strict=True):
            out[i] = tokens
    return out


def true_ranks(
    decoder: ExplicitDecoder,
    heads: MedusaHeads,
    prompt: Sequence[int],
    continuation: Sequence[int],
    draft_ids: torch.Tensor | None = None,
    parents: str = "chain",
) -> np.ndarray:
    """[positions, K]: for each step position t = len(prompt) - 1 ... len(seq) - 2, the rank of g[t+2+k] in
    head k's logits at t (over `draft_ids` when given; MAX_RANK outside them and past the text's end).
    `parents`: which token a sequential head reads (module docstring)."""
    import torch

    from .train_data import hidden_states

    if parents not in ("chain", "path"):
        raise ValueError(f"parents must be chain or path, got {parents!r}")
    if not heads.shared_lm_head:
        raise MedusaError(
            "simulate ranks through the base lm_head: heads with their own projections are not supported"
        )
    seq = torch.tensor([[*prompt, *continuation]], device=decoder.lm_head_weight().device)
    n, k, first = seq.shape[1], heads.num_heads, len(prompt) - 1
    if n - 1 - first <= 0:
        return np.zeros((0, k), dtype=np.int64)
    steps = slice(first, n - 1)  # the positions a verify step can start from
    hidden = hidden_states(decoder, seq)[0, steps]  # [P, C]
    whole, start = torch.tensor([n], device=seq.device), torch.zeros(1, dtype=torch.long, device=seq.device)
    targets = shifted_targets(seq, whole, start, head_offsets(k))[:, 0, steps]  # [K, P], IGNORE past the end
    truth = previous_tokens(seq, k)[:, 0, steps]  # [K, P]: the true token before each target
    weight = decoder.lm_head_weight().float()
    if draft_ids is not None:  # rank among the draft vocabulary only, as the exported heads do
        draft_ids = draft_ids.to(seq.device)
        targets, weight = to_draft(targets, draft_remap(draft_ids, weight.shape[0])), weight[draft_ids]
    known = targets != IGNORE
    embed = decoder.embed_weight().float()
    ranks = torch.full(targets.shape, MAX_RANK, dtype=torch.long, device=seq.device)
    prev = truth[0]  # the root
    with torch.no_grad():
        for j in range(k):
            if heads.sequential and parents == "path":
                prev = truth[j]
            state = heads.head_state(j, hidden, embed[prev] if heads.sequential else None)
            ranks[j, known[j]] = target_ranks(state[known[j]], weight, targets[j][known[j]])
            if heads.sequential and parents == "chain":
                top = torch.argmax(state @ weight.T, dim=-1)  # the chain's next token
                prev = top if draft_ids is None else draft_ids[top]
    return ranks.T.cpu().numpy()


def accepted_at(ranks: np.ndarray, choices: Sequence[Sequence[int]]) -> np.ndarray:
    """Per position, the candidates the tree accepts: the deepest path whose ranks are all the true ones."""
    paths = {tuple(p) for p in choices}
    depth = max((len(p) for p in paths), default=0)
    out = np.zeros(len(ranks), dtype=np.int64)
    for i, row in enumerate(ranks):
        d = 0
        while d < depth and tuple(int(r) for r in row[: d + 1]) in paths:
            d += 1
        out[i] = d
    return out


def walk(accepted: np.ndarray, new_tokens: int) -> list[int]:
    """Tokens emitted by each verify step over a continuation of `new_tokens` tokens: the prefill gives the
    first, a step at offset i (i tokens after the prefill's position) emits accepted[i] + 1, cut at the end."""
    steps, i = [], 0
    while i + 1 < new_tokens:
        emitted = min(int(accepted[i]) + 1, new_tokens - 1 - i)
        steps.append(emitted)
        i += emitted
    return steps


def simulate(
    decoder: ExplicitDecoder,
    heads: MedusaHeads,
    choices: Sequence[Sequence[int]],
    prompts: list[list[int]],
    continuations: list[list[int]],
    categories: list[str],
    draft_ids: torch.Tensor | None = None,
    parents: str = "chain",
) -> list[Simulated]:
    """Each prompt's simulated verify steps (see the module docstring)."""
    out = []
    for prompt, new, category in zip(prompts, continuations, categories, strict=True):
        ranks = true_ranks(decoder, heads, prompt, new, draft_ids, parents)
        out.append(Simulated(category, len(prompt), walk(accepted_at(ranks, choices), len(new))))
    return out
