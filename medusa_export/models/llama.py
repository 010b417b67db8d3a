"""Explicit export-oriented forward for the Llama family (Llama, Qwen2: Qwen2 only adds q/k/v biases,
which the reused nn.Linear modules carry). Weights are the Hugging Face module's own parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import DecoderConfig, ExplicitDecoder, apply_rope, attend, only_rows, rms_norm, rope

FAMILIES = ("llama", "qwen2")


class Llama(ExplicitDecoder):
    def __init__(self, hf):
        super().__init__()
        c = hf.config
        self.hf = hf
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", False) else None
        layer_types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
        self.cfg = DecoderConfig(
            family=c.model_type,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=head_dim,
            sliding_window=window,
            sliding_layers=tuple(window is not None and t == "sliding_attention" for t in layer_types),
        )
        self.eps = c.rms_norm_eps
        rot = hf.model.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().clone(), persistent=False)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))

    def lm_head_weight(self) -> torch.Tensor:
        return self.hf.lm_head.weight

    def forward(self, input_ids, position_ids, attention_mask, sliding_mask, past, rows=None):
        cfg, m = self.cfg, self.hf.model
        b, t = input_ids.shape
        x = m.embed_tokens(input_ids)  # [B, T, C]
        cos, sin = rope(position_ids, self.inv_freq, self.rope_scale, x.dtype)
        new_kv = []
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = rms_norm(x, layer.input_layernorm.weight, self.eps)
            q = apply_rope(a.q_proj(h).view(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rope(a.k_proj(h).view(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = a.v_proj(h).view(b, t, cfg.num_kv_heads, cfg.head_dim)
            new_kv.append((k, v))
            k_all = torch.cat((past[i][0], k), dim=1)  # [B, S, KV, D]
            v_all = torch.cat((past[i][1], v), dim=1)
            mask = sliding_mask if cfg.sliding_layers[i] else attention_mask
            q, mask, x = only_rows(i, cfg, rows, q, mask, x)
            x = x + a.o_proj(attend(q, k_all, v_all, mask, cfg.head_dim**-0.5))
            h = rms_norm(x, layer.post_attention_layernorm.weight, self.eps)
            x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        return rms_norm(x, m.norm.weight, self.eps), new_kv
