"""Start the service: load N runtimes, bind the socket, run uvicorn; SIGTERM/SIGINT drain gracefully."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import MedusaError

log = logging.getLogger("medusa_runtime.serve")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MedusaError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise MedusaError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name in ("medusa_runtime.serve", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False


def serve(
    folder: str | Path,
    backend: str = "ort-cpu",
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    tree: str | None = None,
    max_queue: int = 16,
    threads: int | None = None,
    model_name: str | None = None,
    graceful_timeout: float = 30.0,
    medusa: bool = True,
    log_level: str = "info",
) -> None:
    """Serve an artifact over HTTP (OpenAI's completions API) until SIGTERM/SIGINT, then drain and return.

    `workers` runtimes decode that many streams at once; up to `max_queue` more requests wait, further
    ones are answered 429. `threads`: ONNX Runtime intra-op threads per worker (ort-cpu default: the cores
    divided among the workers). Port 0 picks a free port; the ready line on stdout names it."""
    try:
        import uvicorn

        from .app import ServerState, create_app
    except ImportError as exc:
        raise MedusaError(
            f"serving needs FastAPI and uvicorn ({exc.name} is missing): pip install 'medusa-runtime[serve]' "
            "(or '.[serve]' at the medusa-export repository root)"
        ) from None
    from ..api import MedusaRuntime

    if workers < 1:
        raise MedusaError(f"--workers must be at least 1, got {workers}")
    if max_queue < 0:
        raise MedusaError(f"--max-queue must be 0 or more, got {max_queue}")
    if not 0 <= port <= 65535:
        raise MedusaError(f"--port must be within 0..65535, got {port}")
    if graceful_timeout < 0:
        raise MedusaError(f"--graceful-timeout must be 0 or more, got {graceful_timeout}")
    folder = Path(folder)
    if not folder.is_dir():
        raise MedusaError(f"artifact folder {folder} does not exist")
    _setup_logging(log_level)

    sock = _bind(host, port)  # before loading: a busy port fails at once
    try:
        options = {}
        if backend.startswith("ort-"):
            options["threads"] = threads or (max(1, _cores() // workers) if backend == "ort-cpu" else None)
        elif threads:
            raise MedusaError("--threads applies to the ONNX Runtime backends (ort-cpu, ort-cuda)")
        runtimes = []
        for i in range(workers):
            runtimes.append(MedusaRuntime.open(folder, backend=backend, tree=tree, medusa=medusa, **options))
            log.info("worker %d/%d loaded (%s, tree %s)", i + 1, workers, backend, runtimes[-1].tree_name)
        state = ServerState(
            runtimes,
            model_name or folder.resolve().name,
            max_queue,
            graceful_timeout=graceful_timeout,
            backend=backend,
        )
        app = create_app(state)
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level=log_level,
            access_log=False,  # the server writes its own line per request
            timeout_graceful_shutdown=graceful_timeout + 5.0,  # a backstop: streams end cleanly before
            lifespan="on",
        )

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:  # a signal handler, on the loop's thread
                if state.loop is not None:
                    state.loop.call_soon_threadsafe(state.begin_shutdown)
                super().handle_exit(sig, frame)

        server = Server(config)
        sock.listen(2048)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(
            f"medusa-serve: ready on http://{shown}:{bound_port} (model {state.model_id}, backend {backend}, "
            f"tree {state.tree_name}, {workers} worker(s), queue {max_queue})",
            flush=True,
        )
        # uvicorn re-raises the signal it caught once it has drained; the previous handler then runs, so make
        # that one a no-op: a drained server exits with status 0
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run(sockets=[sock])
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        log.info("stopped")
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    """`medusa-serve DIR [options]`: the entry point of the runtime's [serve] extra."""
    p = argparse.ArgumentParser(
        prog="medusa-serve",
        description="Serve a medusa-export artifact over HTTP: OpenAI-compatible /v1/completions "
        "(streaming as server-sent events), /v1/models, /health, /metrics.",
    )
    p.add_argument("folder", help="artifact folder (written by medusa-export onnx)")
    p.add_argument("--backend", default="ort-cpu", help="ort-cpu | ort-cuda | trt (default: ort-cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--workers", type=int, default=1, help="streams decoded at once, one runtime each")
    p.add_argument("--tree", default=None, help="tree preset name or JSON file (default: the artifact's)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting for a worker before 429")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per worker")
    p.add_argument("--model-name", default=None, help="model id in the API (default: the folder's name)")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get to finish after SIGTERM (default: 30)",
    )
    p.add_argument("--no-medusa", action="store_true", help="plain autoregressive decoding")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    try:
        serve(
            a.folder,
            backend=a.backend,
            host=a.host,
            port=a.port,
            workers=a.workers,
            tree=a.tree,
            max_queue=a.max_queue,
            threads=a.threads,
            model_name=a.model_name,
            graceful_timeout=a.graceful_timeout,
            medusa=not a.no_medusa,
            log_level=a.log_level,
        )
    except MedusaError as exc:
        if os.environ.get("MEDUSA_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
