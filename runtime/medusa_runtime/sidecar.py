"""The on-disk contracts: an artifact's `artifact.json` (ArtifactSidecar, written by `medusa-export onnx`) and
a TensorRT engine's `<engine>.json` (EngineSidecar, written by `medusa-export trt`), as frozen dataclasses.

`to_json()` gives the JSON object to write; `from_json(data, where)` checks one read from `where` (types,
ranges, the format string, and the cross-checks between sections) and raises a one-line MedusaError naming
the bad key. Unknown keys are ignored on read, so that a newer writer's additions do not break this reader.
Files are named relative to the sidecar's folder; what needs the file system (existence, links, checksums)
is checked by the readers (artifact.Artifact.load, backends.trt.load_engine_sidecar). Runtime imports only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from .contract import DTYPES, ELEMENT_TYPES, TensorSpec
from .errors import MedusaError
from .tree import TreePath, split_lookup, validate_choices

PREFILL, VERIFY, COMMIT = "prefill", "verify", "commit"  # the engines' optimization profiles
_REQUIRED = object()


def read_json(path: Path) -> dict:
    """A sidecar's JSON object, or a one-line MedusaError."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise MedusaError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except json.JSONDecodeError as exc:
        raise MedusaError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MedusaError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def _plain(value: Any) -> Any:
    """JSON-ready copy: dataclasses as objects (fields in declaration order), tuples as lists."""
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + " ..."


def _is_int(v: Any, least: int = 0) -> bool:
    return type(v) is int and v >= least


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _is_range(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(map(_is_int, v)) and v[0] <= v[1] <= v[2]


def _check_format(data: dict, want: str, where) -> None:
    if data.get("format") != want:
        raise MedusaError(f"{where} has format {data.get('format')!r}, this runtime reads {want!r}")


class _Obj:
    """Typed reads from one JSON object of a sidecar at `path` ("" for the top level, "model", ...)."""

    def __init__(self, value: Any, where, path: str = ""):
        if not isinstance(value, dict):
            raise MedusaError(f"{where}: {path or 'the sidecar'} must be a JSON object, got {_show(value)}")
        self.value, self.where, self.path = value, where, path

    def key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str):
        raise MedusaError(f"{self.where}: {self.key(key)} {message}")

    def get(self, key: str, ok, what: str, default: Any = _REQUIRED) -> Any:
        if key not in self.value:
            if default is _REQUIRED:
                raise MedusaError(f"{self.where} lacks {self.key(key)}")
            return default
        value = self.value[key]
        if not ok(value):
            self.fail(key, f"must be {what}, got {_show(value)}")
        return value

    def int(self, key: str, least: int = 1, null: bool = False, **kw) -> int | None:
        what = "a positive integer" if least == 1 else f"an integer >= {least}"
        return self.get(
            key, lambda v: (null and v is None) or _is_int(v, least), what + " or null" * null, **kw
        )

    def str(self, key: str, **kw) -> str:
        return self.get(key, _is_name, "a non-empty string", **kw)

    def bool(self, key: str, **kw) -> bool:
        return self.get(key, lambda v: isinstance(v, bool), "true or false", **kw)

    def list(self, key: str, ok, what: str, **kw) -> tuple:
        """A list of scalars, each passing `ok`."""
        return tuple(
            self.get(key, lambda v: isinstance(v, list) and all(map(ok, v)), f"a list of {what}", **kw)
        )

    def map(self, key: str, ok, what: str, **kw) -> dict:
        """An object of scalars, each passing `ok`."""
        value = self.get(
            key, lambda v: isinstance(v, dict) and all(map(ok, v.values())), f"an object of {what}", **kw
        )
        return dict(value)

    def obj(self, key: str, **kw) -> _Obj:
        return _Obj(
            self.get(key, lambda v: isinstance(v, dict), "a JSON object", **kw), self.where, self.key(key)
        )

    def optional(self, key: str, parse) -> Any:
        """`parse(_Obj)` of an object that may be missing or null (None then)."""
        return None if self.value.get(key) is None else parse(self.obj(key))

    def objs(self, key: str, parse) -> tuple:
        """A list of objects, each read by `parse(_Obj)`."""
        items = self.get(key, lambda v: isinstance(v, list), "a list")
        return tuple(parse(_Obj(v, self.where, f"{self.key(key)}[{i}]")) for i, v in enumerate(items))

    def members(self, key: str, parse, **kw) -> dict:
        """An object of objects, each read by `parse(_Obj)`."""
        o = self.obj(key, **kw)
        return {k: parse(_Obj(v, self.where, o.key(k))) for k, v in o.value.items()}


