"""Replay the adaptive chain's choices over recorded plain decoding: policy variants compared exactly in
accepted tokens, in seconds instead of a benchmark's hour.

    python scripts/chain_replay.py record ARTIFACT --prompts FILE [--tokens 96] [--threads 2] --out FILE.pkl
    python scripts/chain_replay.py replay FILE.pkl [--new-tokens 64] [--row-cost 0.08]

`record` decodes every prompt plainly (one token a step) on ort-cpu and keeps, at each position, the token
and the heads' top-k and top-1 probabilities there. Both depend only on the text before that position, so
they are what any Medusa step with that root sees, and greedy Medusa emits the same text: `replay` walks
each prompt the way decode.decode would, choosing each step's chain with adaptive.chain_step, accepting
the chain's tokens that equal the recorded ones. Accepted tokens per step are therefore exact. Time is
modelled: a step of n chain rows costs 1 + ROW_COST n plain steps (cpu_step_profile.py measures 0.04-0.09;
BENCHMARKS.md), so tokens per unit of cost stands in for speed; confirm a choice with a timed run.

Variants: the lookup's occurrence (the most recent, as before round 13, against the longest agreement with
the context, lookup.best_continuation), and an oracle that knows which of the step's lookup chain and
heads chain is accepted further (the headroom of a better chooser between the two).
"""

from __future__ import annotations

import argparse
import math
import pickle
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]


def record(args) -> None:
    from tokenizers import Tokenizer
    from tqdm import tqdm

    from medusa_export.prompts import read_prompts
    from medusa_runtime.artifact import Artifact
    from medusa_runtime.backends.ort import OrtBackend
    from medusa_runtime.decode import prefill, verify
    from medusa_runtime.tree import build_tree

    art = Artifact.load(args.artifact)
    tokenizer = Tokenizer.from_file(str(art.path("tokenizer")))
    backend = OrtBackend(art, "cpu", max_nodes=1, threads=args.threads)
    root, window = build_tree([]), art.model["sliding_window"]
    rows = read_prompts(Path(args.prompts), None)
    out = []
    for row in tqdm(rows, desc="record", unit="prompt"):
        prompt = tokenizer.encode(row["prompt"]).ids
        if len(prompt) + args.tokens > art.max_seq:
            continue
        step = prefill(backend, prompt, window)
        tokens, drafts, confs = (
            [int(step.next_tokens[-1])],
            [step.medusa_topk[:, -1]],
            [backend.draft_confidence(-1)],
        )
        for _ in range(args.tokens - 1):
            step = verify(backend, root, np.array([tokens[-1]]), window)
            tokens.append(int(step.next_tokens[0]))
            drafts.append(step.medusa_topk[:, 0])
            confs.append(backend.draft_confidence(0))
        out.append(
            dict(
                category=row.get("category", ""),
                prompt=prompt,
                tokens=tokens,
                drafts=np.array(drafts),
                confs=np.array(confs),
            )
        )
    Path(args.out).write_bytes(pickle.dumps(out))
    print(f"recorded {len(out)} prompts x {args.tokens} tokens -> {args.out}")


def _accepted(chain, truth) -> int:
    n = 0
    while n < len(chain) and n < len(truth) and chain[n] == truth[n]:
        n += 1
    return n


def _walk(rec, new_tokens: int, row_cost: float, choose) -> tuple[float, float]:
    """(tokens per step, tokens per unit of cost) for one prompt; choose(context, draft, conf, truth) -> chain."""
    tokens, j, emitted, steps, cost = rec["tokens"], 0, 1, 0, 0.0
    while emitted < new_tokens:
        truth = tokens[j + 1 :]
        chain = choose([*rec["prompt"], *tokens[: j + 1]], rec["drafts"][j], rec["confs"][j], truth)
        n = _accepted(chain, truth)
        steps, cost = steps + 1, cost + 1 + row_cost * len(chain)
        j, emitted = j + n + 1, emitted + n + 1
    return emitted / steps, emitted / cost


def replay(args) -> None:
    from medusa_runtime import adaptive, lookup

    records = pickle.loads(Path(args.file).read_bytes())
    longest = max(len(r["tokens"]) for r in records) - args.new_tokens
    prefixes = adaptive._chains(min(lookup.AUTO_LENGTH, longest))

    def policy(context, draft, conf, truth):
        return adaptive.chain_step(prefixes, context, draft, conf)[1][0]

    def oracle(context, draft, conf, truth):
        """The policy's lookup chain or its heads chain, whichever is accepted further."""
        found, matched = lookup.best_continuation(context, max(prefixes), cap=adaptive.LONG_MATCH)
        heads = adaptive.heads_chain(draft, adaptive.heads_length(conf, adaptive.POLICY.keep, max(prefixes)))
        if found is None:
            return heads
        chains = [found[: adaptive.chain_length(matched, max(prefixes))], heads]
        return max(chains, key=lambda c: (_accepted(c, truth), -len(c)))

    scan = lookup.SCAN
    # name: (occurrences of the suffix n-gram the lookup compares, chooser)
    variants = {
        "most recent occurrence": (1, policy),
        "longest agreement": (scan, policy),
        "oracle chooser": (scan, oracle),
    }
    results = {}
    try:
        for name, (occurrences, choose) in variants.items():
            lookup.SCAN = occurrences
            results[name] = [_walk(r, args.new_tokens, args.row_cost, choose) for r in records]
    finally:
        lookup.SCAN = scan
    base = results["most recent occurrence"]
    half = len(records) // 2
    print(f"{len(records)} prompts x {args.new_tokens} tokens, row cost {args.row_cost}")
    for name, res in results.items():
        ratios = [b[1] / a[1] for a, b in zip(base, res)]

        def geo(xs):
            return math.exp(statistics.mean(math.log(x) for x in xs))

        print(
            f"  {name:24s} tokens/step {statistics.mean(r[0] for r in res):.3f}, tokens per cost (geometric mean) "
            f"{geo([r[1] for r in res]):.4f}: x{geo(ratios):.3f} (halves x{geo(ratios[:half]):.3f} / "
            f"x{geo(ratios[half:]):.3f}; {sum(r > 1 + 1e-9 for r in ratios)} prompts better, "
            f"{sum(r < 1 - 1e-9 for r in ratios)} worse)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("artifact")
    r.add_argument("--prompts", required=True)
    r.add_argument("--tokens", type=int, default=96)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--out", required=True)
    p = sub.add_parser("replay")
    p.add_argument("file")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--row-cost", type=float, default=0.08)
    args = ap.parse_args()
    record(args) if args.cmd == "record" else replay(args)


if __name__ == "__main__":
    main()
