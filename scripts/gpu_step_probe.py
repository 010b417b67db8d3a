"""Per-step timing of the fused step graph (step.onnx) against the host loop (model.onnx + kv_commit).

    python3 scripts/gpu_step_probe.py ARTIFACT [--trees gemma3-270m-16,gemma3-270m-32,gemma3-270m-64]
        [--steps 200] [--warmup 20] [--device cuda|cpu] [--generate 0] [--out FILE.json]

For the plain step (root-only tree, N = 1) and each tree: the host loop (`decode.decode` over ort-cuda:
one model.onnx run + kv_commit + host acceptance a step), the fused step without a CUDA graph, and the
fused step replayed from a captured CUDA graph (`ort-cuda-graph`), and that with two caches in ping-pong
instead of one updated in place (does ScatterND skip its full-cache copy when aliased?). Each is timed per step of its decode
generator (host work included: what a user waits for), median over --steps steps after --warmup, on a
Spec-Bench prompt, heads' own drafts. With torch + CUPTI on the machine, a profiled stretch gives the
kernels per step and their summed GPU time (and the costliest kernel names); host = wall - GPU busy. Node counts: the ONNX file's and the
graph ONNX Runtime runs after its fusions. First it checks that all three give the same tokens.
Prints a table last (and writes --out as JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

import numpy as np  # noqa: E402

from medusa_runtime import decode, fused_decode  # noqa: E402
from medusa_runtime.artifact import Artifact  # noqa: E402
from medusa_runtime.backends import open_backend  # noqa: E402
from medusa_runtime.tree import build_tree  # noqa: E402


def prompt_ids(folder: Path, n: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = json.loads((ROOT / "data" / "specbench_dev.jsonl").read_text().splitlines()[0])["turns"][0]
    ids = tok.encode(text * 8).ids
    return ids[:n]


def loop(kind: str, backend, ids, tree, window):
    if kind == "host":
        return decode.decode(backend, ids, tree, window)
    return fused_decode.decode(backend, ids, tree, window)


def timed_steps(kind, backend, ids, tree, window, warmup, steps, profile):
    """Per-step wall seconds (median), tokens, and (kernels, GPU seconds) per step if profiled."""
    gen = loop(kind, backend, ids, tree, window)
    next(gen)  # prefill
    tokens, times = [], []
    for _ in range(warmup):
        tokens += next(gen).tokens
    for _ in range(steps):
        t = time.perf_counter()
        step = next(gen)
        times.append(time.perf_counter() - t)
        tokens += step.tokens
    kernels = gpu = top = None
    if profile:
        kernels, gpu, top = profiled(gen, 20)
    gen.close()
    return statistics.median(times), len(tokens) / (warmup + steps), kernels, gpu, top


def by_name(kernels, n: int, keep: int = 12) -> list[tuple[str, float, float]]:
    """The `keep` costliest kernel names: (name, launches per step, GPU microseconds per step)."""
    totals: dict[str, list[float]] = {}
    for e in kernels:
        entry = totals.setdefault(e.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:keep]
    return [(name, count / n, us / n) for name, (count, us) in ranked]


def profiled(gen, n: int):
    """(kernels per step, GPU kernel seconds per step, costliest kernel names) over n steps, through
    torch's CUPTI profiler."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None, None, None
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                next(gen)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) * 1e-6  # us -> s (overlaps ignored: one stream)
        return len(kernels) / n, busy / n, by_name(kernels, n)
    except Exception as exc:  # CUPTI unavailable, profiler errors
        print(f"  (no kernel profile: {str(exc).splitlines()[0][:120]})", flush=True)
        return None, None, None


