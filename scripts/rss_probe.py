"""Peak resident memory of one runtime process serving many prompts (issue 13: peak RSS <= 700 MiB), and
its cold start (MedusaRuntime.open to the first token).

    python scripts/rss_probe.py ARTIFACT [--prompts docs/cpu-runs/round5/prompts-52.jsonl] [--per-category N]
        [--limit N] [--max-new-tokens 64] [--methods medusa,plain] [--rounds 1] [--backend ort-cpu]
        [--min-prompt-tokens N] [--threads N] [--tree NAME] [--prefill-chunk N] [--keep-pages] [--dense-reads]
        [--json FILE]

Opens ARTIFACT once (only the runtime: no torch, no transformers), times open -> first token, then
generates --max-new-tokens tokens for every prompt (EOS off, so every prompt runs the same number of
tokens) with each method in turn, prompt by prompt (medusa: the artifact's default tree; plain: the same
backend with the root-only tree), and prints after every generation the process's resident memory now
(VmRSS), its peak so far (VmHWM, = ru_maxrss), glibc's heap (in use / free), and tok/s. `--dense-reads`
turns off the ort-cpu backend's sparse reading of the embedding table (FilePages.read_sparsely);
`--prefill-chunk N` sets the size of its prompt pieces (0: the whole prompt at once). `--keep-pages`
turns off the ort-cpu backend's release of mapped weight pages (runtime/medusa_runtime/file_pages.py).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "runtime")]


def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MiB (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap() -> dict[str, float]:
    """glibc's view (MiB): brk/arena heap in use and free, and mmapped chunks; {} without mallinfo2."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError, TypeError):
        return {}
    mib = 1 / 2**20
    return {"heap_used": m.uordblks * mib, "heap_free": m.fordblks * mib, "mmapped": m.hblkhd * mib}


def smaps() -> dict[str, float]:
    """Resident MiB per kind of mapping (/proc/self/smaps): [heap], anonymous, each file, [stack]..."""
    out: dict[str, float] = {}
    name = ""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
            name = parts[5] if len(parts) > 5 else "[anon]"
        elif parts and parts[0] == "Rss:":
            out[name] = out.get(name, 0.0) + int(parts[1]) / 1024
    return out


def smaps_growth(before: dict[str, float], after: dict[str, float], top: int = 8) -> str:
    grow = sorted(((after.get(k, 0) - before.get(k, 0), k) for k in set(before) | set(after)), reverse=True)
    return ", ".join(f"{Path(k).name} {d:+.1f}" for d, k in grow[:top] if abs(d) >= 0.1)


