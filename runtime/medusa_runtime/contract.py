"""The graph's I/O contract: every input/output name, dtype and symbolic shape, made in this one place.

The exporter traces with these names and renames the exporter's invented dims to these symbols; the
sidecar records the result; the runtime, the TensorRT builder and the tests read it from here.

Symbols: batch; tokens (T: prompt at prefill, tree nodes at verify); past (P cached tokens);
total (P + T); rows (R: positions whose logits are projected: the last one at prefill, all tree
nodes at verify); heads (K Medusa heads); topk (candidates kept per head and row).
KV tensors are sequence-major per layer: [batch, past, kv_heads, head_dim] in, and the T new rows
[batch, tokens, kv_heads, head_dim] out, so the runtime owns a preallocated cache and appends to it.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT32, INT64 = "float32", "int64"
# bytes per element of the dtype names used across the contract and the backends' bindings
ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # float32, float16, bfloat16, int64
    shape: tuple  # ints or symbol names

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def past_names(num_layers: int, prefix: str = "past") -> list[str]:
    return [f"{prefix}_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def graph_inputs(
    num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str, sliding: bool
) -> list[TensorSpec]:
    specs = [
        TensorSpec("input_ids", INT64, ("batch", "tokens")),
        TensorSpec("position_ids", INT64, ("batch", "tokens")),
        TensorSpec("attention_mask", FLOAT32, ("batch", 1, "tokens", "total")),
    ]
    if sliding:
        specs.append(TensorSpec("sliding_attention_mask", FLOAT32, ("batch", 1, "tokens", "total")))
    specs.append(TensorSpec("output_rows", INT64, ("rows",)))
    kv_shape = ("batch", "past", kv_heads, head_dim)
    specs += [TensorSpec(n, kv_dtype, kv_shape) for n in past_names(num_layers)]
    return specs


def graph_outputs(
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    kv_dtype: str,
    num_heads: int,
    vocab: int,
    topk: int,
    head_vocab: int | None = None,
) -> list[TensorSpec]:
    """head_vocab: the heads' draft vocabulary size when smaller than the model's (top-k ids are full-vocab ids)."""
    specs = [
        TensorSpec("logits", FLOAT32, ("batch", "rows", vocab)),
        TensorSpec("medusa_logits", FLOAT32, (num_heads, "batch", "rows", head_vocab or vocab)),
        TensorSpec("next_tokens", INT64, ("batch", "rows")),
        TensorSpec("medusa_topk", INT64, (num_heads, "batch", "rows", topk)),
    ]
    kv_shape = ("batch", "tokens", kv_heads, head_dim)
    specs += [TensorSpec(n, kv_dtype, kv_shape) for n in past_names(num_layers, "present")]
    return specs


# The KV commit graph: gathers the accepted rows of this step's new KV into the cache (runs on device).
COMMIT_ROWS = "rows"


def commit_names(num_layers: int) -> tuple[list[str], list[str]]:
    return past_names(num_layers, "present"), past_names(num_layers, "kept")
