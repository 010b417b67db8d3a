"""Post-export pass: block-quantized weights (`--weights int4|int8`) in ONNX Runtime's `com.microsoft` ops.

Every MatMul whose weight is a constant (a Linear's folded transpose, the tied lm_head through a Transpose,
the draft-vocabulary rows) becomes `MatMulNBits`; the embedding Gather becomes `GatherBlockQuantized`, which
reads the same 8-bit blocks as the tied lm_head's MatMulNBits (one initializer, two consumers). Weights are
found by value: each initializer is matched against the exported module's parameters, so the pass needs no
knowledge of the exporter's initializer names.

Where the weights come from:
- a GGUF source (the built-in gemma3-270m, or a .gguf MODEL): the file's own quantized blocks, mapped
  exactly (gguf_blocks.py); `int4` keeps Q4_K at 4 bits and stores the 5/6/8-bit types at 8 bits, `int8`
  stores everything at 8 bits. Tensors the file holds in F32/F16 are quantized by round-to-nearest at the
  requested width; the Medusa heads' own layers (not in the file) by round-to-nearest at 8 bits.
- any other source: round-to-nearest blocks of 32 (4 bits asymmetric, 8 bits symmetric). The embedding, a
  tied lm_head and the heads' own layers are always 8 bits (the embedding gather reads 8-bit blocks).

MatMulNBits that read the same input (q/k/v, gate/up, the heads' first layers) are then fused into one, its
output split back (`_fuse_siblings`): the same columns, bitwise, from one kernel.

MatMulNBits runs with accuracy_level 4 (activations quantized to int8 per block, integer dot products): on
the CPU that is the fast kernel, and it computes each row independently of the others (checked by
`tests/test_quantize.py`), which is what makes Medusa's multi-row verify step agree with one-row plain steps.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medusa_runtime.errors import MedusaError

from .gguf_blocks import Blocks, GGUFWeights, gguf_source, rtn

WEIGHTS = ("fp", "int4", "int8")  # fp: unquantized (the artifact's dtype)
MS_DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 4
EMBED_BITS = 8
# A MatMulNBits weight larger than this is split along N into chunks whose outputs are concatenated: ONNX
# Runtime prepacks each chunk and frees its staging copy before the next, so loading gemma3-270m peaks at
# ~470 MiB instead of ~610 (the 160 MiB lm_head staged whole); same kernels, bitwise the same logits.
CHUNK_BYTES = 48 << 20


@dataclass
class Source:
    """A parameter of the exported module that an initializer holds (or rows of it)."""

    name: str
    rows: np.ndarray | None = None  # row ids when the initializer holds a subset (draft vocabulary)


@dataclass
class Report:
    weights: str
    source: str  # "gguf:<file>" or "rtn"
    tensors: Counter = field(default_factory=Counter)  # kind -> count
    max_abs_diff_exact: float = 0.0  # over tensors carried from the GGUF: vs its dequantized weights
    max_abs_diff_rtn: float = 0.0  # over round-to-nearest tensors: vs the float weights
    bytes_before: int = 0
    bytes_after: int = 0
    skipped: list[str] = field(default_factory=list)
    fused: int = 0  # MatMulNBits merged into a sibling's (same input): see _fuse_siblings

    def to_json(self) -> dict:
        return {
            "scheme": self.weights,
            "source": self.source,
            "accuracy_level": ACCURACY_LEVEL,
            "tensors": dict(sorted(self.tensors.items())),
            "max_abs_diff_vs_gguf": self.max_abs_diff_exact if self.source != "rtn" else None,
            "max_abs_diff_rtn": self.max_abs_diff_rtn,
            "weight_bytes_before": self.bytes_before,
            "weight_bytes_after": self.bytes_after,
            "unquantized": self.skipped,
            "matmuls_fused": self.fused,
        }


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.shape, hashlib.blake2b(a.tobytes(), digest_size=16).digest()


def module_sources(graph) -> dict[tuple, Source]:
    """Value key -> Source for the 2-D float parameters of the exported MedusaGraph (and its draft rows)."""
    index: dict[tuple, Source] = {}
    for name, p in graph.named_parameters():
        if p.dim() == 2:
            index.setdefault(_key(p.detach().float().numpy()), Source(name))
    weight = getattr(graph, "draft_weight", None)
    ids = getattr(graph, "draft_ids", None)
    if weight is not None and weight.shape[0] == 1 and graph.heads.shared_lm_head:
        lm = dict(graph.named_parameters())
        tied = next((n for n, p in lm.items() if p is graph.decoder.lm_head_weight()), None)
        if tied is not None:
            index.setdefault(_key(weight[0].float().numpy()), Source(tied, ids.numpy()))
    return index


class _Quantizer:
    def __init__(self, params: dict, gguf: GGUFWeights | None, bits: int, report: Report, progress):
        self.params, self.gguf, self.bits, self.report, self.progress = params, gguf, bits, report, progress
        self.cache: dict[tuple, Blocks] = {}

    def blocks(self, src: Source, value: np.ndarray, bits: int) -> Blocks:
        """value: the float weight [N, K] the graph held (for the distance report)."""
        key = (src.name, bits, None if src.rows is None else src.rows.tobytes())
        if key in self.cache:
            return self.cache[key]
        full = self.gguf.blocks(_hf_name(src.name)) if self.gguf else None
        if full is not None:
            b = full if src.rows is None else full.rows(src.rows)
            b = b.widened(max(b.bits, bits))
            diff = float(np.abs(b.dequantize() - value).max())
            self.report.max_abs_diff_exact = max(self.report.max_abs_diff_exact, diff)
        else:
            b = rtn(value, bits)
            diff = float(np.abs(b.dequantize() - value).max())
            self.report.max_abs_diff_rtn = max(self.report.max_abs_diff_rtn, diff)
        self.report.tensors[f"{b.kind}->{b.bits}bit"] += 1
        self.cache[key] = b
        return b


def _hf_name(module_name: str) -> str:
    """MedusaGraph parameter name -> the Hugging Face model's own (decoder.hf.model.x -> model.x)."""
    return module_name.removeprefix("decoder.hf.")


