"""`medusa-export bench`: Medusa vs plain decoding on the same runtime and artifact vs transformers
`generate`, interleaved per prompt in one process after a warm-up, with the outputs checked equal."""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from .fsutil import atomic_file

METHODS = ("medusa", "plain", "hf")
COLORS = {"medusa": "tab:green", "plain": "tab:blue", "hf": "tab:gray", "compare": "tab:olive"}


class TimedBackend:
    """Delegates to a backend and accumulates the wall time of its device work (forward + commit)."""

    def __init__(self, inner):
        self.inner, self.device_s = inner, 0.0

    def __getattr__(self, name):  # everything else (reset, logits, length, capacity) is the backend's
        return getattr(self.inner, name)

    def _timed(self, fn, *args, **kw):
        start = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.device_s += time.perf_counter() - start

    def forward(self, *args, **kw):
        return self._timed(self.inner.forward, *args, **kw)

    def commit(self, rows):
        return self._timed(self.inner.commit, rows)


def _stats(values: list[float]) -> dict:
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "p25": q[0],
        "p75": q[2],
        "min": values[0],
        "max": values[-1],
    }


def bench(
    folder: Path,
    prompts: Path,
    backend: str = "ort-cpu",
    tree: str | None = None,
    max_new_tokens: int = 128,
    limit: int | None = None,
    runs: int = 1,
    hf: bool = True,
    out: Path | None = None,
    quiet: bool = False,
    per_category: int | None = None,
    compare: Path | None = None,
) -> dict:
    from tqdm import tqdm

    from medusa_runtime.api import MedusaRuntime
    from medusa_runtime.tree import build_tree

    from .prompts import read_prompts
    from .reference import GPU_BACKENDS, hf_greedy, reference_model

    def timed_runtime(path: Path):
        runtime = MedusaRuntime.open(path, backend=backend, tree=tree)
        runtime.backend = TimedBackend(runtime.backend)
        return runtime

    medusa = timed_runtime(folder)
    # another artifact (other export options, dtype, ...) decoding with the same tree, interleaved too
    other = timed_runtime(compare) if compare else None
    plain = MedusaRuntime(
        medusa.backend, medusa.tokenizer, build_tree([]), medusa.eos, medusa.window, tree_name="plain"
    )
    meta = medusa.artifact.meta
    rows = read_prompts(prompts, limit, per_category)
    # transformers in the artifact's dtype where the runtime runs on the GPU, fp32 on the CPU
    hf_dtype = meta["dtype"] if backend in GPU_BACKENDS else "fp32"
    base = reference_model(meta["model"]["name"], hf_dtype, backend) if hf else None

    runtimes = {"medusa": medusa, "plain": plain, "compare": other}

    def run(method: str, ids: list[int]) -> tuple[list[int], float, float, float]:
        """tokens, seconds, device seconds, mean accepted"""
        start = time.perf_counter()
        if method == "hf":
            tokens = hf_greedy(base, ids, max_new_tokens, scores=False).tokens
            return tokens, time.perf_counter() - start, 0.0, 1.0
        runtime = runtimes[method]
        runtime.backend.device_s = 0.0
        res = runtime.generate(ids, max_new_tokens)
        return res.token_ids, time.perf_counter() - start, runtime.backend.device_s, res.mean_accepted or 1.0

    methods = [m for m in METHODS if m != "hf" or base is not None] + (["compare"] if other else [])
    warm = medusa.encode(rows[0]["prompt"])
    for m in methods:  # warm-up: session initialisation, allocator growth, cuBLAS handles
        run(m, warm[:32])
    samples = defaultdict(list)
    per_prompt = []
    identical = 0
    bar = tqdm(total=len(rows) * runs, desc="bench", unit="prompt", disable=quiet)
    for i, row in enumerate(rows):
        ids = medusa.encode(row["prompt"])
        outputs = {}
        for r in range(runs):
            order = methods[(i + r) % len(methods) :] + methods[: (i + r) % len(methods)]  # interleave
            for m in order:
                tokens, secs, dev, acc = run(m, ids)
                outputs[m] = tokens
                samples[m].append(
                    {
                        "tok_s": len(tokens) / secs,
                        "device_s": dev,
                        "seconds": secs,
                        "accepted": acc,
                        "tokens": len(tokens),
                        "category": row["category"],
                    }
                )
            bar.update(1)
        same = all(outputs[m] == outputs["plain"] for m in methods)
        identical += same
        per_prompt.append(
            {
                "id": row["id"],
                "category": row["category"],
                "identical": same,
                **{f"{m}_tokens": len(outputs[m]) for m in methods},
            }
        )
    bar.close()

    result = {
        "artifact": str(folder),
        "backend": backend,
        "dtype": meta["dtype"],
        "tree": medusa.tree_name,
        "tree_nodes": medusa.tree.num_nodes,
        **({"compare": str(compare)} if compare else {}),
        "max_new_tokens": max_new_tokens,
        "prompts": len(rows),
        "runs": runs,
        "identical_outputs": identical,
        "methods": {},
    }
    for m in methods:
        s = samples[m]
        device = sum(x["device_s"] for x in s)
        total = sum(x["seconds"] for x in s)
        entry = {"tok_s": _stats([x["tok_s"] for x in s])}
        if m != "hf":
            entry["device_fraction"] = device / total
            entry["host_fraction"] = 1 - device / total
        if m in ("medusa", "compare"):
            by_cat = defaultdict(list)
            for x in s:
                by_cat[x["category"]].append(x["accepted"])
            entry["accepted"] = statistics.fmean(x["accepted"] for x in s)
            entry["accepted_by_category"] = {c: statistics.fmean(v) for c, v in sorted(by_cat.items())}
        result["methods"][m] = entry
    result["per_prompt"] = per_prompt
    tok = {m: result["methods"][m]["tok_s"]["median"] for m in methods}
    result["speedup"] = tok["medusa"] / tok["plain"]
    if out:
        with atomic_file(Path(out)) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        _plot(result, Path(out).with_suffix(".png"))
    return result


