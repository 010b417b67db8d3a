"""The training objective of Medusa heads: the k+2 target convention and a memory-bounded cross-entropy.

At position t the final-normed hidden state h_t has read tokens[0..t]; the base model predicts tokens[t+1],
head k (0-indexed) predicts tokens[t+2+k]. The vocabulary projection and its cross-entropy run in chunks
of rows with the gradient computed on the fly, so memory stays bounded with a 262k vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE = -100
MAX_RANK = 10  # columns of rank_accuracy


# --------------------------------------------------------------------------------------------- targets


def shifted_targets(
    tokens: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, offsets: Sequence[int]
) -> torch.Tensor:
    """Targets [len(offsets), B, T]: row j at position t is tokens[t + offsets[j]], or IGNORE where that
    index is past the sequence's length or before its first target `starts`.

    With offsets (1,) this is the base model's next token; with (2, 3, ..., K+1) the K Medusa heads'.
    """
    import torch

    b, t = tokens.shape
    out = torch.full((len(offsets), b, t), IGNORE, dtype=torch.long, device=tokens.device)
    index = torch.arange(t, device=tokens.device)
    for j, offset in enumerate(offsets):
        if offset >= t:
            continue
        source = index[offset:]  # target indices for positions 0 .. t-offset-1
        valid = (source[None] < lengths[:, None]) & (source[None] >= starts[:, None])
        out[j, :, : t - offset] = torch.where(valid, tokens[:, offset:], IGNORE)
    return out


def previous_tokens(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[K, B, T]: row k at position t is tokens[t + 1 + k], the token just before head k's target (what a
    sequential head reads), or 0 past the end, where head k has no target either."""
    import torch

    b, t = tokens.shape
    whole = torch.full((b,), t, device=tokens.device)
    offsets = [k + 1 for k in range(num_heads)]
    return shifted_targets(tokens, whole, torch.zeros_like(whole), offsets).clamp(min=0)


def draft_remap(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V]: full token id -> its index in the draft vocabulary `ids`, IGNORE outside it."""
    import torch

    remap = torch.full((vocab_size,), IGNORE, dtype=torch.long, device=ids.device)
    remap[ids] = torch.arange(len(ids), device=ids.device)
    return remap


def to_draft(targets: torch.Tensor, remap: torch.Tensor) -> torch.Tensor:
    """Targets as draft-vocabulary indices (`draft_remap`): IGNORE where absent or already IGNORE."""
    import torch

    return torch.where(targets != IGNORE, remap[targets.clamp(min=0)], IGNORE)


def head_offsets(num_heads: int) -> list[int]:
    """Head k predicts the token k + 2 positions after the one its hidden state has just read."""
    return [k + 2 for k in range(num_heads)]


# ------------------------------------------------------------------------------ chunked cross-entropy


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk of [rows, vocab] float32 logits: about 2 GiB on CUDA, 64 MiB on CPU."""
    budget = 2**29 if device.type == "cuda" else 2**24
    return max(1, budget // vocab)


@functools.cache
def _linear_ce():
    """The autograd Function behind `linear_cross_entropy` (made on first use: torch imports lazily)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, states, weight, targets, row_weights, softcap, compute_dtype):
            loss, grad_states, grad_weight = _ce_forward(
                states, weight, targets, row_weights, softcap, compute_dtype, weight.requires_grad
            )
            ctx.save_for_backward(grad_states, grad_weight)
            return loss

        @staticmethod
        def backward(ctx, grad_out):
            grad_states, grad_weight = ctx.saved_tensors
            grad_weight = None if grad_weight is None else grad_weight * grad_out
            return grad_states * grad_out, grad_weight, None, None, None, None

    return LinearCrossEntropy


def linear_cross_entropy(
    states: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    softcap: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """sum_i row_weights[i] * CE(softcap(states[i] @ weight.T), targets[i]), chunk by chunk.

    Never holds more than one chunk of [rows, V] logits: the gradients w.r.t. the states (and the weight,
    when it requires grad) are computed in the forward pass and only scaled in backward. The matmuls run
    in `compute_dtype` (default: the weight's), the softmax in float32.
    """
    return _linear_ce().apply(states, weight, targets, row_weights, softcap, compute_dtype or weight.dtype)


def _ce_forward(states, weight, targets, row_weights, softcap, compute_dtype, weight_grad: bool):
    """Loss and gradients, one chunk of rows at a time: logits in `compute_dtype`, softmax in float32,
    the row weights folded into the gradient matmuls (few full passes over the [rows, V] chunk)."""
    import torch

    chunk = _chunk_rows(weight.shape[0], states.device)
    w = weight.detach().to(compute_dtype)
    loss = torch.zeros((), dtype=torch.float32, device=states.device)
    grad_states = torch.empty_like(states, dtype=torch.float32)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=w.device) if weight_grad else None
    for i in range(0, states.shape[0], chunk):
        x = states[i : i + chunk].detach().to(compute_dtype)
        y, rw = targets[i : i + chunk], row_weights[i : i + chunk, None]
        rows = torch.arange(len(y), device=y.device)
        z = x @ w.t()  # [r, V]
        if softcap:
            tanh = torch.tanh(z.float() / softcap)
            z = tanh * softcap
        grad = torch.softmax(z, dim=-1, dtype=torch.float32)  # becomes d loss / d z
        loss -= (torch.log(grad[rows, y].clamp_min(1e-38)) * rw[:, 0]).sum()
        grad[rows, y] -= 1.0
        if softcap:
            grad.mul_(1.0 - tanh * tanh)
        grad = grad.to(compute_dtype)
        grad_states[i : i + chunk] = (grad @ w).float() * rw
        if grad_weight is not None:
            grad_weight += (grad.t() @ (x * rw.to(compute_dtype))).float()
    return loss, grad_states, grad_weight


def target_ranks(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each row's target among its logits `states @ weight.T` (0: the top token), chunked."""
    import torch

    chunk = _chunk_rows(weight.shape[0], states.device)
    ranks = []
    with torch.no_grad():
        for i in range(0, states.shape[0], chunk):
            z = (states[i : i + chunk].to(weight.dtype) @ weight.t()).float()
            target = z.gather(1, targets[i : i + chunk, None])
            ranks.append((z > target).sum(-1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=states.device)
