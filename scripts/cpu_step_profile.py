"""Where one decode step's time goes on the CPU (ort-cpu), per tree size and context length.

    python scripts/cpu_step_profile.py ARTIFACT [ARTIFACT ...] [--contexts 100,700]
        [--trees plain,chain1,chain2,chain3,tree8] [--reps 7] [--steps 8] [--threads N] [--no-spin]
        [--ops 700:plain,700:chain3] [--no-steps] [--out FILE.json]

Each artifact gets one backend, prefilled once with real text (the longest Spec-Bench prompts, concatenated)
to the longest context; a shorter context c is the cache's first c rows. A step is the decode loop's own
step (decode.py: lookup + candidates, masks, forward, greedy acceptance, commit) on that fixed context: the
cache is rewound after each step (and the rows it wrote restored), so every repetition sees the same
context. Variants (artifact x context x tree) run interleaved, `--steps` steps per variant per round after
one unmeasured step, `--reps` rounds, the order reversed every other round; the table gives the median
over rounds of the per-step mean, and the spread (min-max over rounds) of the step total. The machine's
load moves these numbers a lot: compare variants within one table (or alternate whole runs), never across.

Columns (ms per step): host = candidates + lookup + masks + acceptance + binding and output handling in
forward() and commit() (everything outside the session runs); masks and bind (forward + commit) are parts
of it; model = the model.onnx run; commit = the kv_commit.onnx run (0 where the CPU backend commits in
host memory); total; `x plain` = total / the root-only (plain) step's total for that artifact and context.
The prefill of each context (once, cold) is printed too: it is part of what `bench` times as tok/s.

--ops CTX:TREE,... profiles those variants with ONNX Runtime's profiler (its own session per context)
and prints kernel time per op type per model run (MatMulNBits split into the lm_head and the rest), the
sum over kernels and the median model_run (the gap is the executor's per-node overhead, inflated by the
profiler itself). --threads / --no-spin set the sessions' intra-op threads / thread spinning.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

import numpy as np  # noqa: E402

PARTS = ("cand", "masks", "bind", "model", "accept", "commit_host", "commit")


class TimedSession:
    """Wraps an InferenceSession: accumulates the wall time of run_with_iobinding."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_with_iobinding(self, io, *args, **kw):
        start = time.perf_counter()
        try:
            return self.inner.run_with_iobinding(io, *args, **kw)
        finally:
            self.seconds += time.perf_counter() - start


def context_ids(tokenizer, prompts: Path, length: int, bos: int | None) -> list[int]:
    """`length` token ids of real text: the longest prompts of the file, concatenated."""
    from medusa_export.prompts import read_prompts

    rows = sorted(read_prompts(prompts), key=lambda r: -len(r["prompt"]))
    ids = [] if bos is None else [bos]
    for row in rows:
        ids += tokenizer.encode(row["prompt"], add_special_tokens=False).ids
        if len(ids) >= length:
            return ids[:length]
    raise SystemExit(f"{prompts} holds fewer than {length} tokens")


class Variant:
    """One (context, tree) on a Prefilled backend, rewound to `ctx` before each step."""

    def __init__(self, pre: Prefilled, tree_name, tree, ctx, ids, window):
        self.pre, self.backend, self.tree_name, self.tree, self.ctx = pre, pre.backend, tree_name, tree, ctx
        self.window = window
        self.token, self.draft = pre.first[ctx]
        self.context = [*ids[:ctx], self.token]
        self.samples: dict[str, list[float]] = defaultdict(list)  # part -> per-round mean seconds
        self.accepted = 0

    def step(self) -> dict[str, float]:
        from medusa_runtime.acceptance import Greedy
        from medusa_runtime.decode import candidates, lookup
        from medusa_runtime.masks import step_masks

        b, tree, window = self.backend, self.tree, self.window
        b.length = self.ctx
        model, commit = b.session, b.commit_session
        m0, c0 = model.seconds, commit.seconds
        t0 = time.perf_counter()
        cand = candidates(tree, self.token, self.draft, lookup(tree, self.context)[0])
        t1 = time.perf_counter()
        positions = b.length + tree.position_ids
        masks = step_masks(b.length, positions, tree.attention_mask, window)
        t2 = time.perf_counter()
        plain = tree.num_nodes == 1
        out = b.forward(cand, positions, masks, np.arange(tree.num_nodes), keep_all=plain)
        t3 = time.perf_counter()
        nodes = Greedy().accept(tree, cand, out.next_tokens, None)
        _ = out.medusa_topk[:, int(nodes[-1])]
        t4 = time.perf_counter()
        if not plain:
            b.commit(nodes)
        t5 = time.perf_counter()
        self.accepted = len(nodes) - 1
        self.pre.restore(self.ctx)
        model_s, commit_s = model.seconds - m0, commit.seconds - c0
        return {
            "cand": t1 - t0,
            "masks": t2 - t1,
            "bind": (t3 - t2) - model_s,
            "model": model_s,
            "accept": t4 - t3,
            "commit_host": (t5 - t4) - commit_s,
            "commit": commit_s,
        }


