"""Where the tree builder's prediction comes from: the heads' rank accuracy on the base model's greedy
continuations of a prompt set, the expected acceptance the builder computes from it (ranks independent
across depths, `tree.expected_accept_length`), and the tree's acceptance simulated position by position
on the same text.

    python scripts/heads_calibration.py HEADS[,HEADS...] PROMPTS.jsonl PER_CATEGORY    (CPU, fp32 transformers)
        [--weight-by data/specbench_dev.jsonl] [--save-accuracy accuracy-calibration.json]

HEADS is a shipped heads name (its trees/gemma3-270m-64.json is the tree); several, comma-separated, share
the continuations. PER_CATEGORY 0 takes every prompt. 64 greedy tokens per prompt. --weight-by also reports
the figures with each category weighted by its share of that file (the benchmark's mix); --save-accuracy
writes the (unweighted) rank accuracies to heads/HEADS/FILE in the format of accuracy.json, for
`medusa-export tree --from-accuracy`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from medusa_export.heads import resolve_heads
from medusa_export.models import explicit_model, load_base
from medusa_export.prompts import read_prompts
from medusa_export.simulate import accepted_at, greedy_continuations, true_ranks
from medusa_runtime.tree import expected_accept_length, load_choices

RANKS, NEW_TOKENS = 10, 64


def rank_accuracy(ranks: np.ndarray, weights: np.ndarray) -> list[list[float]]:
    w = weights / weights.sum()
    return [[float(w[ranks[:, k] == r].sum()) for r in range(RANKS)] for k in range(ranks.shape[1])]


def report(label: str, ranks, simulated, weights, choices) -> list[list[float]]:
    acc = rank_accuracy(ranks, weights)
    top5 = [round(sum(a[:5]), 3) for a in acc]
    sim = float(np.average(simulated, weights=weights))
    print(f"  [{label}] top-1 per head {[round(a[0], 3) for a in acc]}  top-5 per head {top5}")
    print(
        f"  [{label}] predicted (independent ranks): {expected_accept_length(choices, acc):.3f}"
        f"   simulated per position: {sim:.3f}"
    )
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("heads", help="shipped heads name(s), comma-separated")
    parser.add_argument("prompts")
    parser.add_argument("per_category", type=int)
    parser.add_argument("--weight-by", help="JSONL whose category counts weight the categories")
    parser.add_argument("--save-accuracy", help="write heads/NAME/FILE (accuracy.json format)")
    args = parser.parse_args()
    base = load_base("gemma3-270m", "fp32")
    decoder = explicit_model(base)
    prompts = [
        (r["category"], r["prompt"]) for r in read_prompts(Path(args.prompts), per_category=args.per_category)
    ]
    encoded = [base.tokenizer.encode(prompt).ids for _, prompt in prompts]
    continuations = list(zip(encoded, greedy_continuations(base, encoded, NEW_TOKENS, "cpu"), strict=True))
    for heads_name in args.heads.split(","):
        heads = resolve_heads(heads_name, decoder.cfg.hidden_size, decoder.cfg.vocab_size).eval()
        _, choices = load_choices(f"heads/{heads_name}/trees/gemma3-270m-64.json")
        all_ranks, simulated, categories = [], [], []
        for (category, _), (ids, new) in zip(prompts, continuations, strict=True):
            ranks = true_ranks(decoder, heads, ids, new)[: -heads.num_heads]  # positions with every target
            all_ranks.append(ranks)
            simulated += (1 + accepted_at(ranks, choices)).tolist()
            categories += [category] * len(ranks)
        ranks = np.concatenate(all_ranks)
        per_cat = Counter(categories)
        print(
            f"{heads_name} on {args.prompts} ({args.per_category or 'all'} per category): "
            f"{len(prompts)} prompts, {len(ranks)} positions"
        )
        acc = report("pooled", ranks, simulated, np.ones(len(ranks)), choices)
        if args.weight_by:
            share = Counter(json.loads(line)["category"] for line in open(args.weight_by) if line.strip())
            missing = sorted(set(share) - set(per_cat))
            w = np.array([share[c] / per_cat[c] for c in categories], dtype=float)
            report(f"weighted like {Path(args.weight_by).name}", ranks, simulated, w, choices)
            if missing:
                print(f"  (no calibration prompts for {missing})")
        for category in sorted(per_cat):
            mask = np.array([c == category for c in categories], dtype=float)
            cat_acc = rank_accuracy(ranks, mask)
            print(
                f"    {category:15s} {per_cat[category]:4d} positions  top-1 {cat_acc[0][0]:.2f}"
                f"  predicted {expected_accept_length(choices, cat_acc):.2f}"
                f"  simulated {np.average(simulated, weights=mask):.2f}"
            )
        if args.save_accuracy:
            out = Path("heads") / heads_name / args.save_accuracy
            doc = {
                "rank_accuracy": [[round(a, 6) for a in row] for row in acc],
                "top1": [round(row[0], 6) for row in acc],
                "top5": [round(sum(row[:5]), 6) for row in acc],
                "eval_targets": [len(ranks)] * len(acc),
                "calibration": {
                    "prompts": args.prompts,
                    "num_prompts": len(prompts),
                    "new_tokens": NEW_TOKENS,
                    "model": "gemma3-270m fp32 greedy (transformers)",
                    "script": "scripts/heads_calibration.py",
                },
            }
            out.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"  wrote {out}")


if __name__ == "__main__":
    main()
