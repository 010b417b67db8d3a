"""Time the adaptive chain's policy (adaptive.POLICY, the heads' probabilities used) against round 9's
(adaptive.MATCH_ONLY, the context's match alone), or trees (--trees), with plain decoding, in one process on
one artifact: variants interleaved per prompt (order reversed every other run), median of runs, outputs
checked equal to plain decoding's.

    python scripts/chain_policy_ab.py ARTIFACT [--prompts data/specbench_dev.jsonl] [--skip 0] [--per-category 1]
        [--min-prompt-tokens 0] [--max-new-tokens 64] [--runs 3] [--threads 2] [--trees chain0+lookupauto12,chain0+lookupauto15]
        [--policies 0.4/0.7,0.3/0.7]

--policies KEEP/CONFIDENT,... compares adaptive.ChainPolicy settings (keep, confident) instead (the default
policy is 0.4/0.7).

--skip S --per-category N takes prompts S .. S+N-1 of every category (prompts held out from a choice).
Prints per variant: median tok/s over prompts (each prompt's median over runs), its ratio to plain's, the
geometric mean over prompts of each prompt's ratio to plain, accepted tokens per verify step, and rows
verified per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompts", default=str(ROOT / "data/specbench_dev.jsonl"))
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--min-prompt-tokens", type=int, default=0, help="only prompts at least this long")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trees", help="comma-separated trees to compare instead of the two policies")
    ap.add_argument("--policies", help="comma-separated KEEP/CONFIDENT chain policies to compare instead")
    args = ap.parse_args()

    from medusa_export.bench import TimedBackend
    from medusa_export.prompts import read_prompts
    from medusa_runtime import adaptive
    from medusa_runtime.api import MedusaRuntime

    plain = MedusaRuntime.open(args.artifact, medusa=False, threads=args.threads)
    rows = read_prompts(
        Path(args.prompts),
        per_category=args.skip + args.per_category,
        min_tokens=args.min_prompt_tokens,
        encode=plain.encode,
    )
    seen: dict[str, int] = defaultdict(int)
    picked = []
    for row in rows:
        seen[row["category"]] += 1
        if seen[row["category"]] > args.skip:
            picked.append(row)
    policy = adaptive.POLICY
    if args.trees:
        runtimes = [
            MedusaRuntime.open(args.artifact, threads=args.threads, tree=t) for t in args.trees.split(",")
        ]
        variants = {rt.tree_name: (rt, policy) for rt in runtimes}
    else:
        medusa = MedusaRuntime.open(args.artifact, threads=args.threads)
        runtimes = [medusa]
        policies = {"heads' probabilities": policy, "match only": adaptive.MATCH_ONLY}
        if args.policies:
            pairs = [tuple(float(x) for x in spec.split("/")) for spec in args.policies.split(",")]
            policies = {f"keep {k} confident {c}": replace(policy, keep=k, confident=c) for k, c in pairs}
        variants = {name: (medusa, p) for name, p in policies.items()}
    variants["plain"] = (plain, policy)
    print(
        f"{args.artifact}: trees {', '.join(rt.tree_name for rt in runtimes)}, {len(picked)} prompts x "
        f"{args.max_new_tokens} tokens, {args.runs} runs",
        flush=True,
    )
    times: dict[str, dict[int, list[float]]] = {v: defaultdict(list) for v in variants}
    counts: dict[str, list[tuple[int, int, int]]] = {v: [] for v in variants}  # tokens, verify steps, rows
    for rt in (*runtimes, plain):  # counts each forward's tokens
        rt.backend = TimedBackend(rt.backend)
        rt.generate("Warm up.", 8)
    for run in range(args.runs):
        for i, row in enumerate(picked):
            ids = plain.encode(row["prompt"])
            outputs = {}
            order = list(variants) if (run + i) % 2 == 0 else list(variants)[::-1]
            for name in order:
                rt, adaptive.POLICY = variants[name]
                sizes = rt.backend.forward_tokens
                sizes.clear()
                start = time.perf_counter()
                result = rt.generate(ids, args.max_new_tokens)
                times[name][i].append(len(result.token_ids) / (time.perf_counter() - start))
                outputs[name] = result.token_ids
                if run == 0:
                    # the prompt's forwards (one per prefill piece) hold len(ids) tokens; then a forward a step
                    counts[name].append(
                        (len(result.token_ids) - 1, len(result.steps) - 1, sum(sizes) - len(ids))
                    )
            adaptive.POLICY = policy
            if len(set(map(tuple, outputs.values()))) != 1:
                raise SystemExit(f"prompt {i}: the variants' outputs differ")
        print(f"run {run + 1}/{args.runs} done", flush=True)
    plain_rates = [statistics.median(v) for v in times["plain"].values()]
    for name in variants:
        rates = [statistics.median(v) for v in times[name].values()]  # per prompt, median over runs
        tokens, steps, rows_ = (sum(c[j] for c in counts[name]) for j in range(3))
        ratios = [r / p for r, p in zip(rates, plain_rates)]
        print(
            f"{name:22s} {statistics.median(rates):7.1f} tok/s (median over prompts)  "
            f"{statistics.median(rates) / statistics.median(plain_rates):5.2f}x plain  "
            f"geometric mean of per-prompt x plain {statistics.geometric_mean(ratios):5.2f}  "
            f"{tokens / steps:5.2f} tokens/step  {rows_ / steps:5.2f} rows/step"
        )
    print("outputs: every variant = plain decoding on every prompt")


if __name__ == "__main__":
    main()
