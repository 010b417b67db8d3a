"""Outputs that never destroy a user's data: checked before any work starts, built in a temporary sibling,
renamed into place only when complete, with the permissions the user's umask asks for."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from medusa_runtime.errors import MedusaError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_out_dir(
    target: Path, marker: str, force: bool, inputs: Iterable[str | Path | None] = (), what: str = "artifact"
) -> Path:
    """Refuse an output folder that would lose data, before any work is done.

    Allowed: a new path, an empty folder, or (with `force`) a folder that holds `marker` (one of ours).
    Never: a file, a folder of something else, the working directory or one of its parents, and any
    folder that contains or lies inside one of the command's `inputs`.
    """
    target = Path(target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise MedusaError(
            f"--out {target} is the working directory or one of its parents: choose a new folder"
        )
    for item in inputs:
        if item is not None and Path(item).exists() and _overlaps(resolved, Path(item).resolve()):
            raise MedusaError(f"--out {target} overlaps the input {item}: choose a separate folder")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise MedusaError(f"--out {target} exists and is not a folder: choose a new folder")
    if target.is_dir() and any(target.iterdir()):
        if not (target / marker).is_file():
            raise MedusaError(
                f"--out {target} is a non-empty folder that is not a medusa-export {what} "
                f"(no {marker}): refusing to replace it; choose a new folder"
            )
        if not force:
            raise MedusaError(f"--out {target} already holds a {what}: pass --force to replace it")
    return target


def check_out_file(target: Path, force: bool) -> Path:
    """Refuse an output file path that is a folder, or an existing file without `force`."""
    target = Path(target)
    if target.is_dir():
        raise MedusaError(f"--out {target} is a folder: give a file path")
    if target.parent.exists() and not target.parent.is_dir():
        raise MedusaError(f"--out {target}: {target.parent} is not a folder")
    if target.exists() and not force:
        raise MedusaError(f"--out {target} exists: pass --force to replace it")
    return target


def _sync(path: Path) -> None:
    """fsync a file or folder (a folder: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """Every file under `folder` on disk before the folder takes its final name, so that a crash never leaves
    a complete-looking output with unwritten contents. It also spares the runtime's first open the
    write-back of a fresh export (file_pages.FilePages.read_sparsely drops only clean pages)."""
    for path in folder.rglob("*"):
        if not path.is_symlink():
            _sync(path)
    _sync(folder)


@contextmanager
def atomic_dir(target: Path):
    """Yields a temporary folder next to `target`; on success it replaces `target` (the old folder is moved
    aside first and removed only once the new one is in place), on failure it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    try:
        yield tmp
        _sync_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old / "x", target)
            raise
        _sync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(target: Path):
    """Yields a temporary path next to `target`, renamed onto it on success, removed on failure."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    try:
        yield Path(name)
        _sync(Path(name))
        os.replace(name, target)
        _sync(target.parent)
    finally:
        if os.path.exists(name):
            os.unlink(name)
