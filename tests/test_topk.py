"""The staged top-k of the heads (graph.topk_ids): the same ids as one TopK, through ONNX Runtime too."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from medusa_export.graph import topk_ids


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
