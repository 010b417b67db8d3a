"""The PyTorch backend: the same exported computation (MedusaGraph) run eagerly in torch, behind the
runtime's Backend interface, so `generate --backend torch` drives the very loop the runtimes use."""

from __future__ import annotations

import numpy as np
import torch

from medusa_runtime.backends.base import Backend, StepOutput
from medusa_runtime.errors import MedusaError

from .graph import MedusaGraph


class TorchBackend(Backend):
    def __init__(self, graph: MedusaGraph, capacity: int, device: str = "cpu"):
        cfg = graph.decoder.cfg
        dtype = graph.decoder.lm_head_weight().dtype
        self.graph, self.cfg, self.capacity, self.device = graph, cfg, capacity, device
        shape = (1, capacity, cfg.num_kv_heads, cfg.head_dim)
        self.cache = [
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)] for _ in range(cfg.num_layers)
        ]
        self.new_kv: list = []
        self.last_logits = None

    @torch.no_grad()
    def forward(self, input_ids, positions, masks, rows, keep_all):
        t = len(input_ids)
        if self.length + t > self.capacity:
            raise MedusaError(f"KV cache full: {self.length} + {t} tokens exceed capacity {self.capacity}")
        dev = self.device
        args = [
            torch.from_numpy(np.asarray(input_ids))[None].to(dev),
            torch.from_numpy(np.asarray(positions))[None].to(dev),
            torch.from_numpy(masks[0]).to(dev),
        ]
        if self.cfg.has_sliding:
            args.append(torch.from_numpy(masks[1]).to(dev))
        args.append(torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(dev))
        args += [kv[:, : self.length] for layer in self.cache for kv in layer]
        logits, _, next_tokens, medusa_topk, *new = self.graph(*args)
        self.new_kv = [(new[2 * i], new[2 * i + 1]) for i in range(self.cfg.num_layers)]
        self.last_logits = logits
        if keep_all:
            self.commit(np.arange(t))
        return StepOutput(next_tokens[0].cpu().numpy(), medusa_topk[:, 0].cpu().numpy())

    def commit(self, rows):
        idx = torch.tensor(np.asarray(rows), device=self.device)
        n = len(idx)
        for layer, new in zip(self.cache, self.new_kv):
            for buf, src in zip(layer, new):
                buf[:, self.length : self.length + n] = src.index_select(1, idx)
        self.length += n

    def logits(self):
        return self.last_logits[0].float().cpu().numpy()
