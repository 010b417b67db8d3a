"""TensorRT / TensorRT-RTX backend over an engine built by `medusa-export trt` (see medusa_export.trt_build).

The engine sidecar (`<engine>.json`, sidecar.EngineSidecar) is the contract between build and run: flavor
and version, the artifact it came from (sha256 of artifact.json), the I/O list of both engines (the model
and the small KV-commit gather) with symbolic shapes, and the optimization profiles as ranges per symbol:

  prefill  the prompt: keep_all steps of T > 1 tokens, one projected row
  verify   tree steps and plain decoding steps (T = 1): T tokens, up to T rows
  commit   the KV-commit engine: gathers `kept` accepted rows out of a step's T new rows

Everything that needs no GPU is plain Python here and tested without one: reading and checking the
sidecar, choosing the profile, the shape of every tensor for a step, and the binding plan (which
device buffer, at which byte offset, backs each engine tensor). TrtBackend only adds the device side:
deserialize, allocate, bind, enqueue. CUDA memory and streams come from polygraphy.cuda (libcudart via
ctypes); tensorrt / tensorrt_rtx are imported inside the functions that need them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import contract
from ..artifact import SIDECAR
from ..errors import MedusaError
from ..integrity import sha256_file
from ..sidecar import COMMIT, PREFILL, VERIFY, EngineSidecar, EngineTensor, read_json
from .base import Backend, StepOutput

FLAVORS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}  # flavor -> module, preferred first
TRT_DTYPES = contract.FROM_TRT
KV_PREFIXES = ("past_", "present_", "kept_")
_NOISE = ("has Int64 binding", "Thread context has not been set")


# ----------------------------------------------------------------------------------------------------------
# Flavors, files, sidecar checks (no GPU)


def import_tensorrt(flavor: str = "auto"):
    """(flavor, module) for "tensorrt" (TensorRT 10+), "tensorrt-rtx" (TensorRT for RTX), or "auto"."""
    import importlib

    if flavor != "auto" and flavor not in FLAVORS:
        raise MedusaError(f"unknown TensorRT flavor {flavor!r}: use auto, {', '.join(FLAVORS)}")
    for name in FLAVORS if flavor == "auto" else (flavor,):
        try:
            return name, importlib.import_module(FLAVORS[name])
        except ImportError:
            continue
    extra = {"auto": "[rtx] or [trt]", "tensorrt": "[trt]", "tensorrt-rtx": "[rtx]"}[flavor]
    raise MedusaError(
        f"{'tensorrt or tensorrt-rtx' if flavor == 'auto' else flavor} is not installed "
        f"(pip install medusa-export{extra})"
    )


def default_engine_path(folder: Path, flavor: str) -> Path:
    return Path(folder) / f"model.{flavor}.engine"


def find_engine(folder: Path, flavor: str = "auto") -> Path:
    """The artifact's engine for `flavor` (auto: the first that exists, in FLAVORS order)."""
    candidates = [default_engine_path(folder, f) for f in (FLAVORS if flavor == "auto" else (flavor,))]
    for path in candidates:
        if path.is_file():
            return path
    raise MedusaError(
        f"no TensorRT engine in {folder} ({', '.join(p.name for p in candidates)}): "
        f"build one with `medusa-export trt {folder}`, or pass engine=PATH"
    )


def sidecar_path(engine: Path) -> Path:
    return Path(f"{engine}.json")


def load_engine_sidecar(engine: Path) -> EngineSidecar:
    """The engine's sidecar (sidecar.EngineSidecar), with both engine files present at their recorded sizes."""
    engine = Path(engine)
    side = sidecar_path(engine)
    if not engine.is_file():
        raise MedusaError(f"engine {engine} does not exist")
    if not side.is_file():
        raise MedusaError(f"engine {engine} has no sidecar {side.name}: rebuild it with `medusa-export trt`")
    meta = EngineSidecar.from_json(read_json(side), side)
    for role, part in meta.engines.items():
        path = engine.parent / part.file
        if not path.is_file():
            raise MedusaError(f"engine {engine} is incomplete: its {role} engine {part.file} is missing")
        if path.stat().st_size != part.bytes:
            raise MedusaError(
                f"engine file {path} has {path.stat().st_size} bytes, its sidecar says "
                f"{part.bytes}: truncated or replaced; rebuild it"
            )
    return meta


