"""`medusa-serve`: the OpenAI-compatible HTTP service, run as a real subprocess on 127.0.0.1 (a free port the
server picks itself) over a tiny artifact, driven by httpx and the official openai client. Outputs must
equal MedusaRuntime.generate token for token; queueing, disconnects, bad requests, /metrics and SIGTERM
are exercised for real (no mocks). The server runs with torch and transformers imports blocked."""

from __future__ import annotations

import json
import math
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import PROMPTS, ROOT
from medusa_runtime.acceptance import Typical
from medusa_runtime.api import MedusaRuntime

LONG_PROMPT = "The quick brown fox"  # tiny-llama's greedy continuation runs 1,800+ tokens without EOS
LONG = 1800
BOOT = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from medusa_runtime.serve import main
main(sys.argv[1:])
"""


class Server:
    """`medusa-serve FOLDER --port 0 ...` as a subprocess; the ready line on stdout names the port."""

    def __init__(self, folder, log_path, *args):
        self.log_path = log_path
        self.log_file = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BOOT, str(folder), "--host", "127.0.0.1", "--port", "0", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            cwd=ROOT,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 90)
        line = self.proc.stdout.readline() if ready else ""
        m = re.search(r"ready on (http://127\.0\.0\.1:\d+)", line)
        if not m:
            self.stop()
            raise AssertionError(f"server did not start: {line!r}\n{self.log()}")
        self.url = m.group(1)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text()

    def health(self) -> dict:
        return self.http.get("/health").json()

    def wait_health(self, timeout=20, **want) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if all(h[k] == v for k, v in want.items()):
                return h
            assert time.monotonic() < deadline, f"health never reached {want}: {h}"
            time.sleep(0.02)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """tiny-llama with 4 random heads and room for long streams (max_seq 2048)."""
    from medusa_export.onnx_export import export_onnx

    return export_onnx(
        "tiny-llama", "random:4", tmp_path_factory.mktemp("serve") / "tiny-llama", max_seq=2048, quiet=True
    )


@pytest.fixture(scope="module")
def ref(art):
    """The single-stream reference: the runtime in this process, greedy unless a test says otherwise."""
    return MedusaRuntime.open(art)


@pytest.fixture(scope="module")
def long_ids(ref):
    """The single-stream continuation of LONG_PROMPT (no EOS within LONG tokens)."""
    ids = ref.generate(LONG_PROMPT, LONG).token_ids
    assert len(ids) == LONG
    return ids


@pytest.fixture(scope="module")
def srv(art, tmp_path_factory):
    s = Server(art, tmp_path_factory.mktemp("srv") / "server.log", "--workers", 2, "--max-queue", 4)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def srv1(art, tmp_path_factory):
    """One worker, a queue of one; the 64-node tree makes each step slow enough to hold the slot."""
    s = Server(
        art,
        tmp_path_factory.mktemp("srv1") / "server.log",
        "--workers",
        1,
        "--max-queue",
        1,
        "--tree",
        "mc_sim_7b_63",
        "--graceful-timeout",
        1,
    )
    yield s
    s.stop()


def sse(lines) -> tuple[list[dict], bool]:
    """The JSON events of a server-sent-event stream, and whether it ended with [DONE]."""
    events, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        assert not done, "data after [DONE]"
        if line == "data: [DONE]":
            done = True
        else:
            events.append(json.loads(line[6:]))
    return events, done


def complete(s: Server, prompt, max_tokens, **extra) -> dict:
    r = s.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def stream(s: Server, prompt, max_tokens, **extra) -> tuple[str, list[int], list[dict], bool]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "return_token_ids": True, **extra}
    with s.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events, done = sse(r.iter_lines())
    chunks = [e for e in events if e["choices"]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    return text, ids, events, done


def test_completions_equal_runtime_generate(srv, ref):
    for prompt in [*PROMPTS, "Hello there"]:
        want = ref.generate(prompt, 48)
        body = complete(srv, prompt, 48, return_token_ids=True)
        choice = body["choices"][0]
        assert choice["token_ids"] == want.token_ids and choice["text"] == want.text
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["usage"] == {
            "prompt_tokens": want.prompt_tokens,
            "completion_tokens": 48,
            "total_tokens": want.prompt_tokens + 48,
        }
        assert choice["finish_reason"] == "length"
        text, ids, events, done = stream(srv, prompt, 48, stream_options={"include_usage": True})
        assert done and ids == want.token_ids and text == want.text
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 48
        assert len({e["id"] for e in events}) == 1
    # token ids as the prompt; EOS ends a completion early with finish_reason "stop"
    ids = ref.encode("Hello there")
    want = ref.generate(ids, 300)
    assert want.token_ids[-1] in ref.eos and len(want.token_ids) < 300
    body = complete(srv, ids, 300, return_token_ids=True)
    assert body["choices"][0]["token_ids"] == want.token_ids and body["choices"][0]["finish_reason"] == "stop"


def test_openai_client_streaming_and_not(srv, ref):
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
    [model] = client.models.list().data
    assert model.id == "tiny-llama"
    for prompt in PROMPTS[:2]:
        want = ref.generate(prompt, 40)
        res = client.completions.create(model=model.id, prompt=prompt, max_tokens=40)
        assert res.choices[0].text == want.text and res.usage.completion_tokens == 40
        pieces, usage = [], None
        for chunk in client.completions.create(
            model=model.id, prompt=prompt, max_tokens=40, stream=True, stream_options={"include_usage": True}
        ):
            pieces += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(pieces) == want.text and len(pieces) > 3 and usage.prompt_tokens == want.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="beyond capacity"):
        client.completions.create(model=model.id, prompt="hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=5)


def test_stop_strings_and_typical_acceptance(srv, ref):
    prompt = PROMPTS[0]
    whole = ref.generate(prompt, 60).text
    stop = whole[20:23]
    want = "".join(ref.stream(prompt, 60, stop=[stop, "never-there"]))
    assert len(want) < len(whole)
    body = complete(srv, prompt, 60, stop=[stop, "never-there"])
    assert body["choices"][0]["text"] == want and body["choices"][0]["finish_reason"] == "stop"
    text, _, events, done = stream(srv, prompt, 60, stop=stop)
    assert done and text == want and events[-1]["choices"][0]["finish_reason"] == "stop"
    # temperature > 0: typical acceptance, the same draws as the runtime's for the same seed
    typical = Typical(temperature=0.8)
    want = ref.generate(prompt, 40, acceptance=typical, seed=1)
    body = complete(srv, prompt, 40, temperature=0.8, seed=1, return_token_ids=True)
    assert body["choices"][0]["token_ids"] == want.token_ids
    assert want.token_ids != ref.generate(prompt, 40).token_ids  # it did sample
    assert want.token_ids != ref.generate(prompt, 40, acceptance=typical, seed=2).token_ids


def test_concurrent_requests_each_equal_single_stream(srv, ref):
    """More requests than workers at once (2 workers, a queue of 4): each answer is its own prompt's."""
    prompts = [*PROMPTS, "Hello there", "abc"]
    want = {p: ref.generate(p, 64).token_ids for p in prompts}
    got, errors = {}, []

    def run(p):
        try:
            got[p] = (
                stream(srv, p, 64)[1]
                if len(p) % 2
                else complete(srv, p, 64, return_token_ids=True)["choices"][0]["token_ids"]
            )
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and got == want


