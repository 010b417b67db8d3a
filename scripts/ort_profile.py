"""Where a decode step's time goes on ONNX Runtime: per-op-type kernel time and placement (EP), from
ONNX Runtime's own profiler, for Medusa or plain decoding of a few prompts.

    python scripts/ort_profile.py ARTIFACT --prompts FILE [--backend ort-cuda] [--tree T] [--plain] [--limit 3]
        [--min-prompt-tokens N] [--max-new-tokens 64]

`--plain --max-new-tokens 1 --min-prompt-tokens 600` profiles long prompts' prefills alone (the runs are then
the prefill's 512-token pieces).

Prints one line per (provider, op type): nodes run per step, kernel microseconds per step; then the
step's wall time against the sum of its kernel times (the rest is launch gaps and host work).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parent.parent),
    str(Path(__file__).resolve().parent.parent / "runtime"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--tree")
    ap.add_argument("--plain", action="store_true", help="plain decoding instead of Medusa")
    ap.add_argument("--limit", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--min-prompt-tokens", type=int, default=0, help="only prompts at least this long")
    args = ap.parse_args()

    from medusa_export.prompts import read_prompts
    from medusa_runtime.api import MedusaRuntime

    prefix = str(Path(tempfile.mkdtemp()) / "ort")
    runtime = MedusaRuntime.open(
        args.artifact, backend=args.backend, tree=args.tree, medusa=not args.plain, profile=prefix
    )
    rows = read_prompts(
        Path(args.prompts), args.limit, min_tokens=args.min_prompt_tokens, encode=runtime.encode
    )
    # warm-up: profiled too, dropped below (one graph run per decode step, the prefill included)
    warm_runs = len(runtime.generate(runtime.encode(rows[0]["prompt"])[:32], 8).steps)
    steps, wall = 0, 0.0
    for row in rows:
        start = time.perf_counter()
        res = runtime.generate(runtime.encode(row["prompt"]), args.max_new_tokens)
        wall += time.perf_counter() - start
        steps += len(res.steps)
    events = json.loads(Path(runtime.backend.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    timed_runs = runs[warm_runs:]
    first_ts = timed_runs[0]["ts"] if timed_runs else 0
    by_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_ts:
            key = (e["args"].get("provider", "?"), e["args"].get("op_name", "?"))
            by_op[key][0] += 1
            by_op[key][1] += e["dur"]
    n = max(len(timed_runs), 1)
    run_us = sum(r["dur"] for r in timed_runs) / n
    kernel_us = sum(v[1] for v in by_op.values()) / n
    print(f"{args.artifact} on {args.backend}: {len(rows)} prompts, {n} graph runs, {steps} decode steps")
    print(f"{'provider':28s} {'op':24s} {'nodes/run':>9s} {'us/run':>9s}")
    for (prov, op), (count, dur) in sorted(by_op.items(), key=lambda kv: -kv[1][1]):
        print(f"{prov:28s} {op:24s} {count / n:9.1f} {dur / n:9.1f}")
    print(
        f"per graph run: {run_us:.0f} us in ONNX Runtime, {kernel_us:.0f} us summed over kernels "
        f"({sum(v[0] for v in by_op.values()) / n:.0f} nodes); per decode step {wall / max(steps, 1) * 1e3:.2f} ms wall"
    )


if __name__ == "__main__":
    main()
