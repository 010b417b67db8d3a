"""Where the tree builder's prediction comes from: the heads' rank accuracy on the base model's greedy
continuations of a prompt set, the expected acceptance the builder computes from it (ranks independent
across depths, `tree.expected_accept_length`), and the tree's acceptance simulated position by position
on the same text.

    python scripts/heads_calibration.py HEADS PROMPTS.jsonl PER_CATEGORY     (CPU, fp32 transformers)

HEADS is a shipped heads name (its trees/gemma3-270m-64.json is the tree); 64 greedy tokens per prompt.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from medusa_export.heads import resolve_heads
from medusa_export.models import explicit_model, load_base
from medusa_export.reference import hf_greedy
from medusa_export.train_data import hidden_states
from medusa_runtime.tree import expected_accept_length, load_choices

RANKS, NEW_TOKENS = 10, 64


def first_per_category(path: str, per_category: int) -> list[str]:
    seen: dict[str, int] = {}
    prompts = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            category = row.get("category", "")
            if seen.get(category, 0) < per_category:
                seen[category] = seen.get(category, 0) + 1
                prompts.append(row.get("prompt") or row["turns"][0])
    return prompts


def true_ranks(heads, decoder, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
    """[positions, K]: at each continuation position t, the rank of token t+k+2 in head k's logits."""
    seq = torch.tensor([prompt_ids + continuation])
    hidden = hidden_states(decoder, seq)[0]
    weight = decoder.lm_head_weight()
    k = heads.num_heads
    ranks = []
    with torch.no_grad():
        for t in range(len(prompt_ids) - 1, seq.shape[1] - k - 1):
            logits = heads.head_states(hidden[t : t + 1])[:, 0] @ weight.T  # [K, V]
            true = seq[0, t + 2 : t + 2 + k]
            ranks.append((logits > logits.gather(1, true[:, None])).sum(1).numpy())
    return np.array(ranks).reshape(-1, k)


def simulated_accept(ranks: np.ndarray, choices) -> list[int]:
    """Per position: 1 + the deepest tree path whose every rank matches the true token's."""
    return [
        1 + max((len(p) for p in choices if all(r[j] == p[j] for j in range(len(p)))), default=0)
        for r in ranks
    ]


def main() -> None:
    heads_name, prompts_file, per_category = sys.argv[1], sys.argv[2], int(sys.argv[3])
    base = load_base("gemma3-270m", "fp32")
    decoder = explicit_model(base)
    heads = resolve_heads(heads_name, decoder.cfg.hidden_size, decoder.cfg.vocab_size).eval()
    _, choices = load_choices(f"heads/{heads_name}/trees/gemma3-270m-64.json")
    all_ranks, simulated = [], []
    for prompt in first_per_category(prompts_file, per_category):
        ids = base.tokenizer.encode(prompt).ids
        ranks = true_ranks(heads, decoder, ids, hf_greedy(base, ids, NEW_TOKENS, scores=False).tokens)
        all_ranks.append(ranks)
        simulated += simulated_accept(ranks, choices)
    ranks = np.concatenate(all_ranks)
    accuracy = [[float((ranks[:, k] == r).mean()) for r in range(RANKS)] for k in range(heads.num_heads)]
    print(f"{heads_name} on {prompts_file} ({per_category} per category): {len(ranks)} positions")
    print("top-1 per head", [round(a[0], 3) for a in accuracy])
    print("predicted (independent ranks), 64-node tree:", round(expected_accept_length(choices, accuracy), 3))
    print("simulated on the same text, per position:", round(float(np.mean(simulated)), 3))


if __name__ == "__main__":
    main()