def _tensor(o: _Obj) -> TensorSpec:
    dtype = o.get("dtype", lambda v: v in ELEMENT_TYPES, f"one of {', '.join(ELEMENT_TYPES)}")
    shape = o.list("shape", lambda d: _is_int(d) or _is_name(d), "sizes and symbol names")
    return TensorSpec(o.str("name"), dtype, shape)


def _check_inside(where, name: str) -> None:
    """A file of the artifact folder: relative, no '..' (links out are checked where the folder is known)."""
    if Path(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise MedusaError(f"{where} names a file outside the artifact folder: {name!r}")


class _Section:
    def to_json(self) -> dict:
        return _plain(self)


# ----------------------------------------------------------------------------------------------------------
# artifact.json


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str  # the model reference it was exported from
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]

    @classmethod
    def from_json(cls, o: _Obj) -> ModelConfig:
        ints = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim")
        model = cls(
            name=o.str("name"),
            family=o.str("family"),
            **{k: o.int(k) for k in ints},
            sliding_window=o.int("sliding_window", null=True),
            sliding_layers=o.list("sliding_layers", lambda v: isinstance(v, bool), "true/false"),
        )
        if len(model.sliding_layers) != model.num_layers:
            o.fail(
                "sliding_layers",
                f"has {len(model.sliding_layers)} entries, model.num_layers is {model.num_layers}",
            )
        return model


@dataclass(frozen=True)
class MedusaConfig(_Section):
    heads: str  # the heads reference they were exported from
    num_heads: int
    num_layers: int  # residual blocks per head
    shared_lm_head: bool
    topk: int  # candidates per head in the graph's medusa_topk output
    draft_vocab: int | None  # the heads' draft vocabulary size; None: the full vocabulary

    @classmethod
    def from_json(cls, o: _Obj) -> MedusaConfig:
        return cls(
            heads=o.str("heads"),
            num_heads=o.int("num_heads"),
            num_layers=o.int("num_layers", least=0),
            shared_lm_head=o.bool("shared_lm_head"),
            topk=o.int("topk"),
            draft_vocab=o.int("draft_vocab", null=True, default=None),
        )


@dataclass(frozen=True)
class GraphIO(_Section):
    """A graph's inputs and outputs in order (the contract of medusa_runtime.contract)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_json(cls, o: _Obj) -> GraphIO:
        return cls(o.objs("inputs", _tensor), o.objs("outputs", _tensor))


@dataclass(frozen=True)
class StepSection(_Section):
    """The fused step graph (step.onnx, `--gpu-step`): its I/O, KV capacity, and whether it runs natively
    in the artifact's dtype."""

    io: GraphIO
    capacity: int
    native_dtype: bool

    @classmethod
    def from_json(cls, o: _Obj) -> StepSection:
        return cls(GraphIO.from_json(o.obj("io")), o.int("capacity"), o.bool("native_dtype"))


@dataclass(frozen=True)
class TokenizerIds(_Section):
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_json(cls, o: _Obj) -> TokenizerIds:
        eos = o.list("eos_token_ids", _is_int, "token ids")
        return cls(o.int("bos_token_id", least=0, null=True, default=None), eos)


@dataclass(frozen=True)
class Checksum(_Section):
    bytes: int
    sha256: str

    @classmethod
    def from_json(cls, o: _Obj) -> Checksum:
        digest = o.get("sha256", lambda v: isinstance(v, str) and len(v) == 64, "a SHA-256 hex digest")
        return cls(o.int("bytes", least=0), digest)


@dataclass(frozen=True)
class FileRange(_Section):
    """Bytes of a weight file that a CPU session reads in place at run time (a gathered table: the token
    embedding), as opposed to weights read once while the session is made."""

    file: str
    offset: int
    length: int

    @classmethod
    def from_json(cls, o: _Obj) -> FileRange:
        return cls(o.str("file"), o.int("offset", least=0), o.int("length"))


