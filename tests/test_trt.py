"""TensorRT-RTX engines built from tiny artifacts (its builder needs no GPU), their sidecar and checks, and
TrtBackend: its planning, and its whole loop with ONNX Runtime standing in for the engines. Real engines
run only on a GPU of compute capability 8.0/8.6/8.9/12.x: that test is skipped elsewhere."""

from __future__ import annotations

import ctypes
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import PROMPTS, ROOT, oracle_check
from medusa_export.trt_build import (
    RTX_DEFAULT_CCS,
    build_engine,
    check_engine_sidecar,
    check_ranges,
    default_tree_sizes,
    inspect_engine,
    trt_command,
)
from medusa_runtime import contract
from medusa_runtime.artifact import Artifact
from medusa_runtime.backends import open_backend
from medusa_runtime.backends.trt import PREFILL, VERIFY, TrtPlan, check_engine, load_engine_sidecar
from medusa_runtime.errors import MedusaError
from medusa_runtime.tree import build_tree

trt = pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx (pip install .[rtx])")

MAX_SEQ = 128  # below the artifacts' 256: the engine may serve less than the artifact allows
HAS_GPU = Path("/dev/nvidiactl").exists()
NEEDS_GPU = pytest.mark.skipif(
    not HAS_GPU, reason="no NVIDIA GPU: TensorRT-RTX engines run only on compute capability 8.0/8.6/8.9/12.x"
)


@pytest.fixture(scope="module")
def engines(tiny_artifact, tmp_path_factory):
    """name -> (artifact folder, engine path): tiny-llama and tiny-gemma3 built once (timings with -s)."""
    built = {}
    for name in ("tiny-llama", "tiny-gemma3"):
        folder = tiny_artifact(name)
        start = time.perf_counter()
        out = tmp_path_factory.mktemp("engine") / "model.tensorrt-rtx.engine"
        engine = build_engine(folder, "tensorrt-rtx", max_seq=MAX_SEQ, out=out, quiet=True)
        print(f"{name}: engine built in {time.perf_counter() - start:.1f}s")
        built[name] = (folder, engine)
    return built


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_sidecar_follows_the_artifact_contract(engines, name):
    folder, engine = engines[name]
    artifact = Artifact.load(folder)
    meta = check_engine(engine, artifact)
    assert meta.flavor == "tensorrt-rtx" and meta.tensorrt_version == trt.__version__
    assert list(meta.compute_capabilities) == RTX_DEFAULT_CCS
    assert meta.artifact.path == str(folder.resolve())
    assert meta.max_seq == MAX_SEQ and list(meta.tree_sizes) == default_tree_sizes(artifact)
    model = meta.engines["model"]
    want = [(s["name"], s["dtype"], s["shape"]) for kind in ("inputs", "outputs") for s in artifact.io(kind)]
    assert [(t.name, t.dtype, list(t.shape)) for t in model.io] == want
    commit = meta.engines["commit"].io
    present, kept = contract.commit_names(artifact.model["num_layers"])
    assert [t.name for t in commit] == [contract.COMMIT_ROWS, *present, *kept]
    for part in meta.engines.values():  # every op went through the parser as a TensorRT layer: no plugin
        assert not [k for k in part.layers if "PLUGIN" in k], part.layers
        assert (engine.parent / part.file).stat().st_size == part.bytes
    info = inspect_engine(engine)
    assert info["engines"]["model"]["plugin_layers"] == 0
    assert info["engines"]["model"]["outputs"] == [s["name"] for s in artifact.io("outputs")]


