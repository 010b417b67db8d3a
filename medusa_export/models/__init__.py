"""Base models: where weights come from (source.py) and one explicit forward per architecture family."""

from __future__ import annotations

from medusa_runtime.errors import MedusaError

from .source import BaseModel, load_base  # noqa: F401


def explicit_model(base: BaseModel):
    """The export-oriented forward for this model's architecture family (weights shared with `base.hf`)."""
    from . import gemma3, llama

    family = base.config.model_type
    for module, cls in ((llama, llama.Llama), (gemma3, gemma3.Gemma3)):
        if family in module.FAMILIES:
            return cls(base.hf).eval()
    raise MedusaError(f"unsupported architecture {family!r}: supported are llama, qwen2, gemma3_text")
