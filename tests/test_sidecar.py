"""The typed sidecars (medusa_runtime.sidecar): artifact.json and <engine>.json read, checked and written
back unchanged; one-line errors naming the bad key; and tree.resolve_tree, the one tree resolution."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import ROOT
from medusa_runtime.artifact import SIDECAR, Artifact
from medusa_runtime.errors import MedusaError
from medusa_runtime.sidecar import (
    ArtifactSidecar,
    EnginePart,
    EngineProfile,
    EngineSidecar,
    EngineSource,
    EngineTensor,
)
from medusa_runtime.tree import TreeError, resolve_tree

TREES_DIR = ROOT / "configs" / "trees"
SHIPPED = sorted(p.parent.name for p in (ROOT / "artifacts").glob(f"*/{SIDECAR}"))


def one_line_error(call, *fragments) -> str:
    with pytest.raises(MedusaError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for f in fragments:
        assert f in message, message
    return message


# --- artifact.json ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED or [pytest.param("none", marks=pytest.mark.skip("no artifacts/"))])
def test_existing_artifacts_load_and_round_trip(name):
    """Artifacts written before the typed sidecar still load, and are written back key for key."""
    folder = ROOT / "artifacts" / name
    meta = json.loads((folder / SIDECAR).read_text())
    art = Artifact.load(folder, verify=False)
    assert art.meta == meta and art.sidecar.to_json() == meta
    assert (art.num_heads, art.topk, art.max_seq) == (
        meta["medusa"]["num_heads"],
        meta["medusa"]["topk"],
        meta["max_seq"],
    )
    assert art.io("inputs") == meta["io"]["inputs"] and art.tree()[0] == meta["default_tree"]
    assert (art.sidecar.step is None) == ("step" not in meta)


@pytest.fixture(scope="module")
def tiny(tiny_artifact):
    folder = tiny_artifact("tiny-gemma3")
    return folder, json.loads((folder / SIDECAR).read_text())


def test_exported_sidecar_is_typed_and_round_trips(tiny):
    folder, meta = tiny
    art = Artifact.load(folder)
    side = art.sidecar
    assert side.to_json() == meta and list(side.to_json()) == list(meta)  # same keys, same order
    assert meta["format"] == ArtifactSidecar.FORMAT
    assert side.model.name == "tiny-gemma3" and side.model.sliding_window == meta["model"]["sliding_window"]
    assert side.medusa.num_heads == art.num_heads == 4 and side.medusa.draft_vocab is None
    assert side.io.inputs[0].name == "input_ids" and side.io.outputs[-1].name.startswith("present_")
    assert set(side.checksums) == set(side.file_names()) and side.weights is None and side.step is None
    assert side.default_trees == {"cpu": side.default_tree, "gpu": side.default_tree}
    assert art.path("commit") == folder / "kv_commit.onnx"
    table = side.model.vocab_size * side.model.hidden_size * 4  # fp32 embedding: the one gathered tensor
    assert [(r.file, r.length) for r in side.read_in_place] == [("model.onnx.data", table)]
    assert ArtifactSidecar.from_json(side.to_json(), "again") == side


def _set(path: str, value):
    def edit(meta):
        *parents, key = path.split("/")
        target = meta
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value

    return edit


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (_set("format", "medusa-export/9"), ["has format 'medusa-export/9'", "reads 'medusa-export/1'"]),
        (_set("trees", KeyError), ["lacks trees"]),
        (_set("medusa/num_heads", "4"), ["medusa.num_heads must be a positive integer, got '4'"]),
        (_set("model/vocab_size", True), ["model.vocab_size must be a positive integer"]),
        (_set("model/sliding_window", 0), ["model.sliding_window must be a positive integer or null"]),
        (_set("model/sliding_layers", [True]), ["model.sliding_layers has 1 entries", "num_layers is 2"]),
        (_set("medusa/topk", KeyError), ["lacks medusa.topk"]),
        (_set("medusa/topk", 3), ["medusa.num_heads/topk disagree"]),
        (_set("model/head_dim", 7), ["model.num_layers/num_kv_heads/head_dim disagree"]),
        (_set("dtype", "int3"), ["dtype must be one of fp32, fp16, bf16"]),
        (_set("max_seq", -1), ["max_seq must be a positive integer, got -1"]),
        (_set("io/inputs/0/dtype", "float128"), ["io.inputs[0].dtype must be one of float32"]),
        (_set("io/outputs", {}), ["io.outputs must be a list"]),
        (_set("files/commit", KeyError), ["lacks files.commit"]),
        (_set("external_data", ["../model.onnx.data"]), ["outside the artifact folder"]),
        (_set("files/tokenizer", "/etc/hostname"), ["outside the artifact folder"]),
        (_set("checksums", KeyError), ["records no checksums"]),
        (
            _set("checksums/tokenizer.json/sha256", "ab"),
            ["checksums.tokenizer.json.sha256 must be a SHA-256"],
        ),
        (_set("trees/bad", [[1, 0]]), ["trees.bad: medusa choice [1, 0] has no parent path [1]"]),
        (_set("default_tree", "nope"), ["default_tree must be a served tree, got 'nope'"]),
        (_set("default_trees/gpu", "nope"), ["default_trees must be an object of served trees"]),
        (_set("default_trees/gpu", "nope+lookup2"), ["default_trees must be an object of served trees"]),
        (
            _set("step", {"io": {"inputs": [], "outputs": []}, "capacity": 8, "native_dtype": False}),
            ["files.step"],
        ),
        (_set("tokenizer/eos_token_ids", [1.5]), ["tokenizer.eos_token_ids must be a list of token ids"]),
        (_set("read_in_place/0/offset", 10**9), ["read_in_place names bytes outside the external data"]),
        (_set("read_in_place/0/file", "model.onnx"), ["read_in_place names bytes outside the external data"]),
        (_set("read_in_place/0/length", "8"), ["read_in_place[0].length must be a positive integer"]),
    ],
)
def test_bad_sidecars_are_one_line_errors_naming_the_key(tiny, edit, fragments):
    _, meta = tiny
    meta = copy.deepcopy(meta)
    edit(meta)
    message = one_line_error(lambda: ArtifactSidecar.from_json(meta, "x/artifact.json"), *fragments)
    assert message.startswith("x/artifact.json")


def test_a_default_tree_may_carry_lookup_chains(tiny):
    """default_trees {"gpu": "tree8+lookup2x4"}: served base + chains; an explicit lookup replaces them."""
    _, meta = tiny
    meta = copy.deepcopy(meta)
    meta["default_trees"]["gpu"] = "tree8+lookup2x4"
    side = ArtifactSidecar.from_json(meta, "x")
    art = Artifact(Path("x"), meta, side)
    assert art.tree(None, "ort-cuda")[0] == "tree8+lookup2x4" and art.tree(None, "ort-cuda")[1].lookup == (
        2,
        4,
    )
    assert art.tree(None, "ort-cuda", lookup=3)[0] == "tree8+lookup3"
    assert art.tree(None, "ort-cpu")[0] == side.default_tree


def test_unknown_keys_are_tolerated(tiny):
    _, meta = tiny
    meta = copy.deepcopy(meta)
    meta["from_the_future"] = {"anything": 1}
    meta["model"]["rope_theta"] = 10000.0
    meta["io"]["inputs"][0]["layout"] = "row-major"
    side = ArtifactSidecar.from_json(meta, "newer")
    assert "from_the_future" not in side.to_json() and side.model.num_layers == meta["model"]["num_layers"]
    one_line_error(
        lambda: ArtifactSidecar.from_json([meta], "list"), "list: the sidecar must be a JSON object"
    )


def test_artifact_refuses_links_out_of_its_folder(tiny, tmp_path):
    import shutil

    folder, meta = tiny
    copy_ = tmp_path / "art"
    shutil.copytree(folder, copy_)
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((copy_ / "tokenizer.json").read_bytes())
    (copy_ / "tokenizer.json").unlink()
    (copy_ / "tokenizer.json").symlink_to(outside)
    one_line_error(lambda: Artifact.load(copy_), "outside the artifact folder")


# --- <engine>.json ------------------------------------------------------------------------------------------


def engine_sidecar() -> EngineSidecar:
    """A small engine sidecar as medusa-export trt writes it (no TensorRT needed)."""
    tensors = (
        EngineTensor("input_ids", "input", "int64", ("batch", "tokens")),
        EngineTensor("logits", "output", "float32", ("batch", "rows", 320)),
    )
    ranges = {"batch": (1, 1, 1), "tokens": (1, 4, 8)}
    shapes = {"input_ids": {"min": (1, 1), "opt": (1, 4), "max": (1, 8)}}
    model = EnginePart(
        "model.tensorrt-rtx.engine",
        1000,
        tensors,
        (EngineProfile("prefill", ranges, shapes), EngineProfile("verify", ranges, shapes)),
        {"CONVOLUTION": 2},
    )
    commit = EnginePart(
        "model.tensorrt-rtx.kv_commit.engine", 10, tensors[:1], (EngineProfile("commit", ranges, shapes),), {}
    )
    return EngineSidecar(
        flavor="tensorrt-rtx",
        tensorrt_version="1.2.3",
        compute_capabilities=("8.0", "12.x"),
        artifact=EngineSource("/tmp/art", "0" * 64),
        max_seq=64,
        max_prompt=56,
        tree_sizes=(4, 8),
        opt_tree_size=8,
        engines={"model": model, "commit": commit},
        build_seconds=1.5,
    )


def test_engine_sidecar_round_trips():
    side = engine_sidecar()
    data = json.loads(json.dumps(side.to_json()))
    assert list(data) == [
        "format",
        "flavor",
        "tensorrt_version",
        "compute_capabilities",
        "artifact",
        "max_seq",
        "max_prompt",
        "tree_sizes",
        "opt_tree_size",
        "engines",
        "build_seconds",
    ]
    assert data["engines"]["model"]["io"][0] == {
        "name": "input_ids",
        "mode": "input",
        "dtype": "int64",
        "shape": ["batch", "tokens"],
    }
    assert data["engines"]["model"]["profiles"][0]["symbols"]["tokens"] == [1, 4, 8]
    assert EngineSidecar.from_json(data, "e.json") == side


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_set("format", "medusa-export/1"), "has format 'medusa-export/1'"),
        (_set("engines/commit", KeyError), "lacks engines.commit"),
        (_set("engines/model/profiles/1/name", "decode"), "engines.model lacks the verify profile"),
        (
            _set("engines/model/profiles/0/symbols/tokens", [8, 4, 1]),
            "symbols must be an object of [min, opt, max]",
        ),
        (
            _set("engines/model/file", "../x.engine"),
            "engines.model.file must be a file name next to the sidecar",
        ),
        (_set("engines/model/io/0/mode", "inout"), "engines.model.io[0].mode must be input or output"),
        (_set("engines/model/bytes", -1), "engines.model.bytes must be an integer >= 0"),
        (_set("max_prompt", 65), "max_prompt 65 exceeds max_seq 64"),
    ],
)
def test_bad_engine_sidecars_are_one_line_errors(edit, fragment):
    data = json.loads(json.dumps(engine_sidecar().to_json()))
    edit(data)
    one_line_error(lambda: EngineSidecar.from_json(data, "e.json"), "e.json", fragment)


# --- resolve_tree -------------------------------------------------------------------------------------------


def test_resolve_tree_finds_every_kind_of_spec(tmp_path: Path):
    served = {"mine": [[0], [1]], "tree8": [[0]]}  # a served name wins over a preset of that name
    assert resolve_tree("mine", served=served)[1].choices == ((0,), (1,))
    assert resolve_tree("tree8", served=served, search_dirs=[TREES_DIR])[1].num_nodes == 2
    name, tree = resolve_tree("tree8", search_dirs=[TREES_DIR])
    assert (name, tree.num_nodes) == ("tree8", 8)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"name": "from-file", "choices": [[0], [0, 0]]}))
    assert resolve_tree(path)[0] == "from-file" and resolve_tree(str(path))[1].depth == 2
    assert resolve_tree("[[0], [1], [0, 0]]")[0] == "inline"
    assert resolve_tree('{"name": "x", "choices": [[2]]}')[1].topk == 3
    name, tree = resolve_tree("chain2+lookup4", search_dirs=[TREES_DIR])
    assert (name, tree.num_nodes, tree.lookup) == ("chain2+lookup4", 3 + 4, (1, 4))
    name, tree = resolve_tree("mine", served=served, lookup="2x3")
    assert (name, tree.lookup_chains) == ("mine+lookup2x3", 2)


def test_resolve_tree_errors_are_one_style():
    served = {"a": [[0]], "b": [[0], [0, 0]]}
    one_line_error(lambda: resolve_tree("nope", served=served), "unknown tree 'nope': give one of a, b")
    message = one_line_error(lambda: resolve_tree("nope", search_dirs=[TREES_DIR]), "chain1", "mc_sim_7b_63")
    assert message.startswith("unknown tree 'nope'")
    deep = "[[0], [0, 0], [0, 0, 0]]"
    one_line_error(lambda: resolve_tree(deep, num_heads=2), "tree 'inline' needs 3 Medusa heads, 2 available")
    one_line_error(
        lambda: resolve_tree("[[4]]", topk=2), "tree 'inline' needs top-5 per head, top-2 available"
    )
    one_line_error(lambda: resolve_tree("[[0], [1, 0]]"), "inline tree: medusa choice [1, 0] has no parent")
    one_line_error(lambda: resolve_tree("[[0]"), "inline tree '[[0]' is not valid JSON")
    with pytest.raises(TreeError, match="already has lookup chains"):
        resolve_tree("b+lookup2", served=served, lookup=3)


def test_artifact_trees_resolve_through_resolve_tree(tiny, tmp_path):
    folder, meta = tiny
    art = Artifact.load(folder)
    one_line_error(lambda: art.tree("nope"), "unknown tree 'nope': give one of chain0, chain1")
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    one_line_error(lambda: art.tree(str(deep)), "needs 5 Medusa heads, 4 available")
    assert art.tree("tree8", lookup=3)[0] == "tree8+lookup3"
    assert art.tree("chain0+lookup3")[1].lookup == (1, 3)  # a served tree with a lookup suffix
    assert art.tree(backend="trt")[0] == meta["default_trees"]["gpu"]


def test_tree_command_takes_inline_json_and_lookup_suffix():
    import subprocess
    import sys

    def tree(*args):
        cmd = [sys.executable, "-m", "medusa_export.cli", "tree", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)

    doc = json.loads(tree("tree8+lookup4", "--json").stdout)
    assert (doc["name"], doc["num_nodes"], doc["lookup"]) == ("tree8+lookup4", 12, {"chains": 1, "length": 4})
    assert tree("[[0], [1], [0, 0]]").stdout.startswith("inline: 4 nodes (root included), depth 2")
    proc = tree("no-such-tree")
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown tree 'no-such-tree': give one of")
