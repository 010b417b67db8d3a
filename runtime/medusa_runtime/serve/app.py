"""The OpenAI-compatible HTTP API over a pool of MedusaRuntime workers (FastAPI on uvicorn).

POST /v1/completions (streaming as server-sent events), GET /v1/models, GET /health, GET /metrics.
Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..acceptance import Greedy, Typical
from ..errors import MedusaError
from .metrics import CONTENT_TYPE, Metrics
from .pool import ClientGone, Job, Pool, QueueFull, ShuttingDown, Stats

log = logging.getLogger("medusa_runtime.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "server_error",
}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers=None
):
    body = {
        "error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}
    }
    return JSONResponse(body, status_code=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request this server honours; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = None  # temperature > 0: the same seed, the same draws; none: fresh ones
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    best_of: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    # extensions: typical acceptance's parameters (temperature > 0), and the generated token ids
    posterior_threshold: float = Field(0.09, ge=0.0, le=1.0)
    posterior_alpha: float = Field(0.3, ge=0.0)
    return_token_ids: bool = False


class Call:
    """One completion request's bookkeeping: what it produced, when, and its single log line."""

    def __init__(self, state: ServerState, rid: str, stream: bool):
        self.state, self.id, self.stream = state, rid, stream
        self.arrived = time.perf_counter()
        self.prompt_tokens = 0
        self.queue_wait: float | None = None
        self.ttft: float | None = None
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.finish: str | None = None
        self.stats: Stats | None = None
        self.error: tuple[int, str] | None = None
        self.logged = False

    def take(self, event) -> None:
        kind = event[0]
        if kind == "delta":
            if event[2] and self.ttft is None:
                self.ttft = time.perf_counter() - self.arrived
            self.text.append(event[1])
            self.token_ids += event[2]
        elif kind == "end":
            self.finish, self.stats = event[1], event[2]
        else:
            self.error = (event[1], event[2])

    @property
    def over(self) -> bool:
        return self.finish is not None or self.error is not None

    async def drain(self, job: Job, timeout: float | None = None) -> None:
        """Read the job's events to its end (the worker stops within a step once the job is cancelled)."""

        async def read() -> None:
            while not self.over:
                self.take(await job.events.get())

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(read(), timeout)

    def done(self, outcome: str, status: int, message: str = "") -> None:
        """Count the request and write its one log line."""
        if self.logged:
            return
        self.logged = True
        duration = time.perf_counter() - self.arrived
        started = self.queue_wait is not None
        self.state.metrics.request(
            outcome,
            self.prompt_tokens if started else 0,
            duration=duration if outcome == "ok" else None,
            ttft=self.ttft,
            queue_wait=self.queue_wait,
        )
        parts = [self.id, str(status), outcome, "stream" if self.stream else "json"]
        if self.stats is not None:
            s = self.stats
            parts += [
                f"prompt={s.prompt_tokens}",
                f"tokens={s.completion_tokens}",
                f"{s.tokens_per_s:.1f} tok/s",
                f"accepted={s.mean_accepted:.2f}/step",
                f"decode={s.seconds:.3f}s",
            ]
        if started:
            parts.append(f"queue={self.queue_wait:.3f}s")
        if self.ttft is not None:
            parts.append(f"ttft={self.ttft:.3f}s")
        parts.append(f"total={duration:.3f}s")
        if self.finish:
            parts.append(f"finish={self.finish}")
        if message:
            parts.append(f"- {message}")
        log.info(" ".join(parts))


