"""The fused step graph (`step.onnx`, `medusa-export onnx ... --gpu-step`): one whole greedy Medusa step.

model.onnx runs one forward at dynamic shapes and leaves acceptance, the KV commit and the next tree to
the host. This graph does the whole step on the device at FIXED shapes, so that ONNX Runtime's CUDA EP
can capture it once and replay it as a CUDA graph:

  tokens [N] (this step's tree: root + candidates), length [1] (valid cache rows), the tree's constants
  (depth [N], ancestors [N, N], retrieve [L, D+1], tree_indices [N]) and the KV cache bound at full
  capacity [1, capacity, KV, head_dim] per layer
  -> masks from length, positions (length + depth) and the ancestors (sliding-window layers too)
  -> the decoder over the N nodes (q|k|v and gate|up as one projection each), attention over
     [cache ; new] as two matmuls and a float32 softmax
     (models.common.attend): cuBLAS spreads them over the whole GPU, where ONNX `Attention` ran a
     memory-efficient kernel of one block per head for N > 1 (130 us a layer over 2,048 slots on an H200)
  -> argmax at every node; greedy acceptance (`acceptance.Greedy`: the longest root-first path whose
     every token is its parent's argmax, the first such path on ties)
  -> the accepted path's K/V rows written into the cache at slots length .. length + D (D + 1 rows; those
     past the accepted count are garbage beyond the new length, never read), in place: one ScatterND per
     cache with an index per element, its output bound to its input's buffer
  -> the heads' top-k at the last accepted node only -> the next step's tree tokens (tree_indices)
  outputs next_tokens [N], next_length [1], step_result [D + 3] (emitted tokens, their count, the last
  accepted node) and the updated caches.

N, L and D + 1 are symbols here (`contract.STEP_SYMBOLS`); the runtime pins them per tree with ONNX
Runtime's free dimension overrides, so one file serves every tree and constant folding removes the
shape arithmetic. fp32 computes what model.onnx computes (the same explicit forward and attention; a joined
projection computes the same dot products).
With `native=True` (bf16/fp16 artifacts) RMSNorm, RoPE and GELU run in the model dtype (float32 math
inside the kernels) instead of float32 islands between Casts, and every norm is one com.microsoft
SkipSimplifiedLayerNormalization (_rms, _add_rms): each residual add runs inside the norm after it. Far
fewer nodes, slightly different rounding (Gemma's (1 + w) scale is rounded to the model dtype; a fused norm
normalizes the float32 sum, not the sum rounded to the model dtype).
With `gqa` (the plain step only) each layer's attention is one com.microsoft GroupQueryAttention, which
also rotates q and k (RoPE tables over every cache slot) and writes the new K/V into the cache in place.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from medusa_runtime import contract

from .graph import MedusaGraph, topk_ids
from .models.common import apply_rope, attend, fused_onnx_ops, rms_norm, rope

STEP_FILE = "step.onnx"
PLAIN_FILE = "step_plain.onnx"  # the same step without the heads, for plain decoding (N = 1)
SKIP_NORM = "SkipSimplifiedLayerNormalization"


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, native: bool) -> torch.Tensor:
    """RMSNorm over the last axis. native (bf16/fp16): SkipSimplifiedLayerNormalization of x with itself
    as the skip and 4 * eps, which is rms_norm(x) exactly in real arithmetic and in binary floating point
    (2x, its mean square 4 * ms and 4 * (ms + eps) are exact scalings): on CUDA its kernel takes about half
    the time of RMSNormalization's for rows this short (1.6 against 3.1 us on an H200)."""
    if not native or x.dtype == torch.float32:
        return rms_norm(x, weight, eps, offset)
    rows = x.reshape(1, -1, x.shape[-1])  # the operator takes [batch, rows, hidden]
    return _skip_norm(rows, rows, weight, 4.0 * eps, offset)[0].reshape(x.shape)


