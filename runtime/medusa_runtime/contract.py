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
# The one dtype table: the user-facing spelling of an artifact's dtype -> its tensors' element type
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ElementType:
    """One tensor element type under every name the stages give it."""

    name: str  # the contract's name (numpy's, "bfloat16" aside)
    itemsize: int
    onnx: int  # onnx.TensorProto data type
    trt: str  # TensorRT DataType member


ELEMENT_TYPES = {
    e.name: e
    for e in (
        ElementType("float32", 4, 1, "FLOAT"),
        ElementType("float16", 2, 10, "HALF"),
        ElementType("bfloat16", 2, 16, "BF16"),
        ElementType("int64", 8, 7, "INT64"),
        ElementType("int32", 4, 6, "INT32"),
        ElementType("int8", 1, 3, "INT8"),
        ElementType("uint8", 1, 2, "UINT8"),
        ElementType("bool", 1, 9, "BOOL"),
    )
}
ITEMSIZE = {n: e.itemsize for n, e in ELEMENT_TYPES.items()}
ONNX_ELEM = {n: e.onnx for n, e in ELEMENT_TYPES.items()}
FROM_TRT = {e.trt: n for n, e in ELEMENT_TYPES.items()}
_ORT_SPELLING = {"float32": "float", "bool": "bool"}
FROM_ORT = {f"tensor({_ORT_SPELLING.get(n, n)})": n for n in ELEMENT_TYPES}  # "tensor(float)" -> "float32"


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


# The fused step graph (step.onnx, exported with `--gpu-step`): one whole Medusa step (verify the tree,
# accept greedily, write the accepted path's KV into the cache, draft the next tree) at fixed shapes.
# Symbols: nodes (N tree nodes, root included), paths (L root-to-leaf paths), path_len (D + 1: tree depth
# plus the root); the runtime fixes them per tree (free dimension overrides), so the graph is static.
# The cache is bound at full capacity; slot j holds position j; rows >= length are ignored.
# step_result [path_len + 2] int64: the emitted tokens (first num_emitted valid), num_emitted, last node.
STEP_TOKENS, STEP_LENGTH = "tokens", "length"
STEP_TREE = ("depth", "ancestors", "retrieve", "tree_indices")
STEP_NEXT_TOKENS, STEP_NEXT_LENGTH, STEP_RESULT = "next_tokens", "next_length", "step_result"
STEP_SYMBOLS = ("nodes", "paths", "path_len")
# step_plain.onnx exported with `--plain-attention gqa` (one KV head): com.microsoft GroupQueryAttention
# appends the token's K/V to the cache in place and attends over it. Its caches cross as [1, KV, capacity,
# head_dim] (the same bytes as [1, capacity, KV, head_dim] for one KV head), and it takes the cache capacity
# as `total_length` int32 [1] in host memory (the operator reads it on the host; bound once).
STEP_TOTAL = "total_length"


def step_cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(cache inputs, updated-cache outputs) of the step graph, layer-major, key before value."""
    return past_names(num_layers, "cache"), past_names(num_layers, "updated")


def step_inputs(
    num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str, capacity: int, gqa: bool = False
) -> list[TensorSpec]:
    specs = [
        TensorSpec(STEP_TOKENS, INT64, ("nodes",)),
        TensorSpec(STEP_LENGTH, INT64, (1,)),
        TensorSpec("depth", INT64, ("nodes",)),
        TensorSpec("ancestors", "bool", ("nodes", "nodes")),
        TensorSpec("retrieve", INT64, ("paths", "path_len")),
        TensorSpec("tree_indices", INT64, ("nodes",)),
    ]
    if gqa:
        specs.append(TensorSpec(STEP_TOTAL, "int32", (1,)))
    shape = step_cache_shape(kv_heads, head_dim, capacity, gqa)
    return specs + [TensorSpec(n, kv_dtype, shape) for n in step_cache_names(num_layers)[0]]


def step_outputs(
    num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str, capacity: int, gqa: bool = False
) -> list[TensorSpec]:
    specs = [
        TensorSpec(STEP_NEXT_TOKENS, INT64, ("nodes",)),
        TensorSpec(STEP_NEXT_LENGTH, INT64, (1,)),
        TensorSpec(STEP_RESULT, INT64, ("result",)),
    ]
    shape = step_cache_shape(kv_heads, head_dim, capacity, gqa)
    return specs + [TensorSpec(n, kv_dtype, shape) for n in step_cache_names(num_layers)[1]]


def step_cache_shape(kv_heads: int, head_dim: int, capacity: int, gqa: bool = False) -> tuple[int, ...]:
    """A step graph's cache shape: [1, capacity, KV, D], or [1, KV, capacity, D] crossing GroupQueryAttention."""
    return (1, kv_heads, capacity, head_dim) if gqa else (1, capacity, kv_heads, head_dim)
