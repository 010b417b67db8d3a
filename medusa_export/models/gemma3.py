"""Explicit export-oriented forward for Gemma 3 (text): embeddings scaled by sqrt(C), q/k RMSNorm,
sandwich norms around attention and MLP, (1 + w) RMSNorm in float32, GELU-tanh MLP, sliding-window
layers with their own RoPE base, query scaling by query_pre_attn_scalar. Weights are the Hugging Face
module's own parameters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medusa_runtime.errors import MedusaError

from .common import DecoderConfig, ExplicitDecoder, apply_rope, attend, only_rows, rms_norm, rope

FAMILIES = ("gemma3_text",)


def _inv_freq(rot, c, layer_type: str, head_dim: int) -> torch.Tensor:
    """The RoPE inverse frequencies per layer type, from the HF module's buffers or else the config."""
    buf = getattr(rot, f"{layer_type}_inv_freq", None)
    if buf is not None:
        return buf.detach().clone()
    params = getattr(c, "rope_parameters", None) or {}
    base = (params.get(layer_type) or {}).get("rope_theta")
    if base is None:
        base = c.rope_local_base_freq if layer_type == "sliding_attention" else c.rope_theta
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


class Gemma3(ExplicitDecoder):
    def __init__(self, hf):
        super().__init__()
        c = hf.config
        self.hf = hf
        sliding = tuple(t == "sliding_attention" for t in c.layer_types)
        self.cfg = DecoderConfig(
            family="gemma3_text",
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            sliding_window=c.sliding_window if any(sliding) else None,
            sliding_layers=sliding,
            final_logit_softcap=getattr(c, "final_logit_softcapping", None),
        )
        if getattr(c, "attn_logit_softcapping", None) is not None:
            raise MedusaError("Gemma 3 with attention logit soft-capping is not supported")
        self.eps = c.rms_norm_eps
        self.scaling = c.query_pre_attn_scalar**-0.5
        self.embed_scale = math.sqrt(c.hidden_size)
        rot = hf.model.rotary_emb
        self.register_buffer(
            "inv_freq_full", _inv_freq(rot, c, "full_attention", c.head_dim), persistent=False
        )
        self.register_buffer(
            "inv_freq_sliding", _inv_freq(rot, c, "sliding_attention", c.head_dim), persistent=False
        )

    def lm_head_weight(self) -> torch.Tensor:
        return self.hf.model.embed_tokens.weight  # tied

    def forward(self, input_ids, position_ids, attention_mask, sliding_mask, past, rows=None):
        cfg, m, eps = self.cfg, self.hf.model, self.eps
        b, t = input_ids.shape
        emb = m.embed_tokens.weight
        x = F.embedding(input_ids, emb) * torch.tensor(self.embed_scale, dtype=emb.dtype)  # [B, T, C]
        rope_full = rope(position_ids, self.inv_freq_full, 1.0, x.dtype)
        rope_sliding = rope(position_ids, self.inv_freq_sliding, 1.0, x.dtype)
        new_kv = []
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            cos, sin = rope_sliding if cfg.sliding_layers[i] else rope_full
            h = rms_norm(x, layer.input_layernorm.weight, eps, offset=1.0)
            q = a.q_proj(h).view(b, t, cfg.num_heads, cfg.head_dim)
            k = a.k_proj(h).view(b, t, cfg.num_kv_heads, cfg.head_dim)
            v = a.v_proj(h).view(b, t, cfg.num_kv_heads, cfg.head_dim)
            q = apply_rope(rms_norm(q, a.q_norm.weight, eps, offset=1.0), cos, sin)
            k = apply_rope(rms_norm(k, a.k_norm.weight, eps, offset=1.0), cos, sin)
            new_kv.append((k, v))
            k_all = torch.cat((past[i][0], k), dim=1)  # [B, S, KV, D]
            v_all = torch.cat((past[i][1], v), dim=1)
            mask = sliding_mask if cfg.sliding_layers[i] else attention_mask
            q, mask, x = only_rows(i, cfg, rows, q, mask, x)
            attn = a.o_proj(attend(q, k_all, v_all, mask, self.scaling))
            x = x + rms_norm(attn, layer.post_attention_layernorm.weight, eps, offset=1.0)
            h = rms_norm(x, layer.pre_feedforward_layernorm.weight, eps, offset=1.0)
            mlp = layer.mlp
            gate = F.gelu(mlp.gate_proj(h).float(), approximate="tanh").to(h.dtype)  # float32 activation
            h = mlp.down_proj(gate * mlp.up_proj(h))
            x = x + rms_norm(h, layer.post_feedforward_layernorm.weight, eps, offset=1.0)
        return rms_norm(x, m.norm.weight, eps, offset=1.0), new_kv