def _skip_norm(x, skip, weight, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """com.microsoft SkipSimplifiedLayerNormalization: (rms_norm(x + skip) * scale, x + skip); float32 math
    inside, the sum rounded to the model dtype."""
    scale = ((offset + weight.float()) if offset else weight.float()).to(x.dtype)
    normed, _, _, total = torch.onnx.ops.symbolic_multi_out(
        f"com.microsoft::{SKIP_NORM}",
        (x, skip, scale),
        {"epsilon": float(eps)},
        dtypes=(x.dtype, torch.float32, torch.float32, x.dtype),
        shapes=(x.shape, (), (), x.shape),
        version=1,
    )
    return normed, total


def _add_rms(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, native: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it: (x + delta, rms(x + delta)). native (bf16/fp16): one
    com.microsoft SkipSimplifiedLayerNormalization kernel (the sum rounded to the model dtype as an Add
    would, the norm taken of the float32 sum); fp32 keeps the separate Add and the explicit norm."""
    if not native or x.dtype == torch.float32:
        total = x + delta
        return total, _rms(total, weight, eps, offset, native)
    normed, total = _skip_norm(x, delta, weight, eps, offset)
    return total, normed


def _drop_unused_skip_outputs(model) -> int:
    """The outputs of SkipSimplifiedLayerNormalization nodes that nothing reads made optional (empty names):
    always the mean and inverse std (the CUDA kernel does not write them), the sum where a node is a plain
    norm (_rms). Returns how many nodes there are."""
    g = model.graph
    used = {name for node in g.node for name in node.input} | {o.name for o in g.output}
    nodes = [node for node in g.node if node.op_type == SKIP_NORM]
    dropped = set()
    for node in nodes:
        for i in (1, 2, 3):
            if node.output[i] not in used:
                dropped.add(node.output[i])
                node.output[i] = ""
        assert not node.output[1] and not node.output[2], node.name
    kept = [v for v in g.value_info if v.name not in dropped]
    del g.value_info[:]
    g.value_info.extend(kept)
    return len(nodes)


def _cos_sin(positions, inv_freq, scale: float, dtype, native: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [1, N, D/2]: float32 values rounded to the model dtype, as models.common.rope; native
    keeps them in the model dtype (no float32 round trip)."""
    if not native or dtype == torch.float32:
        return rope(positions, inv_freq, scale, dtype)
    freqs = positions[..., None].float() * inv_freq.float()
    return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, native: bool) -> torch.Tensor:
    if not native or x.dtype == torch.float32:
        return apply_rope(x, cos, sin)
    b, t, h, d = x.shape
    flat = torch.onnx.ops.rotary_embedding(x.reshape(b, t, h * d), cos, sin, num_heads=h)
    return flat.reshape(b, t, h, d)


def _gqa(q, k, v, past_k, past_v, seqlens, total, cos, sin, window: int, scaling: float):
    """com.microsoft GroupQueryAttention of the new rows q, k, v [1, N, heads, D] (before RoPE) over a
    [1, KV, capacity, D] cache holding `seqlens` (int32 [1]) rows: q and k are rotated at their positions
    (from `seqlens`) by the tables cos, sin [capacity, D/2], the new K/V written at that slot, then attended
    to (causal, the last `window` keys on sliding-window layers, -1: all). Returns (out [1, N, heads * D], present key,
    present value); the presents are the cache itself when bound to its buffer (past_present_share_buffer).
    scripts/gqa_check.py checks those semantics on a machine's ONNX Runtime."""
    b, n, h, d = q.shape
    out, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        (
            q.reshape(b, n, h * d),
            k.reshape(b, n, -1),
            v.reshape(b, n, -1),
            past_k,
            past_v,
            seqlens,
            total,
            cos,
            sin,
        ),
        {
            "do_rotary": 1,
            "num_heads": h,
            "kv_num_heads": past_k.shape[1],
            "local_window_size": window,
            "scale": float(scaling),
        },
        dtypes=(q.dtype, past_k.dtype, past_v.dtype),
        shapes=((b, n, h * d), past_k.shape, past_v.shape),
        version=1,
    )
    return out, present_k, present_v


