"""`medusa-export`: thin typer commands over the library. Heavy imports happen inside the commands, so
`--help` is instant. User errors print one line and exit 1; MEDUSA_DEBUG=1 shows the traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from medusa_runtime.errors import MedusaError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Export a causal LM + Medusa heads to ONNX / TensorRT; run and validate the Medusa loop.",
)

Heads = Annotated[
    str, typer.Option("--heads", help="heads folder (FasterDecoding format), built-in name, or random:K")
]
Tree = Annotated[
    str | None, typer.Option("--tree", help="tree preset name or JSON file (default: the artifact's)")
]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", min=1, help="tokens to generate")]
Lookup = Annotated[
    str | None,
    typer.Option(
        "--lookup",
        help="add prompt-lookup candidates to the tree: L (one chain of L tokens copied from the context), KxL, "
        "or auto[L] (one chain, up to L tokens verified a step as the context's match promises; root-only trees)",
    ),
]
Backend = Annotated[str, typer.Option("--backend", help="torch | ort-cpu | ort-cuda | trt")]
RuntimeBackend = Annotated[str, typer.Option("--backend", help="ort-cpu | ort-cuda | trt")]
Force = Annotated[bool, typer.Option("--force", help="replace an existing output of this command")]
Prompts = Annotated[Path, typer.Option("--prompts", help="JSONL file: first of `turns`, or `prompt`")]
Limit = Annotated[int | None, typer.Option("--limit", min=1, help="use only the first N prompts")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _text_arg(option: str, value: str) -> str:
    """Command-line text must be valid Unicode (undecodable bytes arrive as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MedusaError(f"{option} is not valid UTF-8 text") from None
    return value


@app.command()
def onnx(
    model: Annotated[
        str, typer.Argument(help="gemma3-270m, tiny-llama|tiny-qwen2|tiny-gemma3, HF folder, or .gguf")
    ],
    heads: Heads,
    out: Annotated[Path, typer.Option("--out", help="artifact folder to write")],
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 | fp16 | bf16")] = "fp32",
    max_seq: Annotated[int, typer.Option("--max-seq", help="KV capacity (prompt + generated + tree)")] = 2048,
    opset: Annotated[
        int,
        typer.Option(
            "--opset",
            min=18,
            max=23,
            help="23: RMSNorm, RoPE and GELU as single nodes (a quarter of the nodes); 18-22: elementary ops",
        ),
    ] = 23,
    tree: Annotated[
        list[str] | None, typer.Option("--tree", help="trees to serve (repeatable; default: presets)")
    ] = None,
    default_tree: Annotated[str | None, typer.Option("--default-tree")] = None,
    draft_vocab: Annotated[
        int,
        typer.Option(
            "--draft-vocab", min=0, help="heads project onto the N most frequent tokens (0: full vocab)"
        ),
    ] = 0,
    force: Force = False,
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            help="fp: the dtype's weights; int4|int8: block-quantized MatMulNBits (from a GGUF: its own blocks)",
        ),
    ] = "fp",
    default_tree_cpu: Annotated[
        str | None, typer.Option("--default-tree-cpu", help="default tree on CPU backends")
    ] = None,
    default_tree_gpu: Annotated[
        str | None, typer.Option("--default-tree-gpu", help="default tree on GPU backends")
    ] = None,
    gpu_step: Annotated[
        bool,
        typer.Option(
            "--gpu-step",
            help="also step.onnx: the fused, CUDA-graph-capturable step (backend ort-cuda-graph)",
        ),
    ] = False,
    plain_attention: Annotated[
        str,
        typer.Option(
            "--plain-attention",
            help="attention of the plain step graph: matmul | gqa (GroupQueryAttention, one KV head) | auto "
            "(gqa in bf16/fp16 where it applies)",
        ),
    ] = "auto",
):
    """Trace base model + Medusa heads into ONNX (+ sidecar, tokenizer) with tree-mask and tree-position inputs."""
    from .onnx_export import export_onnx

    path = export_onnx(
        model,
        heads,
        out,
        dtype,
        max_seq,
        opset,
        tree,
        default_tree,
        draft_vocab,
        force=force,
        weights=weights,
        default_trees={"cpu": default_tree_cpu, "gpu": default_tree_gpu},
        gpu_step=gpu_step,
        plain_attention=plain_attention,
    )
    typer.echo(f"wrote {path}")


