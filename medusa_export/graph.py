"""The exported computation: explicit base forward + Medusa heads + in-graph argmax/top-k.

Input and output order follow medusa_runtime.contract. Base and head projections are one matmul over
the stacked [1 + K, B, R, C] states when the heads share the lm_head.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import MedusaHeads
from .models.common import ExplicitDecoder


class MedusaGraph(nn.Module):
    def __init__(self, decoder: ExplicitDecoder, heads: MedusaHeads, topk: int):
        super().__init__()
        self.decoder, self.heads, self.topk = decoder, heads, topk

    def forward(self, input_ids, position_ids, attention_mask, *rest):
        cfg = self.decoder.cfg
        sliding_mask = rest[0] if cfg.has_sliding else None
        rest = rest[1:] if cfg.has_sliding else rest
        output_rows, flat_past = rest[0], rest[1:]
        past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(cfg.num_layers)]
        hidden, new_kv = self.decoder(input_ids, position_ids, attention_mask, sliding_mask, past)
        logits, medusa = self.project(hidden.index_select(1, output_rows))  # [B,R,V], [K,B,R,V]
        next_tokens = torch.argmax(logits, dim=-1)  # [B, R]
        medusa_topk = torch.topk(medusa, self.topk, dim=-1).indices  # [K, B, R, topk]
        return (logits, medusa, next_tokens, medusa_topk, *[t for kv in new_kv for t in kv])

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base logits [B, R, V] and Medusa logits [K, B, R, V], in float32."""
        states = self.heads.head_states(hidden)  # [K, B, R, C]
        if self.heads.shared_lm_head:
            both = self.decoder.project(torch.cat((hidden[None], states), dim=0)).float()  # one matmul
            return both[0], both[1:]
        medusa = self.heads.logits(hidden)
        return self.decoder.project(hidden).float(), medusa.float()
