"""The README's two commands depend on nothing outside the repository: a copy of its tracked files, with
no workplace folder beside it, exports, generates, validates and benches on the prompts it carries."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT

# a path that leaves the repository for a folder beside it (dot-dot, slash, a name, slash); the "../../etc"
# inputs of the path-escape tests start with two dot-dots and do not match
OUTSIDE = r"(?<![./])\.\./[A-Za-z_][\w.-]*/"


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_project_file_refers_to_a_folder_beside_the_repository():
    hits = []
    for rel in _tracked():
        if rel.endswith((".png", ".safetensors")):
            continue
        text = (ROOT / rel).read_text(errors="replace")
        if re.search(OUTSIDE, text):
            hits.append(rel)
    assert not hits, f"files refer to a folder beside the repository: {hits}"


def test_readme_commands_work_from_a_copy_with_nothing_beside_it(tmp_path):
    clone = tmp_path / "alone" / "medusa-export"
    for rel in _tracked():
        if (ROOT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, clone / rel)
    assert [p.name for p in clone.parent.iterdir()] == [clone.name]  # nothing beside the copy
    # what `make demo` and `make test` read: every file the Makefile names exists in the copy
    plan = subprocess.run(
        ["make", "-n", "demo", "validate", "test", "PY=python3", "CLI=medusa-export"],
        cwd=clone,
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, plan.stderr
    prompts = set(re.findall(r"--prompts (\S+)", plan.stdout))
    assert prompts and all((clone / p).is_file() for p in prompts), prompts
    env = {**os.environ, "PYTHONPATH": f"{clone}{os.pathsep}{clone / 'runtime'}", "HF_HUB_OFFLINE": "1"}

    def run(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "medusa_export.cli", *map(str, args)],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import medusa_export, medusa_runtime; print(medusa_export.__file__, medusa_runtime.__file__)",
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.count(str(clone)) == 2, probe.stdout  # the copy's code, not the checkout's
    run("onnx", "tiny-gemma3", "--heads", "random:4", "--out", "art", "--max-seq", "1024")
    assert "tokens/s" in run("generate", "art", "--prompt", "Hello", "--max-new-tokens", "8").stderr
    for p in prompts:
        out = run("validate", "art", "--prompts", p, "--limit", "2", "--max-new-tokens", "16").stdout
        assert "2/2 prompts identical" in out
    bench = run(
        "bench", "art", "--prompts", sorted(prompts)[0], "--limit", "1", "--max-new-tokens", "8", "--no-hf"
    )
    assert "speedup" in bench.stdout
