"""The fused step graph (step.onnx, `--gpu-step`) on ONNX Runtime's CPU EP: the same tokens and steps as
the host loop (decode.py over model.onnx) and as transformers' greedy output; the CUDA-graph path runs
the same graph with the same bindings (scripts/gpu_step_probe.py measures it on the GPU host)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PROMPTS, oracle_check
from medusa_export.reference import hf_greedy
from medusa_runtime.api import MedusaRuntime
from medusa_runtime.errors import MedusaError

STEP = "ort-cpu-step"


@pytest.fixture(scope="module")
def step_artifact(tmp_path_factory):
    """Tiny artifacts with model.onnx + step.onnx (random:4 heads, max_seq 256): get(name) -> folder."""
    from medusa_export.onnx_export import export_onnx

    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp("step") / name
            cache[name] = export_onnx(name, "random:4", out, max_seq=256, quiet=True, gpu_step=True)
        return cache[name]

    return get


def test_step_graph_is_in_the_artifact_with_matmul_attention_and_on_device_commit(step_artifact):
    from medusa_export.step_graph import count_nodes
    from medusa_runtime import contract

    folder = step_artifact("tiny-gemma3")
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["files"]["step"] == "step.onnx" and meta["step"]["capacity"] == 256
    assert meta["files"]["step_plain"] == "step_plain.onnx"  # plain decoding: the step without the heads
    assert "TopK" not in count_nodes(folder / "step_plain.onnx")
    names = [s["name"] for s in meta["step"]["io"]["inputs"]]
    assert names[:6] == [contract.STEP_TOKENS, contract.STEP_LENGTH, *contract.STEP_TREE]
    ops = count_nodes(folder / "step.onnx")
    # attention as matmuls + one softmax a layer (ONNX `Attention` ran one CUDA block per head for N > 1)
    assert ops["Softmax"] == 2 and ops["ScatterND"] == 4 and ops["TopK"] == 1  # 2 layers, K and V
    assert "Attention" not in ops and "Pad" not in ops and sum(ops.values()) < 260
    # q|k|v and gate|up run as one projection each (2 layers)
    assert ops["Split"] >= 4 and ops["MatMul"] <= count_nodes(folder / "model.onnx")["MatMul"] - 6
    # the weights are stored once: step.onnx points at model.onnx.data for every tensor both graphs share
    # and holds the joined projections; step_plain.onnx points at those two
    size = {name: (folder / f"{name}.onnx.data").stat().st_size for name in ("model", "step", "step_plain")}
    assert size["step_plain"] < 0.1 * size["model"] and size["step"] < size["model"]


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama"])
@pytest.mark.parametrize("tree", ["tree16", "mc_sim_7b_63", None])
def test_fused_steps_equal_the_host_loop_and_base_greedy(tiny_base, step_artifact, name, tree):
    """Same tokens AND the same accepted path each step (so the in-graph draft equals the host's)."""
    folder = step_artifact(name)
    host = MedusaRuntime.open(folder, tree=tree or "tree8", medusa=tree is not None)
    fused = MedusaRuntime.open(folder, backend=STEP, tree=tree or "tree8", medusa=tree is not None)
    for prompt in PROMPTS:
        ids = host.encode(prompt)
        a, b = host.generate(ids, 30), fused.generate(ids, 30)
        assert b.token_ids == a.token_ids == hf_greedy(tiny_base(name), ids, 30).tokens
        assert [s.path for s in b.steps] == [s.path for s in a.steps]


def test_gqa_plain_step_writes_the_cache_in_place_and_equals_base_greedy(tiny_base, tmp_path):
    """`--plain-attention gqa` on a one-KV-head model: step_plain.onnx attends through GroupQueryAttention
    (which appends the token's K/V to the cache itself), no ScatterND; plain decoding over it equals the
    host loop and transformers, also across the sliding window (8) many times; the tree step is unchanged."""
    from medusa_export.onnx_export import export_onnx
    from medusa_export.step_graph import count_nodes
    from medusa_runtime import contract

    name = "tiny-gemma3-mq"
    folder = export_onnx(
        name, "random:4", tmp_path / name, max_seq=256, quiet=True, gpu_step=True, plain_attention="gqa"
    )
    ops = count_nodes(folder / "step_plain.onnx")
    assert ops["GroupQueryAttention"] == 2 and "ScatterND" not in ops and "Softmax" not in ops
    assert count_nodes(folder / "step.onnx")["ScatterND"] == 4
    fused = MedusaRuntime.open(folder, backend=STEP, medusa=False)
    runner = fused.backend.runner(fused.tree)
    assert contract.STEP_TOTAL in {i.name for i in runner.session.get_inputs()}
    host = MedusaRuntime.open(folder, medusa=False)
    medusa = MedusaRuntime.open(folder, backend=STEP, tree="tree16")
    for prompt in [*PROMPTS[:3], " ".join(PROMPTS)[:130]]:
        ids = host.encode(prompt)
        want = hf_greedy(tiny_base(name), ids, 60).tokens
        assert fused.generate(ids, 60).token_ids == host.generate(ids, 60).token_ids == want
        assert medusa.generate(ids, 60).token_ids == want


def test_native_fp16_step_graphs_fuse_norms_and_rotary_and_equal_the_host_loop(tmp_path):
    """A half-precision artifact's step graphs as the GPU runs them in bf16: every norm a
    SkipSimplifiedLayerNormalization (each residual add fused with the norm after it, the other norms with
    the input as its own skip), the plain step on GroupQueryAttention by default (auto), rotating q and k
    itself (no RotaryEmbedding left); plain and Medusa decoding over them equal the host loop."""
    from medusa_export.onnx_export import export_onnx
    from medusa_export.step_graph import SKIP_NORM, count_nodes

    name = "tiny-gemma3-mq"
    folder = export_onnx(
        name, "random:4", tmp_path / name, dtype="fp16", max_seq=256, quiet=True, gpu_step=True
    )
    layers = json.loads((folder / "artifact.json").read_text())["model"]["num_layers"]
    plain, tree = count_nodes(folder / "step_plain.onnx"), count_nodes(folder / "step.onnx")
    # per layer 2 residual adds with their norms, 4 norms alone (q, k, after attention, after the MLP); the first
    assert plain[SKIP_NORM] == tree[SKIP_NORM] == 6 * layers + 1
    assert "RMSNormalization" not in plain and "RMSNormalization" not in tree
    assert "RotaryEmbedding" not in plain and tree["RotaryEmbedding"] == 2 * layers
    host = MedusaRuntime.open(folder, medusa=False)
    fused = MedusaRuntime.open(folder, backend=STEP, medusa=False)
    medusa = MedusaRuntime.open(folder, backend=STEP, tree="tree16")
    for prompt in PROMPTS[:2]:
        ids = host.encode(prompt)
        want = host.generate(ids, 40).token_ids
        assert fused.generate(ids, 40).token_ids == medusa.generate(ids, 40).token_ids == want


def test_gqa_plain_step_refusals(tmp_path):
    from medusa_export.onnx_export import export_onnx

    with pytest.raises(MedusaError, match="one KV head"):
        export_onnx(
            "tiny-gemma3",
            "random:4",
            tmp_path / "a",
            max_seq=64,
            quiet=True,
            gpu_step=True,
            plain_attention="gqa",
        )
    with pytest.raises(MedusaError, match="add --gpu-step"):
        export_onnx(
            "tiny-gemma3-mq", "random:4", tmp_path / "b", max_seq=64, quiet=True, plain_attention="gqa"
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("tree", ["tree8", "mc_sim_7b_63"])
def test_fused_oracle_heads_accept_several_tokens_and_stay_exact(tiny_base, step_artifact, tree):
    """Oracle drafts (tests/conftest.py): full, partial and non-first acceptance, all on the device."""
    rt = MedusaRuntime.open(step_artifact("tiny-gemma3"), backend=STEP, tree=tree)
    kinds, mean = oracle_check(rt, tiny_base("tiny-gemma3"), PROMPTS, 40)
    assert {"full", "partial", "non-first"} <= kinds, kinds
    assert mean > 1.5


def test_long_prompt_crosses_the_sliding_window_many_times(tiny_base, step_artifact):
    """tiny-gemma3's window is 8: a 130-token prompt and 60 new tokens (max_seq 256 with a 64-node tree),
    oracle drafts (multi-token steps)."""
    rt = MedusaRuntime.open(step_artifact("tiny-gemma3"), backend=STEP, tree="mc_sim_7b_63")
    prompt = " ".join(PROMPTS)[:130]
    assert len(rt.encode(prompt)) == 130
    kinds, mean = oracle_check(rt, tiny_base("tiny-gemma3"), [prompt], 60, seed=7)
    assert "full" in kinds and mean > 1.5


def test_inplace_cache_equals_ping_pong_caches(step_artifact):
    folder = step_artifact("tiny-gemma3")
    a = MedusaRuntime.open(folder, backend=STEP, tree="tree16")
    b = MedusaRuntime.open(folder, backend=STEP, tree="tree16", inplace=False)
    for prompt in PROMPTS[:2]:
        assert a.generate(prompt, 30).token_ids == b.generate(prompt, 30).token_ids


def test_two_trees_and_repeated_requests_on_one_backend(step_artifact):
    """Runners per tree share the backend's cache; a new prefill restarts cleanly."""
    from medusa_runtime.tree import build_tree

    folder = step_artifact("tiny-gemma3")
    host = MedusaRuntime.open(folder, tree="tree16")
    fused = MedusaRuntime.open(folder, backend=STEP, tree="tree16")
    want = [host.generate(p, 20).token_ids for p in PROMPTS]
    assert [fused.generate(p, 20).token_ids for p in PROMPTS] == want
    fused.tree = build_tree([[0], [0, 0]])
    assert [fused.generate(p, 20).token_ids for p in PROMPTS] == want


def test_fused_backend_refusals(tiny_artifact, step_artifact):
    from medusa_runtime.acceptance import Typical

    with pytest.raises(MedusaError, match="--gpu-step"):
        MedusaRuntime.open(tiny_artifact("tiny-gemma3"), backend=STEP)
    rt = MedusaRuntime.open(step_artifact("tiny-gemma3"), backend=STEP, acceptance=Typical())
    with pytest.raises(MedusaError, match="greedily"):
        rt.generate(PROMPTS[0], 8)
    rt = MedusaRuntime.open(step_artifact("tiny-gemma3"), backend=STEP, tree="tree16")
    rt.backend.reset()
    runner = rt.backend.runner(rt.tree)
    rt.backend.length = rt.backend.capacity - 4
    runner.start(np.zeros(rt.tree.num_nodes, np.int64))
    with pytest.raises(MedusaError, match="KV cache full"):
        runner.step()


@pytest.mark.parametrize("tree,lookup", [("tree8", "2x4"), (None, 6)])
def test_fused_lookup_chains_equal_the_host_loop(tiny_base, step_artifact, tree, lookup):
    """Hybrid trees (heads + prompt-lookup chains) and plain + lookup on the fused step: the host fills the
    lookup nodes between graph runs; tokens, paths and sources equal the host loop's, the lookup accepts
    on a prompt that repeats itself, and the output is the base model's greedy."""
    folder = step_artifact("tiny-gemma3")
    opts = dict(tree=tree or "tree8", medusa=tree is not None, lookup=lookup)
    host, fused = MedusaRuntime.open(folder, **opts), MedusaRuntime.open(folder, backend=STEP, **opts)
    assert fused.tree.lookup_chains
    base = tiny_base("tiny-gemma3")
    from_lookup = 0
    for prompt in PROMPTS[:2]:
        ids = host.encode(prompt)
        ids = ids + ids + ids  # a repeated prompt: what lookup finds
        a, b = host.generate(ids, 40), fused.generate(ids, 40)
        assert b.token_ids == a.token_ids == hf_greedy(base, ids, 40).tokens
        assert [(s.path, s.source, len(s.tokens)) for s in b.steps] == [
            (s.path, s.source, len(s.tokens)) for s in a.steps
        ]
        from_lookup += sum(len(s.tokens) - 1 for s in b.steps if s.source == "lookup")
    assert from_lookup > 0


def test_gpu_lock_is_shared_or_exclusive():
    """GPU_LOCK (backends/ort_step.py): shared holders overlap; an exclusive holder (a CUDA-graph capture,
    a session load) runs alone and goes before shared holders that arrive while it waits."""
    import threading
    import time

    from medusa_runtime.backends.ort_step import SharedExclusiveLock

    lock, log, release = SharedExclusiveLock(), [], threading.Event()

    def wait_until(cond):
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.001)

    def shared(i, hold):
        with lock.shared():
            log.append(("in", i))
            if hold:
                release.wait(10)
            log.append(("out", i))

    def exclusive():
        with lock.exclusive():
            log.append(("exclusive", lock._shared))

    first = [threading.Thread(target=shared, args=(i, True)) for i in range(3)]
    for t in first:
        t.start()
    wait_until(lambda: lock._shared == 3)  # three shared holders at once
    ex = threading.Thread(target=exclusive)
    ex.start()
    wait_until(lambda: lock._waiting == 1)
    late = threading.Thread(target=shared, args=(9, False))  # arrives while the exclusive request waits
    late.start()
    time.sleep(0.05)
    assert ("in", 9) not in log and ("exclusive", 0) not in log
    release.set()
    for t in [*first, ex, late]:
        t.join(10)
    events = [e for e in log if e[0] != "in" or e[1] == 9]
    assert events[3] == ("exclusive", 0) and events[4:] == [("in", 9), ("out", 9)]


def test_fused_backends_in_threads_give_the_sequential_outputs(step_artifact):
    """Four runtimes (as the server's workers) decoding at once in threads: each its own output."""
    from concurrent.futures import ThreadPoolExecutor

    folder = step_artifact("tiny-gemma3")
    runtimes = [MedusaRuntime.open(folder, backend=STEP, tree="tree16") for _ in range(4)]
    want = [runtimes[0].generate(p, 24).token_ids for p in PROMPTS]
    jobs = [(i % 4, i % len(PROMPTS)) for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: runtimes[job[0]].generate(PROMPTS[job[1]], 24).token_ids, jobs))
    assert got == [want[p] for _, p in jobs]