def _cache_rows(backend, row: int, rows: int) -> list[np.ndarray]:
    """Views (bytes) of cache rows [row, row + rows) of every layer's key and value (CPU OrtValues)."""
    n = rows * backend.row_bytes
    return [
        np.frombuffer((ctypes.c_char * n).from_address(v.data_ptr() + row * backend.row_bytes), np.uint8)
        for v in backend.cache
    ]


class Prefilled:
    """One backend prefilled once with the longest context; a shorter context c is the cache's first c rows,
    and the rows a step writes past c (which belong to the longer contexts) are restored after the step."""

    def __init__(self, artifact, contexts, ids, max_nodes, threads, profile=None):
        from medusa_runtime.backends.ort import OrtBackend
        from medusa_runtime.masks import causal, step_masks

        b = OrtBackend(artifact, "cpu", max_nodes=max_nodes, threads=threads, profile=profile)
        b.session, b.commit_session = TimedSession(b.session), TimedSession(b.commit_session)
        self.backend, self.max_nodes = b, max_nodes
        top = max(contexts)
        window = artifact.model["sliding_window"]
        positions = np.arange(top, dtype=np.int64)
        masks = step_masks(0, positions, causal(top), window)
        rows = np.array([c - 1 for c in contexts], dtype=np.int64)
        self.prefill_s = {}
        for c in contexts:  # the prefill of each context alone (timed: it is part of generate's time)
            start = time.perf_counter()
            b.reset()
            m = step_masks(0, positions[:c], causal(c), window)
            b.forward(np.asarray(ids[:c], np.int64), positions[:c], m, np.array([c - 1]), keep_all=True)
            self.prefill_s[c] = time.perf_counter() - start
        b.reset()
        out = b.forward(np.asarray(ids[:top], np.int64), positions, masks, rows, keep_all=True)
        self.first = {
            c: (int(out.next_tokens[i]), out.medusa_topk[:, i].copy()) for i, c in enumerate(contexts)
        }
        self.saved = {c: [v.copy() for v in _cache_rows(b, c, max_nodes)] for c in contexts if c < top}

    def restore(self, ctx: int) -> None:
        if ctx in self.saved:
            for view, keep in zip(_cache_rows(self.backend, ctx, self.max_nodes), self.saved[ctx]):
                view[:] = keep


def trees_for(artifact, names):
    from medusa_runtime.tree import build_tree

    out = []
    for name in names:
        if name == "plain":
            out.append(("plain", build_tree([])))
        else:
            out.append(artifact.tree(name, "ort-cpu"))
    return out


def time_steps(artifacts, contexts, tree_names, ids, args) -> tuple[list[Variant], dict]:
    """Every (artifact, context, tree), interleaved: one prefilled backend per artifact."""
    variants, prefill = [], {}
    for label, artifact in artifacts.items():
        trees = trees_for(artifact, tree_names)
        window = artifact.model["sliding_window"]
        pre = Prefilled(artifact, contexts, ids, max(t.num_nodes for _, t in trees), args.threads)
        prefill[label] = pre.prefill_s
        for ctx in contexts:
            for name, tree in trees:
                v = Variant(pre, name, tree, ctx, ids, window)
                v.label = label
                variants.append(v)
    for v in variants:  # warm-up
        for _ in range(2):
            v.step()
    for r in range(args.reps):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            v.step()  # unmeasured: the switch from the previous variant (another session's threads spinning)
            acc = defaultdict(float)
            for _ in range(args.steps):
                for k, s in v.step().items():
                    acc[k] += s
            for k in PARTS:
                v.samples[k].append(acc[k] / args.steps)
            v.samples["total"].append(sum(acc[k] for k in PARTS) / args.steps)
    return variants, prefill


