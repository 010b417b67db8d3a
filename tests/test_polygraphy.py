"""The exported graph passes `polygraphy inspect model` and `polygraphy run --onnxrt` against PyTorch's outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from medusa_export.graph import MedusaGraph
from medusa_export.heads import resolve_heads
from medusa_export.models import explicit_model
from medusa_runtime.masks import causal, step_masks

POLYGRAPHY = [str(Path(sys.executable).with_name("polygraphy"))]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_polygraphy_inspect_and_run_against_pytorch(tiny_base, tiny_artifact, name, tmp_path):
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    folder = tiny_artifact(name)
    inspect = subprocess.run(
        [*POLYGRAPHY, "inspect", "model", str(folder / "model.onnx")], capture_output=True, text=True
    )
    assert inspect.returncode == 0 and "past_key.0" in inspect.stdout, inspect.stderr

    meta = json.loads((folder / "artifact.json").read_text())
    decoder = explicit_model(tiny_base(name))
    cfg = decoder.cfg
    heads = resolve_heads(meta["medusa"]["heads"], cfg.hidden_size, cfg.vocab_size)
    graph = MedusaGraph(decoder, heads, meta["medusa"]["topk"]).eval()
    t, p = 7, 4  # a prompt of 7 on top of 4 cached tokens, all rows projected
    full, sliding = step_masks(p, np.arange(p, p + t), causal(t), cfg.sliding_window)
    rng = np.random.default_rng(0)
    feed = OrderedDict(
        input_ids=rng.integers(3, 250, (1, t)), position_ids=np.arange(p, p + t)[None], attention_mask=full
    )
    if sliding is not None:
        feed["sliding_attention_mask"] = sliding
    feed["output_rows"] = np.arange(t)
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            feed[f"past_{kind}.{i}"] = rng.standard_normal((1, p, cfg.num_kv_heads, cfg.head_dim)).astype(
                np.float32
            )
    with torch.no_grad():
        outs = graph(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feed.values()])
    names = [o["name"] for o in meta["io"]["outputs"]]
    ref = OrderedDict((n, o.numpy()) for n, o in zip(names, outs))
    save_json([feed], str(tmp_path / "inputs.json"))
    results = RunResults()
    results.append(("pytorch", [IterationResult(ref, runner_name="pytorch")]))
    results.save(str(tmp_path / "pytorch.json"))
    shutil.copy(folder / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(folder / "model.onnx.data", tmp_path / "model.onnx.data")
    run = subprocess.run(
        [
            *POLYGRAPHY,
            "run",
            str(tmp_path / "model.onnx"),
            "--onnxrt",
            "--load-inputs",
            str(tmp_path / "inputs.json"),
            "--load-outputs",
            str(tmp_path / "pytorch.json"),
            "--atol",
            "2e-4",
            "--rtol",
            "1e-3",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "PASSED" in run.stdout + run.stderr, (
        run.stdout[-3000:] + run.stderr[-2000:]
    )
