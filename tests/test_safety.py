"""No command destroys data, damaged inputs are refused in one line, the runtime is safe to share between
threads, and outputs respect the umask (issue: fresh clone, data loss, silent wrong answers)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import ROOT
from medusa_runtime.errors import MedusaError
from test_cli import assert_one_line_error, cli

# ------------------------------------------------------------------------------------- outputs never destroy


def test_onnx_out_refuses_user_folders_inputs_and_the_working_directory(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    assert_one_line_error(
        cli("onnx", "tiny-llama", "--heads", "random:2", "--out", user), "not a medusa-export"
    )
    assert (user / "notes.txt").read_text() == "precious"
    assert_one_line_error(cli("onnx", "tiny-llama", "--heads", "random:2", "--out", "."), "working directory")
    heads = ROOT / "heads" / "gemma3-270m-medusa"
    before = sorted(p.name for p in heads.iterdir())
    for out in (heads, heads.parent, heads / "trees"):
        assert_one_line_error(
            cli("onnx", "tiny-llama", "--heads", "gemma3-270m-medusa", "--out", out), "overlaps the input"
        )
    assert sorted(p.name for p in heads.iterdir()) == before
    afile = tmp_path / "file"
    afile.write_text("x")
    assert_one_line_error(cli("onnx", "tiny-llama", "--heads", "random:2", "--out", afile), "not a folder")
    assert afile.read_text() == "x"


def test_replacing_an_artifact_needs_force(tmp_path):
    out = tmp_path / "art"
    args = ("onnx", "tiny-llama", "--heads", "random:2", "--out", out, "--max-seq", "64")
    assert cli(*args).returncode == 0
    first = (out / "artifact.json").read_text()
    assert_one_line_error(cli(*args), "--force")
    assert (out / "artifact.json").read_text() == first
    proc = cli(*args, "--force", "--max-seq", "96")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "artifact.json").read_text())["max_seq"] == 96
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no partial or old folders left


def test_atomic_dir_keeps_the_old_folder_when_the_new_one_fails(tmp_path):
    from medusa_export.fsutil import atomic_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("export failed")
    assert (target / "a").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_are_on_disk_before_they_take_their_names(tmp_path, monkeypatch):
    """Every file of an output folder and a single output file is fsynced before the rename that publishes
    it, and the folder that receives the name after it (a crash never leaves a valid-looking output whose
    contents were never written)."""
    from medusa_export import fsutil

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with fsutil.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"x" * 4096)
        (tmp / "m.json").write_text("{}")
    rename = events.index(("rename", str(tmp)))
    synced = {path for kind, path in events[:rename] if kind == "sync"}
    assert {str(tmp / "sub" / "w.bin"), str(tmp / "m.json"), str(tmp / "sub"), str(tmp)} <= synced
    assert ("sync", str(tmp_path)) in events[rename:]
    events.clear()
    with fsutil.atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
    assert events == [("sync", str(tmp)), ("rename", str(tmp)), ("sync", str(tmp_path))]


def test_outputs_respect_the_umask(tmp_path):
    from medusa_export.fsutil import atomic_dir, atomic_file

    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        with atomic_file(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o640


def test_file_outputs_refuse_folders_and_existing_files(tmp_path, tiny_artifact):
    folder = tiny_artifact("tiny-llama")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    bench = ("bench", folder, "--prompts", prompts, "--max-new-tokens", "4", "--no-hf")
    assert_one_line_error(cli(*bench, "--out", tmp_path), "is a folder")
    acc = ROOT / "heads" / "gemma3-270m-medusa" / "accuracy.json"
    assert_one_line_error(cli("tree", "--from-accuracy", acc, "--out", tmp_path), "is a folder")
    existing = tmp_path / "t.json"
    existing.write_text("mine")
    assert_one_line_error(cli("tree", "--from-accuracy", acc, "--out", existing), "--force")
    assert existing.read_text() == "mine"
    assert cli("tree", "--from-accuracy", acc, "--out", existing, "--force").returncode == 0
    assert_one_line_error(cli("trt", folder, "--flavor", "tensorrt-rtx", "--out", tmp_path), ".engine")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(cli("train", "tiny-llama", "--out", afile), "not a folder")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("x")
    assert_one_line_error(cli("train", "tiny-llama", "--out", tmp_path / "user"), "refusing")


# ------------------------------------------------------------------------------ damaged or hostile inputs


@pytest.fixture()
def copy_of(tiny_artifact, tmp_path):
    def make(name="a", model="tiny-llama"):
        dst = tmp_path / name
        shutil.copytree(tiny_artifact(model), dst)
        return dst

    return make


def _edit_sidecar(folder, edit):
    meta = json.loads((folder / "artifact.json").read_text())
    edit(meta)
    (folder / "artifact.json").write_text(json.dumps(meta))


def test_corrupted_weights_are_refused_and_verification_is_cached(copy_of):
    from medusa_runtime.artifact import Artifact
    from medusa_runtime.integrity import verify_files

    folder = copy_of()
    art = Artifact.load(folder)
    assert verify_files(folder, art.meta["checksums"]) == []  # verified once, not hashed again
    data = folder / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))  # same size, new mtime
    assert_one_line_error(cli("generate", folder, "--prompt", "hi"), "SHA-256")
    data.write_bytes(bytes(blob[:-4]))
    assert_one_line_error(cli("generate", folder, "--prompt", "hi"), "bytes")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m["model"].__setitem__("head_dim", 7), "head_dim"),
        (lambda m: m["model"].__setitem__("num_kv_heads", 3), "num_kv_heads"),
        (lambda m: m["model"].__setitem__("num_layers", 5), "num_layers"),
        (lambda m: m["model"].__setitem__("sliding_window", 4), "sliding_window"),
        (lambda m: m["model"].__setitem__("sliding_window", -4), "sliding_window"),
        (lambda m: m.__setitem__("max_seq", -1), "max_seq"),
        (lambda m: m["medusa"].pop("topk"), "medusa.topk"),
        (lambda m: m["files"].__setitem__("tokenizer", "../../etc/passwd"), "outside"),
        (lambda m: m["files"].__setitem__("tokenizer", "/etc/hostname"), "outside"),
        (lambda m: m.pop("checksums"), "checksums"),
    ],
)
def test_edited_sidecars_are_refused(copy_of, edit, fragment):
    folder = copy_of()
    _edit_sidecar(folder, edit)
    assert_one_line_error(cli("generate", folder, "--prompt", "hi"), fragment)


@pytest.mark.parametrize("content", [b"", b"garbage{", b'{"version": "1.0"}'])
def test_bad_tokenizer_file_is_one_line(copy_of, content):
    from medusa_runtime.integrity import file_checksums

    folder = copy_of()
    (folder / "tokenizer.json").write_bytes(content)
    _edit_sidecar(folder, lambda m: m["checksums"].update(file_checksums(folder, ["tokenizer.json"])))
    assert_one_line_error(cli("generate", folder, "--prompt", "hi"), "tokenizer")


def test_bad_text_inputs_are_one_line(tiny_artifact, tmp_path):
    folder = tiny_artifact("tiny-llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert_one_line_error(cli("validate", folder, "--prompts", bad), "bad.jsonl:2", "UTF-8")
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"prompt": "a \\ud800 b"}\n')
    assert_one_line_error(cli("validate", folder, "--prompts", lone), "lone.jsonl:1", "surrogate")
    proc = subprocess.run(
        [sys.executable, "-m", "medusa_export.cli", "generate", str(folder), "--prompt", b"caf\xe9"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert_one_line_error(proc, "--prompt", "UTF-8")
    data = tmp_path / "data.txt"
    data.write_bytes(b"text \xff\xfe more")
    assert_one_line_error(cli("train", "tiny-llama", "--data", data, "--out", tmp_path / "h"), "--data")


@pytest.mark.parametrize("content", [b"", b"not a gguf at all", b"GGUF\x03\x00\x00\x00garbage"])
def test_bad_gguf_files_are_one_line(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    env = {**os.environ, "MEDUSA_EXPORT_CACHE": str(tmp_path / "cache")}
    proc = cli("onnx", path, "--heads", "random:2", "--out", tmp_path / "out", env=env)
    assert_one_line_error(proc, "GGUF")


def test_gguf_cache_is_keyed_on_content(tmp_path):
    from medusa_export.models.source import _gguf_key

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, body in ((a, b"GGUF one"), (b, b"GGUF two"), (c, b"GGUF one")):
        d.mkdir()
        (d / "model.gguf").write_bytes(body)
    keys = [_gguf_key(d / "model.gguf") for d in (a, b, c)]
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_bad_values_are_refused(tiny_artifact, tmp_path):
    folder = tiny_artifact("tiny-llama")
    gen = ("generate", folder, "--prompt", "hi", "--max-new-tokens", "4")
    assert_one_line_error(cli(*gen, "--typical", "--temperature", "0"), "temperature")
    assert_one_line_error(cli(*gen, "--typical", "--temperature", "-1"), "temperature")
    assert_one_line_error(cli(*gen, "--typical", "--posterior-threshold", "nan"), "posterior threshold")
    assert_one_line_error(cli(*gen, "--heads", "random:2"), "--heads")
    assert_one_line_error(
        cli("train", "tiny-llama", "--out", tmp_path / "h", "--head-decay", "nan"), "--head-decay"
    )
    for command in ("validate", "bench"):
        help_text = cli(command, "--help").stdout
        assert "ort-cpu" in help_text and "torch" not in help_text


def test_heads_with_nan_weights_are_not_exported(tmp_path):
    import torch

    from medusa_export.heads import random_heads, save_heads

    heads = random_heads(2, 64, 320)  # tiny-llama's hidden size and vocabulary
    with torch.no_grad():
        next(heads.parameters())[0, 0] = float("inf")
    save_heads(heads, tmp_path / "heads", "tiny-llama")
    proc = cli("onnx", "tiny-llama", "--heads", tmp_path / "heads", "--out", tmp_path / "out")
    assert_one_line_error(proc, "NaN or Inf")
    assert not (tmp_path / "out").exists()


def test_api_refuses_bad_token_ids(tiny_artifact):
    from medusa_runtime.api import MedusaRuntime

    rt = MedusaRuntime.open(tiny_artifact("tiny-llama"), tree="tree8")
    for prompt in ([1, -1], [1, 1.5], b"hello", [True, 2], [rt.vocab_size]):
        with pytest.raises(MedusaError):
            rt.generate(prompt, 4)
    assert rt.generate(np.array([1, 2, 3]), 4).token_ids == rt.generate([1, 2, 3], 4).token_ids


def test_api_checks_requests_when_they_are_made(tiny_artifact):
    """Bad budgets and stop lists are refused by the call itself (a stream too, before its first piece)."""
    from medusa_runtime.api import MedusaRuntime

    rt = MedusaRuntime.open(tiny_artifact("tiny-llama"), tree="tree8")
    for budget in (0, -3, 1.5, "4", True):
        with pytest.raises(MedusaError, match="max_new_tokens"):
            rt.stream("hello", budget)
        with pytest.raises(MedusaError, match="max_new_tokens"):
            rt.generate("hello", budget)
    with pytest.raises(MedusaError, match="beyond capacity"):
        rt.stream("hello", 10_000)
    for stop in ("x", [1], (s for s in ["x"])):
        with pytest.raises(MedusaError, match="stop"):
            rt.stream("hello", 4, stop=stop)
    assert "".join(rt.stream("hello", 4, stop=None)) == rt.generate("hello", np.int64(4)).text


def test_a_thread_cannot_wait_for_its_own_open_stream(tiny_artifact):
    """A second generation in the thread whose stream still holds the runtime is refused instead of waiting
    for itself forever; once the stream is closed the runtime serves again."""
    from medusa_runtime.api import MedusaRuntime

    rt = MedusaRuntime.open(tiny_artifact("tiny-llama"), tree="tree8")
    want = rt.generate("hello", 8).token_ids
    pieces = rt.stream("abc abc", 16)
    next(pieces)
    with pytest.raises(MedusaError, match="already decoding"):
        rt.generate("hello", 8)
    pieces.close()
    assert rt.generate("hello", 8).token_ids == want


def test_acceptance_and_seed_are_per_call(tiny_artifact):
    """Typical acceptance and its seed given to one call leave the runtime's own acceptance alone; the same
    seed repeats the draws."""
    from medusa_runtime.acceptance import Greedy, Typical
    from medusa_runtime.api import MedusaRuntime

    rt = MedusaRuntime.open(tiny_artifact("tiny-gemma3"), tree="tree8")
    greedy = rt.generate("The quick brown fox", 40).token_ids
    typical = Typical(temperature=1.0)
    draws = [rt.generate("The quick brown fox", 40, acceptance=typical, seed=s).token_ids for s in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2] and greedy not in draws
    assert isinstance(rt.acceptance, Greedy) and rt.generate("The quick brown fox", 40).token_ids == greedy


def test_engine_failures_are_one_line_backend_errors(tiny_artifact):
    """An ONNX Runtime run that fails (here: nothing bound) surfaces as a BackendError, not onnxruntime's own
    exception: the CLI prints one line and the server answers 500."""
    from medusa_runtime.api import MedusaRuntime
    from medusa_runtime.backends.ort import run_bound
    from medusa_runtime.errors import BackendError

    session = MedusaRuntime.open(tiny_artifact("tiny-llama"), tree="tree8").backend.session
    with pytest.raises(BackendError, match="^ONNX Runtime failed: ") as err:
        run_bound(session, session.io_binding())
    assert "\n" not in str(err.value)


def test_cuda_sessions_turn_tf32_off():
    from medusa_runtime.backends.ort import cuda_provider_options

    assert cuda_provider_options()["use_tf32"] == "0"


# --------------------------------------------------------------------------------------- streaming + threads


def test_stop_string_split_inside_a_character_is_never_half_sent():
    from medusa_runtime.api import _pending

    assert _pending("number 19 v\ufffd", ["v\u0121"]) == 2  # "v" may start the stop string
    assert _pending("abc\ufffd\ufffd", []) == 2
    assert _pending("abcv", ["vw"]) == 1 and _pending("abc", ["vw"]) == 0


def test_streaming_with_stop_strings_at_every_non_ascii_character(tiny_artifact):
    from medusa_runtime.api import MedusaRuntime

    rt = MedusaRuntime.open(tiny_artifact("tiny-llama"), tree="tree8")
    probes = 0
    for prompt in ("caf\u00e9 na\u00efve \u00fc", "1, 2, 3,", "\u4f60\u597d \u00e9t\u00e9"):
        full = rt.generate(prompt, 48).text
        for i, ch in enumerate(full):
            if i and ord(ch) > 127:
                stop = full[i - 1 : i + 1]
                text = "".join(rt.stream(prompt, 48, stop=[stop]))
                assert text == full[: full.find(stop)], (prompt, stop)
                probes += 1
    assert probes >= 3


def test_one_runtime_shared_by_threads_gives_sequential_results(tiny_artifact):
    from medusa_runtime.api import MedusaRuntime

    rt = MedusaRuntime.open(tiny_artifact("tiny-gemma3"), tree="tree16")
    prompts = ["The quick brown fox", "1, 2, 3, 4,", "Medusa heads guess", "abc abc abc"]
    expected = {p: rt.generate(p, 24).token_ids for p in prompts}
    results, errors = [], []

    def worker(i):
        try:
            for j in range(10):
                p = prompts[(i + j) % len(prompts)]
                if j % 2:
                    results.append((p, rt.generate(p, 24).text))
                else:
                    results.append((p, "".join(rt.stream(p, 24))))
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 40
    assert all(text == rt.tokenizer.decode(expected[p]) for p, text in results)
