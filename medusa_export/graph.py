"""The exported computation: explicit base forward + Medusa heads + in-graph argmax/top-k.

Input and output order follow medusa_runtime.contract. Base and head projections are one matmul over
the stacked [1 + K, B, R, C] states when the heads share the lm_head. With a draft vocabulary (the N
most frequent token ids), the heads project onto those N rows only and their top-k is mapped back to
full-vocabulary ids in the graph: verification still uses the full vocabulary, so outputs are unchanged.
The heads' top-k over a full vocabulary is taken in stages (`topk_ids`): one top-k over 262k columns runs
as one CUDA block per row in ONNX Runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import MedusaHeads
from .models.common import ExplicitDecoder

TOPK_CHUNK = 256  # ONNX Runtime's CUDA TopK sorts a row of up to 256 in one block (bitonic); longer
# rows get one block each for a multi-pass radix select: ~2 ms for 4 rows of 262,144 on an H200


def _chunk(width: int, k: int, largest: int) -> int | None:
    """The largest power of two <= `largest` that divides `width` into several chunks of >= 2k, if any
    (no padding: ONNX Runtime has no CUDA Pad for the int64 indices, and a CPU node breaks CUDA graphs)."""
    c = largest
    while c >= 2 * k:
        if width % c == 0 and width > c:
            return c
        c //= 2
    return None


def topk_ids(x: torch.Tensor, k: int, chunk: int = TOPK_CHUNK, staged_above: int = 4096) -> torch.Tensor:
    """Indices of the k largest along the last axis, sorted, ties to the lower index (as one TopK).

    Rows longer than `staged_above` go in stages: the top-k of every chunk of columns, then the top-k of
    those, while a chunk size divides the row, then one TopK over what is left. Equal values keep their
    index order through every stage (chunks in column order, each sorted with ties to the lower index), so
    the result is the single TopK's, and each stage spreads over (rows x chunks) blocks instead of one
    block per row.
    """
    index = None  # [..., M]: the column of x that each entry of the current stage came from
    c = _chunk(x.shape[-1], k, chunk) if x.shape[-1] > staged_above else None
    while c is not None:
        top = torch.topk(x.unflatten(-1, (-1, c)), k, dim=-1)  # [..., chunks, k]
        offsets = torch.arange(0, x.shape[-1], c, dtype=torch.int64)[:, None]
        picked = (top.indices + offsets).flatten(-2)  # [..., chunks * k] positions in this stage's x
        index = picked if index is None else torch.gather(index, -1, picked)
        x = top.values.flatten(-2)
        c = _chunk(x.shape[-1], k, chunk)
    best = torch.topk(x, k, dim=-1).indices
    return best if index is None else torch.gather(index, -1, best)


ARGMAX_CHUNK = 128


def argmax_ids(x: torch.Tensor, chunk: int = ARGMAX_CHUNK) -> torch.Tensor:
    """torch.argmax(x, -1) (the first of tied maxima), in two stages when a chunk size divides the row: the
    max of every chunk of `chunk` columns, the first chunk holding the row's max, then the first max within
    that chunk. Same index, bitwise; ONNX Runtime's CPU ArgMax scans a whole row on one thread, and a 13-row
    verify of the 4-bit Gemma 3 270M artifact on 2 cores takes 1.3-1.9 ms less staged (BENCHMARKS.md,
    round 9)."""
    c = _chunk(x.shape[-1], 1, chunk)
    if c is None:
        return torch.argmax(x, dim=-1)
    blocks = x.unflatten(-1, (-1, c))  # [..., chunks, c]
    first = torch.argmax(blocks.amax(dim=-1), dim=-1, keepdim=True)  # [..., 1]: the first chunk with the max
    within = torch.gather(blocks, -2, first[..., None].expand(*first.shape, c)).squeeze(-2)  # [..., c]
    return first.squeeze(-1) * c + torch.argmax(within, dim=-1)


class MedusaGraph(nn.Module):
    def __init__(
        self, decoder: ExplicitDecoder, heads: MedusaHeads, topk: int, draft_ids: torch.Tensor | None = None
    ):
        super().__init__()
        self.decoder, self.heads, self.topk = decoder, heads, topk
        self.register_buffer(
            "draft_ids", None if draft_ids is None else draft_ids.to(torch.int64), persistent=False
        )
        if draft_ids is not None:  # [N] token ids
            if heads.shared_lm_head:
                weight = decoder.lm_head_weight()[draft_ids][None]  # [1, N, C]
            else:
                weight = torch.stack(
                    [h[heads.num_layers].weight[draft_ids] for h in heads.heads]
                )  # [K, N, C]
            self.register_buffer("draft_weight", weight.detach().clone(), persistent=False)

    def forward(self, input_ids, position_ids, attention_mask, *rest):
        cfg = self.decoder.cfg
        sliding_mask = rest[0] if cfg.has_sliding else None
        rest = rest[1:] if cfg.has_sliding else rest
        output_rows, flat_past = rest[0], rest[1:]
        past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(cfg.num_layers)]
        hidden, new_kv = self.decoder(
            input_ids, position_ids, attention_mask, sliding_mask, past, output_rows
        )
        logits, medusa = self.project(hidden)  # [B,R,V], [K,B,R,V or N]
        next_tokens = argmax_ids(logits)  # [B, R]
        medusa_topk = topk_ids(medusa, self.topk)  # [K, B, R, topk]
        if self.draft_ids is not None:
            medusa_topk = self.draft_ids[medusa_topk]  # back to full-vocabulary ids
        return (logits, medusa, next_tokens, medusa_topk, *[t for kv in new_kv for t in kv])

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base logits [B, R, V] and Medusa logits [K, B, R, V] (or [K, B, R, N] on a draft vocabulary), float32."""
        if self.heads.sequential:
            logits = self.decoder.project(hidden).float()
            return logits, self.draft_logits(hidden, argmax_ids(logits))
        states = self.heads.head_states(hidden)  # [K, B, R, C]
        if self.draft_ids is None and self.heads.shared_lm_head:
            both = self.decoder.project(torch.cat((hidden[None], states), dim=0)).float()  # one matmul
            return both[0], both[1:]
        return self.decoder.project(hidden).float(), self._project_heads(states)

    def draft_logits(self, hidden: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        """The heads' logits [K, ..., V or N] (float32) at final-normed rows [..., C] whose next token is `root`
        [...]. Sequential heads draft along the top-1 chain: head 0 reads the root, head k the top-1 token of
        head k-1 at the same row; the runtime's per-depth top-k is then exact for the rank-0 path and a guess
        conditioned on it elsewhere (verification keeps the output exact either way)."""
        if not self.heads.sequential:
            return self._project_heads(self.heads.head_states(hidden))
        embed, prev, out = self.decoder.embed_weight(), root, []
        for k in range(self.heads.num_heads):
            # F.embedding exports as a Gather, which --weights int4 turns into the 8-bit table's gather
            state = self.heads.head_state(k, hidden, F.embedding(prev, embed))
            out.append(self._project_heads(state[None], k)[0])
            top = torch.argmax(out[-1], dim=-1)  # the first of tied maxima, as topk_ids ranks them
            prev = top if self.draft_ids is None else self.draft_ids[top]
        return torch.stack(out)

    def _project_heads(self, states: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Head states [K', ..., C] of heads first .. first + K' - 1 -> their logits [K', ..., V or N], float32."""
        k, shape = states.shape[0], states.shape[:-1]
        if self.draft_ids is not None:
            shared = self.draft_weight.shape[0] == 1
            weight = self.draft_weight if shared else self.draft_weight[first : first + k]
            flat = states.reshape(1 if shared else k, -1, states.shape[-1])  # [K'|1, rows, C]
            return torch.matmul(flat, weight.transpose(1, 2)).reshape(*shape, -1).float()
        if self.heads.shared_lm_head:
            return self.decoder.project(states).float()
        layers = self.heads.num_layers
        return torch.stack([self.heads.heads[first + i][layers](x) for i, x in enumerate(states)]).float()