def summary_line(result: dict) -> str:
    m = result["methods"]
    hf = f"{m['hf']['tok_s']['median']:.1f}" if "hf" in m else "n/a"
    return (
        f"bench: medusa {m['medusa']['tok_s']['median']:.1f} tok/s, plain {m['plain']['tok_s']['median']:.1f} tok/s, "
        f"hf {hf} tok/s, speedup {result['speedup']:.2f}x, accepted {m['medusa']['accepted']:.2f} tokens/step"
    )


def report_lines(result: dict) -> list[str]:
    lines = [
        f"{result['prompts']} prompts x {result['runs']} runs, {result['max_new_tokens']} new tokens, "
        f"{result['backend']} {result['dtype']}, tree {result['tree']} ({result['tree_nodes']} nodes); "
        f"outputs identical on {result['identical_outputs']}/{result['prompts']} prompts"
    ]
    for name, m in result["methods"].items():
        t = m["tok_s"]
        split = (
            f", device {m['device_fraction']:.0%} / host {m['host_fraction']:.0%}"
            if "device_fraction" in m
            else ""
        )
        lines.append(
            f"  {name:7s} median {t['median']:.1f} tok/s (p25 {t['p25']:.1f}, p75 {t['p75']:.1f}){split}"
        )
    cats = result["methods"]["medusa"]["accepted_by_category"]
    lines.append("  accepted tokens/step by category: " + ", ".join(f"{c} {a:.2f}" for c, a in cats.items()))
    return lines


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(result["methods"])
    med = [result["methods"][n]["tok_s"]["median"] for n in names]
    err = [
        [m - result["methods"][n]["tok_s"]["p25"] for n, m in zip(names, med)],
        [result["methods"][n]["tok_s"]["p75"] - m for n, m in zip(names, med)],
    ]
    a.bar(names, med, yerr=err, capsize=4, color=[COLORS[n] for n in names])
    a.set_ylabel("tokens/s (median, p25-p75)")
    a.set_title(f"{result['backend']} {result['dtype']}, tree {result['tree']}")
    cats = result["methods"]["medusa"]["accepted_by_category"]
    b.barh(list(cats), list(cats.values()), color="tab:green")
    b.set_xlabel("accepted tokens / step")
    b.set_title("Medusa acceptance by category")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