def quantize_model(path: Path, graph, model: str, weights: str, quiet: bool = False) -> Report:
    """Rewrite the ONNX model at `path` (external data next to it) in place; returns what was done."""
    import onnx
    from onnx import numpy_helper

    if weights not in WEIGHTS[1:]:
        raise MedusaError(f"unknown --weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    bits = 4 if weights == "int4" else 8
    gguf_path = gguf_source(model)
    cfg = graph.decoder.cfg
    gguf = GGUFWeights(gguf_path, cfg.num_layers) if gguf_path else None
    report = Report(weights, f"gguf:{gguf_path.name}" if gguf_path else "rtn")
    sources = module_sources(graph)
    proto = onnx.load(str(path), load_external_data=True)
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    ranks = {  # known ranks of the graph's tensors (the exporter records value_info): a shorter Q4_K term
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*g.value_info, *g.input]
        if v.type.tensor_type.HasField("shape")
    }
    arrays: dict[str, np.ndarray] = {}

    def array(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    def match(name, transpose: bool):
        """(Source, float weight [N, K]) when initializer `name` holds a module weight."""
        a = array(name)
        if a.dtype != np.float32 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[0] != 1):
            return None
        w = a.reshape(a.shape[-2:])
        w = np.ascontiguousarray(w.T) if transpose else w
        src = sources.get(_key(w))
        return (src, w) if src else None

    q = _Quantizer(dict(graph.named_parameters()), gguf, bits, report, None)
    new_inits: dict[str, onnx.TensorProto] = {}
    embed_names = _embedding_inits(g, inits)

    def add_init(name, arr):
        if name not in new_inits:
            new_inits[name] = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        return name

    def nbits_inputs(tag: str, b: Blocks) -> list[str]:
        return [
            add_init(f"{tag}.q{b.bits}", b.packed()),
            add_init(f"{tag}.scales", b.scales.reshape(-1)),
            add_init(f"{tag}.zp{b.bits}", b.packed_zero_points()),
        ]

    nodes_out = []
    whole: set[str] = set()  # MatMulNBits nodes that hold a whole weight (not a row chunk of one)
    used_transpose: Counter = Counter(i for n in g.node for i in n.input)
    n_total = sum(n.op_type in ("MatMul", "Gather") for n in g.node)
    done = 0
    for node in g.node:
        rewritten = None
        if node.op_type == "MatMul" and len(node.input) == 2:
            w_name, transpose = node.input[1], True
            prod = producers.get(w_name)
            if w_name in inits:
                init_name, transpose = w_name, True  # [K, N]: the folded transpose of a Linear's [N, K]
            elif prod is not None and prod.op_type == "Transpose" and prod.input[0] in inits:
                perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), None)
                rank = len(array(prod.input[0]).shape)
                if perm not in (None, list(range(rank - 2)) + [rank - 1, rank - 2]):
                    init_name = None
                else:
                    init_name, transpose = prod.input[0], False
            else:
                init_name = None
            found = match(init_name, transpose) if init_name else None
            if found:
                src, w = found
                # the embedding/tied lm_head and the heads' own layers (small; their accuracy is the
                # acceptance rate) at 8 bits
                wbits = EMBED_BITS if init_name in embed_names or src.name.startswith("heads.") else bits
                b = q.blocks(src, w, wbits)
                tag = _tag(src, init_name)
                parts = _row_chunks(b)
                ins = [
                    nbits_inputs(f"{tag}.c{i}" if len(parts) > 1 else tag, b.rows(p))
                    for i, p in enumerate(parts)
                ]
                rewritten = _matmul_nbits(node, b, ins, tag, add_init, ranks.get(node.input[0]))
                if len(ins) == 1:
                    whole.add(rewritten[0].name)
                if prod is not None and prod.op_type == "Transpose":
                    used_transpose[w_name] -= 1
            elif init_name:
                report.skipped.append(init_name)
        elif node.op_type == "Gather" and node.input[0] in embed_names:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            found = match(node.input[0], False) if axis == 0 else None
            if found:
                src, w = found
                b = q.blocks(src, w, EMBED_BITS)
                if b.mins is None and b.k == b.q.shape[1] * b.block_size:
                    tag = _tag(src, node.input[0])
                    # its own copy of the blocks: MatMulNBits prepacks (and then frees) the tied lm_head's,
                    # while the gather's stay memory-mapped, only the rows it reads resident
                    data = add_init(f"{tag}.q8", b.packed())
                    rewritten = _gather_quantized(node, b, data, tag, add_init)
            if rewritten is None:
                report.skipped.append(node.input[0])
        if node.op_type in ("MatMul", "Gather"):
            done += 1
            if not quiet and done % 50 == 0:
                print(f"[medusa-export]   quantized {done}/{n_total} MatMul/Gather nodes", flush=True)
        nodes_out.extend(rewritten or [node])

    nodes_out, report.fused = _fuse_siblings(nodes_out, whole, new_inits, add_init)
    # Drop the float weights (and the Transposes) nothing reads any more, and the blocks fused away.
    live = {i for n in nodes_out for i in n.input} | {o.name for o in g.output}
    nodes_out = [n for n in nodes_out if n.op_type != "Transpose" or any(o in live for o in n.output)]
    live = {i for n in nodes_out for i in n.input} | {o.name for o in g.output}
    report.bytes_before = sum(array(n).nbytes for n in inits if n not in live)
    kept = [t for t in g.initializer if t.name in live]
    new_inits = {k: t for k, t in new_inits.items() if k in live}
    report.bytes_after = sum(t.raw_data.__len__() for t in new_inits.values())
    del g.node[:]
    g.node.extend(nodes_out)
    del g.initializer[:]
    g.initializer.extend(kept + list(new_inits.values()))
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    report.skipped = sorted(set(report.skipped))
    for f in path.parent.glob(path.name + "?*"):
        f.unlink()
    onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    (path.parent / (path.name + ".data")).chmod(0o644)
    return report


