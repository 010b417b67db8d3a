"""The CPU decode step: a verified chain's rows equal plain one-token steps bitwise (the property that keeps
greedy Medusa = plain greedy on quantized weights), at contexts past the sizes where kernels block their
reductions, for the exported attention (keys as a transposed MatMul operand, no copy of the cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medusa_export.models.common import attend
from medusa_runtime.artifact import Artifact
from medusa_runtime.backends.ort import QUANTIZED_CPU_ROWS, OrtBackend
from medusa_runtime.masks import causal, step_masks

ROOT = Path(__file__).resolve().parent.parent
CHAIN = 4  # verified rows
LAYERS, HEADS, DIM = 2, 4, 256  # Gemma 3 270M's query heads and head size


def _forward(backend, window, tokens, rows, keep_all):
    positions = backend.length + np.arange(len(tokens), dtype=np.int64)
    masks = step_masks(backend.length, positions, causal(len(tokens)), window)
    out = backend.forward(np.asarray(tokens, np.int64), positions, masks, np.asarray(rows), keep_all)
    return out, backend.logits().copy()


def check_chain_rows_equal_plain(folder, contexts, seed=0, chain=CHAIN):
    """For each context: `chain` plain steps vs one verify of the same tokens as a chain, then the commit
    of the whole chain vs the plain steps' cache (and the next step on top of it)."""
    artifact = Artifact.load(folder)
    window = artifact.model["sliding_window"]
    vocab = artifact.model["vocab_size"]
    rng = np.random.default_rng(seed)
    backend = OrtBackend(artifact, "cpu", max_nodes=chain)
    ids = rng.integers(3, min(vocab, 4096), size=max(contexts) + chain + 1).tolist()
    for ctx in contexts:
        backend.reset()
        _forward(backend, window, ids[:ctx], [ctx - 1], True)
        tokens = ids[ctx : ctx + chain]
        plain = []
        for token in tokens:
            out, logits = _forward(backend, window, [token], [0], True)
            plain.append((logits[0], int(out.next_tokens[0]), out.medusa_topk[:, 0].copy()))
        after_plain, logits_plain = _forward(backend, window, [ids[ctx + chain]], [0], True)
        backend.length = ctx
        out, logits = _forward(backend, window, tokens, np.arange(chain), False)
        for i, (row, token, topk) in enumerate(plain):
            assert np.array_equal(logits[i], row), (
                f"context {ctx}: verify row {i} differs from the plain step"
            )
            assert int(out.next_tokens[i]) == token
            assert np.array_equal(out.medusa_topk[:, i], topk)
        backend.commit(np.arange(chain))
        after_commit, logits_commit = _forward(backend, window, [ids[ctx + chain]], [0], True)
        assert np.array_equal(logits_commit, logits_plain), f"context {ctx}: the committed cache differs"


class _Layers(torch.nn.Module):
    """LAYERS attention layers over a cache, as the family files call `attend`: [past ; new] keys/values."""

    def forward(self, q, k, v, mask, *past):
        outs = []
        for i in range(LAYERS):
            k_all = torch.cat((past[2 * i], k), dim=1)
            v_all = torch.cat((past[2 * i + 1], v), dim=1)
            outs.append(attend(q, k_all, v_all, mask, 0.125))
        return torch.stack(outs)