def test_bad_requests_get_openai_errors(srv):
    def err(r, status, *fragments, param=None):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"}
        for f in fragments:
            assert f in e["message"], e
        if param:
            assert e["param"] == param

    post = lambda body: srv.http.post("/v1/completions", json=body)  # noqa: E731
    err(
        post({"prompt": "hi", "max_tokens": 4000}), 400, "beyond capacity", "max_seq 2048", param="max_tokens"
    )
    err(post({"prompt": "x" * 3000, "max_tokens": 4}), 400, "longer than max_seq", param="prompt")
    err(post({"prompt": "", "max_tokens": 4}), 400, "empty prompt")
    err(post({"prompt": "hi", "max_tokens": 0}), 400, "max_tokens", param="max_tokens")
    err(post({"max_tokens": 3}), 400, "prompt", param="prompt")
    err(post({"prompt": "hi", "n": 2}), 400, "n is not supported", param="n")
    err(post({"prompt": ["a", "b"]}), 400, "one prompt per request")
    err(post({"prompt": [5, 99999]}), 400, "token id 99999")
    err(post({"prompt": "hi", "temperature": -1}), 400, "temperature")
    err(post({"prompt": "hi", "model": "nope"}), 404, "'nope' not found", param="model")
    err(srv.http.post("/v1/completions", content=b"{not json"), 400, "not valid JSON")
    err(srv.http.post("/v1/completions", content=b'{"prompt": "\\ud800"}'), 400, "lone surrogate")
    err(srv.http.get("/v1/nothing"), 404, "Not Found")
    assert srv.health()["status"] == "ok"


