"""Progress for long work: one line per stage on stderr, with elapsed time."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


@contextmanager
def stage(label: str, quiet: bool = False):
    start = time.perf_counter()
    if not quiet:
        print(f"[medusa-export] {label} ...", file=sys.stderr, flush=True)
    yield
    if not quiet:
        print(
            f"[medusa-export] {label}: done in {time.perf_counter() - start:.1f}s",
            file=sys.stderr,
            flush=True,
        )


def log(message: str, quiet: bool = False) -> None:
    """One progress line on stderr."""
    if not quiet:
        print(f"[medusa-export] {message}", file=sys.stderr, flush=True)