class ServerState:
    """What the endpoints share: the runtimes and their pool, metrics, the served model's description."""

    def __init__(
        self,
        runtimes,
        model_id: str,
        max_queue: int,
        graceful_timeout: float = 30.0,
        backend: str = "",
    ):
        from tokenizers import Tokenizer

        self.runtimes, self.model_id, self.max_queue = runtimes, model_id, max_queue
        self.graceful_timeout, self.backend = graceful_timeout, backend
        rt = runtimes[0]
        self.tokenizer = Tokenizer.from_str(rt.tokenizer.to_str())  # the loop's own: workers use theirs
        artifact = rt.artifact
        self.max_seq = artifact.max_seq if artifact is not None else rt.backend.capacity
        self.vocab_size = artifact.model.get("vocab_size") if artifact is not None else None
        self.tree_name = rt.tree_name
        self.created = int(time.time())
        self.metrics = Metrics()
        self.pool: Pool | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pool = Pool(self.runtimes, self.max_queue, self.metrics, loop)

    def begin_shutdown(self) -> None:
        """SIGTERM: stop taking work, answer queued requests 503, let running ones finish within
        graceful_timeout, then end them cleanly (finish_reason "abort")."""
        if self.draining or self.pool is None:
            return
        self.draining = True
        log.info(
            "shutting down: %d running request(s) get %gs to finish, %d queued answered 503",
            self.pool.active,
            self.graceful_timeout,
            self.pool.queued,
        )
        self.pool.begin_shutdown()
        if self.pool.active:
            self.loop.call_later(self.graceful_timeout, self._drain_timeout)

    def _drain_timeout(self) -> None:
        if self.pool.active:
            log.warning("graceful timeout: ending %d running request(s) now", self.pool.active)
            self.pool.abort_running()

    def gauges(self) -> dict[str, tuple[float, str]]:
        pool = self.pool
        return {
            "queue_depth": (pool.queued if pool else 0, "Requests waiting for a free worker."),
            "active_requests": (pool.active if pool else 0, "Requests being decoded now."),
            "workers": (len(self.runtimes), "Decoding workers (each its own runtime and KV cache)."),
            "max_queue": (self.max_queue, "Longest queue before requests are answered 429."),
            "uptime_seconds": (time.monotonic() - self.metrics.started, "Seconds since the server started."),
        }

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise BadRequest(f"one prompt per request, got {len(p)}", "prompt")
            p = p[0]
        if isinstance(p, str):
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(
                    "prompt is not valid Unicode text (it holds a lone surrogate)", "prompt"
                ) from None
            return self.tokenizer.encode(p).ids
        ids = [int(t) for t in p]
        bad = [t for t in ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
        if bad:
            raise BadRequest(
                f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", "prompt"
            )
        return ids

    def check_capacity(self, ids: list[int], max_tokens: int) -> None:
        """The runtime's own capacity rule, asked before queueing (the worker asks again when it starts)."""
        self.runtimes[0].check_request(len(ids), max_tokens)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err.get("loc") else None
    return f"{field or 'body'}: {err.get('msg', 'invalid value')}", field


def _api_words(message: str) -> tuple[str, str | None]:
    """A runtime message in the API's words, and the request field it is about."""
    if "max-new-tokens" in message:
        return message.replace("max-new-tokens", "max_tokens"), "max_tokens"
    if "prompt" in message:
        return message, "prompt"
    if any(w in message for w in ("temperature", "posterior", "typical")):
        return message, "temperature"
    return message, None


def _unsupported(req: CompletionRequest) -> str | None:
    if req.n not in (None, 1):
        return "n"
    if req.best_of not in (None, 1):
        return "best_of"
    if req.echo:
        return "echo"
    if req.logprobs is not None:
        return "logprobs"
    if req.suffix:
        return "suffix"
    return None


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (finished, or the client left)."""

    def __init__(self, content, on_close):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Stops the job when the client disconnects (while queued, decoding, or streaming)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.halt("disconnect")


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.begin_shutdown()
            state.pool.abort_running()
            await asyncio.to_thread(state.pool.close)

    app = FastAPI(title="medusa-serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.medusa = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return error_response(
            exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        pool = state.pool
        body = {
            "status": "shutting_down" if state.draining else "ok",
            "model": state.model_id,
            "workers": len(state.runtimes),
            "active": pool.active if pool else 0,
            "queued": pool.queued if pool else 0,
            "max_queue": state.max_queue,
        }
        return JSONResponse(body, status_code=503 if state.draining else 200)

    def model_card() -> dict[str, Any]:
        return {
            "id": state.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "medusa-export",
            "max_seq": state.max_seq,
            "tree": state.tree_name,
            "backend": state.backend,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_id:
            return error_response(
                404,
                f"model {model_id!r} not found: this server serves {state.model_id!r}",
                "model",
                "model_not_found",
            )
        return model_card()

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(state.gauges()), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request):
        call = Call(state, "cmpl-" + uuid.uuid4().hex[:24], stream=False)

        def invalid(status: int, message: str, param=None, code=None, outcome="invalid", headers=None):
            call.done(outcome, status, message)
            return error_response(status, message, param, code, headers)

        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return invalid(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return invalid(400, "the request body must be a JSON object")
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            return invalid(400, message, param)
        call.stream = bool(req.stream)
        if req.model and req.model != state.model_id:
            return invalid(
                404,
                f"model {req.model!r} not found: this server serves {state.model_id!r}",
                "model",
                "model_not_found",
            )
        if (field := _unsupported(req)) is not None:
            return invalid(400, f"{field} is not supported by this server", field)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        temperature = req.temperature or 0.0
        try:
            ids = state.prompt_ids(req)
            call.prompt_tokens = len(ids)
            state.check_capacity(ids, req.max_tokens or 16)
            acceptance = (
                Typical(req.posterior_threshold, req.posterior_alpha, temperature)
                if temperature > 0
                else Greedy()
            )
        except BadRequest as exc:
            return invalid(400, str(exc), exc.param)
        except MedusaError as exc:
            return invalid(400, *_api_words(str(exc)))
        if state.draining:
            return invalid(503, "the server is shutting down", code="shutting_down", outcome="unavailable")

        job = Job(call.id, ids, req.max_tokens or 16, stop, acceptance, state.loop, req.seed)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        streaming = False
        try:
            try:
                worker = await state.pool.acquire(job)
            except QueueFull:
                return invalid(
                    429,
                    f"server busy: {len(state.runtimes)} worker(s) busy and {state.pool.queued} request(s) queued "
                    f"(--max-queue {state.max_queue}); retry later",
                    code="queue_full",
                    outcome="rejected",
                    headers={"Retry-After": "1"},
                )
            except ShuttingDown:
                return invalid(
                    503, "the server is shutting down", code="shutting_down", outcome="unavailable"
                )
            except ClientGone:
                return invalid(499, "the client disconnected while queued", outcome="cancelled")
            call.queue_wait = time.perf_counter() - call.arrived
            worker.submit(job)
            first = await job.events.get()
            call.take(first)
            if first[0] == "error":
                if first[1] < 500:
                    return invalid(first[1], *_api_words(first[2]))
                return invalid(first[1], first[2], outcome="error")
            if req.stream:
                streaming = True
                return EventStream(_sse(state, call, job, first, req), lambda: _closed(call, job, watcher))
            await call.drain(job)
            if call.error is not None:
                return invalid(call.error[0], call.error[1], outcome="error")
            outcome = {"cancelled": "cancelled", "abort": "aborted"}.get(call.finish, "ok")
            call.done(outcome, 200)
            return JSONResponse(_completion_body(state, call, req))
        finally:
            if not streaming:
                watcher.cancel()
                job.halt("disconnect")  # a no-op once the job ended

    return app


async def _closed(call: Call, job: Job, watcher: asyncio.Task) -> None:
    """The event stream is over: finished, or cut by the client, whose decoding then stops."""
    watcher.cancel()
    if not call.logged:  # the client left before [DONE]
        job.halt("disconnect")
        await call.drain(job, timeout=30.0)
        call.finish = "cancelled"
        call.done("cancelled", 200, "client disconnected mid-stream")


def _event(obj) -> str:
    """One server-sent event, as OpenAI writes them."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _chunk(state: ServerState, call: Call, text: str, finish=None, token_ids=None) -> str:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body = {
        "id": call.id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_id,
        "choices": [choice],
    }
    return _event(body)