def parse_prometheus(text: str) -> dict[str, dict]:
    """A strict reader of the text format: every sample belongs to a declared family, values are numbers,
    histogram buckets are cumulative and end at +Inf = _count."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="[^"]*",?)*)\})? (\S+)$')
    families: dict[str, dict] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in families
            families[name] = {"type": kind, "samples": []}
            continue
        m = sample.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.groups()
        family = next(
            f for f in families if name == f or name.removeprefix(f) in ("_bucket", "_sum", "_count")
        )
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        families[family]["samples"].append((name, labels, float(value)))
    for name, f in families.items():
        assert f["samples"], name
        if f["type"] == "histogram":
            buckets = [(float(lb["le"]), v) for n, lb, v in f["samples"] if n.endswith("_bucket")]
            assert buckets[-1][0] == math.inf and [b for b, _ in buckets] == sorted(b for b, _ in buckets)
            assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
            count = next(v for n, _, v in f["samples"] if n.endswith("_count"))
            assert buckets[-1][1] == count
    return families


def test_metrics_parse(srv):
    before = parse_prometheus(srv.http.get("/metrics").text)
    complete(srv, "Hello there", 16)
    r = srv.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_prometheus(r.text)

    def value(family, **labels):
        return next(v for _, lb, v in m[family]["samples"] if lb == labels)

    ok = lambda fam: next(v for _, lb, v in fam["samples"] if lb == {"outcome": "ok"})  # noqa: E731
    assert ok(m["medusa_requests_total"]) == ok(before["medusa_requests_total"]) + 1
    assert value("medusa_requests_total", outcome="invalid") >= 10
    assert value("medusa_completion_tokens_total") >= 16 and value("medusa_tokens_per_second") > 0
    assert value("medusa_accepted_tokens_per_step") >= 1.0
    assert (
        value("medusa_queue_depth") == 0 and value("medusa_workers") == 2 and value("medusa_max_queue") == 4
    )
    for h in ("request_duration_seconds", "time_to_first_token_seconds", "queue_wait_seconds"):
        assert m[f"medusa_{h}"]["type"] == "histogram"
    assert m["medusa_request_duration_seconds"]["samples"][-1][2] >= 1  # _count
    # one log line per request, with its id, tokens, tok/s and accepted tokens per step
    lines = [line for line in srv.log().splitlines() if " cmpl-" in line and " 200 ok " in line]
    assert lines and all(re.search(r"tokens=\d+ [\d.]+ tok/s accepted=[\d.]+/step", line) for line in lines)


def test_load_script_small_slice(srv, art, tmp_path):
    """scripts/serve_load.py as CI runs it: a small slice against the running server (2 workers, queue 4)."""
    out = tmp_path / "load.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "serve_load.py"),
        art,
        "--url",
        srv.url,
        "--concurrency",
        "1,3",
    ]
    cmd += ["--requests", 2, "--max-tokens", 16, "--distinct", 4, "--long-prompt", LONG_PROMPT, "--out", out]
    proc = subprocess.run([*map(str, cmd)], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert [r["concurrency"] for r in doc["rows"]] == [1, 3] and not doc["failures"]
    for r in doc["rows"]:
        assert r["ok"] == r["identical"] == r["distinct_ids"] == r["server_ok_delta"] == r["requests"]
        assert (
            r["probes_429"] == r["probes"] > 0
            and r["probe_429_max_s"] < 1.0
            and r["slots_freed_s"] is not None
        )
        assert r["after_disconnect_ok"] == 2 and r["aggregate_tokens_per_s"] > 0
    assert "| concurrency | workers |" in proc.stdout and "single-stream Medusa" in proc.stdout
    srv.wait_health(active=0, queued=0)


def long_stream(s: Server, chunks: int, max_tokens: int = LONG):
    """Opens a long stream and reads `chunks` chunks; returns (response context, chunks' texts)."""
    cm = s.http.stream(
        "POST", "/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": max_tokens, "stream": True}
    )
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    texts = []
    for line in lines:
        if line.startswith("data: {"):
            texts.append(json.loads(line[6:])["choices"][0]["text"])
            if len(texts) >= chunks:
                break
    return cm, lines, texts


def test_queue_full_is_answered_429_at_once(srv1):
    running, lines, _ = long_stream(srv1, 2)  # keep `lines`: dropping the iterator closes the connection
    queued = threading.Thread(
        target=lambda: srv1.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8})
    )
    queued.start()
    srv1.wait_health(active=1, queued=1)
    start = time.perf_counter()
    r = srv1.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8})
    assert r.status_code == 429 and time.perf_counter() - start < 1.0
    assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] == "1"
    running.__exit__(None, None, None)  # disconnect: the queued request gets the worker and completes
    queued.join(30)
    assert not queued.is_alive()
    srv1.wait_health(active=0, queued=0)


