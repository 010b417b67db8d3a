"""The server's counters, gauges and histograms, written in Prometheus' text exposition format (0.0.4)."""

from __future__ import annotations

import threading
import time
from collections import deque

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OUTCOMES = ("ok", "cancelled", "aborted", "invalid", "rejected", "unavailable", "error")
RATE_WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


def _num(v) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class Metrics:
    """Thread-safe: workers count steps from their threads, the loop counts requests."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = self.completion_tokens = 0
        self.steps = self.verify_steps = self.verify_tokens = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW_S
        self.latency = {
            "request_duration_seconds": (
                Histogram(),
                "Time from a completion request's arrival to its last byte's being ready.",
            ),
            "time_to_first_token_seconds": (
                Histogram(),
                "Time from a completion request's arrival to its first generated token.",
            ),
            "queue_wait_seconds": (Histogram(), "Time a completion request waited for a free worker."),
        }

    def step(self, tokens: int, verify: bool) -> None:
        now = time.monotonic()
        with self.lock:
            self.steps += 1
            self.completion_tokens += tokens
            if verify:
                self.verify_steps += 1
                self.verify_tokens += tokens
            self.recent.append((now, tokens))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def request(
        self,
        outcome: str,
        prompt_tokens: int = 0,
        duration: float | None = None,
        ttft: float | None = None,
        queue_wait: float | None = None,
    ) -> None:
        with self.lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens
            for name, value in (
                ("request_duration_seconds", duration),
                ("time_to_first_token_seconds", ttft),
                ("queue_wait_seconds", queue_wait),
            ):
                if value is not None:
                    self.latency[name][0].observe(value)

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self.lock:
            self._prune(now)
            window = min(RATE_WINDOW_S, max(now - self.started, 1e-9))
            return sum(n for _, n in self.recent) / window

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        """The exposition text; `gauges` adds the pool's live values: name -> (value, help)."""
        rate = self.tokens_per_s()
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples) -> None:
            out.append(f"# HELP medusa_{name} {help_}")
            out.append(f"# TYPE medusa_{name} {kind}")
            for suffix, labels, value in samples:
                lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
                out.append(f"medusa_{name}{suffix}{lab} {_num(value)}")

        with self.lock:
            family(
                "requests_total",
                "counter",
                "Completion requests by outcome (ok, cancelled by the client, aborted by shutdown, "
                "invalid: 4xx, rejected: queue full, unavailable: shutting down, error: 5xx).",
                [("", [("outcome", k)], v) for k, v in self.requests.items()],
            )
            family(
                "prompt_tokens_total",
                "counter",
                "Prompt tokens of started requests.",
                [("", [], self.prompt_tokens)],
            )
            family(
                "completion_tokens_total",
                "counter",
                "Tokens generated (every step's, stop strings included).",
                [("", [], self.completion_tokens)],
            )
            family(
                "steps_total", "counter", "Forwards run: prefills and verify steps.", [("", [], self.steps)]
            )
            family(
                "verify_steps_total",
                "counter",
                "Draft-verify steps (prefills excluded).",
                [("", [], self.verify_steps)],
            )
            family(
                "verify_tokens_total",
                "counter",
                "Tokens emitted by draft-verify steps (accepted candidates + 1 each).",
                [("", [], self.verify_tokens)],
            )
            family(
                "tokens_per_second",
                "gauge",
                f"Generated tokens per second over all streams, the last {RATE_WINDOW_S:g} s.",
                [("", [], rate)],
            )
            family(
                "accepted_tokens_per_step",
                "gauge",
                "Mean tokens emitted per verify step since start (accepted candidates + 1).",
                [("", [], self.verify_tokens / self.verify_steps if self.verify_steps else 0.0)],
            )
            for name, (value, help_) in gauges.items():
                family(name, "gauge", help_, [("", [], value)])
            for name, (h, help_) in self.latency.items():
                samples = [("_bucket", [("le", _num(b))], c) for b, c in zip(h.buckets, h.counts)]
                samples += [
                    ("_bucket", [("le", "+Inf")], h.count),
                    ("_sum", [], h.sum),
                    ("_count", [], h.count),
                ]
                family(name, "histogram", help_, samples)
        return "\n".join(out) + "\n"