@app.command()
def generate(
    model: Annotated[
        str, typer.Argument(help="artifact folder (runtime backends) or MODEL (--backend torch)")
    ],
    prompt: Annotated[str, typer.Option("--prompt")],
    heads: Annotated[
        str | None, typer.Option("--heads", help="with --backend torch: heads folder or random:K")
    ] = None,
    tree: Tree = None,
    backend: Backend = "ort-cpu",
    max_new_tokens: MaxNew = 128,
    no_medusa: Annotated[bool, typer.Option("--no-medusa", help="plain autoregressive decoding")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="with --backend torch")] = "fp32",
    typical: Annotated[bool, typer.Option("--typical", help="typical acceptance instead of greedy")] = False,
    posterior_threshold: Annotated[float, typer.Option("--posterior-threshold")] = 0.09,
    posterior_alpha: Annotated[float, typer.Option("--posterior-alpha")] = 0.3,
    temperature: Annotated[float, typer.Option("--temperature", help="typical acceptance only")] = 0.7,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="stop string (repeatable)")] = None,
    lookup: Lookup = None,
):
    """Stream a completion, then tokens/s and mean accepted tokens per step."""
    import time

    from medusa_runtime.acceptance import Greedy, Typical
    from medusa_runtime.api import decode_tokens_per_s

    prompt = _text_arg("--prompt", prompt)
    stop = [_text_arg("--stop", s) for s in stop or ()]
    acceptance = Typical(posterior_threshold, posterior_alpha, temperature) if typical else Greedy()
    if heads and backend != "torch":
        _fail(
            f"--heads applies to --backend torch only: the {backend} backend runs the heads in the artifact"
        )
    if backend == "torch":
        from .draft_vocab import draft_ids
        from .heads import resolve_heads
        from .models import load_base
        from .models.source import torch_dtype_of
        from .reference import torch_runtime

        if not heads:
            _fail("--backend torch needs --heads (a heads folder or random:K)")
        base = load_base(model, dtype)
        c = base.config
        med = resolve_heads(heads, c.hidden_size, c.vocab_size, dtype=torch_dtype_of(dtype))
        drafts = draft_ids(heads, 0, c.vocab_size)  # as the export does, for heads trained on one
        runtime = torch_runtime(
            base,
            med,
            None if no_medusa else (tree or "tree8"),
            acceptance=acceptance,
            draft_ids=drafts,
            lookup=lookup,
        )
    else:
        from medusa_runtime.api import MedusaRuntime

        runtime = MedusaRuntime.open(
            model, backend=backend, tree=tree, medusa=not no_medusa, acceptance=acceptance, lookup=lookup
        )
    start = time.perf_counter()
    pieces = runtime.stream(prompt, max_new_tokens, stop)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    seconds = time.perf_counter() - start
    first = pieces.first_token_s or seconds
    after = decode_tokens_per_s(pieces.num_tokens, seconds, first)
    after = f", then {after:.1f} tokens/s" if after else ""
    typer.echo(
        f"\n[{backend}, tree {runtime.tree_name}] {pieces.num_tokens} tokens in {seconds:.2f}s: "
        f"{pieces.num_tokens / seconds:.1f} tokens/s (first token {first:.2f}s{after}), "
        f"mean accepted {pieces.mean_accepted:.2f} tokens/step",
        err=True,
    )


@app.command()
def validate(
    folder: Annotated[Path, typer.Argument(help="artifact folder")],
    prompts: Prompts,
    backend: RuntimeBackend = "ort-cpu",
    max_new_tokens: MaxNew = 64,
    limit: Limit = None,
    tree: Tree = None,
    lookup: Lookup = None,
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            help="auto | plain (the same artifact's plain greedy decoding) | transformers (fp32 greedy); "
            "auto: plain + a transformers agreement rate for quantized artifacts, transformers otherwise",
        ),
    ] = "auto",
):
    """Compare the runtime with transformers' greedy decoding (or the artifact's own plain decoding), token for token."""
    from .validate import validate as run

    if not run(folder, prompts, backend, max_new_tokens, limit, tree, lookup=lookup, reference=reference):
        raise typer.Exit(1)