def check_engine(engine: Path, artifact) -> EngineSidecar:
    """The sidecar of `engine`, checked against `artifact` (sha256 of its artifact.json, I/O names)."""
    meta = load_engine_sidecar(engine)
    io = artifact.sidecar.io
    same_io = [t.name for t in meta.engines["model"].io] == [s.name for s in [*io.inputs, *io.outputs]]
    if meta.artifact.sha256 != sha256_file(artifact.folder / SIDECAR) or not same_io:
        raise MedusaError(
            f"engine {engine} was built from a different artifact ({meta.artifact.path})"
            f", not {artifact.folder}: rebuild it with `medusa-export trt {artifact.folder}`"
        )
    return meta


def _noise(message: str) -> bool:
    return any(n in message for n in _NOISE)


def make_logger(trt, quiet: bool = False):
    """A TensorRT logger that keeps errors (for one-line MedusaErrors) and prints warnings on stderr."""
    import sys

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg.strip())
            elif level == int(trt.ILogger.Severity.WARNING) and not quiet and not _noise(msg):
                print(f"[{trt.__name__}] {msg.strip()}", file=sys.stderr, flush=True)

        def last_error(self) -> str:
            return self.errors[-1].splitlines()[0] if self.errors else "no details logged"

    return Logger()


# ----------------------------------------------------------------------------------------------------------
# Planning (no GPU): profiles, shapes, bindings


@dataclass(frozen=True)
class Binding:
    buffer: str  # a key of TrtPlan.buffer_bytes
    offset: int  # bytes into that buffer
    shape: tuple[int, ...]
    nbytes: int
    is_input: bool


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * contract.ITEMSIZE[dtype]


def concrete_shape(shape: tuple, sizes: dict[str, int]) -> tuple[int, ...]:
    """A symbolic shape (ints and symbol names) at concrete symbol sizes."""
    return tuple(d if isinstance(d, int) else sizes[d] for d in shape)


def kv_buffer(name: str) -> str | None:
    """past_key.3 / present_key.3 / kept_key.3 -> "key.3" (the cache slot they address); None otherwise."""
    for prefix in KV_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


