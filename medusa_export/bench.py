"""`medusa-export bench`: Medusa vs plain decoding on the same runtime and artifact vs transformers
`generate`, interleaved per prompt in one process after a warm-up, with the outputs checked equal.
With `lookup` (a hybrid tree: the heads' tree + prompt-lookup chains) the heads-only tree is timed too,
and accepted tokens are counted per source (heads / lookup) and per category."""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from .fsutil import atomic_file

METHODS = ("medusa", "plain", "hf")
COLORS = {
    "medusa": "tab:green",
    "plain": "tab:blue",
    "hf": "tab:gray",
    "heads": "tab:cyan",
    "compare": "tab:olive",
}
SOURCES = ("heads", "lookup")


class TimedBackend:
    """Delegates to a backend and accumulates the wall time of its device work (forward + commit), and the
    token count of each forward (`forward_tokens`: the prefill's, then each step's verified rows)."""

    def __init__(self, inner):
        self.inner, self.device_s = inner, 0.0
        self.forward_tokens: list[int] = []

    def __getattr__(self, name):  # everything else (reset, logits, length, capacity) is the backend's
        return getattr(self.inner, name)

    def _timed(self, fn, *args, **kw):
        start = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.device_s += time.perf_counter() - start

    def forward(self, input_ids, *args, **kw):
        self.forward_tokens.append(len(input_ids))
        return self._timed(self.inner.forward, input_ids, *args, **kw)

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
    lookup: int | str | None = None,
    min_prompt_tokens: int = 0,
) -> dict:
    """`min_prompt_tokens`: only prompts at least this long (their prefill is then a large part of the time:
    the result splits each method's time into the first token and the tokens after it)."""
    from tqdm import tqdm

    from medusa_runtime.api import MedusaRuntime
    from medusa_runtime.decode import accepted_by_source
    from medusa_runtime.lookup import parse_lookup
    from medusa_runtime.tree import build_tree

    from .prompts import read_prompts
    from .reference import GPU_BACKENDS, hf_greedy, reference_model

    def timed_runtime(path: Path):
        runtime = MedusaRuntime.open(path, backend=backend, tree=tree, lookup=lookup)
        runtime.backend = TimedBackend(runtime.backend)
        return runtime

    medusa = timed_runtime(folder)
    # another artifact (other export options, dtype, ...) decoding with the same tree, interleaved too
    other = timed_runtime(compare) if compare else None
    plain = MedusaRuntime(
        medusa.backend, medusa.tokenizer, build_tree([]), medusa.eos, medusa.window, tree_name="plain"
    )
    chains, length = parse_lookup(lookup)
    # with lookup chains: the same tree without them, on the same backend, to see what the lookup adds
    heads = None
    if chains:
        heads_name, heads_tree = medusa.artifact.tree(tree, backend)
        heads = MedusaRuntime(
            medusa.backend, medusa.tokenizer, heads_tree, medusa.eos, medusa.window, tree_name=heads_name
        )
    meta = medusa.artifact.meta
    rows = read_prompts(prompts, limit, per_category, min_tokens=min_prompt_tokens, encode=medusa.encode)
    # transformers in the artifact's dtype where the runtime runs on the GPU, fp32 on the CPU
    hf_dtype = meta["dtype"] if backend in GPU_BACKENDS else "fp32"
    base = reference_model(meta["model"]["name"], hf_dtype, backend) if hf else None

    runtimes = {"medusa": medusa, "plain": plain, "heads": heads, "compare": other}

    def run(method: str, ids: list[int]) -> tuple[list[int], dict]:
        """tokens, and the sample: seconds, device seconds, mean accepted; for our runtimes also the first
        token's seconds, the tokens/s after it and accepted tokens per verify step by source"""
        start = time.perf_counter()
        if method == "hf":
            tokens = hf_greedy(base, ids, max_new_tokens, scores=False).tokens
            seconds = time.perf_counter() - start
            return tokens, {"seconds": seconds, "device_s": 0.0, "accepted": 1.0}
        runtime = runtimes[method]
        runtime.backend.device_s = 0.0
        res = runtime.generate(ids, max_new_tokens)
        seconds = time.perf_counter() - start
        counts, verify_steps = accepted_by_source(res.steps), max(len(res.steps) - 1, 1)
        return res.token_ids, {
            "seconds": seconds,
            "first_s": res.first_token_s,
            "decode_tok_s": res.decode_tokens_per_s,
            "device_s": runtime.backend.device_s,
            "accepted": res.mean_accepted or 1.0,
            "by_source": {s: counts[s] / verify_steps for s in SOURCES},
        }

    methods = (
        [m for m in METHODS if m != "hf" or base is not None]
        + (["heads"] if chains else [])
        + (["compare"] if other else [])
    )
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
                tokens, sample = run(m, ids)
                outputs[m] = tokens
                samples[m].append(
                    sample
                    | {
                        "tok_s": len(tokens) / sample["seconds"],
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
        "weights": (meta.get("weights") or {}).get("scheme", meta["dtype"]),
        "tree": medusa.tree_name,
        "tree_nodes": medusa.tree.num_nodes,
        "lookup": {"chains": chains, "length": length},
        **({"compare": str(compare)} if compare else {}),
        "max_new_tokens": max_new_tokens,
        "min_prompt_tokens": min_prompt_tokens,
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
            entry.update(_first_token(s))
            entry["device_fraction"] = device / total
            entry["host_fraction"] = 1 - device / total
        if m in ("medusa", "heads", "compare"):
            entry.update(_acceptance(s))
        result["methods"][m] = entry
    result["per_prompt"] = per_prompt
    tok = {m: result["methods"][m]["tok_s"]["median"] for m in methods}
    result["speedup"] = tok["medusa"] / tok["plain"]
    after = {m: result["methods"][m].get("decode_tok_s", {}).get("median") for m in ("medusa", "plain")}
    if after["medusa"] and after["plain"]:
        result["decode_speedup"] = after["medusa"] / after["plain"]
    if chains:
        result["speedup_vs_heads"] = tok["medusa"] / tok["heads"]
    if out:
        with atomic_file(Path(out)) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        _plot(result, Path(out).with_suffix(".png"))
    return result


def _first_token(samples: list[dict]) -> dict:
    """The time to the first token (the prompt's prefill, in seconds) and the tokens/s after it."""
    after = [x["decode_tok_s"] for x in samples if x["decode_tok_s"]]
    return {"first_token_s": _stats([x["first_s"] for x in samples])} | (
        {"decode_tok_s": _stats(after)} if after else {}
    )


def _acceptance(samples: list[dict]) -> dict:
    """Mean accepted tokens/step over prompts: overall, by source, by category, by category and source.
    `accepted` = 1 (the base model's own token) + the accepted candidates of each source."""
    by_cat = defaultdict(list)
    for x in samples:
        by_cat[x["category"]].append(x)

    def sources(xs: list[dict]) -> dict:
        return {src: statistics.fmean(x["by_source"][src] for x in xs) for src in SOURCES}

    return {
        "accepted": statistics.fmean(x["accepted"] for x in samples),
        "accepted_by_source": sources(samples),
        "accepted_by_category": {
            c: statistics.fmean(x["accepted"] for x in xs) for c, xs in sorted(by_cat.items())
        },
        "accepted_by_category_source": {c: sources(xs) for c, xs in sorted(by_cat.items())},
    }


def summary_line(result: dict) -> str:
    m = result["methods"]
    hf = f"{m['hf']['tok_s']['median']:.1f}" if "hf" in m else "n/a"
    line = (
        f"bench: medusa {m['medusa']['tok_s']['median']:.1f} tok/s, plain {m['plain']['tok_s']['median']:.1f} tok/s, "
        f"hf {hf} tok/s, speedup {result['speedup']:.2f}x, accepted {m['medusa']['accepted']:.2f} tokens/step"
    )
    if "heads" in m:
        src = m["medusa"]["accepted_by_source"]
        line += (
            f" (heads {src['heads']:.2f} + lookup {src['lookup']:.2f}); heads-only tree "
            f"{m['heads']['tok_s']['median']:.1f} tok/s, accepted {m['heads']['accepted']:.2f}"
        )
    return line


def report_lines(result: dict) -> list[str]:
    lines = [
        f"{result['prompts']} prompts x {result['runs']} runs, {result['max_new_tokens']} new tokens, "
        f"{result['backend']} {result['dtype']} ({result['weights']} weights), tree {result['tree']} ({result['tree_nodes']} nodes); "
        f"outputs identical on {result['identical_outputs']}/{result['prompts']} prompts"
    ]
    for name, m in result["methods"].items():
        t = m["tok_s"]
        split = (
            f", device {m['device_fraction']:.0%} / host {m['host_fraction']:.0%}"
            if "device_fraction" in m
            else ""
        )
        first = f"; first token {m['first_token_s']['median'] * 1000:.0f} ms" if "first_token_s" in m else ""
        if "decode_tok_s" in m:
            first += f", then {m['decode_tok_s']['median']:.1f} tok/s"
        lines.append(
            f"  {name:7s} median {t['median']:.1f} tok/s (p25 {t['p25']:.1f}, p75 {t['p75']:.1f}){first}{split}"
        )
    if "decode_speedup" in result:
        lines.append(
            f"  medusa / plain: {result['speedup']:.2f}x end to end, {result['decode_speedup']:.2f}x after the "
            "first token (the prefill is the same computation for both)"
        )
    medusa = result["methods"]["medusa"]
    cats = medusa["accepted_by_category"]
    if "heads" not in result["methods"]:
        lines.append(
            "  accepted tokens/step by category: " + ", ".join(f"{c} {a:.2f}" for c, a in cats.items())
        )
        return lines
    heads = result["methods"]["heads"]["accepted_by_category"]
    src = medusa["accepted_by_source"]
    lines.append(
        f"  accepted tokens/step {medusa['accepted']:.2f} = 1 + heads {src['heads']:.2f} + lookup "
        f"{src['lookup']:.2f}; heads-only tree {result['methods']['heads']['accepted']:.2f}"
    )
    lines.append("  accepted tokens/step by category (with lookup = 1 + heads + lookup | heads-only tree):")
    for c, a in cats.items():
        cs = medusa["accepted_by_category_source"][c]
        lines.append(f"    {c:15s} {a:.2f} = 1 + {cs['heads']:.2f} + {cs['lookup']:.2f} | {heads[c]:.2f}")
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
    a.set_title(f"{result['backend']} {result['dtype']} ({result['weights']} weights), tree {result['tree']}")
    by_source = result["methods"]["medusa"]["accepted_by_category_source"]
    cats = list(by_source)
    left = [1.0] * len(cats)
    b.barh(cats, left, color="tab:gray", label="base token")
    for src, color in zip(SOURCES, ("tab:green", "tab:orange")):
        widths = [by_source[c][src] for c in cats]
        b.barh(cats, widths, left=left, color=color, label=src)
        left = [x + w for x, w in zip(left, widths)]
    b.set_xlabel("accepted tokens / step")
    b.set_title("Medusa acceptance by category and source")
    b.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