def _fuse_siblings(nodes: list, whole: set[str], inits: dict, add_init) -> tuple[list, int]:
    """MatMulNBits nodes in `whole` that read the same input with the same attributes (q/k/v, gate/up, the
    heads' first layers) become one MatMulNBits over their blocks stacked along N, then a Split back into
    their outputs, as long as the stacked blocks stay within CHUNK_BYTES. One weight stream and one kernel
    instead of several; each output column is computed exactly as before (ONNX Runtime's kernel computes
    columns independently: tests/test_quantize.py checks it bitwise). Returns the nodes and how many
    MatMulNBits were fused away."""
    from onnx import helper, numpy_helper

    def key(n):
        return n.input[0], tuple(sorted((a.name, a.i) for a in n.attribute if a.name != "N"))

    def n_of(n):
        return next(a.i for a in n.attribute if a.name == "N")

    groups: dict[tuple, list[list]] = {}
    for n in nodes:
        if n.op_type != "MatMulNBits" or n.name not in whole or len(n.input) != 4:
            continue
        size = len(inits[n.input[1]].raw_data)
        runs = groups.setdefault(key(n), [[]])
        if runs[-1] and sum(len(inits[m.input[1]].raw_data) for m in runs[-1]) + size > CHUNK_BYTES:
            runs.append([])
        runs[-1].append(n)
    first = {run[0].name: run for runs in groups.values() for run in runs if len(run) > 1}
    fused = {m.name for run in first.values() for m in run}
    out = []
    for n in nodes:
        if n.name not in fused:
            out.append(n)
            continue
        run = first.get(n.name)
        if run is None:  # a later member: computed by its run's fused node
            continue
        name = n.name + "/fused"
        stacked = [
            add_init(f"{name}.in{j}", np.concatenate([numpy_helper.to_array(inits[m.input[j]]) for m in run]))
            for j in (1, 2, 3)
        ]
        sizes = [n_of(m) for m in run]
        attrs = {a.name: a.i for a in n.attribute} | {"N": sum(sizes)}
        out += [
            helper.make_node(
                "MatMulNBits", [n.input[0], *stacked], [name + "/out"], name=name, domain=MS_DOMAIN, **attrs
            ),
            helper.make_node(
                "Split",
                [name + "/out", add_init(f"{name}.sizes", np.array(sizes, np.int64))],
                [m.output[0] for m in run],
                name=name + "/split",
                axis=-1,
            ),
        ]
    return out, len(fused) - len(first)


