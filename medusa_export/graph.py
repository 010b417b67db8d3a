"""The exported computation: explicit base forward + Medusa heads + in-graph argmax/top-k.

Input and output order follow medusa_runtime.contract. Base and head projections are one matmul over
the stacked [1 + K, B, R, C] states when the heads share the lm_head. With a draft vocabulary (the N
most frequent token ids), the heads project onto those N rows only and their top-k is mapped back to
full-vocabulary ids in the graph: verification still uses the full vocabulary, so outputs are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import MedusaHeads
from .models.common import ExplicitDecoder


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
        hidden, new_kv = self.decoder(input_ids, position_ids, attention_mask, sliding_mask, past)
        logits, medusa = self.project(hidden.index_select(1, output_rows))  # [B,R,V], [K,B,R,V or N]
        next_tokens = torch.argmax(logits, dim=-1)  # [B, R]
        medusa_topk = torch.topk(medusa, self.topk, dim=-1).indices  # [K, B, R, topk]
        if self.draft_ids is not None:
            medusa_topk = self.draft_ids[medusa_topk]  # back to full-vocabulary ids
        return (logits, medusa, next_tokens, medusa_topk, *[t for kv in new_kv for t in kv])

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base logits [B, R, V] and Medusa logits [K, B, R, V] (or [K, B, R, N] on a draft vocabulary), float32."""
        states = self.heads.head_states(hidden)  # [K, B, R, C]
        if self.draft_ids is not None:
            k, b, r, c = states.shape
            flat = states.reshape(k if self.draft_weight.shape[0] > 1 else 1, -1, c)  # [K|1, K*B*R / ., C]
            medusa = torch.matmul(flat, self.draft_weight.transpose(1, 2)).reshape(k, b, r, -1)
            return self.decoder.project(hidden).float(), medusa.float()
        if self.heads.shared_lm_head:
            both = self.decoder.project(torch.cat((hidden[None], states), dim=0)).float()  # one matmul
            return both[0], both[1:]
        return self.decoder.project(hidden).float(), self.heads.logits(hidden).float()