def test_profile_ranges(engines):
    folder, engine = engines["tiny-gemma3"]
    artifact = Artifact.load(folder)
    meta = load_engine_sidecar(engine)
    largest, default = max(meta.tree_sizes), build_tree(artifact.tree()[1].choices).num_nodes
    profiles = {p.name: p for p in meta.engines["model"].profiles}
    assert list(profiles) == [PREFILL, VERIFY]
    for p in profiles.values():
        s = p.symbols
        assert s["batch"] == (1, 1, 1)
        assert tuple(a + b for a, b in zip(s["past"], s["tokens"], strict=True)) == s["total"]
        assert s["total"][2] == MAX_SEQ
        for name, r in p.inputs.items():  # per-input ranges are the symbols' at min, opt and max
            spec = next(t for t in artifact.io("inputs") if t["name"] == name)
            for i, key in enumerate(("min", "opt", "max")):
                assert list(r[key]) == [d if isinstance(d, int) else s[d][i] for d in spec["shape"]], (
                    name,
                    key,
                )
    prefill, verify = profiles[PREFILL].symbols, profiles[VERIFY].symbols
    assert prefill["rows"] == (1, 1, 1)
    assert prefill["tokens"] == (1, meta.max_prompt // 2, meta.max_prompt)
    assert verify["tokens"] == verify["rows"] == (1, default, largest)
    assert meta.max_prompt == MAX_SEQ - largest
    kv = profiles[VERIFY].inputs["past_key.0"]
    assert kv["max"] == (1, MAX_SEQ - largest, artifact.model["num_kv_heads"], artifact.model["head_dim"])
    commit = meta.engines["commit"].profiles[0].symbols
    assert commit["tokens"][2] == commit["kept"][2] == largest


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_prompt=MAX_SEQ + 1), "--max-prompt"),
        (dict(max_prompt=0), "--max-prompt"),
        (dict(tree_sizes=[MAX_SEQ]), "leaves no room"),
        (dict(tree_sizes=[]), "is empty"),
        (dict(tree_sizes=[0, 4]), "not a node count"),
        (dict(max_seq=4096), "exceeds the artifact's max_seq"),
    ],
)
def test_inconsistent_ranges_are_refused_before_building(tiny_artifact, tmp_path, kwargs, message):
    args = dict(max_seq=MAX_SEQ, out=tmp_path / "e.engine", quiet=True) | kwargs
    with pytest.raises(MedusaError, match=message):
        build_engine(tiny_artifact("tiny-llama"), "tensorrt-rtx", **args)
    assert not list(tmp_path.iterdir())


def test_default_ranges(tiny_artifact):
    artifact = Artifact.load(tiny_artifact("tiny-llama"))
    sizes = default_tree_sizes(artifact)
    assert sizes == sorted({build_tree(c).num_nodes for c in artifact.meta["trees"].values()})
    assert check_ranges(artifact, None, None, None) == (256, 256 - sizes[-1], sizes, 16)
    assert check_ranges(artifact, 64, 10, [4, 8]) == (64, 10, [4, 8], 8)


def test_bad_inputs(tiny_artifact, engines, tmp_path):
    with pytest.raises(MedusaError, match="not a medusa-export artifact"):
        build_engine(tmp_path / "missing", "tensorrt-rtx", quiet=True)
    with pytest.raises(MedusaError, match="unknown TensorRT flavor"):
        build_engine(tiny_artifact("tiny-llama"), "onnx", quiet=True)
    with pytest.raises(MedusaError, match="engine .* does not exist"):
        check_engine_sidecar(tmp_path / "missing.engine")