def _tag(src: Source, init_name: str) -> str:
    return ("q." + src.name + (f".rows{len(src.rows)}" if src.rows is not None else "")).replace("/", "_")


def _embedding_inits(g, inits) -> set[str]:
    """Initializers gathered along axis 0 by a Gather (the token embedding)."""
    out = set()
    for n in g.node:
        if n.op_type == "Gather" and n.input[0] in inits:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if axis == 0:
                out.add(n.input[0])
    return out


def _row_chunks(b: Blocks) -> list[slice]:
    """Row ranges of at most CHUNK_BYTES of packed weights each (one range for all but the largest)."""
    size = b.n * b.q.shape[1] * b.block_size * b.bits // 8
    parts = max(1, -(-size // CHUNK_BYTES))
    step = -(-b.n // parts)
    return [slice(i, min(i + step, b.n)) for i in range(0, b.n, step)]


def _matmul_nbits(node, b: Blocks, ins: list[list[str]], tag: str, add_init, rank: int | None = None):
    """MatMul(X, W^T) -> MatMulNBits(X, blocks) [- (block sums of X) @ mins^T]. `ins`: per row chunk
    (see _row_chunks), the chunk's B, scales and zero points; several chunks are concatenated along N.
    `rank`: X's rank when known: the mins term keeps X's leading dims (4 nodes), else it goes through a
    flat [rows, blocks] matrix and back (6 nodes); the same MatMul over the same rows either way."""
    from onnx import helper

    out = node.output[0]
    base_out = out if b.mins is None else out + "/nbits"
    parts = _row_chunks(b) if len(ins) > 1 else [slice(0, b.n)]
    outs = [base_out] if len(ins) == 1 else [f"{base_out}/c{i}" for i in range(len(ins))]
    nodes = [
        helper.make_node(
            "MatMulNBits",
            [node.input[0], *chunk_ins],
            [chunk_out],
            name=node.name + ("/nbits" if len(ins) == 1 else f"/nbits{i}"),
            domain=MS_DOMAIN,
            K=b.k,
            N=part.stop - part.start,
            bits=b.bits,
            block_size=b.block_size,
            accuracy_level=ACCURACY_LEVEL,
        )
        for i, (chunk_ins, chunk_out, part) in enumerate(zip(ins, outs, parts))
    ]
    if len(ins) > 1:
        nodes.append(helper.make_node("Concat", outs, [base_out], name=node.name + "/concat", axis=-1))
    if b.mins is not None:  # Q4_K: subtract sum over blocks of mins[n, blk] * sum(x in blk)
        kb, bs = b.q.shape[1], b.block_size
        axes = add_init(f"{tag}.lastaxis", np.array([-1], np.int64))
        mins_t = add_init(f"{tag}.mins_t", np.ascontiguousarray(b.mins.T))  # [kb, N]
        p = node.name + "/mins"
        if rank:  # [..., K] -> [..., kb, bs] (0: keep that dim) -> sums [..., kb] -> [..., N]
            shape = add_init(f"{tag}.blockshape{rank}", np.array([0] * (rank - 1) + [kb, bs], np.int64))
            return nodes + [
                helper.make_node("Reshape", [node.input[0], shape], [p + "/blocks"], name=p + "/reshape"),
                helper.make_node(
                    "ReduceSum", [p + "/blocks", axes], [p + "/sums"], name=p + "/sum", keepdims=0
                ),
                helper.make_node("MatMul", [p + "/sums", mins_t], [p + "/term"], name=p + "/matmul"),
                helper.make_node("Sub", [base_out, p + "/term"], [out], name=p + "/sub"),
            ]
        shape = add_init(f"{tag}.blockshape", np.array([-1, kb, bs], np.int64))
        nodes += [
            helper.make_node("Reshape", [node.input[0], shape], [p + "/blocks"], name=p + "/reshape"),
            helper.make_node("ReduceSum", [p + "/blocks", axes], [p + "/sums"], name=p + "/sum", keepdims=0),
            helper.make_node("MatMul", [p + "/sums", mins_t], [p + "/flat"], name=p + "/matmul"),
            helper.make_node("Shape", [base_out], [p + "/shape"], name=p + "/shapeof"),
            helper.make_node("Reshape", [p + "/flat", p + "/shape"], [p + "/term"], name=p + "/unflatten"),
            helper.make_node("Sub", [base_out, p + "/term"], [out], name=p + "/sub"),
        ]
    return nodes


def _gather_quantized(node, b: Blocks, data: str, tag: str, add_init):
    """Gather(E, ids) -> Reshape(GatherBlockQuantized(E blocks [V, kb, bs], ids), ids.shape + [K])."""
    from onnx import helper

    scales = add_init(f"{tag}.gscales", b.scales[..., None])
    zps = add_init(f"{tag}.gzp", b.zero_points[..., None])
    width = add_init(f"{tag}.width", np.array([b.k], np.int64))
    p = node.name + "/gbq"
    return [
        helper.make_node(
            "GatherBlockQuantized",
            [data, node.input[1], scales, zps],
            [p + "/blocks"],
            name=p,
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=2,
            block_size=b.block_size,
            bits=8,
        ),
        helper.make_node("Shape", [node.input[1]], [p + "/ids_shape"], name=p + "/shapeof"),
        helper.make_node("Concat", [p + "/ids_shape", width], [p + "/shape"], name=p + "/concat", axis=0),
        helper.make_node("Reshape", [p + "/blocks", p + "/shape"], [node.output[0]], name=p + "/reshape"),
    ]