def test_disconnect_mid_stream_frees_the_slot(srv1, ref):
    cm, lines, texts = long_stream(srv1, 3)
    assert srv1.health()["active"] == 1
    cm.__exit__(None, None, None)  # the client goes away after 3 chunks of a ~5 s stream
    start = time.perf_counter()
    want = ref.generate("Hello there", 20)
    body = complete(srv1, "Hello there", 20, return_token_ids=True)  # workers=1: needs the freed slot
    assert body["choices"][0]["token_ids"] == want.token_ids
    assert time.perf_counter() - start < 3.0
    srv1.wait_health(active=0, queued=0)
    line = [line for line in srv1.log().splitlines() if "cancelled" in line and "mid-stream" in line][-1]
    assert int(re.search(r"tokens=(\d+)", line).group(1)) < LONG  # decoding stopped early
    # a client that leaves while queued gives up its place too
    cm, lines, _ = long_stream(srv1, 1)
    waiting = httpx.Client(base_url=srv1.url, timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        waiting.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8})
    waiting.close()
    srv1.wait_health(active=1, queued=0)
    cm.__exit__(None, None, None)
    srv1.wait_health(active=0, queued=0)


def read_rest(cm, lines, texts) -> tuple[str, list[dict], bool]:
    """Reads a stream opened by long_stream to its end: (whole text, remaining events, [DONE] seen)."""
    events, done = sse(lines)
    cm.__exit__(None, None, None)
    return "".join(texts) + "".join(e["choices"][0]["text"] for e in events if e["choices"]), events, done


def test_sigterm_finishes_running_streams_and_refuses_queued_ones(art, ref, long_ids, tmp_path):
    """SIGTERM (default 30 s grace): running streams go on to their end, a queued request gets 503, exit 0."""
    s = Server(art, tmp_path / "server.log", "--workers", 2, "--max-queue", 1, "--tree", "mc_sim_7b_63")
    try:
        running = [long_stream(s, 1, max_tokens=n) for n in (600, 500)]  # each ~2 s of decoding
        queued = {}
        q = threading.Thread(
            target=lambda: queued.update(
                r=s.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8})
            )
        )
        q.start()
        s.wait_health(active=2, queued=1)
        s.proc.send_signal(signal.SIGTERM)
        results = [None, None]

        def finish(i):
            results[i] = read_rest(*running[i])

        readers = [threading.Thread(target=finish, args=(i,)) for i in range(2)]
        for t in readers:
            t.start()
        for t in (*readers, q):
            t.join(60)
        assert s.proc.wait(30) == 0
    finally:
        s.stop()
    assert queued["r"].status_code == 503 and queued["r"].json()["error"]["code"] == "shutting_down"
    for (text, events, done), n in zip(results, (600, 500)):
        assert done and events[-1]["choices"][0]["finish_reason"] == "length"
        assert text == ref.tokenizer.decode(long_ids[:n])
    assert "shutting down: 2 running request(s)" in s.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health", timeout=2)


def test_sigterm_after_the_grace_period_ends_streams_cleanly(srv1, ref, long_ids):
    """srv1 has --graceful-timeout 1: a ~5 s stream still running then gets a last chunk (finish_reason
    "abort") and [DONE], and the server exits 0. (srv1's last test: it stops the server.)"""
    stream_ = long_stream(srv1, 1)
    srv1.proc.send_signal(signal.SIGTERM)
    text, events, done = read_rest(*stream_)
    assert done and events[-1]["choices"][0]["finish_reason"] == "abort"
    # the text of the tokens decoded before the abort: the whole run's first k tokens, for some k (not
    # always a prefix of the whole run's text: a cut inside a multi-byte character sends U+FFFD)
    assert text and any(text == ref.tokenizer.decode(long_ids[:k]) for k in range(1, len(long_ids) + 1))
    assert srv1.proc.wait(30) == 0
    assert "graceful timeout: ending 1 running request(s)" in srv1.log()


def test_cli_errors_are_one_line(art):
    def run(*args):
        return subprocess.run([*map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=60)

    for cmd in (
        [sys.executable, "-m", "medusa_export.cli", "serve"],
        [sys.executable, "-m", "medusa_runtime.serve"],
    ):
        proc = run(*cmd, "/no/such/artifact")
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
            "error: artifact folder /no/such/artifact does not exist"
        ], proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run(sys.executable, "-m", "medusa_runtime.serve", art, "--port", port)
    assert (
        proc.returncode == 1
        and "cannot listen on 127.0.0.1" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    light = "import sys, medusa_export.cli, medusa_runtime.serve; assert not {'fastapi', 'uvicorn', 'torch'} & set(sys.modules)"
    assert run(sys.executable, "-c", light).returncode == 0  # --help stays instant
    proc = run(sys.executable, "-m", "medusa_export.cli", "serve", "--help")
    assert proc.returncode == 0 and all(
        o in proc.stdout for o in ("--workers", "--max-queue", "--backend", "--port")
    )