def _joined(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing the given ones side by side (outputs concatenated): one GEMM launch instead of
    several on the same input. Each output column is the same dot product as before."""
    weight = torch.cat([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    joined = nn.Linear(weight.shape[1], weight.shape[0], bias=any(b is not None for b in biases))
    joined = joined.to(weight.dtype).requires_grad_(False)
    joined.weight.copy_(weight)
    if joined.bias is not None:
        zeros = [
            torch.zeros(lin.out_features, dtype=weight.dtype) if b is None else b
            for lin, b in zip(linears, biases)
        ]
        joined.bias.copy_(torch.cat(zeros))
    return joined


class StepGraph(nn.Module):
    """forward(tokens, length, depth, ancestors, retrieve, tree_indices, *caches) in contract order."""

    def __init__(
        self, graph: MedusaGraph, capacity: int, native: bool = False, draft: bool = True, gqa: bool = False
    ):
        super().__init__()
        if gqa and (draft or graph.decoder.cfg.num_kv_heads != 1):
            raise ValueError("GroupQueryAttention serves the plain step (draft=False) of a one-KV-head model")
        self.medusa, self.capacity, self.native, self.draft, self.gqa = graph, capacity, native, draft, gqa
        dec = graph.decoder
        self.family = dec.cfg.family
        self.gemma = self.family == "gemma3_text"
        layers = dec.hf.model.layers
        with torch.no_grad():  # per layer: q|k|v and gate|up as one projection each
            self.qkv = nn.ModuleList(
                _joined(a.q_proj, a.k_proj, a.v_proj) for a in (y.self_attn for y in layers)
            )
            self.gate_up = nn.ModuleList(_joined(y.mlp.gate_proj, y.mlp.up_proj) for y in layers)
        if gqa:  # RoPE tables over every slot for GroupQueryAttention: cos_0/sin_0 full, cos_1/sin_1 sliding
            dtype = dec.hf.model.embed_tokens.weight.dtype
            for sliding in (False, True):
                inv = (dec.inv_freq_sliding if sliding else dec.inv_freq_full) if self.gemma else dec.inv_freq
                scale = 1.0 if self.gemma else dec.rope_scale
                freqs = torch.arange(capacity, dtype=torch.float32)[:, None] * inv.float()[None]
                self.register_buffer(f"cos_{int(sliding)}", (freqs.cos() * scale).to(dtype))
                self.register_buffer(f"sin_{int(sliding)}", (freqs.sin() * scale).to(dtype))

    # -- the decoder over the tree nodes, attending to [cache ; new] -------------------------------------
    def _masks(self, length, positions, ancestors):
        """Additive float32 masks [1, 1, N, capacity + N] (full, sliding): added to attend's float32 scores."""
        dtype = torch.float32
        cfg = self.medusa.decoder.cfg
        n, cap = positions.shape[0], self.capacity
        slots = torch.arange(cap, dtype=torch.int64)
        allowed = torch.cat(((slots[None, :] < length[:, None]).expand(n, cap), ancestors), dim=1)  # [N, S]
        low = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
        zero = torch.tensor(0.0, dtype=dtype)
        full = torch.where(allowed, zero, low)[None, None]
        if not cfg.has_sliding:
            return full, None
        key_pos = torch.cat((slots, positions))
        near = (positions[:, None] - key_pos[None, :]) < cfg.sliding_window
        return full, torch.where(allowed & near, zero, low)[None, None]

    def _decoder(self, tokens, positions, masks, caches):
        """Final-normed hidden states [1, N, C] and the N nodes' new (k, v) per layer [1, N, KV, D]."""
        dec, native = self.medusa.decoder, self.native
        cfg, m = dec.cfg, dec.hf.model
        n = tokens.shape[0]
        eps = dec.eps
        off = 1.0 if self.gemma else 0.0
        x = F.embedding(tokens[None], m.embed_tokens.weight)
        pos = positions[None]
        if self.gemma:
            x = x * torch.tensor(dec.embed_scale, dtype=x.dtype)
            ropes = {
                True: _cos_sin(pos, dec.inv_freq_sliding, 1.0, x.dtype, native),
                False: _cos_sin(pos, dec.inv_freq_full, 1.0, x.dtype, native),
            }
        else:
            both = _cos_sin(pos, dec.inv_freq, dec.rope_scale, x.dtype, native)
            ropes = {True: both, False: both}
        scaling = dec.scaling if self.gemma else cfg.head_dim**-0.5
        new_kv = []
        kv_width = cfg.num_kv_heads * cfg.head_dim
        qkv_sizes = (cfg.num_heads * cfg.head_dim, kv_width, kv_width)
        # each residual add runs with the norm after it (_add_rms): the next layer's input norm, or the final
        layers = m.layers
        following = [y.input_layernorm.weight for y in layers[1:]] + [m.norm.weight]
        h = _rms(x, layers[0].input_layernorm.weight, eps, off, native)
        for i, layer in enumerate(layers):
            a = layer.self_attn
            sliding = cfg.sliding_layers[i]
            cos, sin = ropes[sliding]
            q, k, v = self.qkv[i](h).split(qkv_sizes, dim=-1)
            q = q.reshape(1, n, cfg.num_heads, cfg.head_dim)
            k = k.reshape(1, n, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(1, n, cfg.num_kv_heads, cfg.head_dim)
            if self.gemma:
                q = _rms(q, a.q_norm.weight, eps, 1.0, native)
                k = _rms(k, a.k_norm.weight, eps, 1.0, native)
            if self.gqa:  # masks: (seqlens_k, total_length); the cache comes back with this row in it
                window = cfg.sliding_window if sliding else -1
                rotary = self.get_buffer(f"cos_{int(sliding)}"), self.get_buffer(f"sin_{int(sliding)}")
                cache_kv = caches[2 * i], caches[2 * i + 1]
                attn, *present = _gqa(q, k, v, *cache_kv, *masks, *rotary, window, scaling)
                new_kv.append(present)
            else:
                q, k = _rope(q, cos, sin, native), _rope(k, cos, sin, native)
                new_kv.append((k, v))
                k_all = torch.cat((caches[2 * i], k), dim=1)  # [1, capacity + N, KV, D]
                v_all = torch.cat((caches[2 * i + 1], v), dim=1)
                mask = masks[1] if cfg.sliding_layers[i] else masks[0]
                attn = attend(q, k_all, v_all, mask, scaling, keys_first=False)
            attn = a.o_proj(attn)
            if self.gemma:
                attn = _rms(attn, layer.post_attention_layernorm.weight, eps, 1.0, native)
                x, h = _add_rms(x, attn, layer.pre_feedforward_layernorm.weight, eps, 1.0, native)
                gate, up = self.gate_up[i](h).chunk(2, dim=-1)
                if native:
                    gate = F.gelu(gate, approximate="tanh")
                else:
                    gate = F.gelu(gate.float(), approximate="tanh").to(h.dtype)
                h = layer.mlp.down_proj(gate * up)
                h = _rms(h, layer.post_feedforward_layernorm.weight, eps, 1.0, native)
            else:
                x, h = _add_rms(x, attn, layer.post_attention_layernorm.weight, eps, 0.0, native)
                gate, up = self.gate_up[i](h).chunk(2, dim=-1)
                h = layer.mlp.down_proj(F.silu(gate) * up)
            x, h = _add_rms(x, h, following[i], eps, off, native)
        return h, new_kv

    def _plain_gqa(self, tokens, length, tree_indices, total, caches):
        """The plain step over GroupQueryAttention: the root's K/V go into the cache at slot `length` inside
        the attention operator (in place when the output is bound to the input's buffer), so there is no
        mask, concatenation or commit to run."""
        hidden, presents = self._decoder(tokens, length, (length.to(torch.int32), total), caches)
        root = torch.argmax(self.medusa.decoder.project(hidden[0]).float(), dim=-1)  # [1]
        result = torch.cat((root, torch.tensor([1, 0], dtype=torch.int64)))  # emitted, count 1, last node 0
        updated = [cache for pair in presents for cache in pair]
        return (torch.zeros_like(tree_indices) + root, length + 1, result, *updated)

    # -- the draft of the next tree at one row ----------------------------------------------------------
    def _draft(self, hidden_row: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        """The heads' top-k token ids [K, topk] at one final-normed hidden row [1, C] whose next token is
        `root` [1]."""
        g = self.medusa
        top = topk_ids(g.draft_logits(hidden_row, root)[:, 0], g.topk)  # [K, topk]
        return g.draft_ids[top] if g.draft_ids is not None else top

    def forward(self, tokens, length, depth, ancestors, retrieve, tree_indices, *caches):
        if self.gqa:
            return self._plain_gqa(tokens, length, tree_indices, caches[0], caches[1:])
        positions = length + depth  # [N]
        masks = self._masks(length, positions, ancestors)
        hidden, new_kv = self._decoder(tokens, positions, masks, caches)
        argmax = torch.argmax(self.medusa.decoder.project(hidden[0]).float(), dim=-1)  # [N]

        # greedy acceptance over the root-to-leaf paths, exactly acceptance.Greedy
        # (small integer counts in float32, exact: float reductions and MatMul have CUDA kernels everywhere)
        paths = torch.where(retrieve >= 0, retrieve, 0)  # [L, D+1]
        ok = (retrieve[:, 1:] >= 0) & (tokens[paths[:, 1:]] == argmax[paths[:, :-1]])
        ok = torch.cat((retrieve[:, :1] >= 0, ok), dim=1)  # the root is always accepted
        span = torch.arange(ok.shape[1], dtype=torch.int64)
        upto = (span[:, None] <= span[None, :]).float()  # [D+1, D+1]: column j sums rows 0..j
        misses = torch.matmul((~ok).float(), upto)  # [L, D+1]: failures up to each depth
        lengths = (misses == 0).float().sum(dim=1)  # [L]: accepted prefix of each path
        order = torch.arange(lengths.shape[0], dtype=torch.int64).float()
        first = torch.where(lengths == lengths.max(), order, float(2**24)).min()  # first longest path
        # [1]-shaped picks (index_select), never 0-d data-dependent indexing: torch.export (2.11) cannot trace that
        best = first.to(torch.int64).reshape(1)
        count = lengths.index_select(0, best).to(torch.int64)  # [1] accepted nodes, root included = emitted
        path = paths.index_select(0, best)[0]  # [D+1]
        last = path.index_select(0, count - 1)  # [1]
        root = argmax.index_select(0, last)  # [1]
        steps = torch.arange(path.shape[0], dtype=torch.int64)
        shifted = torch.cat((tokens.index_select(0, path[1:]), root))  # path candidates after the root, a pad
        emitted = torch.where(steps == count - 1, root, torch.where(steps < count - 1, shifted, 0))
        result = torch.cat((emitted, count, last))

        # the accepted path's rows into the cache at slots length .. length + D: one ScatterND per cache
        # straight from the cache input to its output, with an index per element. ONNX Runtime's CUDA
        # ScatterND runs a thread per index, copying its slice serially (a 256-element row per thread took
        # 9 us), and skips copying its input when the output is bound to the same buffer (in place); a
        # Reshape around it would make the copy.
        cfg = self.medusa.decoder.cfg
        at = (
            torch.zeros_like(steps)[:, None, None],
            (length + steps)[:, None, None],
            torch.arange(cfg.num_kv_heads, dtype=torch.int64)[None, :, None],
            torch.arange(cfg.head_dim, dtype=torch.int64)[None, None, :],
        )
        updated = []
        for k, v in new_kv:
            for new, cache in ((k, caches[len(updated)]), (v, caches[len(updated) + 1])):
                updated.append(cache.index_put(at, new.squeeze(0).index_select(0, path)))  # [D+1, KV, D]

        if not self.draft:  # the plain-decoding variant: no heads, every node (the one root) gets the root
            return (torch.zeros_like(tree_indices) + root, length + count, result, *updated)
        draft = self._draft(hidden[0].index_select(0, last), root)  # [K, topk]
        nxt = torch.cat((root, draft.reshape(-1)))[tree_indices]
        return (nxt, length + count, result, *updated)


def export_step(
    graph: MedusaGraph,
    path,
    capacity: int,
    kv_dtype: str,
    torch_dtype,
    native: bool = False,
    draft: bool = True,
    gqa: bool = False,
) -> tuple[list, list]:
    """Trace StepGraph(graph) to `path` (external data beside it); returns the (inputs, outputs) specs.
    draft=False: the plain-decoding variant (step_plain.onnx, root-only tree): no heads projection; with
    `gqa`, its attention is GroupQueryAttention (contract.STEP_TOTAL says what changes at its boundary)."""
    import onnx

    from .onnx_export import _rename_dims

    cfg = graph.decoder.cfg
    dims = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype, capacity, gqa)
    inputs, outputs = contract.step_inputs(*dims), contract.step_outputs(*dims)
    step = StepGraph(graph, capacity, native, draft, gqa).eval()
    args = sample_step_inputs(cfg, capacity, torch_dtype, gqa)
    nodes, paths, plen = (torch.export.Dim(s, min=1, max=1024) for s in contract.STEP_SYMBOLS)
    dims = {"nodes": nodes, "paths": paths, "path_len": plen}
    shapes = [{i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} for s in inputs]
    with torch.no_grad(), fused_onnx_ops(True):
        program = torch.onnx.export(
            step,
            args,
            dynamo=True,
            opset_version=23,
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_shapes=(*shapes[:6], tuple(shapes[6:])),
            optimize=True,
            verbose=False,
        )
    _rename_dims(program.model, inputs, outputs)
    program.save(str(path), external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    if _drop_unused_skip_outputs(model):
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=False)
    return inputs, outputs


def sample_step_inputs(cfg, capacity: int, torch_dtype, gqa: bool = False) -> tuple:
    """A 5-node tree, 2 paths of 4 nodes, at length 3: distinct sizes that specialise nothing."""
    from medusa_runtime.tree import build_tree

    tree = build_tree([[0], [1], [0, 0], [0, 0, 0]])
    n = tree.num_nodes
    kv = contract.step_cache_shape(cfg.num_kv_heads, cfg.head_dim, capacity, gqa)
    caches = [torch.randn(kv).to(torch_dtype) for _ in range(2 * cfg.num_layers)]
    total = [torch.tensor([capacity], dtype=torch.int32)] if gqa else []
    return (
        torch.randint(3, 100, (n,), dtype=torch.int64),
        torch.tensor([3], dtype=torch.int64),
        torch.from_numpy(tree.position_ids.copy()),
        torch.from_numpy(tree.attention_mask.copy()),
        torch.from_numpy(tree.retrieve_indices.copy()),
        torch.arange(n, dtype=torch.int64),
        *total,
        *caches,
    )


def count_nodes(path) -> dict[str, int]:
    """Node count per op type of an ONNX file (no weights loaded)."""
    import collections

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def share_weights(step_path, *model_paths) -> int:
    """Point a step graph's external initializers at identical bytes in the data files of `model_paths`
    (model.onnx, and step.onnx for step_plain.onnx), and rewrite its own data file with only the rest
    (the joined q|k|v and gate|up projections, tree-free constants, draft weights). Returns the bytes no
    longer stored twice."""
    import hashlib
    from pathlib import Path

    import onnx

    step_path = Path(step_path)
    folder = step_path.parent

    def external(tensor) -> dict | None:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return None
        return {e.key: e.value for e in tensor.external_data}

    def read(info: dict) -> bytes:
        with open(folder / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"]))

    def key(tensor, data: bytes) -> tuple:
        return tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).digest()

    known = {}
    for model_path in model_paths:
        for t in onnx.load(str(model_path), load_external_data=False).graph.initializer:
            info = external(t)
            if info is not None:
                known.setdefault(key(t, read(info)), info)
    step = onnx.load(str(step_path), load_external_data=False)
    shapes = {k[:2] for k in known}  # a transposed weight is read and hashed only if its shape is stored
    folded = _fold_weight_transposes(
        step.graph,
        external,
        read,
        lambda shape, data: shape in shapes and (*shape, hashlib.sha256(data()).digest()) in known,
    )
    own_name = step_path.name + ".data"
    rest, shared = [], 0
    for t in step.graph.initializer:
        info = external(t)
        if info is None:
            continue
        data = folded[t.name] if t.name in folded else read(info)
        match = known.get(key(t, data))
        if match is None:
            rest.append((t, data))
            continue
        _point(t, match["location"], match.get("offset", "0"), match["length"])
        shared += len(data)
    tmp = folder / (own_name + ".tmp")
    with open(tmp, "wb") as f:
        for t, data in rest:
            f.write(b"\0" * (-f.tell() % 4096))
            _point(t, own_name, f.tell(), len(data))
            f.write(data)
    tmp.replace(folder / own_name)
    onnx.save(step, str(step_path))
    return shared


def _fold_weight_transposes(graph, external, read, stored) -> dict[str, bytes]:
    """Replace each Transpose of a stored 2-D weight by the transposed weight where those bytes are stored
    already (`stored((dtype, dims), bytes)`, the bytes a callable so that they are made only for a stored
    shape: model.onnx or step.onnx holds them, folded by the exporter, which leaves some weights' Transposes
    unfolded in step_plain.onnx), so that they are stored once. Returns the new tensors' bytes by name
    (external, no file yet)."""
    import numpy as np
    import onnx

    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded: dict[str, bytes] = {}
    keep_nodes = []
    for node in graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Transpose" else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if t is None or len(t.dims) != 2 or perm != [1, 0] or external(t) is None:
            keep_nodes.append(node)
            continue
        bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        ]
        data = functools.cache(
            lambda t=t, bits=bits: np.frombuffer(read(external(t)), bits).reshape(t.dims).T.tobytes()
        )
        shape = (t.data_type, tuple(reversed(t.dims)))
        if not stored(shape, data):
            keep_nodes.append(node)
            continue
        folded[node.output[0]] = data()
        new = onnx.TensorProto(name=node.output[0], data_type=t.data_type, dims=shape[1])
        new.data_location = onnx.TensorProto.EXTERNAL
        new.external_data.add(key="location", value="")
        graph.initializer.append(new)
        consumers[t.name] -= 1
    del graph.node[:]
    graph.node.extend(keep_nodes)
    for t in [t for t in graph.initializer if consumers.get(t.name, 1) == 0]:
        graph.initializer.remove(t)
    return folded


def _point(tensor, location: str, offset, length) -> None:
    """Make `tensor` read `length` bytes at `offset` of the external data file `location`."""
    del tensor.external_data[:]
    for name, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=name, value=str(value))
