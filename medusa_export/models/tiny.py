"""Seeded random tiny models (2 layers) for tests, with a real byte-level tokenizer.

Each is a genuine Hugging Face model of its architecture family, so the exporter, the reference
decoder and the oracle (transformers itself) all see the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 320  # 256 bytes + <pad> <bos> <eos>, rounded up
SPECIALS = ("<pad>", "<bos>", "<eos>")
PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"  # tiny-*.json: model type + config
TINY = tuple(sorted(p.stem for p in PRESETS.glob("tiny-*.json")))


def tiny_preset(name: str) -> dict:
    return json.loads((PRESETS / f"{name}.json").read_text())


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, plus BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.add_tokens([f"<u{i}>" for i in range(len(vocab), VOCAB_SIZE)])  # every model id decodes
    return tok


def make_tiny(name: str, seed: int = 0):
    """Returns (hf_model, tokenizers.Tokenizer) for a tiny built-in model, deterministic per seed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    preset = tiny_preset(name)
    config = AutoConfig.for_model(preset["model_type"], **preset["config"])
    torch.manual_seed(seed + preset["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # larger-than-default weights give peaked, prompt-dependent predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, preset["init_std"])
    return model.eval(), byte_tokenizer()
