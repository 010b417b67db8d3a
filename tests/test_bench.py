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
    for name in ("medusa", "plain"):  # the prefill apart from the rest: our runtimes only
        m = result["methods"][name]
        assert 0 < m["first_token_s"]["median"] and m["decode_tok_s"]["median"] > 0
        assert re.search(rf"  {name} +median .*; first token \d+ ms, then [\d.]+ tok/s", proc.stdout)
    assert "first_token_s" not in result["methods"]["hf"]
    assert result["decode_speedup"] > 0 and "x after the first token" in proc.stdout


def test_bench_min_prompt_tokens_keeps_the_long_prompts(tiny_artifact, tmp_path):
    """--min-prompt-tokens: only prompts of at least N tokens are timed; none that long is a one-line error."""
    folder = tiny_artifact("tiny-gemma3")
    prompts = tmp_path / "p.jsonl"
    texts = ["Hi", "The cat sat on the mat. " * 8, "Short one", "A longer story about a dog and a ball. " * 6]
    prompts.write_text("\n".join(json.dumps({"prompt": t, "category": "c"}) for t in texts))
    out = tmp_path / "bench.json"
    args = ("--prompts", prompts, "--max-new-tokens", "6", "--no-hf", "--min-prompt-tokens", "30")
    proc = cli("bench", folder, *args, "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["prompts"] == 2 and result["min_prompt_tokens"] == 30
    assert [p["id"] for p in result["per_prompt"]] == [2, 4]
    proc = cli("bench", folder, *args[:-1], "100000")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("holds no prompts of 100000 tokens or more")


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
