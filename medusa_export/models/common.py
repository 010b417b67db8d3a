"""Pieces shared by the explicit family files: the decoder config, RoPE, RMSNorm and tree-masked attention.

Shape legend: B batch, T new tokens (prompt at prefill, tree nodes at verify), P cached tokens,
S = P + T, H query heads, KV key/value heads, D head_dim, C hidden size.
The KV cache crosses the graph boundary as [B, P, KV, D] per layer (sequence-major, so that for B=1 the
runtime binds a prefix of its preallocated buffer as `past` and writes new rows with one contiguous copy).
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    """What the exporter, the runtime sidecar and the reference decoder need to know about a base model."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None  # None: no sliding-window layer
    sliding_layers: tuple[bool, ...]  # per layer: does it use the sliding-window mask
    final_logit_softcap: float | None = None

    @property
    def has_sliding(self) -> bool:
        return any(self.sliding_layers)


def empty_past(cfg: DecoderConfig, batch: int, dtype, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (batch, 0, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device),) * 2 for _ in range(cfg.num_layers)]


_FUSED = [False]  # set by fused_onnx_ops() while the exporter traces at opset >= 23


@contextlib.contextmanager
def fused_onnx_ops(enabled: bool):
    """Trace RMSNorm, RoPE (and, through the exporter, GELU) as single ONNX opset-23 nodes.

    The same float32 math on the same inputs as the eager code below (equal up to float32 rounding), in
    fewer than half the nodes: on ONNX Runtime's CUDA EP a decode step is launch-bound, so nodes are time."""
    previous, _FUSED[0] = _FUSED[0], enabled
    try:
        yield
    finally:
        _FUSED[0] = previous


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm in float32. Llama casts before scaling by w; Gemma scales by (1 + w) in float32 then casts."""
    xf = x.float()
    if offset or x.dtype == torch.float32:
        return _normalize(xf, (offset + weight.float()) if offset else weight.float(), eps).to(x.dtype)
    return weight * _normalize(xf, None, eps).to(x.dtype)


def _normalize(xf: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """xf / rms(xf) [* scale], float32."""
    if _FUSED[0]:
        scale = torch.ones(xf.shape[-1], dtype=torch.float32) if scale is None else scale
        attrs = {"axis": -1, "epsilon": float(eps), "stash_type": 1}
        return torch.onnx.ops.symbolic(
            "RMSNormalization", (xf, scale), attrs, dtype=torch.float32, shape=xf.shape, version=23
        )
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed if scale is None else normed * scale


def rope(position_ids: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin for explicit (tree) positions, float32 values rounded to the model dtype: [B, T, 1, D]
    (both halves, broadcast over heads), or [B, T, D/2] as opset-23 RotaryEmbedding takes them."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [B, T, D/2]
    if not _FUSED[0]:
        freqs = torch.cat((freqs, freqs), dim=-1)[:, :, None]
    return (freqs.cos() * scale).to(dtype).float(), (freqs.sin() * scale).to(dtype).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, h, D] rotated by the half-split convention of Hugging Face, in float32."""
    xf = x.float()
    b, t, h, d = x.shape
    if _FUSED[0]:
        flat = torch.onnx.ops.rotary_embedding(xf.reshape(b, t, h * d), cos, sin, num_heads=h)
        return flat.reshape(b, t, h, d).to(x.dtype)
    rotated = torch.cat((-xf[..., d // 2 :], xf[..., : d // 2]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    keys_first: bool = True,
) -> torch.Tensor:
    """Grouped-query attention with an additive mask, without repeating K/V.

    q [B, T, H, D]; k, v [B, S, KV, D]; mask [B, 1, T, S] float32 (0 or a large negative).
    Returns [B, T, H*D]. Softmax in float32, as transformers' eager path does.

    One KV head's keys/values are only reshaped, never copied: a strided copy of every layer's [S, D] keys
    (with the [past; new] Concat that the I/O contract implies) was what made a CPU decode step grow with
    the context.

    keys_first (model.onnx): the scores come from keys @ queries^T ([S, D] @ [D, G*T]), then a transpose of
    the small [S, G*T] result. That keeps a verified row bitwise equal to the plain one-token step over the
    same keys on ONNX Runtime's CPU kernels (MLAS), for up to 16 rows of 4 query heads per KV head: the
    queries @ keys^T form ([G*T, D] @ [D, S]) took another blocking when S crossed 128 or 144 keys in the
    verify but not in the row's own step, and a 4-row verify's rows then differed in the last bits, enough
    for a 4-bit artifact's Medusa output to leave its plain output on 1 prompt in 52
    (tests/test_cpu_step.py scans key counts). keys_first=False (step.onnx, the GPU step) keeps the
    queries @ keys^T form, measured on the H200.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    if keys_first:
        # [B, T, KV, G, D] -> [B, KV, D, G*T] (columns (g, t)) as two single-axis moves with a Reshape between,
        # which ONNX Runtime's CPU Transpose does fast and its optimizer does not merge back into the general
        # 5-D transpose (1.5 ms against 0.2 for a 512-token prompt's queries, each layer)
        qt = q.reshape(b, t, kv, g, d).permute(0, 2, 3, 4, 1).reshape(b * kv, g, d, t).transpose(1, 2)
        qt = qt.reshape(b, kv, d, g * t)
        scores = torch.matmul(_kv_major(k), qt) * scaling  # [B, KV, S, G*T]
        scores = scores.transpose(-1, -2).reshape(b, kv, g, t, -1)  # [B, KV, G, T, S]
    else:
        qg = q.reshape(b, t, kv, g, d).permute(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
        kt = _kv_major(k)[:, :, None].transpose(-1, -2)  # [B, KV, 1, D, S]: a transposed view of [.., S, D]
        scores = torch.matmul(qg, kt) * scaling  # [B, KV, G, T, S]
    probs = F.softmax(scores.float() + mask[:, :, None], dim=-1).to(q.dtype)
    out = torch.matmul(probs, _kv_major(v)[:, :, None])  # [B, KV, G, T, D]
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, h * d)


def _kv_major(x: torch.Tensor) -> torch.Tensor:
    """[B, S, KV, D] -> [B, KV, S, D]: a reshape (no copy) for a single KV head, else a transpose."""
    return x.squeeze(2).unsqueeze(1) if x.shape[2] == 1 else x.transpose(1, 2)


def only_rows(
    layer: int,
    cfg: DecoderConfig,
    rows: torch.Tensor | None,
    q: torch.Tensor,
    mask: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In the last layer, after its keys and values: the queries [B, T, H, D], the mask [B, 1, T, S] and the
    residual stream [B, T, C] of `rows` alone (unchanged in other layers, or without rows). Nothing after the
    last layer's keys and values reads the other rows, so a prompt's prefill (one wanted row a piece) skips
    their attention and MLP there: 1/18 of the layers' work for Gemma 3 270M. A verify wants all its rows,
    in order: the same rows, the same values."""
    if rows is None or layer != cfg.num_layers - 1:
        return q, mask, x
    return q.index_select(1, rows), mask.index_select(2, rows), x.index_select(1, rows)


class ExplicitDecoder(nn.Module):
    """Interface of the family files: hidden states and new KV for T tokens given explicit positions/masks."""

    cfg: DecoderConfig

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] int64
        position_ids: torch.Tensor,  # [B, T] int64
        attention_mask: torch.Tensor,  # [B, 1, T, S] float32 additive
        sliding_mask: torch.Tensor | None,  # [B, 1, T, S] float32 additive, for sliding-window layers
        past: list[tuple[torch.Tensor, torch.Tensor]],  # per layer [B, P, KV, D]
        rows: torch.Tensor | None = None,  # [R] int64: the rows whose hidden states are wanted (None: all)
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:  # [B, R, C] final-normed, new KV
        """Run the decoder layers; return final-normed hidden states (of `rows`) and this call's keys/values
        (of every row). See `only_rows`."""

    @abstractmethod
    def lm_head_weight(self) -> torch.Tensor:  # [V, C]
        """The (possibly tied) vocabulary projection."""

    def embed_weight(self) -> torch.Tensor:  # [V, C]
        """The input token embedding table, before any family scaling (what sequential heads read)."""
        return self.hf.model.embed_tokens.weight

    def project(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits of final-normed hidden states, with the family's logit soft-capping."""
        logits = torch.matmul(hidden, (self.lm_head_weight() if weight is None else weight).t())
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