class TrtPlan:
    """The GPU-free half of TrtBackend: profile choice, tensor shapes and the binding plan of every step.

    Device buffers (sizes in `buffer_bytes`): "cache/<kv>" [max_seq, KV, D] and "scratch/<kv>"
    [max_nodes, KV, D] per layer and kind; every other engine tensor has a buffer of its own name, sized
    for its largest shape in this backend. `capacity` is what the decode loop may use: verify steps need
    past <= max_seq - (largest tree in the verify profile), and the loop keeps `max_nodes` free.
    """

    def __init__(self, meta: EngineSidecar, max_nodes: int):
        self.meta = meta
        self.io = {t.name: t for t in meta.engines["model"].io}
        self.commit_io = {t.name: t for t in meta.engines["commit"].io}
        self.profiles = {
            role: {p.name: (i, p.symbols) for i, p in enumerate(meta.engines[role].profiles)}
            for role in ("model", "commit")
        }
        self.max_seq, self.max_prompt = meta.max_seq, meta.max_prompt
        self.max_tree = self.profiles["model"][VERIFY][1]["tokens"][2]
        if not 1 <= max_nodes <= self.max_tree:
            raise MedusaError(
                f"a tree of {max_nodes} nodes is outside the engine's verify profile "
                f"(1..{self.max_tree} tokens): rebuild with --tree-sizes including {max_nodes}"
            )
        self.max_nodes = max_nodes
        self.capacity = self.max_seq - self.max_tree + max_nodes
        past = next(t for t in self.io.values() if t.name.startswith("past_"))
        self.kv_dtype = past.dtype
        self.row_bytes = nbytes(past.shape[2:], self.kv_dtype)
        self.kv_names = [kv_buffer(n) for n in self.io if n.startswith("past_")]
        for t in [*self.io.values(), *self.commit_io.values()]:
            if kv_buffer(t.name) and (t.dtype, t.shape[2:]) != (self.kv_dtype, past.shape[2:]):
                raise MedusaError(f"engine KV tensor {t.name} disagrees with {past.name}: rebuild it")
        largest = {
            "batch": 1,
            "tokens": max(self.max_prompt, max_nodes),
            "rows": max_nodes,
            "past": self.max_seq,
            "total": self.max_seq,
            "kept": max_nodes,
        }
        self.buffer_bytes = {f"cache/{k}": self.max_seq * self.row_bytes for k in self.kv_names}
        self.buffer_bytes |= {f"scratch/{k}": max_nodes * self.row_bytes for k in self.kv_names}
        for t in [*self.io.values(), *self.commit_io.values()]:
            if kv_buffer(t.name) is None:
                self.buffer_bytes[t.name] = nbytes(concrete_shape(t.shape, largest), t.dtype)

    @staticmethod
    def phase(tokens: int, keep_all: bool) -> str:
        """prefill for the prompt (keep_all, T > 1); verify for tree steps and plain steps (T = 1)."""
        return PREFILL if keep_all and tokens > 1 else VERIFY

    def profile(self, role: str, name: str, sizes: dict[str, int]) -> int:
        """The index of profile `name`, after checking that `sizes` lie within its ranges."""
        index, ranges = self.profiles[role][name]
        for sym, (lo, _, hi) in ranges.items():
            if not lo <= sizes[sym] <= hi:
                hint = " (rebuild with a larger --max-prompt)" if name == PREFILL and sym == "tokens" else ""
                raise MedusaError(
                    f"{sym} = {sizes[sym]} is outside the engine's {name} profile [{lo}, {hi}]{hint}"
                )
        return index

    def forward_plan(
        self, tokens: int, rows: int, past: int, keep_all: bool
    ) -> tuple[int, dict[str, Binding]]:
        """(profile index, binding per engine tensor) for a forward of `tokens` on `past` cached ones."""
        sizes = {"batch": 1, "tokens": tokens, "rows": rows, "past": past, "total": past + tokens}
        index = self.profile("model", self.phase(tokens, keep_all), sizes)

        def place(name: str) -> tuple[str, int]:
            kv = kv_buffer(name)
            if kv is None:
                return name, 0
            if name.startswith("past_"):  # the cache's first `past` rows
                return f"cache/{kv}", 0
            return (f"cache/{kv}", past * self.row_bytes) if keep_all else (f"scratch/{kv}", 0)

        return index, self._bindings(self.io, sizes, place)

    def commit_plan(self, tokens: int, kept: int, past: int) -> tuple[int, dict[str, Binding]]:
        """Bindings of the commit engine: `kept` of the scratch's `tokens` rows -> cache rows from `past`."""
        sizes = {"batch": 1, "tokens": tokens, "kept": kept}
        index = self.profile("commit", COMMIT, sizes)

        def place(name: str) -> tuple[str, int]:
            kv = kv_buffer(name)
            if kv is None:
                return name, 0
            if name.startswith("present_"):
                return f"scratch/{kv}", 0
            return f"cache/{kv}", past * self.row_bytes

        return index, self._bindings(self.commit_io, sizes, place)

    def _bindings(self, io: dict[str, EngineTensor], sizes: dict[str, int], place) -> dict[str, Binding]:
        plan = {}
        for name, t in io.items():
            buffer, offset = place(name)
            shape = concrete_shape(t.shape, sizes)
            size = nbytes(shape, t.dtype)
            if buffer not in self.buffer_bytes or offset + size > self.buffer_bytes[buffer]:
                raise MedusaError(
                    f"{name} {shape} does not fit buffer {buffer} at byte {offset} "
                    f"(capacity {self.buffer_bytes.get(buffer, 0)} bytes)"
                )
            plan[name] = Binding(buffer, offset, shape, size, t.mode == "input")
        return plan


# ----------------------------------------------------------------------------------------------------------
# The device side


class _Cuda:
    """The few CUDA runtime calls the backend needs (polygraphy.cuda: libcudart through ctypes)."""

    def __init__(self):
        try:
            from polygraphy import cuda

            self.cuda = cuda
            self.lib = cuda.wrapper()
            self.stream = self.lib.create_stream()
        except Exception as exc:  # polygraphy raises its own exception types, ctypes OSError
            reason = str(exc).splitlines()[0].split(". ")[0]
            raise MedusaError(f"the trt backend needs a usable NVIDIA GPU and driver: {reason}") from None
        self.pointers: list[int] = []

    def malloc(self, size: int) -> int:
        self.pointers.append(self.lib.malloc(max(size, 1)))
        return self.pointers[-1]

    def upload(self, ptr: int, array: np.ndarray) -> None:
        self.lib.memcpy(ptr, array.ctypes.data, array.nbytes, self.cuda.MemcpyKind.HostToDevice, self.stream)

    def download(self, array: np.ndarray, ptr: int) -> None:
        self.lib.memcpy(array.ctypes.data, ptr, array.nbytes, self.cuda.MemcpyKind.DeviceToHost, self.stream)

    def sync(self) -> None:
        self.lib.stream_synchronize(self.stream)

    def close(self) -> None:
        for ptr in self.pointers:
            self.lib.free(ptr)
        self.pointers = []
        if self.stream:
            self.lib.destroy_stream(self.stream)
            self.stream = None


