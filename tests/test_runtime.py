"""The ONNX artifact and the runtime over ONNX Runtime (CPU EP) against PyTorch and transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import PROMPTS, ROOT, TINY, oracle_check
from medusa_export.graph import MedusaGraph
from medusa_export.heads import resolve_heads
from medusa_export.models import explicit_model
from medusa_export.reference import hf_greedy
from medusa_runtime.api import MedusaRuntime
from medusa_runtime.errors import MedusaError
from medusa_runtime.masks import causal, step_masks
from medusa_runtime.tree import build_tree


def feeds(art_meta, ids, positions, visible, past, past_len, rows):
    window = art_meta["model"]["sliding_window"]
    full, sliding = step_masks(past_len, np.asarray(positions), visible, window)
    f = {
        "input_ids": np.array([ids]),
        "position_ids": np.array([positions]),
        "attention_mask": full,
        "output_rows": np.asarray(rows),
    }
    if window is not None:
        f["sliding_attention_mask"] = sliding
    for i, (k, v) in enumerate(past):
        f[f"past_key.{i}"], f[f"past_value.{i}"] = k, v
    return f


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama"])
def test_fused_opset23_graph_equals_elementary_opset18_graph(tiny_artifact, tmp_path, name):
    """The default export (opset 23) traces RMSNorm, RoPE and GELU as single nodes; opset 18 spells them out.
    Both compute the same function: greedy tokens equal, logits within float32 rounding."""
    import onnx

    from medusa_export.onnx_export import export_onnx

    fused = tiny_artifact(name)
    plain = export_onnx(name, "random:4", tmp_path / "o18", max_seq=256, opset=18, quiet=True)
    ops = {
        p: [n.op_type for n in onnx.load(str(p / "model.onnx"), load_external_data=False).graph.node]
        for p in (fused, plain)
    }
    assert {"RMSNormalization", "RotaryEmbedding"} <= set(ops[fused])
    assert not {"RMSNormalization", "RotaryEmbedding", "Gelu"} & set(ops[plain])
    assert len(ops[fused]) < 0.8 * len(ops[plain])
    meta = json.loads((fused / "artifact.json").read_text())
    cfg = meta["model"]
    rng = np.random.default_rng(3)
    past = [
        (rng.standard_normal((1, 5, cfg["num_kv_heads"], cfg["head_dim"])).astype(np.float32),) * 2
    ] * cfg["num_layers"]
    visible = build_tree([[0], [1], [0, 0]]).attention_mask
    f = feeds(meta, rng.integers(3, 250, size=4).tolist(), [5, 6, 6, 7], visible, past, 5, [0, 1, 2, 3])
    outs = []
    for folder in (fused, plain):
        sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        outs.append(dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f))))
    np.testing.assert_allclose(outs[0]["logits"], outs[1]["logits"], atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(outs[0]["next_tokens"], outs[1]["next_tokens"])


@pytest.mark.parametrize("name", TINY)
def test_onnx_matches_pytorch_at_unseen_shapes(tiny_base, tiny_artifact, name):
    """Past 0 and T=1 included; the export traced at batch 2, T=3, past 5, rows 2."""
    folder = tiny_artifact(name)
    meta = json.loads((folder / "artifact.json").read_text())
    base = tiny_base(name)
    decoder = explicit_model(base)
    heads = resolve_heads("random:4", decoder.cfg.hidden_size, decoder.cfg.vocab_size)
    graph = MedusaGraph(decoder, heads, meta["medusa"]["topk"]).eval()
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    cfg = decoder.cfg
    rng = np.random.default_rng(1)
    past = [
        (np.zeros((1, 0, cfg.num_kv_heads, cfg.head_dim), np.float32),) * 2 for _ in range(cfg.num_layers)
    ]
    plen = 0
    for t, visible in [
        (1, causal(1)),
        (11, causal(11)),
        (1, np.ones((1, 1))),
        (6, build_tree([[0], [1], [0, 0], [0, 1], [1, 0]]).attention_mask),
    ]:
        ids = rng.integers(3, 250, size=t).tolist()
        positions = (
            (plen + (visible.sum(1) - 1)).tolist()
            if t > 1 and not np.array_equal(visible, causal(t))
            else list(range(plen, plen + t))
        )
        rows = list(range(t))
        f = feeds(meta, ids, positions, visible, past, plen, rows)
        got = dict(zip(out_names, sess.run(None, f)))
        with torch.no_grad():
            want = graph(*[torch.from_numpy(np.ascontiguousarray(f[i.name])) for i in sess.get_inputs()])
        want = dict(zip(out_names, [w.numpy() for w in want]))
        for key in ("logits", "medusa_logits") + tuple(n for n in out_names if n.startswith("present")):
            np.testing.assert_allclose(
                got[key], want[key], atol=2e-4, rtol=1e-3, err_msg=f"{key} T={t} P={plen}"
            )
        np.testing.assert_array_equal(got["next_tokens"], want["next_tokens"])
        np.testing.assert_array_equal(got["medusa_topk"][..., 0], want["medusa_topk"][..., 0])
        if np.array_equal(visible, causal(t)) or t == 1:  # keep prompt/decode rows; the tree is the last case
            past = [
                (
                    np.concatenate((k, got[f"present_key.{i}"]), 1),
                    np.concatenate((v, got[f"present_value.{i}"]), 1),
                )
                for i, (k, v) in enumerate(past)
            ]
            plen += t


@pytest.mark.parametrize("name", TINY)
def test_tree_verify_logits_equal_per_path_forwards(tiny_base, tiny_artifact, name):
    """Verify through the runtime backend: every tree node's logits == transformers on prefix + path."""
    from medusa_runtime.decode import prefill, verify

    base = tiny_base(name)
    rt = MedusaRuntime.open(tiny_artifact(name), tree="tree16")
    prefix = rt.encode("A prefix longer than the window")
    tree = rt.tree
    prefill(rt.backend, prefix, rt.window)
    cand = np.random.default_rng(2).integers(3, 250, size=tree.num_nodes)
    out = verify(rt.backend, tree, cand, rt.window)
    logits = rt.backend.logits()
    for node in range(tree.num_nodes):
        path = np.flatnonzero(tree.attention_mask[node])
        with torch.no_grad():
            ref = base.hf(torch.tensor([prefix + cand[path].tolist()])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[node], ref, atol=2e-4, rtol=1e-3)
        assert out.next_tokens[node] == ref.argmax()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("tree", ["tree8", "mc_sim_7b_63"])