def ort_nodes(art: Artifact, tree, device: str) -> tuple[int, int]:
    """(nodes in step.onnx, nodes ONNX Runtime runs for this tree after its optimizations)."""
    import onnx
    import onnxruntime as ort

    from medusa_runtime import contract

    onnx_nodes = len(onnx.load(str(art.path("step")), load_external_data=False).graph.node)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    out = Path("/tmp/gpu_step_probe_opt.onnx")
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    dims = (tree.num_nodes, *tree.retrieve_indices.shape)
    for name, size in zip(contract.STEP_SYMBOLS, dims):
        so.add_free_dimension_override_by_name(name, size)
    providers = (
        [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
        if device == "cuda"
        else ["CPUExecutionProvider"]
    )
    so.enable_profiling = True
    so.profile_file_prefix = "/tmp/gpu_step_probe_prof"
    sess = ort.InferenceSession(str(art.path("step")), so, providers=providers)
    ran = len(onnx.load(str(out), load_external_data=False).graph.node)
    # one run with zeros, profiled: which provider ran each node (a CUDA graph needs CUDA for all)
    from medusa_runtime.backends.ort_step import step_tree_inputs

    io = sess.io_binding()
    feeds = {"tokens": np.zeros(tree.num_nodes, np.int64), "length": np.array([1], np.int64)}
    feeds |= step_tree_inputs(tree, art.num_heads, art.topk)
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    for spec in art.sidecar.step.io.inputs:
        if spec.name.startswith("cache_"):
            shape = list(spec.shape)
            v = ort.OrtValue.ortvalue_from_shape_and_type(shape, contract.ONNX_ELEM[spec.dtype], device, 0)
            v.update_inplace(np.zeros(shape, np.float32 if spec.dtype == "float32" else np.uint16))
            io.bind_ortvalue_input(spec.name, v)
    for o in sess.get_outputs():
        io.bind_output(o.name, device)
    sess.run_with_iobinding(io)
    events = json.loads(Path(sess.end_profiling()).read_text())
    where = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            where.setdefault(e["args"].get("provider", "?"), set()).add(e["args"].get("op_name", "?"))
    for provider, ops in sorted(where.items()):
        print(f"  {provider}: {', '.join(sorted(ops))}", flush=True)
    return onnx_nodes, ran


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--trees", default="gemma3-270m-16,gemma3-270m-32,gemma3-270m-64")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and args.device == "cuda":
        ort.preload_dlls()
    art = Artifact.load(args.artifact)
    window = art.model["sliding_window"]
    ids = prompt_ids(args.artifact, args.prompt_tokens)
    trees = [("plain", build_tree([]))] + [art.tree(t) for t in args.trees.split(",") if t]
    host_name = "ort-cuda" if args.device == "cuda" else "ort-cpu"
    modes = [
        ("host", host_name, {}),
        ("fused", "ort-cuda-graph" if args.device == "cuda" else "ort-cpu-step", {}),
    ]
    if args.device == "cuda":
        modes = [
            modes[0],
            ("fused", "ort-cuda-graph", {"cuda_graph": False}),
            ("fused+graph", "ort-cuda-graph", {}),
            # two caches instead of one updated in place: is ScatterND's input copy skipped when aliased?
            ("graph+pingpong", "ort-cuda-graph", {"inplace": False}),
        ]
    print(f"{art.folder} ({art.meta['dtype']}), prompt {len(ids)} tokens, ORT {ort.__version__}", flush=True)

    # same tokens from every mode, on the largest tree and on plain decoding
    for name, tree in (trees[-1], trees[0]):
        outs = {}
        for label, backend_name, opts in modes:
            try:
                b = open_backend(backend_name, art, max_nodes=tree.num_nodes, **opts)
                gen = loop("host" if label == "host" else "fused", b, ids, tree, window)
                toks = []
                while len(toks) < 64:
                    toks += next(gen).tokens
                outs[label] = toks[:64]
                gen.close()
            except Exception as exc:  # report and go on: one probe run has to tell everything
                print(f"  {label} on {name} FAILED: {str(exc).splitlines()[0][:300]}", flush=True)
        same = all(v == outs.get("host") for v in outs.values())
        print(f"tokens identical across {', '.join(outs)} on {name}: {same}", flush=True)
        for k, v in outs.items():
            print(f"  {k}: {v[:32]}", flush=True)

    rows = []
    for name, tree in trees:
        try:
            onnx_nodes, ran = ort_nodes(art, tree, args.device)
        except Exception as exc:
            print(f"  node count/placement on {name} FAILED: {str(exc).splitlines()[0][:300]}", flush=True)
            onnx_nodes = ran = None
        for label, backend_name, opts in modes:
            profile = args.device == "cuda" and not args.no_profile
            try:
                b = open_backend(backend_name, art, max_nodes=tree.num_nodes, **opts)
                wall, per_step, kernels, gpu, top = timed_steps(
                    "host" if label == "host" else "fused",
                    b,
                    ids,
                    tree,
                    window,
                    args.warmup,
                    args.steps,
                    profile,
                )
            except Exception as exc:
                print(f"  {label} on {name} FAILED: {str(exc).splitlines()[0][:300]}", flush=True)
                continue
            row = {
                "tree": name,
                "nodes": tree.num_nodes,
                "mode": label,
                "ms_per_step": wall * 1e3,
                "tokens_per_step": per_step,
                "tok_s": per_step / wall,
                "kernels_per_step": kernels,
                "gpu_ms_per_step": None if gpu is None else gpu * 1e3,
                "host_ms_per_step": None if gpu is None else (wall - gpu) * 1e3,
                "graph_nodes": None if label == "host" else f"{onnx_nodes} onnx / {ran} ort",
                "top_kernels": top,
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
            for kname, count, us in top or []:
                print(f"    {us:8.1f} us {count:5.1f}x  {kname}", flush=True)
            del b
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    fmt = "{:<16} {:>5} {:<14} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8}  {}"
    print()
    print(
        fmt.format(
            "tree", "N", "mode", "ms/step", "tok/step", "tok/s", "kernels", "gpu ms", "host ms", "graph nodes"
        )
    )
    for r in rows:
        f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        print(
            fmt.format(
                r["tree"],
                r["nodes"],
                r["mode"],
                f(r["ms_per_step"], 3),
                f(r["tokens_per_step"]),
                f(r["tok_s"], 1),
                f(r["kernels_per_step"], 0),
                f(r["gpu_ms_per_step"], 3),
                f(r["host_ms_per_step"], 3),
                r["graph_nodes"] or "",
            )
        )


if __name__ == "__main__":
    main()
