"""`medusa-export onnx`: trace base model + Medusa heads into an artifact folder.

The artifact (the file contract every later stage reads):
  model.onnx (+ model.onnx.data)  the graph of medusa_runtime.contract
  kv_commit.onnx                   gathers a step's accepted KV rows into the runtime's cache, on device
  tokenizer.json                   so that the runtime needs only `tokenizers`
  artifact.json                    the sidecar (medusa_runtime.sidecar.ArtifactSidecar): model/heads config,
                                   dtype, max_seq, I/O contract, trees, files and checksums, versions
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from medusa_runtime import contract
from medusa_runtime.artifact import SIDECAR, Artifact
from medusa_runtime.errors import MedusaError
from medusa_runtime.integrity import file_checksums
from medusa_runtime.sidecar import (
    ArtifactSidecar,
    Checksum,
    FileRange,
    GraphIO,
    MedusaConfig,
    ModelConfig,
    StepSection,
    TokenizerIds,
)
from medusa_runtime.tree import TreeBuffers, resolve_tree, split_lookup

from .fsutil import atomic_dir, check_out_dir
from .progress import stage

ONNX_DTYPES = contract.DTYPES
TREE_DIR = Path(__file__).resolve().parent.parent / "configs" / "trees"
DEFAULT_TREES = (
    "chain0",
    "chain1",
    "chain2",
    "chain3",
    "chain4",
    "tree4",
    "tree8",
    "tree16",
    "mc_sim_7b_63",
)
HEADS_TREES = "trees"  # a heads folder's own presets, built from its accuracy.json (`tree --from-accuracy`)


def tree_dirs(heads: str | None = None) -> list[Path]:
    """Where tree presets are looked up: the heads' own trees first, then configs/trees. Without heads,
    every shipped heads folder's trees (for `medusa-export tree NAME`), the default heads' first."""
    from .heads import DEFAULT_HEADS, SHIPPED_HEADS, heads_path

    shipped = sorted(
        SHIPPED_HEADS.glob(f"*/{HEADS_TREES}"), key=lambda d: (d.parent.name != DEFAULT_HEADS, d)
    )
    own = [Path(heads_path(heads)) / HEADS_TREES] if heads else shipped
    return [d for d in own if d.is_dir()] + [TREE_DIR]


def export_onnx(
    model: str,
    heads: str,
    out: Path,
    dtype: str = "fp32",
    max_seq: int = 2048,
    opset: int = 23,
    trees: list[str] | None = None,
    default_tree: str | None = None,
    draft_vocab: int = 0,
    quiet: bool = False,
    force: bool = False,
    gpu_step: bool = False,
    weights: str = "fp",
    default_trees: dict[str, str] | None = None,
    plain_attention: str = "auto",
) -> Path:
    """Export MODEL + HEADS to the artifact folder `out` (written atomically). Returns `out`.

    `out` must be new, empty, or (with `force`) an earlier artifact; it may not overlap the inputs.
    `gpu_step`: also the fused step graph step.onnx (medusa_export.step_graph; needs opset 23), and
    step_plain.onnx, whose attention is `plain_attention`: matmul (as step.onnx) or gqa (com.microsoft
    GroupQueryAttention: one KV head; bf16/fp16 on CUDA, any dtype on the CPU EP); auto: gqa where that
    holds in bf16/fp16, else matmul.
    `weights`: fp (the dtype's own weights) or int4/int8 block-quantized MatMuls (medusa_export.quantize).
    `default_trees`: the default tree per device class ({"cpu": ..., "gpu": ...}; either defaults to
    `default_tree`)."""

    from .draft_vocab import draft_ids
    from .graph import MedusaGraph
    from .heads import check_finite, heads_path, resolve_heads
    from .models import explicit_model, load_base
    from .models.source import torch_dtype_of

    if dtype not in ONNX_DTYPES:
        raise MedusaError(f"unknown dtype {dtype!r}: use one of {', '.join(ONNX_DTYPES)}")
    if max_seq < 16:
        raise MedusaError(f"--max-seq {max_seq} is too small (at least 16)")
    if plain_attention not in ("auto", "matmul", "gqa"):
        raise MedusaError(f"--plain-attention {plain_attention!r}: use auto, matmul or gqa")
    if plain_attention == "gqa" and not gpu_step:
        raise MedusaError("--plain-attention applies to the fused step graphs: add --gpu-step")
    out = check_out_dir(Path(out), SIDECAR, force, inputs=[model, heads_path(heads)])
    with stage(f"loading {model}", quiet):
        base = load_base(model, dtype)
        decoder = explicit_model(base)
        cfg = decoder.cfg
        med = resolve_heads(heads, cfg.hidden_size, cfg.vocab_size, dtype=torch_dtype_of(dtype)).eval()
        check_finite(med, heads)
        drafts = draft_ids(heads, draft_vocab, cfg.vocab_size)
    if plain_attention == "auto":  # GroupQueryAttention has CUDA kernels in bf16/fp16 only
        plain_attention = "gqa" if dtype != "fp32" and cfg.num_kv_heads == 1 else "matmul"
    if plain_attention == "gqa" and cfg.num_kv_heads != 1:
        raise MedusaError(
            f"--plain-attention gqa needs one KV head (the cache layouts then agree); {model} has {cfg.num_kv_heads}"
        )
    head_vocab = cfg.vocab_size if drafts is None else len(drafts)
    served = _served_trees(trees, med.num_heads, heads)
    if not served:
        raise MedusaError(f"no tree fits {med.num_heads} heads: give --tree with a shallower tree")
    topk = max(1, max(t.topk for t in served.values()))
    topk = min(topk, head_vocab)
    if default_tree is None and weights != "fp" and "chain0" in served:
        # quantized weights: Medusa = plain holds for single chains only (README); on 2 CPU cores a chain of 3
        # prompt-lookup tokens measured 1.59x plain against 1.15x for chain2 (BENCHMARKS.md, round 4)
        default_tree = "chain0+lookup3"
    default_tree = default_tree or _largest(served, limit=16)
    if split_lookup(default_tree)[0] not in served:
        raise MedusaError(f"default tree {default_tree!r} is not among the exported trees {sorted(served)}")
    per_device = {
        "cpu": default_tree,
        "gpu": default_tree,
        **{k: v for k, v in (default_trees or {}).items() if v},
    }
    for device, name in per_device.items():
        if device not in ("cpu", "gpu") or split_lookup(name)[0] not in served:
            raise MedusaError(
                f"default {device} tree {name!r} is not among the exported trees {sorted(served)}"
            )
    if weights != "fp" and dtype != "fp32":
        raise MedusaError(f"--weights {weights} quantizes from fp32 activations: use --dtype fp32")
    if weights != "fp" and gpu_step:
        raise MedusaError("--gpu-step does not quantize its weights yet: use --weights fp with --gpu-step")

    kv_dtype = ONNX_DTYPES[dtype]
    inputs = contract.graph_inputs(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype, cfg.has_sliding)
    outputs = contract.graph_outputs(
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        kv_dtype,
        med.num_heads,
        cfg.vocab_size,
        topk,
        head_vocab,
    )
    graph = MedusaGraph(decoder, med, topk, drafts).eval()
    with atomic_dir(out) as tmp:
        with stage(f"tracing {cfg.family} ({cfg.num_layers} layers) + {med.num_heads} heads to ONNX", quiet):
            _trace(graph, inputs, outputs, tmp / "model.onnx", opset, torch_dtype_of(dtype))
        quantized = None
        if weights != "fp":
            from .quantize import quantize_model

            with stage(f"quantizing the weights ({weights}, MatMulNBits / GatherBlockQuantized)", quiet):
                quantized = quantize_model(tmp / "model.onnx", graph, model, weights, quiet).to_json()
        with stage("checking the graph (onnx.checker, shape inference)", quiet):
            _check(tmp / "model.onnx", inputs, outputs)
            _write_commit_graph(
                tmp / "kv_commit.onnx", cfg.num_layers, kv_dtype, cfg.num_kv_heads, cfg.head_dim
            )
        step = None
        if gpu_step:
            from .step_graph import PLAIN_FILE, STEP_FILE, export_step, share_weights

            if opset < 23:
                raise MedusaError("--gpu-step needs --opset 23 (the ONNX Attention op)")
            with stage("tracing the fused step graph (step.onnx)", quiet):
                native = dtype != "fp32"
                ins, outs = export_step(
                    graph, tmp / STEP_FILE, max_seq, kv_dtype, torch_dtype_of(dtype), native
                )
                export_step(
                    graph,
                    tmp / PLAIN_FILE,
                    max_seq,
                    kv_dtype,
                    torch_dtype_of(dtype),
                    native,
                    draft=False,
                    gqa=plain_attention == "gqa",
                )
                share_weights(tmp / STEP_FILE, tmp / "model.onnx")  # one copy of the weights on disk
                share_weights(tmp / PLAIN_FILE, tmp / "model.onnx", tmp / STEP_FILE)
            step = StepSection(GraphIO(tuple(ins), tuple(outs)), max_seq, native)
        save_tokenizer(base.tokenizer, tmp / "tokenizer.json")
        files = {"model": "model.onnx", "commit": "kv_commit.onnx", "tokenizer": "tokenizer.json"}
        if step is not None:
            files |= {"step": STEP_FILE, "step_plain": PLAIN_FILE}
        external = sorted(p.name for p in [*tmp.glob("model.onnx?*"), *tmp.glob("step*.onnx?*")])
        with stage(f"recording checksums of {len(files) + len(external)} files", quiet):
            sums = file_checksums(tmp, [*files.values(), *external])
        sidecar = ArtifactSidecar(
            model=_model_config(_ref(model), cfg),
            medusa=MedusaConfig(
                heads=_ref(heads),
                num_heads=med.num_heads,
                num_layers=med.num_layers,
                shared_lm_head=med.shared_lm_head,
                topk=topk,
                draft_vocab=None if drafts is None else head_vocab,
            ),
            dtype=dtype,
            max_seq=max_seq,
            io=GraphIO(tuple(inputs), tuple(outputs)),
            files=files,
            external_data=tuple(external),
            tokenizer=TokenizerIds(base.bos_token_id, tuple(base.eos_token_ids)),
            trees={name: tree.choices for name, tree in served.items()},
            default_tree=default_tree,
            default_trees=per_device,
            versions=_versions(opset),
            weights=quantized,
            step=step,
            checksums={name: Checksum(**c) for name, c in sums.items()},
            read_in_place=_gathered_ranges(tmp / "model.onnx"),
        )
        (tmp / SIDECAR).write_text(json.dumps(sidecar.to_json(), indent=1))
        Artifact.load(tmp)  # the runtime's own checks, before the folder becomes visible
    return out


def save_tokenizer(tokenizer, path: Path) -> None:
    """tokenizer.json, minified, with a BPE model's merges written "a b" (the older form, which tokenizers
    still reads) when no merged piece holds a space: the same tokenizer in 12 MB instead of 33 for Gemma 3,
    whose 514,906 merges were most of `MedusaRuntime.open`'s time (BENCHMARKS.md, round 12)."""
    data = json.loads(tokenizer.to_str())
    merges = data.get("model", {}).get("merges")
    if merges and not isinstance(merges[0], str) and not any(" " in part for m in merges for part in m):
        data["model"]["merges"] = [" ".join(m) for m in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _ref(spec: str) -> str:
    """A model/heads reference that stays valid from another working directory."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def _served_trees(names: list[str] | None, num_heads: int, heads: str) -> dict[str, TreeBuffers]:
    """The trees asked for (each must fit the heads), or the generic presets plus the heads' own trees,
    those that fit the heads."""
    dirs = tree_dirs(heads)
    own = [p.stem for d in dirs[:-1] for p in sorted(d.glob("*.json"))]
    served = {}
    for spec in names or [*DEFAULT_TREES, *own]:
        name, tree = resolve_tree(spec, search_dirs=dirs, num_heads=num_heads if names else None)
        if tree.lookup_chains:
            raise MedusaError(
                f"tree {spec!r}: prompt-lookup chains are added at run time (--lookup), not exported"
            )
        if tree.depth <= num_heads:
            served[name] = tree
    return served


def _largest(served: dict[str, TreeBuffers], limit: int) -> str:
    fitting = [(t.num_nodes, n) for n, t in served.items() if t.num_nodes <= limit]
    return max(fitting)[1] if fitting else min((t.num_nodes, n) for n, t in served.items())[1]


def _model_config(name: str, cfg) -> ModelConfig:
    return ModelConfig(
        name=name,
        family=cfg.family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        sliding_window=cfg.sliding_window,
        sliding_layers=tuple(cfg.sliding_layers),
    )


def sample_inputs(inputs, torch_dtype, tokens=3, past=5, rows=2):
    """Tracing inputs at shapes that specialise nothing (no 0/1 sizes)."""
    import torch

    sizes = {"batch": 2, "tokens": tokens, "past": past, "total": past + tokens, "rows": rows}
    args = []
    for s in inputs:
        shape = [sizes.get(d, d) for d in s.shape]
        if s.name == "output_rows":
            args.append(torch.arange(rows, dtype=torch.int64))
        elif s.dtype == "int64":
            args.append(torch.randint(0, 8, shape, dtype=torch.int64))
        elif s.dtype == "float32":
            args.append(torch.zeros(shape, dtype=torch.float32))
        else:
            args.append(torch.randn(shape).to(torch_dtype))
    return tuple(args)


def _trace(graph, inputs, outputs, path: Path, opset: int, torch_dtype) -> None:
    import torch

    from .models.common import fused_onnx_ops

    args = sample_inputs(inputs, torch_dtype)
    dims = {}
    for s in inputs:
        dims[s.name] = {i: torch.export.Dim.DYNAMIC for i, d in enumerate(s.shape) if isinstance(d, str)}
    with torch.no_grad(), fused_onnx_ops(opset >= 23):
        program = torch.onnx.export(
            graph,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_shapes=_shapes_for_signature([dims[s.name] for s in inputs]),
            optimize=True,
            verbose=False,
        )
    _rename_dims(program.model, inputs, outputs)
    program.save(str(path), external_data=True)


def _shapes_for_signature(dims: list) -> tuple:
    """MedusaGraph.forward(input_ids, position_ids, attention_mask, *rest): torch.export wants that nesting."""
    return (*dims[:3], tuple(dims[3:]))


def _rename_dims(model, inputs, outputs) -> None:
    """Give every symbolic dim the contract's name (the exporter invents s0, s1, 's0 + s1', ...)."""
    import onnx_ir as ir

    rename = {}
    values = {v.name: v for v in [*model.graph.inputs, *model.graph.outputs]}
    for spec in [*inputs, *outputs]:
        shape = values[spec.name].shape
        for i, d in enumerate(spec.shape):
            if isinstance(d, str) and shape is not None and not isinstance(shape[i], int):
                rename.setdefault(str(shape[i]), d)
    for value in _all_values(model.graph):
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(rename.get(str(d), str(d))) if not isinstance(d, int) else d for d in value.shape
        ]
        value.shape = ir.Shape(dims)
    for spec in [*inputs, *outputs]:  # the contract wins over whatever the exporter inferred
        values[spec.name].shape = ir.Shape(
            [d if isinstance(d, int) else ir.SymbolicDim(d) for d in spec.shape]
        )


