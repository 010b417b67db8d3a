"""The staged top-k of the heads (graph.topk_ids) and the staged argmax of the logits (graph.argmax_ids): the
same ids as one TopK / ArgMax, ties included, in PyTorch and through ONNX Runtime."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from medusa_export.graph import argmax_ids, topk_ids


def stable_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Reference: the k largest, sorted, ties to the lower index."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


@pytest.mark.parametrize("width", [300, 4097, 70_000, 262_144])
def test_staged_topk_values_match_torch(width):
    x = torch.randn(4, 2, width)
    ids = topk_ids(x, 10, chunk=64, staged_above=128)
    assert torch.equal(torch.gather(x, -1, ids), torch.topk(x, 10, dim=-1).values)


class Staged(torch.nn.Module):
    def forward(self, x):
        return topk_ids(x, 10, chunk=64, staged_above=128)


def test_staged_topk_in_onnx_runtime_keeps_tie_order(tmp_path):
    """Exported (TopK per chunk, GatherElements; no Pad: its int64 form has no CUDA kernel) and run by ONNX
    Runtime on rows with many ties: exactly the stable reference, so staging changes no draft."""
    import onnx

    path = tmp_path / "topk.onnx"
    sample = torch.randn(4, 1280)  # 20 chunks of 64 -> 200 -> one TopK
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        Staged(), (sample,), str(path), dynamo=True, input_names=["x"], dynamic_shapes=({0: batch},)
    )
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("TopK") == 2 and "Pad" not in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for rows in (1, 5):
        x = np.round(rng.standard_normal((rows, 1280)) * 3).astype(np.float32)  # many equal values
        (got,) = sess.run(None, {"x": x})
        np.testing.assert_array_equal(got, stable_topk(x, 10))


class StagedArgmax(torch.nn.Module):
    def forward(self, x):
        return argmax_ids(x)


@pytest.mark.parametrize("width", [7, 1000, 32_000, 262_144])
def test_staged_argmax_is_argmax_with_ties(width):
    x = torch.round(torch.randn(3, 5, width) * 2)  # many tied maxima: the first one must win
    assert torch.equal(argmax_ids(x), torch.argmax(x, dim=-1))


def test_staged_argmax_in_onnx_runtime(tmp_path):
    """Exported and run by ONNX Runtime: ArgMax's own answer (first of tied maxima) for 1 and 13 rows, with the
    maximum tied across chunks, and no full-width ArgMax left in the graph."""
    import onnx

    path = tmp_path / "argmax.onnx"
    width = 4096
    rows = torch.export.Dim("rows", min=1, max=64)
    torch.onnx.export(
        StagedArgmax(),
        (torch.randn(1, 4, width),),
        str(path),
        dynamo=True,
        input_names=["x"],
        dynamic_shapes=({1: rows},),
    )
    assert "ReduceMax" in [n.op_type for n in onnx.load(str(path)).graph.node]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (1, 13):
        x = np.round(rng.standard_normal((1, n, width)) * 3).astype(np.float32)
        x[0, :, [5, 700, 4000]] = x.max() + 1  # a tie in three chunks
        x[0, -1, 900] = x.max() + 2  # one row's max elsewhere
        (got,) = sess.run(None, {"x": x})
        np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
