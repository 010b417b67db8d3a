"""`medusa-export validate`: the runtime against transformers' greedy decoding, token for token."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# A mismatch is a near-tie when the reference's top-2 logit margin is within this fraction of the
# top logit's magnitude: the rounding of the runtime's dtype accumulated through the network.
NEAR_TIE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


@dataclass
class PromptReport:
    identical: bool
    same_tokens: int
    total_tokens: int
    line: str
    acceptable: bool  # identical, or every difference explained as a near-tie in a reduced precision


def compare(idx: int, got: list[int], ref, tokenizer, dtype: str, mean_accepted: float) -> PromptReport:
    want = ref.tokens
    same = sum(a == b for a, b in zip(got, want))
    if got == want:
        return PromptReport(
            True,
            same,
            len(want),
            f"prompt {idx}: identical ({len(want)} tokens, {mean_accepted:.2f} tokens/step)",
            True,
        )
    pos = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if pos >= min(len(got), len(want)):
        return PromptReport(
            False,
            same,
            len(want),
            f"prompt {idx}: MISMATCH: runtime stopped after {len(got)} tokens, reference after {len(want)}",
            False,
        )
    margin = ref.margins[pos]
    tie = margin <= NEAR_TIE[dtype] * max(1.0, abs(ref.tops[pos]))
    verdict = f"near-tie within {dtype} rounding" if tie else "NOT a near-tie"
    line = (
        f"prompt {idx}: MISMATCH at position {pos}: runtime {got[pos]} {tokenizer.decode([got[pos]])!r} vs "
        f"reference {want[pos]} {tokenizer.decode([want[pos]])!r}; reference top-2 margin {margin:.5f} ({verdict})"
    )
    return PromptReport(False, same, len(want), line, tie and dtype != "fp32")


def validate(
    folder: Path,
    prompts: Path,
    backend: str = "ort-cpu",
    max_new_tokens: int = 64,
    limit: int | None = None,
    tree: str | None = None,
    out=sys.stdout,
) -> bool:
    """Prints one line per prompt and the summary; returns True when the result is acceptable."""
    from medusa_runtime.api import MedusaRuntime

    from .prompts import read_prompts
    from .reference import hf_greedy, reference_model

    runtime = MedusaRuntime.open(folder, backend=backend, tree=tree)
    meta = runtime.artifact.meta
    dtype = meta.get("dtype", "fp32")
    rows = read_prompts(prompts, limit)
    base = reference_model(
        meta["model"]["name"], "fp32", backend
    )  # where the runtime runs; TF32 off by default
    print(
        f"validate: {folder} on {backend} ({dtype}, tree {runtime.tree_name}) vs transformers greedy (fp32), "
        f"{len(rows)} prompts x {max_new_tokens} tokens",
        file=out,
        flush=True,
    )
    reports = []
    for i, row in enumerate(rows, 1):
        ids = runtime.encode(row["prompt"])
        ref = hf_greedy(base, ids, max_new_tokens)
        res = runtime.generate(ids, max_new_tokens)
        rep = compare(i, res.token_ids, ref, runtime.tokenizer, dtype, res.mean_accepted)
        print(rep.line, file=out, flush=True)
        reports.append(rep)
    n_same = sum(r.identical for r in reports)
    tok_same, tok_all = sum(r.same_tokens for r in reports), sum(r.total_tokens for r in reports)
    print(
        f"validate: {n_same}/{len(reports)} prompts identical, {tok_same}/{tok_all} tokens identical",
        file=out,
        flush=True,
    )
    return all(r.acceptable for r in reports)
