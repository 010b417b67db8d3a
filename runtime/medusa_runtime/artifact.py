"""Reading an artifact folder (see medusa_export.onnx_export for what it holds); numpy/stdlib only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import MedusaError
from .integrity import verify_files
from .sidecar import ArtifactSidecar, read_json
from .tree import TreeBuffers, resolve_tree, split_lookup

SIDECAR = "artifact.json"


@dataclass
class Artifact:
    folder: Path
    meta: dict = field(repr=False)  # artifact.json as read, for code that reads its keys directly
    sidecar: ArtifactSidecar = field(repr=False)  # the same, typed and checked

    @classmethod
    def load(cls, folder: str | Path, verify: bool | str = True) -> Artifact:
        """Read and check an artifact folder. `verify`: check every file against the sidecar's SHA-256
        (True: hash files not verified before at their current size and mtime; "full": hash all; False: sizes only).
        """
        folder = Path(folder)
        side = folder / SIDECAR
        if not side.is_file():
            raise MedusaError(f"{folder} is not a medusa-export artifact: {SIDECAR} is missing")
        meta = read_json(side)
        sidecar = ArtifactSidecar.from_json(meta, side)
        for name in sidecar.file_names():
            _inside(folder, name, side)
        for role, name in sidecar.files.items():
            if not (folder / name).is_file():
                raise MedusaError(f"artifact {folder} is incomplete: {role} file {name} is missing")
        data = [e for e in sidecar.external_data if not (folder / e).is_file()]
        if data:
            raise MedusaError(f"artifact {folder} is incomplete: external data {data[0]} is missing")
        sums = {name: c.to_json() for name, c in sidecar.checksums.items()}
        if verify:
            verify_files(folder, sums, full=verify == "full")
        else:
            for name, want in sums.items():
                if (folder / name).stat().st_size != want["bytes"]:
                    raise MedusaError(f"artifact file {folder / name} does not have its recorded size")
        return cls(folder, meta, sidecar)

    def path(self, role: str) -> Path:
        return self.folder / self.sidecar.files[role]

    @property
    def model(self) -> dict:
        """The model section as a dict (sidecar.model typed)."""
        return self.meta["model"]

    @property
    def num_heads(self) -> int:
        return self.sidecar.medusa.num_heads

    @property
    def topk(self) -> int:
        return self.sidecar.medusa.topk

    @property
    def max_seq(self) -> int:
        return self.sidecar.max_seq

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.sidecar.tokenizer.eos_token_ids)

    def io(self, kind: str) -> list[dict]:
        return [s.to_json() for s in getattr(self.sidecar.io, kind)]

    def default_tree(self, backend: str | None = None) -> str:
        """The default tree for a backend's device class (sidecar `default_trees`: {"cpu": ..., "gpu": ...},
        chosen from measurements at export), else the sidecar's single `default_tree`."""
        per_device = self.sidecar.default_trees.get(device_class(backend)) if backend else None
        return per_device or self.sidecar.default_tree

    def tree(
        self, spec: str | None = None, backend: str | None = None, lookup=None
    ) -> tuple[str, TreeBuffers]:
        """A tree the artifact serves, by name, or from a JSON file or inline JSON (tree.resolve_tree); checked
        against the exported heads and top-k. Without `spec`, the default tree for `backend`'s device class
        (which may carry lookup chains, e.g. chain0+lookup3; an explicit `lookup` replaces those)."""
        if spec is None:
            spec = self.default_tree(backend)
            if lookup is not None:
                spec = split_lookup(spec)[0]
        return resolve_tree(
            spec,
            served=self.sidecar.trees,
            num_heads=self.num_heads,
            topk=self.topk,
            lookup=lookup,
        )

    def check_io(self, kind: str, actual: list[tuple[str, str]]) -> None:
        """Compare (name, type) pairs of a loaded graph with the sidecar's contract."""
        want = [(s.name, s.dtype) for s in getattr(self.sidecar.io, kind)]
        if [n for n, _ in actual] != [n for n, _ in want]:
            extra = sorted({n for n, _ in actual} ^ {n for n, _ in want})
            raise MedusaError(
                f"{self.path('model').name} {kind} disagree with {SIDECAR}: differing names {extra[:4]}"
            )
        for (name, got), (_, expect) in zip(actual, want):
            if got != expect:
                raise MedusaError(
                    f"{self.path('model').name} {kind[:-1]} {name} is {got}, {SIDECAR} says {expect}"
                )


def release_heap() -> None:
    """Give freed heap back to the OS (glibc's malloc_trim; a no-op elsewhere). Loading Gemma 3's 33 MB
    tokenizer.json frees ~200 MB that glibc would otherwise keep, and ONNX Runtime's weight prepacking
    frees its staging buffers: both would count in the process's resident memory."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def device_class(backend: str) -> str:
    """cpu or gpu: which of an artifact's `default_trees` a runtime backend uses."""
    from .backends import GPU_BACKENDS

    return "gpu" if backend in GPU_BACKENDS else "cpu"


def _inside(folder: Path, name: str, side: Path) -> None:
    """Sidecar file names must stay inside the artifact folder (relative, no '..': checked by the sidecar;
    here: no links out)."""
    if folder.resolve() not in (folder / name).resolve().parents:
        raise MedusaError(f"{side} names a file outside the artifact folder: {name!r}")
