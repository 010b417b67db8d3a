"""The PyTorch side: Hugging Face greedy decoding as the oracle every runtime is compared with, and the
PyTorch Medusa decoder (TorchBackend under the runtime's loop)."""

from __future__ import annotations

from dataclasses import dataclass

from medusa_runtime.acceptance import Greedy
from medusa_runtime.api import MedusaRuntime
from medusa_runtime.backends import GPU_BACKENDS
from medusa_runtime.errors import MedusaError
from medusa_runtime.lookup import add_lookup
from medusa_runtime.tree import build_tree, resolve_tree

from .onnx_export import tree_dirs


@dataclass
class Reference:
    tokens: list[int]
    margins: list[float]  # top-1 minus top-2 logit at each generated position
    tops: list[float]  # the top-1 logit at each generated position


def reference_model(name: str, dtype: str, backend: str):
    """transformers' model for the oracle (or the HF timing), on the GPU where the runtime backend runs."""
    from .models import load_base

    base = load_base(name, dtype)
    if backend in GPU_BACKENDS:
        import torch

        if not torch.cuda.is_available():
            raise MedusaError(f"{backend} is compared with transformers on CUDA, but torch sees no GPU")
        base.hf.to("cuda")
    return base


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
            pad_token_id=base.pad_token_id,
            output_logits=scores,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    if not scores:
        return Reference(tokens, [], [])
    top2 = [torch.topk(step[0].float(), 2).values.tolist() for step in out.logits]
    return Reference(tokens, [a - b for a, b in top2], [a for a, _ in top2])


def torch_runtime(
    base,
    heads,
    tree: str | None = "tree8",
    max_seq: int = 2048,
    acceptance=Greedy(),
    device: str = "cpu",
    draft_ids=None,
    lookup=None,
) -> MedusaRuntime:
    """The PyTorch Medusa decoder: explicit forward + heads (on a draft vocabulary when `draft_ids` is given,
    as the exported graph is), run eagerly, driven by the runtime's loop."""
    from .graph import MedusaGraph
    from .models import explicit_model
    from .torch_backend import TorchBackend

    decoder = explicit_model(base).to(device)
    if tree:
        name, buffers = resolve_tree(tree, search_dirs=tree_dirs(), num_heads=heads.num_heads, lookup=lookup)
    else:
        name, buffers = add_lookup("plain", build_tree([]), lookup)  # plain, or prompt lookup alone
    graph = MedusaGraph(decoder, heads.to(device).eval(), max(1, buffers.topk), draft_ids).to(device).eval()
    backend = TorchBackend(graph, max_seq, device)
    return MedusaRuntime(
        backend,
        base.tokenizer,
        buffers,
        base.eos_token_ids,
        decoder.cfg.sliding_window,
        acceptance,
        name,
        heads_fill=bool(tree),
    )