def _usage(call: Call) -> dict[str, int]:
    n = call.stats.completion_tokens if call.stats else len(call.token_ids)
    return {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": call.prompt_tokens + n,
    }


async def _sse(state: ServerState, call: Call, job: Job, first, req: CompletionRequest):
    event = first
    ids = req.return_token_ids
    while True:
        kind = event[0]
        if kind == "delta":
            if event[1] or (ids and event[2]):
                yield _chunk(state, call, event[1], token_ids=event[2] if ids else None)
        elif kind == "end":
            finish = event[1] if event[1] != "cancelled" else "abort"
            yield _chunk(state, call, "", finish, [] if ids else None)
            if req.stream_options and req.stream_options.include_usage:
                body = {
                    "id": call.id,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": state.model_id,
                    "choices": [],
                    "usage": _usage(call),
                }
                yield _event(body)
            yield "data: [DONE]\n\n"
            call.done({"cancelled": "cancelled", "abort": "aborted"}.get(event[1], "ok"), 200)
            return
        else:
            status, message = event[1], event[2]
            err = {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": None, "code": None}
            yield _event({"error": err})
            yield "data: [DONE]\n\n"
            call.done("error", status, message)
            return
        event = await job.events.get()
        call.take(event)


def _completion_body(state: ServerState, call: Call, req: CompletionRequest) -> dict[str, Any]:
    choice = {"index": 0, "text": "".join(call.text), "logprobs": None, "finish_reason": call.finish}
    if req.return_token_ids:
        choice["token_ids"] = call.token_ids
    return {
        "id": call.id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_id,
        "choices": [choice],
        "usage": _usage(call),
    }
