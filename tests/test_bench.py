"""`medusa-export bench` on a small slice: it runs, writes its JSON and plot, and the three outputs agree."""

from __future__ import annotations

import json
import re

from conftest import SPECBENCH
from test_cli import cli


def test_bench_small_slice(tiny_artifact, tmp_path):
    folder = tiny_artifact("tiny-llama")
    prompts = tmp_path / "p.jsonl"
    rows = [json.loads(line) for line in SPECBENCH.read_text().splitlines()[:3]]
    prompts.write_text(
        "\n".join(json.dumps({"prompt": r["turns"][0][:120], "category": r["category"]}) for r in rows)
    )
    out = tmp_path / "bench.json"
    proc = cli(
        "bench",
        folder,
        "--prompts",
        prompts,
        "--max-new-tokens",
        "12",
        "--runs",
        "2",
        "--tree",
        "tree8",
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"bench: medusa [\d.]+ tok/s, plain [\d.]+ tok/s, hf [\d.]+ tok/s, speedup [\d.]+x, "
        r"accepted [\d.]+ tokens/step",
        last,
    ), last
    result = json.loads(out.read_text())
    assert result["identical_outputs"] == 3 and set(result["methods"]) == {"medusa", "plain", "hf"}
    assert (
        result["methods"]["medusa"]["tok_s"]["median"] > 0
        and 0 < result["methods"]["plain"]["device_fraction"] <= 1
    )
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bench_compare_times_a_second_artifact(tiny_artifact, tmp_path):
    """--compare: Medusa on another export of the same model (here opset 18), interleaved, outputs checked too."""
    from medusa_export.onnx_export import export_onnx

    folder = tiny_artifact("tiny-gemma3")
    other = export_onnx("tiny-gemma3", "random:4", tmp_path / "o18", max_seq=256, opset=18, quiet=True)
    prompts = tmp_path / "p.jsonl"
    rows = [json.loads(line) for line in SPECBENCH.read_text().splitlines()[:2]]
    prompts.write_text("\n".join(json.dumps({"prompt": r["turns"][0][:80]}) for r in rows))
    out = tmp_path / "bench.json"
    args = ("--prompts", prompts, "--max-new-tokens", "8", "--no-hf", "--compare", other, "--out", out)
    proc = cli("bench", folder, *args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"medusa", "plain", "compare"} and result["identical_outputs"] == 2
    assert result["compare"] == str(other) and result["methods"]["compare"]["accepted"] >= 1
    assert "  compare median" in proc.stdout