@dataclass(frozen=True)
class ArtifactSidecar:
    """artifact.json: what an artifact folder holds and what the runtime checks and plans with."""

    FORMAT: ClassVar[str] = "medusa-export/1"
    # not written when empty
    OPTIONAL: ClassVar[tuple[str, ...]] = ("default_trees", "weights", "step", "read_in_place")

    model: ModelConfig
    medusa: MedusaConfig
    dtype: str  # a key of contract.DTYPES
    max_seq: int
    io: GraphIO  # model.onnx
    files: dict[str, str]  # role (model, commit, tokenizer; step, step_plain) -> file name
    external_data: tuple[str, ...]  # the graphs' weight files
    tokenizer: TokenizerIds
    trees: dict[str, tuple[TreePath, ...]]  # served trees: name -> medusa choices
    default_tree: str
    default_trees: dict[str, str] = field(default_factory=dict)  # device class (cpu, gpu) -> tree name
    versions: dict[str, Any] = field(default_factory=dict)  # the exporting toolchain's, as recorded
    weights: dict[str, Any] | None = None  # the quantization report (medusa_export.quantize), if quantized
    step: StepSection | None = None
    checksums: dict[str, Checksum] = field(default_factory=dict)  # file name -> size and SHA-256
    read_in_place: tuple[FileRange, ...] = ()  # model.onnx's gathered tables in its external data

    def file_names(self) -> list[str]:
        """Every file the sidecar names: the files' roles, then the external data."""
        return [*self.files.values(), *self.external_data]

    def to_json(self) -> dict:
        body = _plain(self)
        return {"format": self.FORMAT, **{k: v for k, v in body.items() if v or k not in self.OPTIONAL}}

    @classmethod
    def from_json(cls, data: Any, where: str | Path) -> ArtifactSidecar:
        o = _Obj(data, where)
        _check_format(data, cls.FORMAT, where)
        model = ModelConfig.from_json(o.obj("model"))
        medusa = MedusaConfig.from_json(o.obj("medusa"))
        dtype = o.get("dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
        files = o.map("files", _is_name, "file names")
        for role in ("model", "commit", "tokenizer"):
            if role not in files:
                raise MedusaError(f"{where} lacks files.{role}")
        external = o.list("external_data", _is_name, "file names", default=[])
        for name in [*files.values(), *external]:
            _check_inside(where, name)
        trees = {}
        for name, choices in o.map("trees", lambda v: True, "medusa choices").items():
            try:
                trees[name] = tuple(validate_choices(choices))
            except MedusaError as exc:
                raise MedusaError(f"{where}: trees.{name}: {exc}") from None
        served = lambda v: isinstance(v, str) and split_lookup(v)[0] in trees  # noqa: E731 (+lookupL allowed)
        side = cls(
            model=model,
            medusa=medusa,
            dtype=dtype,
            max_seq=o.int("max_seq"),
            io=GraphIO.from_json(o.obj("io")),
            files=files,
            external_data=external,
            tokenizer=TokenizerIds.from_json(o.obj("tokenizer")),
            trees=trees,
            default_tree=o.get("default_tree", served, "a served tree"),
            default_trees=o.map("default_trees", served, "served trees", default={}),
            versions=o.obj("versions", default={}).value,
            weights=o.optional("weights", lambda w: w.value),
            step=o.optional("step", StepSection.from_json),
            checksums=_checksums(o),
            read_in_place=o.objs("read_in_place", FileRange.from_json) if "read_in_place" in o.value else (),
        )
        side._cross_check(o)
        return side

    def _cross_check(self, o: _Obj) -> None:
        """The sidecar's numbers, consistent with its own I/O contract, files and checksums."""
        m, med, where = self.model, self.medusa, o.where
        past = [s for s in self.io.inputs if s.name.startswith("past_")]
        kv_shape = (m.num_kv_heads, m.head_dim)
        if len(past) != 2 * m.num_layers or any(tuple(s.shape[2:]) != kv_shape for s in past):
            raise MedusaError(
                f"{where}: model.num_layers/num_kv_heads/head_dim disagree with the graph's past inputs "
                "(was the sidecar edited?)"
            )
        has_sliding = any(s.name == "sliding_attention_mask" for s in self.io.inputs)
        if has_sliding != (m.sliding_window is not None):
            raise MedusaError(f"{where}: model.sliding_window disagrees with the graph's inputs")
        topk = [s for s in self.io.outputs if s.name == "medusa_topk"]
        if not topk or topk[0].shape[-1:] != (med.topk,) or topk[0].shape[:1] != (med.num_heads,):
            raise MedusaError(f"{where}: medusa.num_heads/topk disagree with the graph's medusa_topk output")
        if (self.step is None) != ("step" not in self.files):
            raise MedusaError(f"{where}: files.step and the step section must come together")
        if set(self.checksums) != set(self.file_names()):
            raise MedusaError(f"{where} records no checksums for its files: export the artifact again")
        for r in self.read_in_place:
            if r.file not in self.external_data or r.offset + r.length > self.checksums[r.file].bytes:
                raise MedusaError(
                    f"{where}: read_in_place names bytes outside the external data: {r.file} "
                    f"[{r.offset}, {r.offset + r.length})"
                )


def _checksums(o: _Obj) -> dict[str, Checksum]:
    if not isinstance(o.value.get("checksums"), dict):
        raise MedusaError(f"{o.where} records no checksums for its files: export the artifact again")
    return o.members("checksums", Checksum.from_json)


# ----------------------------------------------------------------------------------------------------------
# <engine>.json


@dataclass(frozen=True)
class EngineTensor(_Section):
    """One engine I/O tensor; dynamic dims by their contract symbol."""

    name: str
    mode: str  # input | output
    dtype: str  # a key of contract.ELEMENT_TYPES
    shape: tuple[int | str, ...]

    @classmethod
    def from_json(cls, o: _Obj) -> EngineTensor:
        spec, mode = _tensor(o), o.get("mode", lambda v: v in ("input", "output"), "input or output")
        return cls(spec.name, mode, spec.dtype, spec.shape)


@dataclass(frozen=True)
class EngineProfile(_Section):
    """One optimization profile: [min, opt, max] per symbol, and the resulting shapes per input."""

    name: str
    symbols: dict[str, tuple[int, int, int]]
    inputs: dict[str, dict[str, tuple[int, ...]]]  # tensor -> {"min", "opt", "max"} shapes

    @classmethod
    def from_json(cls, o: _Obj) -> EngineProfile:
        symbols = o.map("symbols", _is_range, "[min, opt, max] ranges")
        inputs = o.members(
            "inputs", lambda t: {k: t.list(k, _is_int, "sizes") for k in ("min", "opt", "max")}
        )
        return cls(o.str("name"), {s: tuple(r) for s, r in symbols.items()}, inputs)


@dataclass(frozen=True)
class EnginePart(_Section):
    """One engine file of the pair (role model or commit)."""

    file: str  # next to the sidecar
    bytes: int
    io: tuple[EngineTensor, ...]
    profiles: tuple[EngineProfile, ...]
    layers: dict[str, int]  # TensorRT layer type -> count

    @classmethod
    def from_json(cls, o: _Obj) -> EnginePart:
        file = o.str("file")
        if PurePosixPath(file).name != file or file in (".", ".."):
            o.fail("file", f"must be a file name next to the sidecar, got {file!r}")
        return cls(
            file,
            o.int("bytes", least=0),
            o.objs("io", EngineTensor.from_json),
            o.objs("profiles", EngineProfile.from_json),
            o.map("layers", _is_int, "counts"),
        )

    def profile_names(self) -> list[str]:
        return [p.name for p in self.profiles]


@dataclass(frozen=True)
class EngineSource(_Section):
    """The artifact an engine was built from: its folder then, and the SHA-256 of its artifact.json."""

    path: str
    sha256: str


@dataclass(frozen=True)
class EngineSidecar:
    """<engine>.json: the contract between `medusa-export trt` and the trt backend."""

    FORMAT: ClassVar[str] = "medusa-export-engine/1"
    PROFILES: ClassVar[dict[str, tuple[str, ...]]] = {"model": (PREFILL, VERIFY), "commit": (COMMIT,)}

    flavor: str  # tensorrt | tensorrt-rtx
    tensorrt_version: str
    compute_capabilities: tuple[str, ...]
    artifact: EngineSource
    max_seq: int
    max_prompt: int
    tree_sizes: tuple[int, ...]  # node counts (root included) the verify profile was built for
    opt_tree_size: int
    engines: dict[str, EnginePart]  # model, commit
    build_seconds: float

    def to_json(self) -> dict:
        return {"format": self.FORMAT, **_plain(self)}

    @classmethod
    def from_json(cls, data: Any, where: str | Path) -> EngineSidecar:
        o = _Obj(data, where)
        _check_format(data, cls.FORMAT, where)
        source = o.obj("artifact")
        side = cls(
            flavor=o.str("flavor"),
            tensorrt_version=o.str("tensorrt_version"),
            compute_capabilities=o.list("compute_capabilities", _is_name, "strings"),
            artifact=EngineSource(source.str("path"), source.str("sha256")),
            max_seq=o.int("max_seq"),
            max_prompt=o.int("max_prompt"),
            tree_sizes=o.list("tree_sizes", lambda v: _is_int(v, 1), "node counts"),
            opt_tree_size=o.int("opt_tree_size"),
            engines=o.members("engines", EnginePart.from_json),
            build_seconds=o.get("build_seconds", lambda v: type(v) in (int, float), "a number", default=0.0),
        )
        if side.max_prompt > side.max_seq:
            o.fail("max_prompt", f"{side.max_prompt} exceeds max_seq {side.max_seq}")
        for role, names in cls.PROFILES.items():
            if role not in side.engines:
                raise MedusaError(f"{where} lacks engines.{role}")
            missing = [n for n in names if n not in side.engines[role].profile_names()]
            if missing:
                raise MedusaError(f"{where}: engines.{role} lacks the {missing[0]} profile")
        return side
