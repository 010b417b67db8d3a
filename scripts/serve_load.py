"""Load test of `medusa-serve`: C concurrent clients x R requests each, at several concurrencies, on 127.0.0.1.

    python scripts/serve_load.py ARTIFACT [--backend ort-cpu] [--tree T] [--concurrency 1,4,16] [--requests 8]
                                 [--max-tokens 64] [--workers auto|N] [--max-workers N] [--max-queue N]
                                 [--url URL] [--out FILE.json]

First the single-stream reference: the runtime in this process generates every prompt the clients will
send (greedy), which gives the expected token ids and the single-stream Medusa tok/s. Then, per concurrency
C, a fresh server (`--workers auto`: C workers; or --url: a running server, never restarted) gets C clients
that each send R requests one after another (every other one streamed) and checks: nothing lost (every
request answered 200, the server's ok counter grew by C x R), nothing duplicated (distinct ids), every
answer identical to the single-stream output. Reported per row: p50/p99 latency, p50 time to first token,
aggregate tok/s, per-stream tok/s, accepted tokens/step. Then the slot checks: fill every worker and the
whole queue with long streams, probe (each probe must be answered 429 fast), disconnect every long stream
and time until all slots are free, then run one request per worker, which must succeed identically.

Every loop is bounded in count and time; only 127.0.0.1 is targeted. Prints a table and writes JSON;
exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "runtime")]

LONG_PROMPT = (
    "Write a very long, detailed essay on the history of the Roman Empire, from its founding to its fall."
)


def read_prompts(path: Path, limit: int) -> list[str]:
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            p = row.get("prompt") or (row.get("turns") or [None])[0]
            if isinstance(p, str) and p.strip():
                prompts.append(p)
        if len(prompts) >= limit:
            break
    if not prompts:
        raise SystemExit(f"error: no prompts in {path}")
    return prompts


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def reference(args, prompts: list[str]) -> dict:
    """Single-stream greedy outputs and speed, in this process (freed before any server starts)."""
    from medusa_runtime.api import MedusaRuntime

    rt = MedusaRuntime.open(args.artifact, backend=args.backend, tree=args.tree)
    rt.generate(prompts[0], 8)  # warm-up
    outputs, tokens, seconds, verify_tokens, verify_steps = [], 0, 0.0, 0, 0
    for p in prompts:
        res = rt.generate(p, args.max_tokens)
        outputs.append(res.token_ids)
        tokens += len(res.token_ids)
        seconds += res.seconds
        verify_tokens += sum(len(s.tokens) for s in res.steps[1:])
        verify_steps += len(res.steps) - 1
    tree, max_seq = rt.tree_name, rt.artifact.max_seq
    del rt
    return {
        "outputs": outputs,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "accepted_per_step": verify_tokens / verify_steps if verify_steps else 0.0,
        "tree": tree,
        "max_seq": max_seq,
    }


class ServerProcess:
    def __init__(self, args, workers: int, max_queue: int, log_path: Path):
        cmd = [
            sys.executable,
            "-m",
            "medusa_runtime.serve",
            str(args.artifact),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        cmd += ["--backend", args.backend, "--workers", str(workers), "--max-queue", str(max_queue)]
        cmd += ["--tree", args.tree] if args.tree else []
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")]),
        }
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], args.start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        m = re.search(r"ready on (http://127\.0\.0\.1:\d+)", line)
        if not m:
            self.stop()
            raise SystemExit(f"error: the server did not start: {line!r}; see {log_path}")
        self.url = m.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def one_request(client, prompt: str, max_tokens: int, stream: bool, timeout: float) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, "return_token_ids": True}
    start = time.perf_counter()
    rec = {"stream": stream, "status": None, "ids": [], "id": None, "ttft": None, "error": None}
    try:
        if not stream:
            r = await client.post("/v1/completions", json=body, timeout=timeout)
            rec["status"] = r.status_code
            if r.status_code == 200:
                doc = r.json()
                rec["id"], rec["ids"] = doc["id"], doc["choices"][0]["token_ids"]
            else:
                rec["error"] = r.text[:200]
        else:
            async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
                rec["status"] = r.status_code
                if r.status_code != 200:
                    rec["error"] = (await r.aread()).decode()[:200]
                else:
                    done = False
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            doc = json.loads(line[6:])
                            if "error" in doc:
                                rec["error"] = doc["error"]["message"]
                            elif doc["choices"]:
                                rec["id"] = doc["id"]
                                ids = doc["choices"][0].get("token_ids") or []
                                if ids and rec["ttft"] is None:
                                    rec["ttft"] = time.perf_counter() - start
                                rec["ids"] += ids
                    if not done:
                        rec["error"] = "stream ended without [DONE]"
    except Exception as exc:  # a lost request is reported, not raised
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["latency"] = time.perf_counter() - start
    return rec


async def run_level(args, url: str, prompts: list[str], ref: dict, concurrency: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency + 8)  # fillers + probes
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.request_timeout) as client:
        health = (await client.get("/health")).json()
        await one_request(client, prompts[0], 4, False, args.request_timeout)  # warm-up
        before = parse_metrics((await client.get("/metrics")).text)

        async def client_loop(i: int) -> list[dict]:
            recs = []
            for k in range(args.requests):
                n = (i * args.requests + k) % len(prompts)
                rec = await one_request(
                    client, prompts[n], args.max_tokens, (i + k) % 2 == 0, args.request_timeout
                )
                rec["prompt"] = n
                recs.append(rec)
            return recs

        start = time.perf_counter()
        results = [
            r for rs in await asyncio.gather(*(client_loop(i) for i in range(concurrency))) for r in rs
        ]
        wall = time.perf_counter() - start
        after = parse_metrics((await client.get("/metrics")).text)

        ok = [r for r in results if r["status"] == 200 and r["error"] is None]
        identical = [r for r in ok if r["ids"] == ref["outputs"][r["prompt"]]]
        tokens = sum(len(r["ids"]) for r in ok)
        served = after['medusa_requests_total{outcome="ok"}'] - before['medusa_requests_total{outcome="ok"}']
        dv = after["medusa_verify_steps_total"] - before["medusa_verify_steps_total"]
        dt = after.get("medusa_verify_tokens_total", 0) - before.get("medusa_verify_tokens_total", 0)
        latencies = [r["latency"] for r in ok]
        row = {
            "concurrency": concurrency,
            "workers": health["workers"],
            "max_queue": health["max_queue"],
            "requests": len(results),
            "ok": len(ok),
            "identical": len(identical),
            "distinct_ids": len({r["id"] for r in ok}),
            "server_ok_delta": int(served),
            "errors": [r["error"] for r in results if r["error"]][:5],
            "wall_s": wall,
            "latency_p50_s": quantile(latencies, 0.5),
            "latency_p99_s": quantile(latencies, 0.99),
            "ttft_p50_s": quantile([r["ttft"] for r in ok if r["ttft"] is not None], 0.5),
            "tokens": tokens,
            "aggregate_tokens_per_s": tokens / wall if wall else 0.0,
            "per_stream_tokens_per_s": sum(len(r["ids"]) / r["latency"] for r in ok) / len(ok) if ok else 0.0,
            "accepted_per_step": dt / dv if dv else 0.0,
        }
        row["lost_or_duplicated"] = not (
            row["ok"] == row["requests"] == row["distinct_ids"] == row["server_ok_delta"]
        )
        if args.slot_checks:
            row.update(await slot_checks(args, client, prompts, ref, health))
        return row


async def wait_health(client, deadline: float, **want) -> dict | None:
    while time.monotonic() < deadline:
        h = (await client.get("/health")).json()
        if all(h[k] == v for k, v in want.items()):
            return h
        await asyncio.sleep(0.02)
    return None


async def slot_checks(args, client, prompts, ref, health) -> dict:
    """Fill every worker and the queue with long streams; probes must get 429 fast; then disconnect them all
    and time until every slot is free; then one request per worker must succeed identically."""
    workers, max_queue = health["workers"], health["max_queue"]
    long_tokens = min(args.long_tokens, ref["max_seq"] - 256)
    body = {"prompt": args.long_prompt, "max_tokens": long_tokens, "stream": True}

    async def hold() -> None:  # a long stream that reads until cancelled (the client disconnects)
        async with client.stream("POST", "/v1/completions", json=body, timeout=args.request_timeout) as r:
            async for _ in r.aiter_lines():
                pass

    fillers = []
    deadline = time.monotonic() + 60
    full = None
    for _ in range(workers + max_queue + 8):  # bounded: a few extra in case a long stream ends early
        fillers.append(asyncio.create_task(hold()))
        await asyncio.sleep(0.05)
        h = (await client.get("/health")).json()
        if h["active"] == workers and h["queued"] == max_queue:
            full = h
            break
        if time.monotonic() > deadline:
            break
    probes = []
    if full:
        for _ in range(args.probes):
            start = time.perf_counter()
            r = await client.post(
                "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=args.request_timeout
            )
            probes.append((r.status_code, time.perf_counter() - start))
    start = time.perf_counter()
    for t in fillers:
        t.cancel()  # the client side closes each connection: running streams stop, queued ones leave
    await asyncio.gather(*fillers, return_exceptions=True)
    freed = await wait_health(client, time.monotonic() + 60, active=0, queued=0)
    freed_s = time.perf_counter() - start if freed else None
    after = await asyncio.gather(
        *(
            one_request(client, prompts[i % len(prompts)], args.max_tokens, i % 2 == 0, args.request_timeout)
            for i in range(workers)
        )
    )
    after_ok = sum(
        r["status"] == 200 and r["ids"] == ref["outputs"][i % len(prompts)] for i, r in enumerate(after)
    )
    rejected = [s for s, _ in probes if s == 429]
    return {
        "queue_filled": full is not None,
        "probes": len(probes),
        "probes_429": len(rejected),
        "probe_429_max_s": max((t for s, t in probes if s == 429), default=None),
        "slots_freed_s": freed_s,
        "after_disconnect_ok": after_ok,
        "slot_checks_ok": bool(full)
        and len(rejected) == len(probes)
        and all(t < 1.0 for _, t in probes)
        and freed_s is not None
        and after_ok == workers,
    }


def fmt(v, spec=".2f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--tree", default=None)
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts, one row each")
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=Path, default=ROOT / "data" / "specbench_dev.jsonl")
    ap.add_argument("--distinct", type=int, default=16, help="distinct prompts, cycled over the requests")
    ap.add_argument("--workers", default="auto", help="auto: as many workers as clients; or a number")
    ap.add_argument("--max-workers", type=int, default=None, help="with --workers auto: at most this many")
    ap.add_argument("--max-queue", type=int, default=None, help="default: 2 x concurrency, at least 4")
    ap.add_argument("--url", default=None, help="a running server on 127.0.0.1 (not restarted per row)")
    ap.add_argument("--out", type=Path, default=Path("serve_load.json"))
    ap.add_argument("--no-slot-checks", dest="slot_checks", action="store_false")
    ap.add_argument("--long-prompt", default=LONG_PROMPT, help="prompt of the streams that fill the slots")
    ap.add_argument("--long-tokens", type=int, default=1024)
    ap.add_argument("--probes", type=int, default=3, help="requests sent to a full queue")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    args = ap.parse_args()
    if args.url and not re.match(r"^http://(127\.0\.0\.1|localhost)(:\d+)?/?$", args.url):
        raise SystemExit("error: --url must be a server on 127.0.0.1")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.requests < 1:
        raise SystemExit("error: --concurrency needs positive integers and --requests at least 1")

    prompts = read_prompts(args.prompts, args.distinct)
    print(
        f"reference: {len(prompts)} prompts x {args.max_tokens} tokens, single stream, in process", flush=True
    )
    ref = reference(args, prompts)
    print(
        f"single-stream Medusa ({args.backend}, tree {ref['tree']}): {ref['tokens_per_s']:.1f} tok/s, "
        f"{ref['accepted_per_step']:.2f} accepted tokens/step",
        flush=True,
    )
    logs = args.out.parent / f"{args.out.stem}-server-logs"  # one log per server started here
    if not args.url:
        logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in levels:
        workers = min(c, args.max_workers or c) if args.workers == "auto" else int(args.workers)
        max_queue = args.max_queue if args.max_queue is not None else max(4, 2 * c)
        server = None if args.url else ServerProcess(args, workers, max_queue, logs / f"server-c{c}.log")
        try:
            row = asyncio.run(run_level(args, args.url or server.url, prompts, ref, c))
        finally:
            if server:
                server.stop()
        rows.append(row)
        print(
            f"  concurrency {c}: {row['ok']}/{row['requests']} ok, {row['identical']} identical, "
            f"{row['aggregate_tokens_per_s']:.1f} tok/s aggregate",
            flush=True,
        )

    head = "| concurrency | workers | requests | ok | identical | p50 latency s | p99 latency s | p50 TTFT s | aggregate tok/s | tok/s per stream | accepted/step | 429 max s | slots freed s |"
    print()
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['workers']} | {r['requests']} | {r['ok']} | {r['identical']} | "
            f"{fmt(r['latency_p50_s'])} | {fmt(r['latency_p99_s'])} | {fmt(r['ttft_p50_s'], '.3f')} | "
            f"{fmt(r['aggregate_tokens_per_s'], '.1f')} | {fmt(r['per_stream_tokens_per_s'], '.1f')} | "
            f"{fmt(r['accepted_per_step'])} | {fmt(r.get('probe_429_max_s'), '.3f')} | {fmt(r.get('slots_freed_s'), '.2f')} |"
        )
    print(
        f"\nsingle-stream Medusa (in process, {args.backend}, tree {ref['tree']}): {ref['tokens_per_s']:.1f} tok/s, "
        f"{ref['accepted_per_step']:.2f} accepted tokens/step"
        + ("" if args.url else f"; server logs in {logs}")
    )
    failures = []
    for r in rows:
        c = r["concurrency"]
        if r["lost_or_duplicated"]:
            failures.append(f"concurrency {c}: requests lost or duplicated ({r['errors']})")
        if r["identical"] != r["ok"]:
            failures.append(
                f"concurrency {c}: {r['ok'] - r['identical']} answers differ from the single stream"
            )
        if args.slot_checks and not r["slot_checks_ok"]:
            failures.append(
                f"concurrency {c}: slot checks failed (queue filled {r['queue_filled']}, "
                f"{r['probes_429']}/{r['probes']} probes 429, freed {r['slots_freed_s']}, "
                f"{r['after_disconnect_ok']}/{r['workers']} after disconnect)"
            )
    doc = {
        "artifact": str(args.artifact),
        "backend": args.backend,
        "tree": ref["tree"],
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "single_stream": {k: v for k, v in ref.items() if k != "outputs"},
        "rows": rows,
        "failures": failures,
        "server_logs": None if args.url else str(logs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    for f in failures:
        print(f"FAIL {f}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
