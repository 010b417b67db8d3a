"""The PyTorch side: Hugging Face greedy decoding as the oracle every runtime is compared with, the
PyTorch Medusa decoder (TorchBackend under the runtime's loop), and the oracle drafter for tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medusa_runtime.acceptance import Greedy
from medusa_runtime.api import MedusaRuntime
from medusa_runtime.tree import build_tree, load_choices

from .onnx_export import TREE_DIR


@dataclass
class Reference:
    tokens: list[int]
    margins: list[float]  # top-1 minus top-2 logit at each generated position
    tops: list[float]  # the top-1 logit at each generated position


def hf_greedy(base, prompt_ids: list[int], max_new_tokens: int, scores: bool = True) -> Reference:
    """transformers' own `generate` (greedy, eager attention, its own cache): the oracle."""
    import torch

    device = base.hf.device
    with torch.no_grad():
        out = base.hf.generate(
            torch.tensor([prompt_ids], device=device),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=base.eos_token_ids or None,
            pad_token_id=base.config.pad_token_id if base.config.pad_token_id is not None else 0,
            output_logits=scores,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    if not scores:
        return Reference(tokens, [], [])
    top2 = [torch.topk(step[0].float(), 2).values.tolist() for step in out.logits]
    return Reference(tokens, [a - b for a, b in top2], [a for a, _ in top2])


def torch_runtime(
    base, heads, tree: str | None = "tree8", max_seq: int = 2048, acceptance=Greedy(), device: str = "cpu"
) -> MedusaRuntime:
    """The PyTorch Medusa decoder: explicit forward + heads, run eagerly, driven by the runtime's loop."""
    from .graph import MedusaGraph
    from .models import explicit_model
    from .torch_backend import TorchBackend

    decoder = explicit_model(base).to(device)
    name, choices = load_choices(tree, [TREE_DIR]) if tree else ("plain", [])
    buffers = build_tree(choices, num_heads=heads.num_heads)
    graph = MedusaGraph(decoder, heads.to(device).eval(), max(1, buffers.topk)).eval()
    backend = TorchBackend(graph, max_seq, device)
    return MedusaRuntime(
        backend, base.tokenizer, buffers, base.eos_token_ids, decoder.cfg.sliding_window, acceptance, name
    )


class OracleDrafter:
    """Drafts from a known future: head k proposes the true token k+2 ahead of the context at a rank drawn
    from a seeded schedule (rank 0 most often, sometimes rank 1 or 2, sometimes not at all), with distinct
    wrong tokens in the other slots. Greedy acceptance must still give exactly the base greedy output."""

    def __init__(
        self,
        prompt_len: int,
        future: list[int],
        vocab: int,
        seed: int = 0,
        rank_probs=(0.6, 0.15, 0.05),
        topk: int | None = None,
    ):
        self.prompt_len, self.future, self.vocab, self.seed = prompt_len, future, vocab, seed
        self.rank_probs, self.topk = rank_probs, topk

    def __call__(self, context: list[int], heads_topk: np.ndarray) -> np.ndarray:
        k_heads, topk = heads_topk.shape
        done = len(context) - self.prompt_len  # generated tokens so far; the root is future[done - 1]
        rng = np.random.default_rng([self.seed, done])
        draft = np.empty((k_heads, topk), dtype=np.int64)
        for k in range(k_heads):
            pos = done + k
            truth = self.future[pos] if pos < len(self.future) else -1
            wrong = rng.choice(self.vocab - 1, size=topk, replace=False)
            wrong = np.where(wrong >= truth, wrong + 1, wrong) if truth >= 0 else wrong  # never the truth
            draft[k] = wrong
            r = rng.choice(len(self.rank_probs) + 1, p=[*self.rank_probs, 1 - sum(self.rank_probs)])
            if truth >= 0 and r < min(len(self.rank_probs), topk):
                draft[k, r] = truth
        return draft
