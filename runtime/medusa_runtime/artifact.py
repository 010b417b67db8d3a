"""Reading an artifact folder (see medusa_export.onnx_export for what it holds); numpy/stdlib only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .contract import DTYPES
from .errors import MedusaError
from .integrity import verify_files
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
    def load(cls, folder: str | Path, verify: bool | str = True) -> Artifact:
        """Read and check an artifact folder. `verify`: check every file against the sidecar's SHA-256
        (True: hash files not verified before at their current size and mtime; "full": hash all; False: sizes only).
        """
        folder = Path(folder)
        side = folder / SIDECAR
        if not side.is_file():
            raise MedusaError(f"{folder} is not a medusa-export artifact: {SIDECAR} is missing")
        meta = read_sidecar(side, cls.FORMAT)
        missing = [k for k in _REQUIRED if k not in meta]
        if missing:
            raise MedusaError(f"{side} lacks {', '.join(missing)}")
        names = [*meta["files"].values(), *_external_data(meta)]
        for name in names:
            _inside(folder, name, side)
        for role, name in meta["files"].items():
            if not (folder / name).is_file():
                raise MedusaError(f"artifact {folder} is incomplete: {role} file {name} is missing")
        data = [e for e in _external_data(meta) if not (folder / e).is_file()]
        if data:
            raise MedusaError(f"artifact {folder} is incomplete: external data {data[0]} is missing")
        _check_meta(meta, side)
        sums = meta.get("checksums")
        if not isinstance(sums, dict) or set(sums) != set(names):
            raise MedusaError(f"{side} records no checksums for its files: export the artifact again")
        if verify:
            verify_files(folder, sums, full=verify == "full")
        else:
            for name, want in sums.items():
                if (folder / name).stat().st_size != want.get("bytes"):
                    raise MedusaError(f"artifact file {folder / name} does not have its recorded size")
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

    def default_tree(self, backend: str | None = None) -> str:
        """The default tree for a backend's device class (sidecar `default_trees`: {"cpu": ..., "gpu": ...},
        chosen from measurements at export), else the sidecar's single `default_tree`."""
        per_device = self.meta.get("default_trees") or {}
        name = per_device.get(device_class(backend)) if backend else None
        return name if name in self.meta["trees"] else self.meta["default_tree"]

    def tree(self, spec: str | None = None, backend: str | None = None) -> tuple[str, TreeBuffers]:
        """A tree by name from the sidecar, or from a JSON file; checked against the exported heads and top-k.
        Without `spec`, the default tree for `backend`'s device class."""
        spec = spec or self.default_tree(backend)
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


def _inside(folder: Path, name, side: Path) -> None:
    """Sidecar file names must stay inside the artifact folder (no absolute paths, no '..', no links out)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise MedusaError(f"{side} names a file outside the artifact folder: {name!r}")
    root = folder.resolve()
    if root not in (folder / name).resolve().parents:
        raise MedusaError(f"{side} names a file outside the artifact folder: {name!r}")


def _positive(value, what: str, side: Path, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if type(value) is not int or value < 1:
        raise MedusaError(f"{side}: {what} must be a positive integer, got {value!r}")


def _check_meta(meta: dict, side: Path) -> None:
    """The sidecar's numbers: well-formed, and consistent with its own I/O contract."""
    m, med = meta["model"], meta["medusa"]
    if not isinstance(m, dict) or not isinstance(med, dict):
        raise MedusaError(f"{side}: model and medusa must be objects")
    for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim"):
        _positive(m.get(key), f"model.{key}", side)
    _positive(m.get("sliding_window", 0), "model.sliding_window", side, allow_none=True)
    for key in ("num_heads", "topk"):
        _positive(med.get(key), f"medusa.{key}", side)
    _positive(meta["max_seq"], "max_seq", side)
    if meta["dtype"] not in DTYPES:
        raise MedusaError(f"{side}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    io = meta["io"]
    if not isinstance(io, dict) or not all(isinstance(io.get(k), list) for k in ("inputs", "outputs")):
        raise MedusaError(f"{side}: io must hold inputs and outputs lists")
    past = [s for s in io["inputs"] if str(s.get("name", "")).startswith("past_")]
    kv_shape = [m["num_kv_heads"], m["head_dim"]]
    if len(past) != 2 * m["num_layers"] or any(list(s.get("shape", []))[2:] != kv_shape for s in past):
        raise MedusaError(
            f"{side}: model.num_layers/num_kv_heads/head_dim disagree with the graph's past inputs "
            "(was the sidecar edited?)"
        )
    has_sliding = any(s.get("name") == "sliding_attention_mask" for s in io["inputs"])
    if has_sliding != (m["sliding_window"] is not None):
        raise MedusaError(f"{side}: model.sliding_window disagrees with the graph's inputs")
    topk = [s for s in io["outputs"] if s.get("name") == "medusa_topk"]
    if not topk or topk[0].get("shape", [None])[-1] != med["topk"] or topk[0]["shape"][0] != med["num_heads"]:
        raise MedusaError(f"{side}: medusa.num_heads/topk disagree with the graph's medusa_topk output")
