"""Accepted tokens per step of heads + tree on a prompt set, from the base model's greedy text
(`medusa_export/simulate.py`): the figure `bench` reports for the heads-only tree, by category, next to the
tree builder's prediction from the heads' held-out accuracy, without exporting anything. Several heads share
one set of continuations. `--parents path` measures what sequential heads would accept if every node were
drafted from its own parent (the runtime drafts from the top-1 chain: `chain`, the default).

    python scripts/simulate_acceptance.py HEADS[,HEADS...] --prompts data/specbench_dev.jsonl \
        [--per-category N] [--max-new-tokens 64] [--tree gemma3-270m-64] [--draft-vocab 8192] \
        [--parents chain|path] [--device cuda] [--batch 64] [--out result.json]

HEADS: shipped names or folders. The tree is HEADS/trees/TREE.json when there is one, else a preset or file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from medusa_export.draft_vocab import draft_ids
from medusa_export.heads import heads_path, resolve_heads
from medusa_export.models import explicit_model, load_base
from medusa_export.onnx_export import tree_dirs
from medusa_export.prompts import read_prompts
from medusa_export.simulate import greedy_continuations, simulate
from medusa_runtime.tree import expected_accept_length, load_rank_accuracy, resolve_tree


def tree_choices(heads_spec: str, tree: str, num_heads: int) -> list:
    own = Path(heads_path(heads_spec)) / "trees" / f"{tree}.json"
    _, buffers = resolve_tree(
        str(own) if own.is_file() else tree, search_dirs=tree_dirs(), num_heads=num_heads
    )
    return [list(p) for p in buffers.choices]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("heads", help="heads names or folders, comma-separated")
    parser.add_argument("--prompts", default="data/specbench_dev.jsonl")
    parser.add_argument("--per-category", type=int, default=0, help="0: every prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tree", default="gemma3-270m-64")
    parser.add_argument("--draft-vocab", type=int, default=0, help="0: what the heads were trained on")
    parser.add_argument(
        "--parents",
        choices=("chain", "path"),
        default="chain",
        help="the token a sequential head reads: the previous head's top-1 (as the runtime drafts) or the "
        "true one (drafting each node from its own parent)",
    )
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1, help="prompts per greedy generation batch")
    parser.add_argument("--out", help="write the figures as JSON")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    base = load_base(args.model, "fp32")
    base.hf.to(args.device)
    decoder = explicit_model(base).to(args.device)
    cfg = decoder.cfg
    rows = read_prompts(Path(args.prompts), per_category=args.per_category)
    categories = [row["category"] for row in rows]
    prompts = [base.tokenizer.encode(row["prompt"]).ids for row in rows]
    start = time.perf_counter()
    continuations = greedy_continuations(base, prompts, args.max_new_tokens, args.device, args.batch)
    print(
        f"{len(prompts)} greedy continuations ({sum(map(len, continuations))} tokens) in "
        f"{time.perf_counter() - start:.0f}s",
        file=sys.stderr,
    )
    result = {"prompts": args.prompts, "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens}
    for spec in args.heads.split(","):
        heads = resolve_heads(spec, cfg.hidden_size, cfg.vocab_size).to(args.device).eval()
        choices = tree_choices(spec, args.tree, heads.num_heads)
        drafts = draft_ids(spec, args.draft_vocab, cfg.vocab_size)
        sims = simulate(decoder, heads, choices, prompts, continuations, categories, drafts, args.parents)
        by_cat: dict[str, list[float]] = defaultdict(list)
        for s in sims:
            by_cat[s.category].append(s.mean_accepted)
        accuracy_file = Path(heads_path(spec)) / "accuracy.json"
        held_out = json.loads(accuracy_file.read_text()) if accuracy_file.is_file() else {}
        predicted = expected_accept_length(choices, load_rank_accuracy(accuracy_file)) if held_out else None
        entry = {
            "tree": args.tree,
            "nodes": len(choices) + 1,
            "draft_vocab": 0 if drafts is None else len(drafts),
            "sequential": heads.sequential,
            "parents": args.parents if heads.sequential else None,
            "num_layers": heads.num_layers,
            "held_out_top1": held_out.get("top1"),
            "held_out_top5": held_out.get("top5"),
            "predicted": predicted,
            "accepted": statistics.fmean(s.mean_accepted for s in sims),
            "accepted_by_category": {c: statistics.fmean(v) for c, v in sorted(by_cat.items())},
            "steps": sum(len(s.steps) for s in sims),
        }
        result[spec] = entry
        pred = "" if predicted is None else f", builder predicted {predicted:.2f}"
        print(
            f"{spec}: {entry['accepted']:.3f} accepted tokens/step{pred} ({args.tree}, {entry['steps']} steps)"
        )
        print("  " + ", ".join(f"{c} {a:.2f}" for c, a in entry["accepted_by_category"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