def test_parser_errors_name_the_node_and_op(tiny_artifact, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from medusa_runtime.integrity import file_checksums

    folder = tmp_path / "art"
    shutil.copytree(tiny_artifact("tiny-llama"), folder)
    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1])
    node = helper.make_node("NoSuchOp", ["input_ids"], ["logits"], name="the_bad_node", domain="example.org")
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("example.org", 1)]
    model = helper.make_model(helper.make_graph([node], "bad", [x], [y]), opset_imports=opsets)
    onnx.save(model, str(folder / "model.onnx"))
    meta = json.loads((folder / "artifact.json").read_text())  # a consistent (re-recorded) artifact
    meta["checksums"].update(file_checksums(folder, ["model.onnx"]))
    (folder / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(MedusaError, match=r"cannot parse model.onnx: node the_bad_node \(NoSuchOp\)"):
        build_engine(folder, "tensorrt-rtx", max_seq=MAX_SEQ, quiet=True)


def test_engine_from_another_artifact_is_refused(engines, tmp_path):
    (llama, llama_engine), (gemma, _) = engines["tiny-llama"], engines["tiny-gemma3"]
    with pytest.raises(MedusaError, match="was built from a different artifact"):
        check_engine_sidecar(llama_engine, gemma)
    with pytest.raises(MedusaError, match="was built from a different artifact"):  # before any GPU work
        open_backend("trt", Artifact.load(gemma), max_nodes=8, engine=llama_engine)
    edited = tmp_path / "edited"  # same graph, sidecar edited after the build
    shutil.copytree(llama, edited)
    (edited / "artifact.json").write_text(json.dumps(json.loads((llama / "artifact.json").read_text())))
    with pytest.raises(MedusaError, match="was built from a different artifact"):
        check_engine_sidecar(llama_engine, edited)
    assert check_engine_sidecar(llama_engine, llama).artifact.path == str(llama.resolve())


def test_damaged_engines_are_refused(engines, tmp_path):
    folder, engine = engines["tiny-llama"]
    for f in engine.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    copy = tmp_path / engine.name
    with open(copy, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(MedusaError, match="truncated"):
        check_engine_sidecar(copy, folder)
    copy.with_name(copy.name + ".json").unlink()
    with pytest.raises(MedusaError, match="has no sidecar"):
        check_engine_sidecar(copy, folder)
    with pytest.raises(MedusaError, match="no TensorRT engine in"):
        open_backend("trt", Artifact.load(folder), max_nodes=8)


def plan_for(engines, name: str, max_nodes: int) -> TrtPlan:
    folder, engine = engines[name]
    return TrtPlan(check_engine(engine, Artifact.load(folder)), max_nodes)


def test_plan_profile_selection(engines):
    plan = plan_for(engines, "tiny-gemma3", 16)
    assert plan.phase(12, keep_all=True) == PREFILL  # the prompt
    assert plan.phase(1, keep_all=True) == VERIFY  # plain decoding (and a one-token prompt)
    assert plan.phase(16, keep_all=False) == VERIFY  # a tree
    assert plan.forward_plan(12, 1, 0, keep_all=True)[0] == 0
    assert plan.forward_plan(16, 16, 30, keep_all=False)[0] == 1
    assert plan.forward_plan(1, 1, 30, keep_all=True)[0] == 1
    with pytest.raises(MedusaError, match="--max-prompt"):
        plan.forward_plan(plan.max_prompt + 1, 1, 0, keep_all=True)
    with pytest.raises(MedusaError, match="past = .* outside the engine's verify profile"):
        plan.forward_plan(16, 16, MAX_SEQ - 16, keep_all=False)
    with pytest.raises(MedusaError, match="rebuild with --tree-sizes"):
        plan_for(engines, "tiny-gemma3", plan.max_tree + 1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("max_nodes", [1, 8])
def test_plan_capacity_covers_the_decode_loop(engines, name, max_nodes):
    """What MedusaRuntime allows (prompt + new + tree <= capacity) fits the engine's profiles."""
    plan = plan_for(engines, name, max_nodes)
    assert plan.capacity == MAX_SEQ - plan.max_tree + max_nodes
    last_past = plan.capacity - max_nodes
    plan.forward_plan(max_nodes, max_nodes, last_past, keep_all=max_nodes == 1)
    plan.forward_plan(plan.max_prompt, 1, 0, keep_all=True)
    if max_nodes > 1:
        plan.commit_plan(max_nodes, 3, last_past)


def test_plan_shapes_and_bindings(engines):
    folder, _ = engines["tiny-gemma3"]
    m, artifact = Artifact.load(folder).model, Artifact.load(folder)
    kv, v, k, topk = (m["num_kv_heads"], m["head_dim"]), m["vocab_size"], artifact.num_heads, artifact.topk
    plan = plan_for(engines, "tiny-gemma3", 8)
    row = plan.row_bytes
    assert row == kv[0] * kv[1] * 4 and len(plan.kv_names) == 2 * m["num_layers"]
    names = {t.name for t in load_engine_sidecar(engines["tiny-gemma3"][1]).engines["model"].io}

    _, b = plan.forward_plan(12, 1, 0, keep_all=True)  # prefill: new KV straight into the cache
    assert set(b) == names
    assert b["attention_mask"].shape == b["sliding_attention_mask"].shape == (1, 1, 12, 12)
    assert b["past_key.0"].shape == (1, 0, *kv) and b["present_key.0"].shape == (1, 12, *kv)
    assert (b["present_key.0"].buffer, b["present_key.0"].offset) == ("cache/key.0", 0)
    assert b["logits"].shape == (1, 1, v) and b["medusa_topk"].shape == (k, 1, 1, topk)

    _, b = plan.forward_plan(8, 8, 20, keep_all=False)  # tree verify: past = cache prefix, new KV to scratch
    past = b["past_value.1"]
    assert (past.buffer, past.offset, past.shape) == ("cache/value.1", 0, (1, 20, *kv))
    assert (b["present_value.1"].buffer, b["present_value.1"].offset) == ("scratch/value.1", 0)
    assert b["attention_mask"].shape == (1, 1, 8, 28) and b["medusa_logits"].shape == (k, 1, 8, v)
    assert [n for n, x in b.items() if x.is_input] == [s["name"] for s in artifact.io("inputs")]

    _, b = plan.forward_plan(1, 1, 20, keep_all=True)  # plain step: appended at row 20
    assert (b["present_key.0"].buffer, b["present_key.0"].offset) == ("cache/key.0", 20 * row)

    _, b = plan.commit_plan(8, 3, 20)  # accepted rows: scratch -> cache rows 20..22
    assert b[contract.COMMIT_ROWS].shape == (3,)
    assert (b["present_key.1"].buffer, b["present_key.1"].shape) == ("scratch/key.1", (1, 8, *kv))
    kept = b["kept_key.1"]
    assert (kept.buffer, kept.offset, kept.shape) == ("cache/key.1", 20 * row, (1, 3, *kv))
    for binding in b.values():
        assert binding.offset + binding.nbytes <= plan.buffer_bytes[binding.buffer]
    with pytest.raises(MedusaError, match="does not fit buffer scratch/"):  # a larger tree than the backend's
        plan.forward_plan(9, 1, 0, keep_all=False)


def test_cli_command(engines, tmp_path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("trt")(trt_command)
    app.command("other")(lambda: None)  # a group, so that "trt" is a subcommand as in medusa-export
    folder, _ = engines["tiny-llama"]
    out = tmp_path / "small.engine"
    args = ["--flavor", "tensorrt-rtx", "--tree-sizes", "4,2", "--max-seq", "64", "--out", str(out)]
    result = CliRunner().invoke(app, ["trt", str(folder), *args])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    meta = load_engine_sidecar(out)
    assert (meta.max_seq, meta.max_prompt, meta.tree_sizes) == (64, 60, (2, 4))
    assert (tmp_path / "small.kv_commit.engine").is_file()
    bad = CliRunner().invoke(app, ["trt", str(folder), "--tree-sizes", "4,x"])
    assert isinstance(bad.exception, MedusaError) and "--tree-sizes" in str(bad.exception)


def test_timing_cache_is_ignored_by_tensorrt_rtx(engines, tmp_path, capsys):
    folder, _ = engines["tiny-llama"]
    cache = tmp_path / "timing.cache"
    build_engine(folder, "tensorrt-rtx", [2], max_seq=32, timing_cache=cache, out=tmp_path / "e.engine")
    assert "--timing-cache ignored" in capsys.readouterr().err and not cache.exists()


@pytest.mark.skipif(HAS_GPU, reason="documents the CPU-only behaviour")
def test_without_a_gpu_engines_cannot_be_loaded(engines):
    folder, engine = engines["tiny-llama"]
    with pytest.raises(MedusaError, match="cannot deserialize"):
        inspect_engine(engine, deserialize=True)
    with pytest.raises(MedusaError, match="the trt backend needs a usable NVIDIA GPU"):
        open_backend("trt", Artifact.load(folder), max_nodes=8, engine=engine)


@pytest.fixture(scope="module")
def roomy_engine(tiny_artifact, tmp_path_factory):
    """tiny-gemma3 at the artifact's full max_seq with tree sizes [8]: room for the prompts + 24 tokens."""
    folder = tiny_artifact("tiny-gemma3")
    out = tmp_path_factory.mktemp("roomy") / "model.tensorrt-rtx.engine"
    return folder, build_engine(folder, "tensorrt-rtx", [8], out=out, quiet=True)


def check_trt_runtime(folder: Path, engine: Path, base) -> None:
    """The trt backend against ort-cpu, with oracle heads (multi-row, non-first commits happen): Medusa ==
    base greedy on both, then the same KV cache and logits; plain decoding gives the same tokens."""
    from medusa_runtime.api import MedusaRuntime

    trt_rt = MedusaRuntime.open(folder, "trt", tree="tree8", engine=engine)
    ort_rt = MedusaRuntime.open(folder, "ort-cpu", tree="tree8")
    for runtime in (trt_rt, ort_rt):
        kinds, _ = oracle_check(runtime, base, PROMPTS, 24)
        assert {"full", "partial", "non-first"} <= kinds, kinds
    backend, length = trt_rt.backend, ort_rt.backend.length
    assert backend.length == length
    for kv, want in zip(backend.plan.kv_names, ort_rt.backend.cache, strict=True):
        got = np.empty((length, backend.plan.row_bytes // 4), np.float32)
        backend.cuda.download(got, backend.pointers[f"cache/{kv}"])
        backend.cuda.sync()
        np.testing.assert_allclose(got, want.numpy()[0, :length].reshape(length, -1), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(backend.logits(), ort_rt.backend.logits(), rtol=1e-3, atol=1e-4)
    plain = MedusaRuntime.open(folder, "trt", medusa=False, engine=engine)
    ort_plain = MedusaRuntime.open(folder, "ort-cpu", medusa=False)
    for prompt in PROMPTS:
        assert plain.generate(prompt, 24).token_ids == ort_plain.generate(prompt, 24).token_ids


@NEEDS_GPU
def test_trt_backend_on_gpu(roomy_engine, tiny_base):
    folder, engine = roomy_engine
    try:
        inspect_engine(engine, deserialize=True)
    except MedusaError as exc:  # e.g. an H200 (compute capability 9.0), which TensorRT-RTX refuses
        pytest.skip(f"this GPU cannot run TensorRT-RTX engines: {exc}")
    check_trt_runtime(folder, engine, tiny_base("tiny-gemma3"))


class HostCuda:
    """Stands in for polygraphy.cuda: "device" buffers in host memory, copies with memmove."""

    def __init__(self):
        self.buffers, self.stream = [], 0

    def malloc(self, size: int) -> int:
        self.buffers.append(np.zeros(max(size, 1), np.uint8))
        return self.buffers[-1].ctypes.data

    def upload(self, ptr: int, array: np.ndarray) -> None:
        ctypes.memmove(ptr, np.ascontiguousarray(array).ctypes.data, array.nbytes)

    def download(self, array: np.ndarray, ptr: int) -> None:
        ctypes.memmove(array.ctypes.data, ptr, array.nbytes)

    def sync(self) -> None:
        pass


class OrtContext:
    """Stands in for an execution context: runs the engine's ONNX graph with ONNX Runtime on those buffers."""

    TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}

    def __init__(self, session):
        self.session, self.shapes, self.pointers, self.profiles = session, {}, {}, []

    def set_optimization_profile_async(self, index, stream):
        self.profiles.append(index)
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.pointers[name] = ptr

    def execute_async_v3(self, stream):
        feeds = {}
        for i in self.session.get_inputs():
            dtype, shape = np.dtype(self.TYPES[i.type]), self.shapes[i.name]
            raw = (ctypes.c_char * (int(np.prod(shape)) * dtype.itemsize)).from_address(self.pointers[i.name])
            feeds[i.name] = np.frombuffer(raw, dtype).reshape(shape).copy()
        for o, value in zip(self.session.get_outputs(), self.session.run(None, feeds), strict=True):
            value = np.ascontiguousarray(value)
            ctypes.memmove(self.pointers[o.name], value.ctypes.data, value.nbytes)
        return True


def ort_tensorrt(folder: Path, meta):
    """A stand-in tensorrt module whose engines are the artifact's ONNX graphs (told apart by file size)."""
    import onnxruntime

    parts = meta.engines
    graphs = {parts["model"].bytes: "model.onnx", parts["commit"].bytes: "kv_commit.onnx"}

    class Engine:
        def __init__(self, data: bytes):
            self.session = onnxruntime.InferenceSession(str(folder / graphs[len(data)]))
            self.contexts = []

        def create_execution_context(self):
            self.contexts.append(OrtContext(self.session))
            return self.contexts[-1]

    class ILogger:
        Severity = SimpleNamespace(ERROR=1, WARNING=2)

        def __init__(self):
            pass

    runtime = SimpleNamespace(deserialize_cuda_engine=Engine)
    return SimpleNamespace(
        __name__="ort_tensorrt",
        __version__=meta.tensorrt_version,
        ILogger=ILogger,
        Runtime=lambda logger: runtime,
    )


def test_trt_backend_over_ort_and_host_memory(roomy_engine, tiny_base, monkeypatch):
    """TrtBackend's own logic (profiles, shapes, bindings at byte offsets, KV commit) without a GPU: the
    engines are replaced by ONNX Runtime over the same graphs, device memory by host memory."""
    from medusa_runtime.backends import trt as backend

    folder, engine = roomy_engine
    fake = ort_tensorrt(folder, load_engine_sidecar(engine))
    monkeypatch.setattr(backend, "import_tensorrt", lambda flavor: ("tensorrt-rtx", fake))
    monkeypatch.setattr(backend, "_Cuda", HostCuda)
    check_trt_runtime(folder, engine, tiny_base("tiny-gemma3"))
    rt = open_backend("trt", Artifact.load(folder), max_nodes=8, engine=engine)
    assert rt.capacity == 256 and rt.plan.max_prompt == 248


@pytest.mark.slow
def test_gemma3_270m_engine(tmp_path):
    """The real model's graph: every op parsed, no plugin; prints the build time."""
    folder = ROOT / "artifacts" / "gemma3-270m-random"
    if not (folder / "artifact.json").is_file():
        from medusa_export.onnx_export import export_onnx

        folder = export_onnx("gemma3-270m", "random:4", tmp_path / "gemma3-270m", max_seq=512, quiet=True)
    start = time.perf_counter()
    engine = build_engine(folder, "tensorrt-rtx", out=tmp_path / "model.tensorrt-rtx.engine", quiet=True)
    seconds = time.perf_counter() - start
    print(f"gemma3-270m: engine built in {seconds:.1f}s, {engine.stat().st_size / 2**30:.2f} GiB")
    info = inspect_engine(engine)
    assert info["engines"]["model"]["plugin_layers"] == 0
    meta = check_engine_sidecar(engine, folder)
    plan = TrtPlan(meta, build_tree(Artifact.load(folder).tree()[1].choices).num_nodes)
    assert plan.row_bytes == 256 * 4 and len(plan.kv_names) == 36
