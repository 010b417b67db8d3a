"""The Medusa loop over a fused-step backend (backends/ort_step.py): greedy only, one graph run a step.

prefill (model.onnx) -> the first tree from the prefill's draft, uploaded once -> [step.onnx: verify,
accept, commit the path's KV, draft the next tree, all on the device] ... Per step the host reads only
the emitted tokens (and the last accepted node, for Step.path). Yields the same Step objects as
decode.decode, and the same tokens (greedy Medusa == greedy plain == the base model's greedy output).
A drafter (tests: an oracle) replaces the graph's own draft by uploading its tree each step. A hybrid tree's
lookup chains are filled on the host from the context after each step (the graph drafts the heads' nodes).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .decode import Drafter, Step, candidates, lookup, prefill
from .tree import TreeBuffers


def decode(
    backend, prompt: list[int], tree: TreeBuffers, window: int | None, drafter: Drafter | None = None
) -> Iterator[Step]:
    """Yields one Step per run, forever: the caller stops at EOS, a token budget or a stop string."""
    runner = backend.runner(tree)  # before the prefill: a bad tree fails before any work
    out = prefill(backend, prompt, window)
    token = int(out.next_tokens[-1])
    draft = out.medusa_topk[:, -1]
    context = [*prompt, token]
    yield Step([token], ())
    if drafter is not None:
        draft = drafter(context, draft)
    runner.start(candidates(tree, token, draft, lookup(tree, context)[0]))
    shape = out.medusa_topk[:, -1].shape
    while True:
        emitted, last = runner.step()
        context += emitted
        yield Step(emitted, tree.path(last), tree.source(last))
        if drafter is not None:
            draft = drafter(context, np.zeros(shape, np.int64))
            runner.set_tokens(candidates(tree, emitted[-1], draft, lookup(tree, context)[0]))
        elif tree.lookup_chains:
            runner.fill_lookup(lookup(tree, context)[0])
