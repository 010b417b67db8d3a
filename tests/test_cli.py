"""The command line: instant help, the tree command, generate, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

CLI = [sys.executable, "-m", "medusa_export.cli"]


def cli(*args, env=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    err = errors[0]
    for f in fragments:
        assert f in err, err


def test_help_is_instant_and_imports_no_torch():
    code = "import sys; import medusa_export.cli as c; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    proc = cli("--help")
    assert proc.returncode == 0 and all(
        c in proc.stdout for c in ("onnx", "trt", "generate", "validate", "tree", "train", "bench")
    )


def test_tree_json_canonical():
    doc = json.loads(cli("tree", "mc_sim_7b_63", "--json").stdout)
    assert (doc["num_nodes"], doc["depth"], doc["num_leaves"]) == (64, 4, 42)
    assert (
        len(doc["attention_mask"]) == 64
        and len(doc["position_ids"]) == 64
        and len(doc["retrieve_indices"]) == 42
    )


def test_tree_bad_inputs(tmp_path):
    assert_one_line_error(cli("tree", "no-such-tree"), "no-such-tree")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[0], [1, 0]]))
    assert_one_line_error(cli("tree", bad), "[1, 0]")


def test_generate_torch_backend_streams_and_reports():
    proc = cli(
        "generate",
        "tiny-gemma3",
        "--backend",
        "torch",
        "--heads",
        "random:4",
        "--tree",
        "tree8",
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "12",
    )
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr and "mean accepted" in proc.stderr
    assert re.search(r"\(first token [\d.]+s, then [\d.]+ tokens/s\)", proc.stderr), proc.stderr


def test_generate_and_validate_on_artifact(tiny_artifact, tmp_path):
    folder = tiny_artifact("tiny-gemma3")
    proc = cli("generate", folder, "--prompt", "Hello there", "--max-new-tokens", "12", "--tree", "tree16")
    assert proc.returncode == 0, proc.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ["one two three four", "abc abc abc abc"])
    )
    proc = cli("validate", folder, "--prompts", prompts, "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "validate: 2/2 prompts identical, 32/32 tokens identical"


@pytest.fixture()
def broken(tiny_artifact, tmp_path):
    def make(name):
        dst = tmp_path / name
        shutil.copytree(tiny_artifact("tiny-llama"), dst)
        return dst

    return make


def test_bad_artifacts_and_requests(broken, tmp_path):
    missing = broken("missing")
    (missing / "kv_commit.onnx").unlink()
    assert_one_line_error(cli("generate", missing, "--prompt", "x"), "kv_commit.onnx")

    nodata = broken("nodata")
    (nodata / "model.onnx.data").unlink()
    assert_one_line_error(cli("generate", nodata, "--prompt", "x"), "model.onnx.data")

    disagree = broken("disagree")
    meta = json.loads((disagree / "artifact.json").read_text())
    meta["io"]["inputs"][0]["name"] = "tokens"
    (disagree / "artifact.json").write_text(json.dumps(meta))
    assert_one_line_error(cli("generate", disagree, "--prompt", "x"), "disagree")

    assert_one_line_error(
        cli("generate", tmp_path / "nowhere", "--prompt", "x"), "not a medusa-export artifact"
    )

    ok = broken("ok")  # max_seq 256, byte tokens
    assert_one_line_error(cli("generate", ok, "--prompt", "y" * 300), "longer than max_seq")
    assert_one_line_error(cli("generate", ok, "--prompt", "hi", "--max-new-tokens", "250"), "beyond capacity")
    tree = tmp_path / "deep.json"
    tree.write_text(json.dumps([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    assert_one_line_error(cli("generate", ok, "--prompt", "hi", "--tree", tree), "needs 5 Medusa heads")


def test_export_refuses_bad_input_and_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    assert_one_line_error(cli("onnx", "no-such-model", "--heads", "random:2", "--out", out), "unknown model")
    assert_one_line_error(cli("onnx", "tiny-llama", "--heads", "random:x", "--out", out), "random:K")
    assert_one_line_error(
        cli("onnx", "tiny-llama", "--heads", "random:2", "--out", out, "--dtype", "int3"), "dtype"
    )
    assert not out.exists() and not list(tmp_path.glob(".art*"))