def _all_values(graph):
    seen = {id(v): v for v in [*graph.inputs, *graph.outputs]}
    for node in graph:
        for v in node.outputs:
            seen.setdefault(id(v), v)
    return seen.values()


def _check(path: Path, inputs, outputs) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=False)
    model = onnx.load(str(path), load_external_data=False)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    if names_in != [s.name for s in inputs] or names_out != [s.name for s in outputs]:
        raise MedusaError(f"exported graph I/O {names_in} -> {names_out} does not match the contract")


def _gathered_ranges(path: Path) -> tuple[FileRange, ...]:
    """The external-data bytes of the tables the graph gathers rows from (the token embedding, its blocks'
    scales and zero points): a CPU session reads them in place at run time (see file_pages.py)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    gathered = set()
    for node in graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized"):
            gathered.update(name for i, name in enumerate(node.input) if i != 1)  # 1: the indices
    ranges = []
    for t in graph.initializer:
        if t.name in gathered and t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            ranges.append(FileRange(info["location"], int(info.get("offset", 0)), int(info["length"])))
    return tuple(sorted(ranges, key=lambda r: (r.file, r.offset)))


def _write_commit_graph(path: Path, num_layers: int, kv_dtype: str, kv_heads: int, head_dim: int) -> None:
    """kept_*.i = Gather(present_*.i, rows, axis=1) for every layer: one small device-side run per step."""
    import onnx
    from onnx import TensorProto, helper

    elem = contract.ONNX_ELEM[kv_dtype]
    src, dst = contract.commit_names(num_layers)
    rows = helper.make_tensor_value_info(contract.COMMIT_ROWS, TensorProto.INT64, ["kept"])
    ins = [helper.make_tensor_value_info(n, elem, ["batch", "tokens", kv_heads, head_dim]) for n in src]
    outs = [helper.make_tensor_value_info(n, elem, ["batch", "kept", kv_heads, head_dim]) for n in dst]
    nodes = [helper.make_node("Gather", [s, contract.COMMIT_ROWS], [d], axis=1) for s, d in zip(src, dst)]
    graph = helper.make_graph(nodes, "kv_commit", [rows, *ins], outs)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="medusa-export"
    )
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _versions(opset: int) -> dict:
    import onnx
    import torch
    import transformers

    from . import __version__

    return {
        "medusa_export": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "opset": opset,
        "python": platform.python_version(),
    }