def _attention_session(tmp_path, kv: int):
    import onnxruntime as ort

    t, p = 3, 5
    args = (
        torch.randn(1, t, HEADS, DIM),
        torch.randn(1, t, kv, DIM),
        torch.randn(1, t, kv, DIM),
        torch.zeros(1, 1, t, p + t),
        *(torch.randn(1, p, kv, DIM) for _ in range(2 * LAYERS)),
    )
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({1: dyn}, {1: dyn}, {1: dyn}, {2: dyn, 3: dyn}, tuple({1: dyn} for _ in range(2 * LAYERS)))
    path = tmp_path / f"attention-kv{kv}.onnx"
    with torch.no_grad():
        program = torch.onnx.export(
            _Layers(),
            args,
            dynamo=True,
            opset_version=23,
            dynamic_shapes=shapes,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# verify key counts across the sizes where ONNX Runtime's CPU MatMul changes its blocking (128, 144) and
# far past them, for a 4-row chain; and 16 rows, the most a CPU tree has (64 query rows for one KV head)
ROWS_AND_PASTS = [(CHAIN, p) for p in (37, *range(118, 150), 300, 700, 1500)] + [
    (16, p) for p in (120, 137, 700)
]


@pytest.mark.parametrize("kv", [1, 2])
def test_attention_rows_independent_of_tree_size(kv, tmp_path):
    """ONNX Runtime (CPU) runs the exported attention so that row i of an n-row causal verify equals a
    one-row step over the same keys (past + the i earlier rows) bitwise, at every past length around the
    kernels' block sizes, for one KV head (Gemma 3 270M): the property behind Medusa = plain on 4-bit
    weights. With several KV heads the rows agree to float32 rounding only (the batched MatMul takes
    another kernel path for one row)."""
    session = _attention_session(tmp_path, kv)
    names = [i.name for i in session.get_inputs()]
    rng = np.random.default_rng(kv)
    low = np.finfo(np.float32).min
    for rows, past_len in ROWS_AND_PASTS if kv == 1 else [(CHAIN, 37), (CHAIN, 300)]:
        q, k, v = (rng.standard_normal((1, rows, h, DIM), np.float32) for h in (HEADS, kv, kv))
        past = [rng.standard_normal((1, past_len, kv, DIM), np.float32) for _ in range(2 * LAYERS)]
        mask = np.zeros((1, 1, rows, past_len + rows), np.float32)
        mask[..., past_len:] = np.where(causal(rows), 0.0, low)
        tree = session.run(None, dict(zip(names, [q, k, v, mask, *past])))[0]
        for i in range(rows):
            grown = [np.concatenate((x, (k if j % 2 == 0 else v)[:, :i]), axis=1) for j, x in enumerate(past)]
            one = np.zeros((1, 1, 1, past_len + i + 1), np.float32)
            feeds = [q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], one, *grown]
            row = session.run(None, dict(zip(names, feeds)))[0]
            if kv == 1:
                assert np.array_equal(row[:, :, 0], tree[:, :, i]), (
                    f"past {past_len}: row {i} of {rows} differs"
                )
            else:
                np.testing.assert_allclose(row[:, :, 0], tree[:, :, i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma3-270m-int4", "gemma3-270m"])
def test_verify_rows_equal_plain_steps_real(name):
    """The shipped model (one KV head: the reshape path of the attention) where an artifact was exported:
    4-row chains, and the longest verify the runtime allows on quantized CPU weights."""
    folder = ROOT / "artifacts" / name
    if not (folder / "artifact.json").is_file():
        pytest.skip(f"no artifact at {folder} (make demo)")
    check_chain_rows_equal_plain(folder, [100, 700])
    check_chain_rows_equal_plain(folder, [137], chain=QUANTIZED_CPU_ROWS)


def test_attention_matches_reference_math():
    """The exported attention formula is ordinary grouped-query attention (float64 reference)."""
    torch.manual_seed(0)
    for kv, keys_first in ((1, True), (2, True), (1, False), (2, False)):
        b, t, s, h, d = 1, 3, 9, 4, 8
        q, k, v = torch.randn(b, t, h, d), torch.randn(b, s, kv, d), torch.randn(b, s, kv, d)
        mask = torch.where(torch.rand(b, 1, t, s) < 0.3, torch.finfo(torch.float32).min, 0.0)
        mask[..., 0] = 0.0
        got = attend(q, k, v, mask, 0.25, keys_first)
        rep = h // kv
        kk = k.double().repeat_interleave(rep, dim=2)  # [B, S, H, D]
        vv = v.double().repeat_interleave(rep, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q.double(), kk) * 0.25 + mask.double()
        ref = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vv).reshape(b, t, h * d)
        assert torch.allclose(got.double(), ref, atol=1e-5)


def test_cpu_commit_moves_accepted_rows_in_place(tiny_artifact):
    """On the CPU a tree's KV lands in the cache past `length`; commit() keeps the accepted rows in order
    (nothing to move for a root-first prefix) and refuses rows the last forward did not produce."""
    from medusa_runtime.errors import MedusaError

    artifact = Artifact.load(tiny_artifact("tiny-gemma3"))
    window = artifact.model["sliding_window"]
    backend = OrtBackend(artifact, "cpu", max_nodes=CHAIN)
    assert backend.in_place and not backend.scratch
    _forward(backend, window, [5, 6, 7, 8, 9], [4], True)
    length = backend.length
    _forward(backend, window, [10, 11, 12, 13], np.arange(CHAIN), False)
    assert backend.length == length  # a verify does not grow the cache by itself
    written = [view[length : length + CHAIN].copy() for view in backend.cache_rows]
    backend.commit(np.array([0, 2, 3]))
    assert backend.length == length + 3
    for view, rows in zip(backend.cache_rows, written):
        assert np.array_equal(view[length : length + 3], rows[[0, 2, 3]])
    _forward(backend, window, [10, 11], np.arange(2), False)
    with pytest.raises(MedusaError, match="not rows of the last"):
        backend.commit(np.array([0, 2]))
    backend.commit(np.array([0, 1]))  # a prefix: already in place
    assert backend.length == length + 5
