"""Reading an artifact folder (see medusa_export.onnx_export for what it holds); numpy/stdlib only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MedusaError
from .tree import TreeBuffers, build_tree, load_choices

SIDECAR = "artifact.json"
_REQUIRED = (
    "format",
    "model",
    "medusa",
    "dtype",
    "max_seq",
    "io",
    "files",
    "tokenizer",
    "trees",
    "default_tree",
)


@dataclass
class Artifact:
    FORMAT = "medusa-export/1"

    folder: Path
    meta: dict = field(repr=False)

    @classmethod
    def load(cls, folder: str | Path) -> Artifact:
        folder = Path(folder)
        side = folder / SIDECAR
        if not side.is_file():
            raise MedusaError(f"{folder} is not a medusa-export artifact: {SIDECAR} is missing")
        meta = read_sidecar(side, cls.FORMAT)
        missing = [k for k in _REQUIRED if k not in meta]
        if missing:
            raise MedusaError(f"{side} lacks {', '.join(missing)}")
        for role, name in meta["files"].items():
            if not (folder / name).is_file():
                raise MedusaError(f"artifact {folder} is incomplete: {role} file {name} is missing")
        data = [e for e in _external_data(meta) if not (folder / e).is_file()]
        if data:
            raise MedusaError(f"artifact {folder} is incomplete: external data {data[0]} is missing")
        return cls(folder, meta)

    def path(self, role: str) -> Path:
        return self.folder / self.meta["files"][role]

    @property
    def model(self) -> dict:
        return self.meta["model"]

    @property
    def num_heads(self) -> int:
        return self.meta["medusa"]["num_heads"]

    @property
    def topk(self) -> int:
        return self.meta["medusa"]["topk"]

    @property
    def max_seq(self) -> int:
        return self.meta["max_seq"]

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.meta["tokenizer"]["eos_token_ids"])

    def io(self, kind: str) -> list[dict]:
        return self.meta["io"][kind]

    def tree(self, spec: str | None = None) -> tuple[str, TreeBuffers]:
        """A tree by name from the sidecar, or from a JSON file; checked against the exported heads and top-k."""
        spec = spec or self.meta["default_tree"]
        if spec in self.meta["trees"]:
            name, choices = spec, self.meta["trees"][spec]
        elif Path(spec).is_file():
            name, choices = load_choices(spec)
        else:
            raise MedusaError(
                f"unknown tree {spec!r}: this artifact serves {', '.join(self.meta['trees'])}, or give a JSON file"
            )
        tree = build_tree(choices)
        if tree.depth > self.num_heads:
            raise MedusaError(
                f"tree {name!r} needs {tree.depth} Medusa heads, the artifact has {self.num_heads}"
            )
        if tree.topk > self.topk:
            raise MedusaError(
                f"tree {name!r} needs top-{tree.topk} per head, the artifact exports top-{self.topk}"
            )
        return name, tree

    def check_io(self, kind: str, actual: list[tuple[str, str]]) -> None:
        """Compare (name, type) pairs of a loaded graph with the sidecar's contract."""
        want = [(s["name"], s["dtype"]) for s in self.io(kind)]
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


def read_sidecar(path: Path, expected_format: str) -> dict:
    """A JSON sidecar of the given format, or a one-line MedusaError."""
    try:
        meta = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise MedusaError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise MedusaError(f"{path} has format {found!r}, this runtime reads {expected_format!r}")
    return meta


def _external_data(meta: dict) -> list[str]:
    return list(meta.get("external_data", []))