def summarize(variants: list[Variant]) -> list[dict]:
    rows = []
    plain = {
        (v.label, v.ctx): statistics.median(v.samples["total"]) for v in variants if v.tree.num_nodes == 1
    }
    for v in variants:
        key = (v.label, v.ctx)
        med = {k: statistics.median(v.samples[k]) * 1e3 for k in (*PARTS, "total")}
        host = med["cand"] + med["masks"] + med["bind"] + med["accept"] + med["commit_host"]
        total = med["total"]
        rows.append(
            {
                "artifact": v.label,
                "context": v.ctx,
                "tree": v.tree_name,
                "nodes": v.tree.num_nodes,
                "accepted": v.accepted,
                "ms": {k: round(x, 3) for k, x in med.items()},
                "host_ms": round(host, 3),
                "total_min_ms": round(min(v.samples["total"]) * 1e3, 3),
                "total_max_ms": round(max(v.samples["total"]) * 1e3, 3),
                "x_plain": round(total / (plain[key] * 1e3), 3) if key in plain else None,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    width = max(len(r["artifact"]) for r in rows)
    head = f"{'artifact':{width}s} {'ctx':>5s} {'tree':10s} {'N':>3s} {'host':>6s} {'masks':>6s} {'bind':>6s} {'model':>7s} {'commit':>6s} {'total':>7s} {'min-max':>13s} {'x plain':>7s}"
    print(head)
    for r in rows:
        ms = r["ms"]
        print(
            f"{r['artifact']:{width}s} {r['context']:5d} {r['tree']:10s} {r['nodes']:3d} {r['host_ms']:6.2f} {ms['masks']:6.2f} "
            f"{ms['bind'] + ms['commit_host']:6.2f} {ms['model']:7.2f} {ms['commit']:6.2f} {ms['total']:7.2f} "
            f"{r['total_min_ms']:6.2f}-{r['total_max_ms']:<6.2f} {r['x_plain'] or 0:7.2f}"
        )


def op_categories(model_path: Path) -> dict[str, str]:
    """node name -> category: the op type, with MatMulNBits split into lm_head (N >= 32768) and the rest."""
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    cats = {}
    for n in g.node:
        cat = n.op_type
        if n.op_type == "MatMulNBits":
            big = any(a.name == "N" and a.i >= 32768 for a in n.attribute)
            cat = "MatMulNBits(lm_head)" if big else "MatMulNBits(other)"
        elif n.op_type == "MatMul" and "/mins/" in n.name:
            cat = "MatMul(q4k mins)"
        cats[n.name] = cat
    return cats


def profile_ops(artifact, specs: list[tuple[int, str]], ids, args) -> dict:
    """Kernel time per op category per model run, for each (ctx, tree) in specs (one session per ctx)."""
    cats = op_categories(artifact.path("model"))
    window = artifact.model["sliding_window"]
    result = {}
    by_ctx = defaultdict(list)
    for ctx, name in specs:
        by_ctx[ctx].append(name)
    for ctx, names in by_ctx.items():
        trees = trees_for(artifact, names)
        prefix = str(Path(tempfile.mkdtemp()) / "ort")
        pre = Prefilled(artifact, [ctx], ids, max(t.num_nodes for _, t in trees), args.threads, prefix)
        b = pre.backend
        variants = [Variant(pre, name, tree, ctx, ids, window) for name, tree in trees]
        runs: list[str | None] = [None, None]  # model runs in order: which variant (None: prefills, warm-up)
        for v in variants:
            v.step()
            runs.append(None)
        for _ in range(args.reps):
            for v in variants:
                for _ in range(args.steps):
                    v.step()
                    runs.append(v.tree_name)
        events = json.loads(Path(b.session.inner.end_profiling()).read_text())
        model_runs = [e for e in events if e.get("name") == "model_run"]
        if len(model_runs) != len(runs):
            raise SystemExit(f"profile holds {len(model_runs)} model runs, expected {len(runs)}")
        spans = [(e["ts"], e["ts"] + e["dur"], runs[i], e["dur"]) for i, e in enumerate(model_runs)]
        agg: dict[str, dict[str, list[float]]] = {n: defaultdict(lambda: [0, 0.0]) for n in names}
        run_us: dict[str, list[float]] = defaultdict(list)
        for _start, _end, who, dur in spans:
            if who:
                run_us[who].append(dur)
        j = 0
        nodes = sorted(
            (e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
            key=lambda e: e["ts"],
        )
        for e in nodes:
            while j < len(spans) and spans[j][1] < e["ts"]:
                j += 1
            if j == len(spans) or spans[j][2] is None or e["ts"] < spans[j][0]:
                continue
            node = e["name"].removesuffix("_kernel_time")
            cat = cats.get(node, e["args"].get("op_name", "?"))
            a = agg[spans[j][2]][cat]
            a[0] += 1
            a[1] += e["dur"]
        for name in names:
            n = len(run_us[name])
            table = {cat: {"nodes": c / n, "us": us / n} for cat, (c, us) in agg[name].items()}
            result[f"{ctx}:{name}"] = {
                "runs": n,
                "run_us": statistics.median(run_us[name]),
                "kernel_us": sum(x["us"] for x in table.values()),
                "ops": dict(sorted(table.items(), key=lambda kv: -kv[1]["us"])),
            }
        del pre, b, variants
    return result


def print_ops(ops: dict) -> None:
    keys = list(ops)
    cats = sorted(
        {c for k in keys for c in ops[k]["ops"]},
        key=lambda c: -max(ops[k]["ops"].get(c, {"us": 0})["us"] for k in keys),
    )
    print(f"{'op (us per model run)':24s} " + " ".join(f"{k:>22s}" for k in keys))
    for c in cats:
        cells = []
        for k in keys:
            x = ops[k]["ops"].get(c)
            cells.append(f"{x['us']:13.0f} ({x['nodes']:5.0f}n)" if x else f"{'-':>22s}")
        print(f"{c:24s} " + " ".join(cells))
    print(f"{'sum of kernels':24s} " + " ".join(f"{ops[k]['kernel_us']:22.0f}" for k in keys))
    print(f"{'model_run (median)':24s} " + " ".join(f"{ops[k]['run_us']:22.0f}" for k in keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", nargs="+", help="one or more artifacts (several: timed interleaved)")
    ap.add_argument("--prompts", default=str(ROOT / "data" / "specbench_dev.jsonl"))
    ap.add_argument("--contexts", default="100,700")
    ap.add_argument("--trees", default="plain,chain1,chain2,chain3,tree8")
    ap.add_argument("--reps", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)")
    ap.add_argument(
        "--no-spin", action="store_true", help="sessions with session.intra_op.allow_spinning=0 (diagnostic)"
    )
    ap.add_argument(
        "--ops", default="", help="CTX:TREE,... to profile per op type (e.g. 700:plain,700:chain3)"
    )
    ap.add_argument("--no-steps", action="store_true", help="only the per-op profile")
    ap.add_argument("--out", help="write the tables as JSON")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from medusa_runtime.artifact import Artifact

    if args.no_spin:  # every session the backends make: worker threads sleep instead of spinning between ops
        import onnxruntime

        class NoSpin(onnxruntime.SessionOptions):
            def __init__(self):
                super().__init__()
                self.add_session_config_entry("session.intra_op.allow_spinning", "0")

        onnxruntime.SessionOptions = NoSpin

    artifacts = {Path(a).name: Artifact.load(a) for a in args.artifact}
    artifact = next(iter(artifacts.values()))
    tokenizer = Tokenizer.from_file(str(artifact.path("tokenizer")))
    contexts = [int(c) for c in args.contexts.split(",") if c]
    specs = [(int(s.split(":")[0]), s.split(":")[1]) for s in args.ops.split(",") if s]
    need = max(contexts + [c for c, _ in specs])
    ids = context_ids(tokenizer, Path(args.prompts), need, artifact.meta["tokenizer"].get("bos_token_id"))
    report = {
        "artifacts": args.artifact,
        "threads": args.threads,
        "no_spin": args.no_spin,
        "reps": args.reps,
        "steps": args.steps,
        "loadavg_before": os.getloadavg(),
    }
    if not args.no_steps:
        tree_names = [t for t in args.trees.split(",") if t]
        variants, prefill = time_steps(artifacts, contexts, tree_names, ids, args)
        rows = summarize(variants)
        report["steps_table"] = rows
        report["prefill_ms"] = {a: {c: round(x * 1e3, 1) for c, x in p.items()} for a, p in prefill.items()}
        print(
            f"ms per step, median of {args.reps} interleaved rounds x {args.steps} steps (min-max: of the total)"
        )
        print_table(rows)
        for a, p in prefill.items():
            print(
                f"prefill {a} (once, cold): "
                + ", ".join(f"{c} tokens {x * 1e3:.0f} ms" for c, x in p.items())
            )
    if specs:
        ops = {}
        for label, a in artifacts.items():
            for key, value in profile_ops(a, specs, ids, args).items():
                ops[key if len(artifacts) == 1 else f"{label[:12]} {key}"] = value
        report["ops"] = ops
        print_ops(ops)
    report["loadavg_after"] = os.getloadavg()
    print(f"load average before {report['loadavg_before'][0]:.2f}, after {report['loadavg_after'][0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