class TrtBackend(Backend):
    """Runs the engine pair of `medusa-export trt`; the KV cache lives in device buffers this backend owns."""

    def __init__(self, artifact, max_nodes: int = 64, engine: str | Path | None = None, flavor: str = "auto"):
        path = Path(engine) if engine else find_engine(artifact.folder, flavor)
        meta = check_engine(path, artifact)
        self.plan = TrtPlan(meta, max_nodes)
        self.capacity, self.max_nodes = self.plan.capacity, max_nodes
        name, trt = import_tensorrt(meta.flavor)
        if trt.__version__ != meta.tensorrt_version:
            raise MedusaError(
                f"engine {path} was built with {name} {meta.tensorrt_version}, "
                f"this is {trt.__version__}: rebuild it"
            )
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.cuda = _Cuda()
        self.engines = {
            role: self._deserialize(path.parent / part.file) for role, part in meta.engines.items()
        }
        self.contexts = {role: e.create_execution_context() for role, e in self.engines.items()}
        if not all(self.contexts.values()):
            raise MedusaError(f"TensorRT could not create an execution context: {self.logger.last_error()}")
        self.pointers = {b: self.cuda.malloc(size) for b, size in self.plan.buffer_bytes.items()}
        self.profile_index = {role: -1 for role in self.contexts}
        self.last_tokens, self.last_logits = 0, (1, 0, 0)

    def _deserialize(self, file: Path):
        engine = self.runtime.deserialize_cuda_engine(file.read_bytes())
        if engine is None:
            raise MedusaError(f"TensorRT could not load {file}: {self.logger.last_error()}")
        return engine

    def _run(self, role: str, index: int, plan: dict[str, Binding], host: dict[str, np.ndarray]) -> None:
        context = self.contexts[role]
        if self.profile_index[role] != index:
            if not context.set_optimization_profile_async(index, self.cuda.stream):
                raise MedusaError(f"TensorRT refused profile {index}: {self.logger.last_error()}")
            self.profile_index[role] = index
        for name, array in host.items():
            if array.shape != plan[name].shape:
                raise MedusaError(f"{name} has shape {array.shape}, this step needs {plan[name].shape}")
            self.cuda.upload(self.pointers[plan[name].buffer], array)
        for name, b in plan.items():
            if b.is_input and not context.set_input_shape(name, b.shape):
                raise MedusaError(f"TensorRT refused shape {b.shape} for {name}: {self.logger.last_error()}")
            context.set_tensor_address(name, self.pointers[b.buffer] + b.offset)
        if not context.execute_async_v3(self.cuda.stream):
            raise MedusaError(f"TensorRT execution failed: {self.logger.last_error()}")

    def forward(self, input_ids, positions, masks, rows, keep_all):
        t, r = len(input_ids), len(rows)
        if self.length + t > self.plan.max_seq:
            raise MedusaError(f"KV cache full: {self.length} + {t} tokens exceed max_seq {self.plan.max_seq}")
        if not keep_all and t > self.max_nodes:
            raise MedusaError(f"a tree of {t} nodes exceeds this backend's {self.max_nodes}-node scratch")
        index, plan = self.plan.forward_plan(t, r, self.length, keep_all)
        host = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)[None],
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64)[None],
            "attention_mask": np.ascontiguousarray(masks[0], dtype=np.float32),
            "output_rows": np.ascontiguousarray(rows, dtype=np.int64),
        }
        if "sliding_attention_mask" in plan:
            host["sliding_attention_mask"] = np.ascontiguousarray(masks[1], dtype=np.float32)
        self._run("model", index, plan, host)
        next_tokens = np.empty(plan["next_tokens"].shape, np.int64)
        topk = np.empty(plan["medusa_topk"].shape, np.int64)
        self.cuda.download(next_tokens, self.pointers["next_tokens"])
        self.cuda.download(topk, self.pointers["medusa_topk"])
        self.cuda.sync()
        if keep_all:
            self.length += t
        self.last_tokens, self.last_logits = t, plan["logits"].shape
        return StepOutput(next_tokens=next_tokens[0], medusa_topk=topk[:, 0])

    def commit(self, rows):
        n = len(rows)
        if self.length + n > self.plan.max_seq:
            raise MedusaError(f"KV cache full: {self.length} + {n} tokens exceed max_seq {self.plan.max_seq}")
        index, plan = self.plan.commit_plan(self.last_tokens, n, self.length)
        self._run("commit", index, plan, {contract.COMMIT_ROWS: np.ascontiguousarray(rows, dtype=np.int64)})
        self.cuda.sync()
        self.length += n

    def logits(self):
        out = np.empty(self.last_logits, np.float32)
        self.cuda.download(out, self.pointers["logits"])
        self.cuda.sync()
        return out[0]

    def close(self) -> None:
        self.contexts, self.engines = {}, {}
        self.cuda.close()
