"""`medusa-export serve`: the runtime's HTTP service (`medusa-serve`), from the exporter's CLI. Nothing heavy is
imported until the command runs (FastAPI and uvicorn come with the `[serve]` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve_command(
    folder: Annotated[Path, typer.Argument(help="artifact folder (written by medusa-export onnx)")],
    backend: Annotated[str, typer.Option("--backend", help="ort-cpu | ort-cuda | trt")] = "ort-cpu",
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port (0 picks a free one)")] = 8000,
    workers: Annotated[
        int, typer.Option("--workers", help="streams decoded at once, one runtime (and KV cache) each")
    ] = 1,
    tree: Annotated[
        str | None, typer.Option("--tree", help="tree preset name or JSON file (default: the artifact's)")
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="requests waiting for a worker before 429")
    ] = 16,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="ONNX Runtime threads per worker (ort-cpu: cores / workers)"),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="model id in the API (default: the folder's name)")
    ] = None,
    graceful_timeout: Annotated[
        float, typer.Option("--graceful-timeout", help="seconds running requests get after SIGTERM")
    ] = 30.0,
    no_medusa: Annotated[bool, typer.Option("--no-medusa", help="plain autoregressive decoding")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug | info | warning | error")] = "info",
):
    """Serve an artifact over HTTP: OpenAI-compatible /v1/completions (streaming too), /v1/models, /health,
    /metrics. Same server as `medusa-serve` (pip install './runtime[serve]')."""
    from medusa_runtime.serve import serve

    serve(
        folder,
        backend=backend,
        host=host,
        port=port,
        workers=workers,
        tree=tree,
        max_queue=max_queue,
        threads=threads,
        model_name=model_name,
        graceful_timeout=graceful_timeout,
        medusa=not no_medusa,
        log_level=log_level,
    )