def snapshot() -> dict[str, float]:
    s = proc_status()
    s["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s.update(heap())
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--prompts", default=str(ROOT / "docs/cpu-runs/round5/prompts-52.jsonl"))
    p.add_argument("--per-category", type=int)
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--methods", default="medusa,plain", help="comma-separated: medusa, plain")
    p.add_argument("--rounds", type=int, default=1, help="passes over the prompts")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--tree")
    p.add_argument("--keep-pages", action="store_true", help="ort-cpu: release_pages=False")
    p.add_argument("--dense-reads", action="store_true", help="ort-cpu: no FilePages.read_sparsely")
    p.add_argument("--prefill-chunk", type=int, help="prompt pieces of N tokens (0: all at once)")
    p.add_argument("--min-prompt-tokens", type=int, default=0)
    p.add_argument("--json", help="write every row here")
    p.add_argument(
        "--ab-release",
        action="store_true",
        help="speed A/B instead: every prompt twice, with and without the release of mapped weight pages "
        "before the prefill (same sessions, order alternating), --rounds passes; prints Medusa tok/s of each",
    )
    args = p.parse_args()

    from medusa_export.prompts import read_prompts
    from medusa_runtime.api import MedusaRuntime
    from medusa_runtime.tree import build_tree

    prompts = read_prompts(Path(args.prompts), args.limit, args.per_category)
    options = {}
    if args.threads:
        options["threads"] = args.threads
    if args.dense_reads:
        from medusa_runtime.file_pages import FilePages

        FilePages.read_sparsely = lambda self, ranges: 0
    if args.keep_pages:
        options["release_pages"] = False
    print(f"[rss] before open: {snapshot()}", flush=True)
    start = time.perf_counter()
    rt = MedusaRuntime.open(args.artifact, backend=args.backend, tree=args.tree, **options)
    opened = time.perf_counter() - start
    after_open = snapshot()
    maps_open = smaps()
    rt.eos = set()  # every prompt generates exactly max_new_tokens
    if args.prefill_chunk is not None:
        rt.backend.prefill_chunk = args.prefill_chunk
    first = rt.generate("Hello", 1)
    cold = time.perf_counter() - start
    print(
        f"[rss] open {opened:.2f} s, cold start (open -> first token) {cold:.2f} s, tree {rt.tree_name}; "
        f"after open: {after_open}",
        flush=True,
    )
    del first
    plain = MedusaRuntime(rt.backend, rt.tokenizer, build_tree([]), set(), rt.window, tree_name="plain")
    runtimes = {"medusa": rt, "plain": plain}
    methods = args.methods.split(",")
    encoded = [rt.encode(q["prompt"]) for q in prompts]
    kept = [(q, ids) for q, ids in zip(prompts, encoded) if len(ids) >= args.min_prompt_tokens]
    if not kept:
        raise SystemExit(f"rss_probe: no prompt has {args.min_prompt_tokens} tokens")
    prompts, encoded = zip(*kept)
    if args.ab_release:
        return ab_release(rt, encoded, args)
    rows, total = [], len(prompts) * len(methods) * args.rounds
    speed = {m: [0, 0.0] for m in methods}
    done = 0
    for rnd in range(args.rounds):
        for i, (q, ids) in enumerate(zip(prompts, encoded)):
            for method in methods:
                res = runtimes[method].generate(ids, args.max_new_tokens)
                done += 1
                speed[method][0] += len(res.token_ids)
                speed[method][1] += res.seconds
                s = snapshot()
                row = {
                    "round": rnd,
                    "prompt": i,
                    "id": q["id"],
                    "category": q["category"],
                    "prompt_tokens": len(ids),
                    "method": method,
                    "tok_s": res.tokens_per_s,
                    **s,
                }
                rows.append(row)
                print(
                    f"[rss] {done:3d}/{total} {method:6s} {q['category'][:14]:14s} {len(ids):4d} tok "
                    f"{res.tokens_per_s:6.1f} tok/s | RSS {s.get('VmRSS', 0):6.1f} peak {s['maxrss']:6.1f} MiB "
                    f"| heap used {s.get('heap_used', 0):5.1f} free {s.get('heap_free', 0):5.1f} "
                    f"mmapped {s.get('mmapped', 0):5.1f}",
                    flush=True,
                )
    end = snapshot()
    print(
        f"[rss] resident growth since open by mapping (MiB): {smaps_growth(maps_open, smaps())}", flush=True
    )
    summary = {
        "artifact": args.artifact,
        "release_pages": not args.keep_pages,
        "sparse_reads": not args.dense_reads,
        "prefill_chunk": rt.backend.prefill_chunk,
        "tree": rt.tree_name,
        "prompts": len(prompts),
        "max_prompt_tokens": max(map(len, encoded)),
        "rounds": args.rounds,
        "open_s": opened,
        "cold_start_s": cold,
        "rss_after_open_mib": after_open.get("VmRSS"),
        "peak_rss_mib": end["maxrss"],
        "rss_end_mib": end.get("VmRSS"),
        "tok_s": {m: n / sec for m, (n, sec) in speed.items()},
    }
    print("[rss] summary " + json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


def ab_release(rt, encoded, args) -> None:
    """Medusa tok/s with and without FilePages.release() before each prefill, interleaved in one process."""
    import statistics

    pages = rt.backend.file_pages
    if pages is None:
        raise SystemExit("--ab-release needs the release of mapped pages on (no --keep-pages)")
    seconds = {"release": 0.0, "keep": 0.0}
    tokens = {"release": 0, "keep": 0}
    ratios = []
    for rnd in range(args.rounds):
        for i, ids in enumerate(encoded):
            order = ("release", "keep") if (i + rnd) % 2 == 0 else ("keep", "release")
            per = {}
            for mode in order:
                rt.backend.file_pages = pages if mode == "release" else None
                res = rt.generate(ids, args.max_new_tokens)
                seconds[mode] += res.seconds
                tokens[mode] += len(res.token_ids)
                per[mode] = res.tokens_per_s
            ratios.append(per["release"] / per["keep"])
            print(
                f"[ab] round {rnd} prompt {i:2d} ({len(ids)} tokens): release {per['release']:6.1f} "
                f"keep {per['keep']:6.1f} tok/s",
                flush=True,
            )
    rt.backend.file_pages = pages
    tok = {m: tokens[m] / seconds[m] for m in seconds}
    print(
        f"[ab] summary: release {tok['release']:.1f} tok/s, keep {tok['keep']:.1f} tok/s (total tokens / total "
        f"seconds), release/keep {tok['release'] / tok['keep']:.4f}; median per-prompt ratio "
        f"{statistics.median(ratios):.4f}; peak RSS {snapshot()['maxrss']:.0f} MiB",
        flush=True,
    )


if __name__ == "__main__":
    main()
