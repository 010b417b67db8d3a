"""Seeded random tiny models (2 layers) for tests, with a real byte-level tokenizer.

Each is a genuine Hugging Face model of its architecture family, so the exporter, the reference
decoder and the oracle (transformers itself) all see the same weights.
"""

from __future__ import annotations

VOCAB_SIZE = 320  # 256 bytes + <pad> <bos> <eos>, rounded up
SPECIALS = ("<pad>", "<bos>", "<eos>")

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_CONFIGS = {
    "tiny-llama": ("llama", dict(_COMMON, rope_theta=10000.0, tie_word_embeddings=False)),
    "tiny-qwen2": ("qwen2", dict(_COMMON, rope_theta=10000.0, tie_word_embeddings=True)),
    "tiny-gemma3": (
        "gemma3_text",
        dict(
            _COMMON,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            rope_theta=1_000_000.0,
            rope_local_base_freq=10000.0,
            tie_word_embeddings=True,
        ),
    ),
}


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

    model_type, kwargs = TINY_CONFIGS[name]
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # larger-than-default weights give peaked, prompt-dependent predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model.eval(), byte_tokenizer()