@app.command("tree")
def tree_cmd(
    spec: Annotated[
        str | None,
        typer.Argument(
            help="preset name, JSON file or inline JSON of choices; NAME+lookupL (or +lookupautoL) adds lookup chains"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the buffers as one JSON object")] = False,
    from_accuracy: Annotated[Path | None, typer.Option("--from-accuracy", help="head accuracy JSON")] = None,
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="node budget, root included")] = 16,
    out: Annotated[Path | None, typer.Option("--out", help="write the built tree here")] = None,
    force: Force = False,
):
    """Show a tree's buffers, or build one from measured head accuracies (Medusa's greedy construction)."""
    from medusa_runtime.tree import (
        expected_accept_length,
        load_rank_accuracy,
        resolve_tree,
        tree_from_accuracy,
    )

    from .fsutil import atomic_file, check_out_file
    from .onnx_export import tree_dirs

    if out:
        check_out_file(out, force)
    if from_accuracy:
        acc = load_rank_accuracy(from_accuracy)
        choices = tree_from_accuracy(acc, nodes)
        name = out.stem if out else f"from-accuracy-{nodes}"
        doc = {
            "name": name,
            "description": f"greedy tree of {nodes} nodes from {from_accuracy.name}, "
            f"expected {expected_accept_length(choices, acc):.3f} tokens/step",
            "choices": choices,
        }
        if out:
            with atomic_file(out) as tmp:
                tmp.write_text(json.dumps(doc, indent=1) + "\n")
            typer.echo(f"wrote {out}: {doc['description']}")
        else:
            typer.echo(json.dumps(doc))
        return
    if spec is None:
        _fail("give a preset name or JSON file, or --from-accuracy FILE")
    name, buffers = resolve_tree(spec, search_dirs=tree_dirs())
    if as_json:
        typer.echo(json.dumps({"name": name, **buffers.to_json_dict()}))
    else:
        typer.echo(
            f"{name}: {buffers.num_nodes} nodes (root included), depth {buffers.depth}, "
            f"{buffers.num_leaves} leaves, top-{buffers.topk}"
        )


@app.command()
def bench(
    folder: Annotated[Path, typer.Argument(help="artifact folder")],
    prompts: Prompts,
    backend: RuntimeBackend = "ort-cpu",
    tree: Tree = None,
    max_new_tokens: MaxNew = 128,
    limit: Limit = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="repetitions per prompt (interleaved)")] = 1,
    hf: Annotated[bool, typer.Option("--hf/--no-hf", help="also time transformers generate")] = True,
    out: Annotated[
        Path | None, typer.Option("--out", help="RESULT.json (a PNG plot is written next to it)")
    ] = None,
    per_category: Annotated[
        int | None, typer.Option("--per-category", min=1, help="first N prompts of each category")
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare", help="another artifact of the same model: its Medusa decoding is timed too"
        ),
    ] = None,
    force: Force = False,
    lookup: Lookup = None,
    min_prompt_tokens: Annotated[
        int, typer.Option("--min-prompt-tokens", min=0, help="only prompts of at least N tokens")
    ] = 0,
):
    """Medusa vs plain decoding (same runtime, same artifact) vs transformers generate, interleaved per prompt;
    each with its time to the first token and its tokens/s after it."""
    from .bench import bench as run
    from .bench import report_lines, summary_line
    from .fsutil import check_out_file

    if out:  # before the run: a bad path must not discard finished results
        check_out_file(out, force)
        check_out_file(out.with_suffix(".png"), force)

    result = run(
        folder,
        prompts,
        backend,
        tree,
        max_new_tokens,
        limit,
        runs,
        hf,
        out,
        per_category=per_category,
        compare=compare,
        lookup=lookup,
        min_prompt_tokens=min_prompt_tokens,
    )
    for line in report_lines(result):
        typer.echo(line)
    typer.echo(summary_line(result))
    if result["identical_outputs"] != result["prompts"] and result["dtype"] == "fp32":
        raise typer.Exit(1)


def _register_lazy_commands() -> None:
    """Commands whose modules import nothing heavy at module level (checked by tests/test_cli.py)."""
    from .train import train_command
    from .trt_build import trt_command

    app.command("trt")(trt_command)
    app.command("train")(train_command)
    app.command("serve")(__import__("medusa_export.serve_cmd", fromlist=["serve_command"]).serve_command)


_register_lazy_commands()


def main() -> None:
    try:
        app()
    except MedusaError as exc:
        if os.environ.get("MEDUSA_DEBUG"):
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
