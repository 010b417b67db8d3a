"""Checksums of artifact files: recorded by the exporter, verified when the runtime loads an artifact.

Hashing gemma3-270m's fp32 weights (1.1 GB) takes about a second, so a file whose (path, size, mtime,
inode) was verified before is not hashed again: a record of verified files lives in the user's cache
(`MEDUSA_RUNTIME_CACHE`, default ~/.cache/medusa-runtime). Any write to a file changes its mtime, so a
modified file is always hashed again. `verify="full"` ignores the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from .errors import MedusaError

_BLOCK = 1 << 22
_lock = threading.Lock()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} for the sidecar."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def _record_path() -> Path:
    root = os.environ.get("MEDUSA_RUNTIME_CACHE") or Path.home() / ".cache" / "medusa-runtime"
    return Path(root) / "verified.json"


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _read_record() -> dict:
    try:
        record = json.loads(_record_path().read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(record: dict) -> None:
    path = _record_path()
    try:  # best effort: a read-only home only means hashing again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        pass


def verify_files(folder: Path, checksums: dict, full: bool = False) -> list[str]:
    """Check every file's size and SHA-256 against the sidecar; returns the names that were hashed now."""
    hashed = []
    with _lock:
        record = _read_record()
        for name, want in checksums.items():
            path = folder / name
            size = path.stat().st_size
            if size != want["bytes"]:
                raise MedusaError(
                    f"artifact file {path} has {size} bytes, the sidecar recorded {want['bytes']}: "
                    "the artifact is damaged or was modified; export it again"
                )
            stamp = _stamp(path)
            if not full and record.get(stamp) == want["sha256"]:
                continue
            if sha256_file(path) != want["sha256"]:
                raise MedusaError(
                    f"artifact file {path} does not match its recorded SHA-256: the artifact is damaged "
                    "or was modified; export it again"
                )
            prefix = stamp.rsplit("|", 3)[0] + "|"
            for old in [k for k in record if k.startswith(prefix)]:  # the file's earlier versions
                del record[old]
            record[stamp] = want["sha256"]
            hashed.append(name)
        if hashed:
            _write_record(record)
    return hashed