def test_runtime_medusa_equals_base_greedy_with_oracle_heads(tiny_base, tiny_artifact, name, tree):
    rt = MedusaRuntime.open(tiny_artifact(name), tree=tree)
    kinds, mean = oracle_check(rt, tiny_base(name), PROMPTS, 40)
    assert {"full", "partial", "non-first"} <= kinds, kinds
    assert mean > 1.5


@pytest.mark.parametrize("name", TINY)
def test_runtime_plain_and_random_heads_equal_base_greedy(tiny_base, tiny_artifact, name):
    base = tiny_base(name)
    for medusa in (False, True):
        rt = MedusaRuntime.open(tiny_artifact(name), tree="tree16", medusa=medusa)
        for prompt in PROMPTS:
            ids = rt.encode(prompt)
            assert rt.generate(ids, 30).token_ids == hf_greedy(base, ids, 30).tokens


@pytest.mark.parametrize("name", TINY)
def test_chunked_prefill_equals_base_greedy(tiny_base, tiny_artifact, name):
    """A prompt in pieces (each attending to the cache so far, sliding windows across the cuts; ort-cpu cuts
    at 512 tokens) gives transformers' greedy text over the whole prompt."""
    from medusa_export.bench import TimedBackend

    base = tiny_base(name)
    rt = MedusaRuntime.open(tiny_artifact(name), tree="tree16")
    assert rt.backend.prefill_chunk == 512
    rt.backend.prefill_chunk = 3
    rt.backend = timed = TimedBackend(rt.backend)
    for prompt in PROMPTS:
        ids = rt.encode(prompt)
        timed.forward_tokens.clear()
        assert rt.generate(ids, 30).token_ids == hf_greedy(base, ids, 30).tokens
        pieces = [3] * (len(ids) // 3) + [len(ids) % 3] * (len(ids) % 3 > 0)
        assert timed.forward_tokens[: len(pieces)] == pieces


def test_streaming_yields_the_same_text_and_honours_stop(tiny_artifact):
    rt = MedusaRuntime.open(tiny_artifact("tiny-llama"), tree="tree8")
    whole = rt.generate(PROMPTS[0], 40)
    assert "".join(rt.stream(PROMPTS[0], 40)) == whole.text
    stop = whole.text[10:13]
    streamed = "".join(rt.stream(PROMPTS[0], 40, stop=[stop]))
    assert streamed == whole.text[: whole.text.find(stop)]


def test_results_split_the_first_token_from_the_rest(tiny_artifact):
    """generate's and stream's time to the first token (the prefill), and the tokens/s after it."""
    rt = MedusaRuntime.open(tiny_artifact("tiny-llama"), tree="tree8")
    res = rt.generate(PROMPTS[0], 40)
    assert len(res.token_ids) > 1 and 0 < res.first_token_s < res.seconds
    assert res.decode_tokens_per_s == (len(res.token_ids) - 1) / (res.seconds - res.first_token_s)
    one = rt.generate(PROMPTS[0], 1)
    assert one.decode_tokens_per_s == 0 and 0 < one.first_token_s <= one.seconds
    pieces = rt.stream(PROMPTS[0], 40)
    assert pieces.first_token_s is None  # nothing decoded yet
    assert "".join(pieces) == res.text and 0 < pieces.first_token_s


def test_runtime_imports_and_runs_without_torch_or_transformers(tiny_artifact):
    folder = tiny_artifact("tiny-qwen2")
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from medusa_runtime.api import MedusaRuntime
from medusa_runtime.errors import MedusaError
rt = MedusaRuntime.open({str(folder)!r}, tree='tree8')
res = rt.generate('hello world', 12)
assert len(res.token_ids) == 12
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_draft_vocabulary_heads_keep_outputs_exact(tiny_base, tmp_path):
    """Heads restricted to the N most frequent tokens: top-k ids map back into that set, output unchanged;
    the fused step graph drafts the same trees from them (same accepted paths as the host loop)."""
    from medusa_export.draft_vocab import write_draft_vocab
    from medusa_export.heads import random_heads, save_heads
    from medusa_export.onnx_export import export_onnx

    base = tiny_base("tiny-qwen2")
    c = base.config
    save_heads(random_heads(3, c.hidden_size, c.vocab_size, seed=5), tmp_path / "heads", "tiny-qwen2")
    write_draft_vocab(tmp_path / "heads", [base.tokenizer.encode(p).ids for p in PROMPTS])
    folder = export_onnx(
        "tiny-qwen2",
        str(tmp_path / "heads"),
        tmp_path / "art",
        max_seq=256,
        draft_vocab=24,
        quiet=True,
        gpu_step=True,
    )
    draft = set(json.loads((tmp_path / "heads" / "draft_vocab.json").read_text())["ids"][:24])
    rt = MedusaRuntime.open(folder, tree="tree8")
    fused = MedusaRuntime.open(folder, backend="ort-cpu-step", tree="tree8")
    with pytest.raises(MedusaError, match="fixed step graph"):  # it cannot choose a length per step
        MedusaRuntime.open(folder, backend="ort-cpu-step", tree="chain0+lookupauto8")
    for prompt in PROMPTS:
        ids = rt.encode(prompt)
        res, res_fused = rt.generate(ids, 30), fused.generate(ids, 30)
        assert res.token_ids == res_fused.token_ids == hf_greedy(base, ids, 30).tokens
        assert [s.path for s in res_fused.steps] == [s.path for s in res.steps]
    from medusa_runtime.decode import prefill

    out = prefill(rt.backend, rt.encode(PROMPTS[0]), rt.window)
    assert set(out.medusa_topk.ravel().tolist()) <= draft


def test_typical_acceptance_on_the_ort_backend(tiny_artifact):
    """Typical acceptance reads the tree's base logits from the backend; seeded, so it repeats."""
    from medusa_runtime.acceptance import Typical

    runs = [
        MedusaRuntime.open(tiny_artifact("tiny-gemma3"), tree="tree16", acceptance=Typical()).generate(
            PROMPTS[1], 40
        )
        for _ in range(2)
    ]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 40
    assert runs[0].mean_accepted > 1.0


def test_sequential_heads_draft_alike_on_every_backend(tiny_base, tmp_path):
    """Sequential (Hydra-style) heads, trained briefly by self-distillation and exported with a draft
    vocabulary and the fused step: the host loop, the fused step graph and the PyTorch runtime draft the same
    top-k along the top-1 chain, accept the same paths and give transformers' greedy output."""
    from medusa_export import train as tr
    from medusa_export.draft_vocab import draft_ids
    from medusa_export.heads import load_heads
    from medusa_export.onnx_export import export_onnx
    from medusa_export.reference import torch_runtime
    from medusa_runtime.decode import prefill

    heads_dir = tmp_path / "heads"
    settings = tr.TrainSettings(
        "tiny-llama", heads_dir, num_heads=3, sequential=True, num_samples=16, max_new_tokens=24,
        epochs=3, batch_size=4, holdout=0.25, lr=1e-2, quiet=True,
    )  # fmt: skip
    tr.train(settings)
    folder = export_onnx(
        "tiny-llama", str(heads_dir), tmp_path / "art", max_seq=256, draft_vocab=24, quiet=True, gpu_step=True
    )
    base = tiny_base("tiny-llama")
    c = base.config
    heads = load_heads(heads_dir, c.hidden_size, c.vocab_size)
    assert heads.sequential
    runtimes = [
        MedusaRuntime.open(folder, tree="tree8"),
        MedusaRuntime.open(folder, backend="ort-cpu-step", tree="tree8"),
        torch_runtime(
            base, heads, "tree8", max_seq=256, draft_ids=draft_ids(str(heads_dir), 24, c.vocab_size)
        ),
    ]
    accepted = 0
    for prompt in PROMPTS:
        ids = runtimes[0].encode(prompt)
        host, fused, ref = (rt.generate(ids, 30) for rt in runtimes)
        assert host.token_ids == fused.token_ids == ref.token_ids == hf_greedy(base, ids, 30).tokens
        assert [s.path for s in host.steps] == [s.path for s in fused.steps] == [s.path for s in ref.steps]
        accepted += sum(len(s.tokens) - 1 for s in host.steps[1:])
        drafts = [prefill(rt.backend, ids, rt.window).medusa_topk[:, -1] for rt in (runtimes[0], runtimes[2])]
        np.testing.assert_array_equal(*drafts)
    assert accepted > 0
