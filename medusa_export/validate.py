"""`medusa-export validate`: the runtime against transformers' greedy decoding, token for token."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# A mismatch is a near-tie when the reference's top-2 logit margin is within this fraction of the
# top logit's magnitude: the rounding of the runtime's dtype accumulated through the network.
NEAR_TIE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
# Block-quantized weights (`--weights int4|int8`) move logits further than rounding does: a divergence from
# transformers fp32 is a near-tie when the fp32 top-2 margin is within this fraction of the top logit.
NEAR_TIE_WEIGHTS = {"int8": 2e-2, "int4": 5e-2}
REFERENCES = ("auto", "plain", "transformers")


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
    lookup: int | str | None = None,
    reference: str = "auto",
) -> bool:
    """Prints one line per prompt and the summary; returns True when the result is acceptable.
    `lookup` adds prompt-lookup chains to the tree (see medusa_runtime.lookup).
    `reference`: transformers (greedy fp32, token for token), plain (the same artifact's plain greedy
    decoding, token for token), or auto: plain for quantized artifacts (`weights` in the sidecar), with
    agreement with transformers reported as a rate; transformers otherwise."""
    if reference not in REFERENCES:
        from medusa_runtime.errors import MedusaError

        raise MedusaError(f"unknown --reference {reference!r}: use one of {', '.join(REFERENCES)}")
    scheme = _weights_scheme(folder)
    if reference == "plain" or (reference == "auto" and scheme != "fp"):
        return validate_plain(
            folder, prompts, backend, max_new_tokens, limit, tree, out, lookup, hf_rate=reference == "auto"
        )
    from medusa_runtime.api import MedusaRuntime
    from medusa_runtime.decode import accepted_by_source

    from .prompts import read_prompts
    from .reference import hf_greedy, reference_model

    runtime = MedusaRuntime.open(folder, backend=backend, tree=tree, lookup=lookup)
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
        if runtime.tree.lookup_chains:
            by_source = accepted_by_source(res.steps)
            rep.line += f"; accepted from heads {by_source['heads']}, from lookup {by_source['lookup']}"
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


def _weights_scheme(folder: Path) -> str:
    from medusa_runtime.artifact import Artifact

    return (Artifact.load(folder, verify=False).meta.get("weights") or {}).get("scheme", "fp")


def validate_plain(
    folder: Path,
    prompts: Path,
    backend: str = "ort-cpu",
    max_new_tokens: int = 64,
    limit: int | None = None,
    tree: str | None = None,
    out=sys.stdout,
    lookup: int | str | None = None,
    hf_rate: bool = True,
) -> bool:
    """Medusa against the same artifact's plain greedy decoding, token for token (the promise of a quantized
    artifact); with `hf_rate`, also how often both agree with transformers' fp32 greedy decoding, and
    whether each divergence from it is a near-tie. True when Medusa = plain on every prompt."""
    from medusa_runtime.api import MedusaRuntime
    from medusa_runtime.tree import build_tree

    from .prompts import read_prompts

    runtime = MedusaRuntime.open(folder, backend=backend, tree=tree, lookup=lookup)
    # plain decoding on the same backend (one copy of the weights; the two never decode at once)
    plain = MedusaRuntime(
        runtime.backend, runtime.tokenizer, build_tree([]), runtime.eos, runtime.window, tree_name="plain"
    )
    meta = runtime.artifact.meta
    scheme = (meta.get("weights") or {}).get("scheme", meta.get("dtype", "fp32"))
    rows = read_prompts(prompts, limit)
    base = None
    if hf_rate:
        from .reference import reference_model

        base = reference_model(meta["model"]["name"], "fp32", backend)
    print(
        f"validate: {folder} on {backend} ({scheme} weights, tree {runtime.tree_name}) vs the same artifact's "
        f"plain greedy decoding, {len(rows)} prompts x {max_new_tokens} tokens"
        + ("; agreement with transformers greedy (fp32) reported as a rate" if hf_rate else ""),
        file=out,
        flush=True,
    )
    same_plain = hf_same = hf_ties = hf_tokens = 0
    total_tokens = 0
    for i, row in enumerate(rows, 1):
        ids = runtime.encode(row["prompt"])
        res = runtime.generate(ids, max_new_tokens)
        ref = plain.generate(ids, max_new_tokens)
        got, want = res.token_ids, ref.token_ids
        total_tokens += len(want)
        if got == want:
            same_plain += 1
            line = f"prompt {i}: Medusa = plain ({len(want)} tokens, {res.mean_accepted:.2f} tokens/step)"
        else:
            pos = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            a = got[pos] if pos < len(got) else None
            b = want[pos] if pos < len(want) else None
            line = f"prompt {i}: MISMATCH with plain at position {pos}: Medusa {a} vs plain {b}"
        if base is not None:
            from .reference import hf_greedy

            hf = hf_greedy(base, ids, max_new_tokens)
            rep = compare(i, want, hf, runtime.tokenizer, "fp32", 0.0)
            hf_tokens += _prefix(want, hf.tokens)
            if rep.identical:
                hf_same += 1
                line += "; = transformers"
            else:
                pos = _prefix(want, hf.tokens)
                if pos < min(len(want), len(hf.tokens)):
                    margin = hf.margins[pos]
                    tie = margin <= NEAR_TIE_WEIGHTS.get(scheme, 1e-4) * max(1.0, abs(hf.tops[pos]))
                    hf_ties += tie
                    line += (
                        f"; differs from transformers at position {pos} (fp32 top-2 margin {margin:.4f}, "
                        f"{'near-tie' if tie else 'NOT a near-tie'})"
                    )
                else:
                    line += f"; differs from transformers in length ({len(want)} vs {len(hf.tokens)} tokens)"
        print(line, file=out, flush=True)
    n = len(rows)
    summary = f"validate: Medusa = plain on {same_plain}/{n} prompts"
    if base is not None:
        summary += (
            f"; agreement with transformers fp32: {hf_same}/{n} prompts identical ({100 * hf_same / max(n, 1):.0f}%), "
            f"{hf_tokens}/{total_tokens} tokens before the first divergence, {hf_ties}/{n - hf_same} divergences "
            f"at near-ties (margin <= {NEAR_TIE_WEIGHTS.get(scheme, 1e-4):g} x |top logit|)"
        )
    print(summary, file=out, flush=True)
    if same_plain < n and not is_chain(runtime.tree.choices):
        print(
            f"validate: tree {runtime.tree_name} branches: a node behind a masked sibling sees its ancestors at other "
            "key positions than plain decoding does, so attention sums round differently, and int8-quantized "
            "activations can turn that into a different token; chain trees (chain1-chain4) are exact",
            file=out,
            flush=True,
        )
    return same_plain == n


def is_chain(choices) -> bool:
    """A tree whose nodes are one path of first choices (root, [0], [0, 0], ...)."""
    return all(all(r == 0 for r in path) for path in choices)


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
