"""`medusa-export trt`: build a TensorRT / TensorRT-RTX engine pair + JSON sidecar from an artifact.

The artifact's model.onnx becomes a strongly typed engine (precision from the ONNX dtypes) with two
optimization profiles, prefill and verify (see medusa_runtime.backends.trt), and its kv_commit.onnx a
small second engine with one profile. The sidecar `<engine>.json` records what the runtime checks and
plans with: flavor, version, targets, the artifact (path + sha256 of artifact.json), per engine its file,
size, I/O list (from the parsed network, symbolic dims from the ONNX graph) and profile ranges.

TensorRT-RTX parses and builds without a GPU; deserializing (running, inspecting the engine) needs one.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from medusa_runtime.artifact import SIDECAR, Artifact
from medusa_runtime.backends.trt import (
    COMMIT,
    PREFILL,
    TRT_DTYPES,
    VERIFY,
    check_engine,
    concrete_shape,
    default_engine_path,
    import_tensorrt,
    load_engine_sidecar,
    make_logger,
    sha256_file,
    sidecar_path,
)
from medusa_runtime.errors import MedusaError
from medusa_runtime.sidecar import EnginePart, EngineProfile, EngineSidecar, EngineSource, EngineTensor
from medusa_runtime.tree import build_tree

from .fsutil import atomic_file, check_out_file
from .progress import log, stage

Range = tuple[int, int, int]  # min, opt, max
RTX_DEFAULT_CCS = ["8.0", "8.6", "8.9", "12.x"]  # TensorRT-RTX's documented targets when none is set
ACCEPTED_OPT = 3  # typical accepted rows per commit: the commit profile's opt


def build_engine(
    artifact_dir: Path,
    flavor: str = "auto",
    tree_sizes: list[int] | None = None,
    max_seq: int | None = None,
    max_prompt: int | None = None,
    timing_cache: Path | None = None,
    out: Path | None = None,
    quiet: bool = False,
    force: bool = False,
) -> Path:
    """Build an artifact's engines + sidecar; returns the engine path (<artifact>/model.<flavor>.engine).
    Existing engines at that path are replaced only with `force`."""
    artifact = Artifact.load(artifact_dir)
    max_seq, max_prompt, sizes, opt_tree = check_ranges(artifact, max_seq, max_prompt, tree_sizes)
    flavor, trt = import_tensorrt(flavor)
    out = Path(out) if out else default_engine_path(artifact.folder, flavor)
    if out.suffix != ".engine":
        raise MedusaError(f"--out {out}: an engine file name must end in .engine")
    commit_out = out.with_name(out.name.removesuffix(".engine") + ".kv_commit.engine")
    for path in (out, commit_out, sidecar_path(out)):
        check_out_file(path, force)
    start = time.perf_counter()
    parsed = _Engine(trt, flavor, artifact.path("model"), quiet)
    for mode in ("input", "output"):
        artifact.check_io(f"{mode}s", [(t.name, t.dtype) for t in parsed.io if t.mode == mode])
    model = parsed.build(profile_ranges(max_seq, max_prompt, sizes, opt_tree), timing_cache)
    targets = parsed.targets
    del parsed  # frees the network's weights before the second build
    commit_graph = _Engine(trt, flavor, artifact.path("commit"), quiet)
    commit = commit_graph.build(commit_ranges(sizes, opt_tree), timing_cache)
    sidecar_path(out).unlink(missing_ok=True)  # no stale sidecar may describe half-replaced engines
    engines = {}
    for role, built, path in (("model", model, out), ("commit", commit, commit_out)):
        blob = built.pop("blob")
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(memoryview(blob))
        engines[role] = EnginePart(path.name, path.stat().st_size, **built)
    meta = EngineSidecar(
        flavor=flavor,
        tensorrt_version=trt.__version__,
        compute_capabilities=tuple(targets),
        artifact=EngineSource(str(artifact.folder.resolve()), sha256_file(artifact.folder / SIDECAR)),
        max_seq=max_seq,
        max_prompt=max_prompt,
        tree_sizes=tuple(sizes),
        opt_tree_size=opt_tree,
        engines=engines,
        build_seconds=round(time.perf_counter() - start, 1),
    )
    with atomic_file(sidecar_path(out)) as tmp:
        tmp.write_text(json.dumps(meta.to_json(), indent=1))
    return out


# ----------------------------------------------------------------------------------------------------------
# Ranges and profiles


def default_tree_sizes(artifact: Artifact) -> list[int]:
    """Node counts (root included) of the trees the artifact serves."""
    return sorted({build_tree(choices).num_nodes for choices in artifact.sidecar.trees.values()})


def check_ranges(
    artifact: Artifact, max_seq: int | None, max_prompt: int | None, tree_sizes: list[int] | None
) -> tuple[int, int, list[int], int]:
    """(max_seq, max_prompt, tree sizes, opt tree size), defaults filled in; MedusaError if inconsistent."""
    sizes = default_tree_sizes(artifact) if tree_sizes is None else sorted(set(tree_sizes))
    if not sizes:
        raise MedusaError("--tree-sizes is empty: give at least one tree size (node count, root included)")
    if sizes[0] < 1:
        raise MedusaError(f"tree size {sizes[0]} is not a node count (at least 1: the root)")
    max_seq = artifact.max_seq if max_seq is None else max_seq
    if max_seq > artifact.max_seq:
        raise MedusaError(
            f"--max-seq {max_seq} exceeds the artifact's max_seq {artifact.max_seq} "
            "(re-export with a larger --max-seq)"
        )
    largest = sizes[-1]
    if largest >= max_seq:
        raise MedusaError(f"a tree of {largest} nodes leaves no room for a prompt in max_seq {max_seq}")
    max_prompt = max_seq - largest if max_prompt is None else max_prompt
    if not 1 <= max_prompt <= max_seq:
        raise MedusaError(f"--max-prompt {max_prompt} must lie in [1, max_seq {max_seq}]")
    default = artifact.tree(backend="trt")[1].num_nodes  # the tree the trt backend runs by default
    return max_seq, max_prompt, sizes, min(default, largest)


def profile_ranges(
    max_seq: int, max_prompt: int, tree_sizes: list[int], opt_tree: int
) -> dict[str, dict[str, Range]]:
    """Symbol ranges of the model engine's profiles; total = past + tokens at min, opt and max alike."""
    tree = max(tree_sizes)
    prompt_opt = max(1, max_prompt // 2)
    past_opt = (max_seq - tree) // 2
    one = (1, 1, 1)
    return {
        PREFILL: {
            "batch": one,
            "tokens": (1, prompt_opt, max_prompt),
            "rows": one,
            "past": (0, 0, max_seq - max_prompt),
            "total": (1, prompt_opt, max_seq),
        },
        VERIFY: {
            "batch": one,
            "tokens": (1, opt_tree, tree),
            "rows": (1, opt_tree, tree),
            "past": (0, past_opt, max_seq - tree),
            "total": (1, past_opt + opt_tree, max_seq),
        },
    }


def commit_ranges(tree_sizes: list[int], opt_tree: int) -> dict[str, dict[str, Range]]:
    """The commit engine's one profile: `kept` of a verify step's `tokens` new rows."""
    tree = max(tree_sizes)
    kept = (1, min(ACCEPTED_OPT, tree), tree)
    return {COMMIT: {"batch": (1, 1, 1), "tokens": (1, opt_tree, tree), "kept": kept}}


def input_ranges(io: list[EngineTensor], symbols: dict[str, Range]) -> dict[str, dict[str, tuple]]:
    """min/opt/max shape of every input of a profile."""
    ranges = {}
    for t in io:
        if t.mode != "input":
            continue
        unknown = [d for d in t.shape if isinstance(d, str) and d not in symbols]
        if unknown:
            raise MedusaError(f"input {t.name} has a dim {unknown[0]!r} that no optimization profile sets")
        ranges[t.name] = {
            key: concrete_shape(t.shape, {s: r[i] for s, r in symbols.items()})
            for i, key in enumerate(("min", "opt", "max"))
        }
    return ranges


# ----------------------------------------------------------------------------------------------------------
# Building


class _Engine:
    """An ONNX graph parsed into a strongly typed network (the parser, kept alive, owns the weights)."""

    def __init__(self, trt, flavor: str, onnx_path: Path, quiet: bool):
        self.trt, self.flavor, self.path, self.quiet = trt, flavor, onnx_path, quiet
        self.logger = make_logger(trt, quiet)
        self.builder = trt.Builder(self.logger)
        self.network = self.builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        self.parser = trt.OnnxParser(self.network, self.logger)
        with stage(f"parsing {onnx_path.name} with the {flavor} ONNX parser", quiet):
            if not self.parser.parse_from_file(str(onnx_path)):
                raise MedusaError(_parser_error(self.parser, onnx_path))
        self.io = _network_io(self.network, _onnx_shapes(onnx_path))

    def build(self, profiles: dict[str, dict[str, Range]], timing_cache: Path | None) -> dict:
        """{blob, io, profiles, layers} of the engine built with these profiles; sets `targets`."""
        config = self.builder.create_builder_config()
        if hasattr(self.trt.BuilderFlag, "TF32"):  # fp32 stays fp32: greedy must match the base model's
            config.clear_flag(self.trt.BuilderFlag.TF32)
        recorded = []
        for name, symbols in profiles.items():
            ranges = input_ranges(self.io, symbols)
            profile = self.builder.create_optimization_profile()
            for tensor, r in ranges.items():
                profile.set_shape(tensor, r["min"], r["opt"], r["max"])
            if config.add_optimization_profile(profile) < 0:
                raise MedusaError(f"TensorRT rejected the {name} profile: {self.logger.last_error()}")
            recorded.append(EngineProfile(name, {s: tuple(r) for s, r in symbols.items()}, ranges))
        monitor = _progress_monitor(self.trt, self.quiet)
        if monitor is not None:
            config.progress_monitor = monitor
        save_cache = _load_timing_cache(config, self.flavor, timing_cache, self.quiet)
        layers = self.network.num_layers
        label = f"building {self.path.stem} ({layers} layers, profiles {', '.join(profiles)})"
        with stage(label, self.quiet):
            blob = self.builder.build_serialized_network(self.network, config)
        if blob is None:
            raise MedusaError(f"TensorRT could not build {self.path.name}: {self.logger.last_error()}")
        if save_cache:
            with atomic_file(timing_cache) as tmp:
                tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        types = Counter(self.network.get_layer(i).type.name for i in range(layers))
        self.targets = _compute_capabilities(self.flavor, config)
        return {
            "blob": blob,
            "io": tuple(self.io),
            "profiles": tuple(recorded),
            "layers": dict(sorted(types.items())),
        }


def _parser_error(parser, path: Path) -> str:
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    if not errors:
        return f"TensorRT could not parse {path.name} (no parser error recorded)"
    e = errors[0]
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    desc = e.desc().strip().splitlines()[0] if e.desc() else str(e.code())
    node = f"node {e.node_name() or '?'} ({e.node_operator() or '?'})"
    return f"TensorRT cannot parse {path.name}: {node}: {desc}{more}"


def _onnx_shapes(path: Path) -> dict[str, list]:
    """Graph input/output shapes with symbolic dims by name (the contract's), external data not loaded."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {v.name: v.type.tensor_type.shape.dim for v in [*graph.input, *graph.output]}
    return {n: [d.dim_param or d.dim_value for d in ds] for n, ds in dims.items()}


def _network_io(network, symbolic: dict[str, list]) -> list[EngineTensor]:
    """The network's inputs then outputs; dynamic dims by their ONNX symbol."""
    tensors = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    tensors += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    io = []
    for mode, t in tensors:
        onnx_shape = symbolic.get(t.name, [])
        shape = [s if d == -1 else d for d, s in zip(t.shape, onnx_shape, strict=False)]
        unnamed = [d for d, s in zip(t.shape, shape, strict=False) if d == -1 and not isinstance(s, str)]
        if len(onnx_shape) != len(t.shape) or unnamed:
            raise MedusaError(
                f"{mode} {t.name}: TensorRT shape {tuple(t.shape)} does not match the ONNX "
                f"graph's {onnx_shape}"
            )
        dtype = TRT_DTYPES.get(t.dtype.name, t.dtype.name)
        io.append(EngineTensor(t.name, mode, dtype, tuple(shape)))
    return io


def _progress_monitor(trt, quiet: bool):
    """Phase lines on stderr (four levels deep, and the end of phases over a second), if the module can."""
    if quiet or not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, tuple[int, float]] = {}  # name -> (depth, start)
            self.start = time.perf_counter()

        def _print(self, depth: int, text: str) -> None:
            elapsed = time.perf_counter() - self.start
            print(f"[{trt.__name__}] {elapsed:6.1f}s {'  ' * depth}{text}", file=sys.stderr, flush=True)

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = self.phases[parent_phase][0] + 1 if parent_phase in self.phases else 0
            self.phases[phase_name] = (depth, time.perf_counter())
            if depth <= 3:
                self._print(depth, f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            depth, start = self.phases.get(phase_name, (0, self.start))
            if depth <= 3 and time.perf_counter() - start >= 1.0:
                self._print(depth, f"{phase_name}: done in {time.perf_counter() - start:.1f}s")

    return Monitor()


def _load_timing_cache(config, flavor: str, path: Path | None, quiet: bool) -> bool:
    """Attach the timing cache at `path` (if it exists) to `config`; whether to save it after the build."""
    if path is None:
        return False
    if flavor == "tensorrt-rtx":  # timing-cache calls are deprecated no-ops: RTX compiles kernels at run time
        log(f"--timing-cache ignored: {flavor} has no timing cache", quiet)
        return False
    cache = config.create_timing_cache(Path(path).read_bytes() if Path(path).is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"timing cache {path} is from another device or version: starting afresh")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return True


def _compute_capabilities(flavor: str, config) -> list[str]:
    """Targets: for TensorRT-RTX the config's (or its documented defaults), for TensorRT the build GPU's."""
    if flavor == "tensorrt-rtx":
        count = getattr(config, "num_compute_capabilities", 0)
        names = [config.get_compute_capability(i).name for i in range(count)]
        return [f"{n[2:-1]}.{n[-1]}" if n.startswith("SM") else n.lower() for n in names] or RTX_DEFAULT_CCS
    return [_gpu_compute_capability()]


def _gpu_compute_capability() -> str:
    import ctypes

    try:
        from polygraphy import cuda

        lib, values = cuda.wrapper().handle, []
        for attribute in (75, 76):  # cudaDevAttrComputeCapabilityMajor, ...Minor
            value = ctypes.c_int()
            if lib.cudaDeviceGetAttribute(ctypes.byref(value), attribute, 0) != 0:
                return "unknown"
            values.append(value.value)
        return f"{values[0]}.{values[1]}"
    except Exception:  # no CUDA runtime: the record says so rather than failing a finished build
        return "unknown"


# ----------------------------------------------------------------------------------------------------------
# Inspection and checks


def inspect_engine(engine_path: Path, deserialize: bool = False) -> dict:
    """What an engine is, from its sidecar and files (no GPU); with `deserialize` also from TensorRT (GPU)."""
    engine_path = Path(engine_path)
    side = load_engine_sidecar(engine_path)
    meta = side.to_json()
    keys = (
        "flavor",
        "tensorrt_version",
        "compute_capabilities",
        "artifact",
        "max_seq",
        "max_prompt",
        "tree_sizes",
    )
    info = {"engine": str(engine_path), **{k: meta[k] for k in keys}, "engines": {}}
    for role, part in side.engines.items():
        with open(engine_path.parent / part.file, "rb") as f:
            magic = f.read(4).decode("ascii", "replace")
        info["engines"][role] = {
            "file": part.file,
            "bytes": part.bytes,
            "magic": magic,
            "profiles": {p.name: p.symbols for p in part.profiles},
            "inputs": [t.name for t in part.io if t.mode == "input"],
            "outputs": [t.name for t in part.io if t.mode == "output"],
            "plugin_layers": sum(n for k, n in part.layers.items() if "PLUGIN" in k),
        }
        if deserialize:
            path = engine_path.parent / part.file
            info["engines"][role]["deserialized"] = _check_deserialized(path, side.flavor, part)
    return info


def _check_deserialized(path: Path, flavor: str, part: EnginePart) -> bool:
    """Deserialize (needs a supported GPU) and compare the engine's I/O and profiles with the sidecar."""
    _, trt = import_tensorrt(flavor)
    logger = make_logger(trt, quiet=True)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise MedusaError(f"cannot deserialize {path} on this machine: {logger.last_error()}")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    actual = {n: TRT_DTYPES.get(engine.get_tensor_dtype(n).name) for n in names}
    if actual != {t.name: t.dtype for t in part.io}:
        raise MedusaError(f"engine {path} I/O disagrees with its sidecar")
    if engine.num_optimization_profiles != len(part.profiles):
        raise MedusaError(
            f"engine {path} has {engine.num_optimization_profiles} profiles, its sidecar {len(part.profiles)}"
        )
    return True


def check_engine_sidecar(engine_path: Path, artifact_dir: Path | None = None) -> dict:
    """Check an engine against its artifact (by default the folder holding it, else the recorded path)."""
    engine_path = Path(engine_path)
    if artifact_dir is None:
        local = engine_path.parent
        if (local / SIDECAR).is_file():
            artifact_dir = local
        else:
            artifact_dir = Path(load_engine_sidecar(engine_path).artifact.path)
    return check_engine(engine_path, Artifact.load(artifact_dir))


# ----------------------------------------------------------------------------------------------------------
# CLI


def parse_tree_sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MedusaError(f"--tree-sizes takes comma-separated node counts (4,8,16), got {text!r}") from None


def trt_command(
    artifact: Annotated[Path, typer.Argument(help="artifact folder (from `medusa-export onnx`)")],
    flavor: Annotated[str, typer.Option("--flavor", help="auto | tensorrt | tensorrt-rtx")] = "auto",
    tree_sizes: Annotated[
        str | None,
        typer.Option("--tree-sizes", help="tree node counts to serve, e.g. 4,8,16 (default: the artifact's)"),
    ] = None,
    max_seq: Annotated[
        int | None, typer.Option("--max-seq", help="KV capacity (default: the artifact's)")
    ] = None,
    max_prompt: Annotated[
        int | None,
        typer.Option("--max-prompt", help="longest prompt (default: max-seq minus the largest tree)"),
    ] = None,
    timing_cache: Annotated[
        Path | None,
        typer.Option("--timing-cache", help="timing cache FILE to reuse and update (TensorRT only)"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="engine FILE (default: <artifact>/model.<flavor>.engine)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace existing engines at --out")] = False,
):
    """Build a TensorRT / TensorRT-RTX engine (+ KV-commit engine and JSON sidecar) from an artifact."""
    sizes = parse_tree_sizes(tree_sizes)
    path = build_engine(artifact, flavor, sizes, max_seq, max_prompt, timing_cache, out, force=force)
    typer.echo(f"wrote {path}")
