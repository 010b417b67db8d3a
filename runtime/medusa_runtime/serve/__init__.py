"""`medusa-serve`: an OpenAI-compatible HTTP service over the runtime (the `[serve]` extra: FastAPI + uvicorn).

    pip install './runtime[serve]'
    medusa-serve artifacts/gemma3-270m --workers 4 --port 8000

Importing this package needs neither FastAPI nor uvicorn; `serve()` says so when they are missing.
"""

from .server import main, serve

__all__ = ["main", "serve"]
