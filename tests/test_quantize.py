"""Quantized artifacts (`--weights int4|int8`): ONNX Runtime's MatMulNBits/GatherBlockQuantized as this
project uses them, GGUF blocks carried exactly, the round-to-nearest path on tiny models, and Medusa = plain
on the same quantized artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medusa_export.gguf_blocks import Blocks, gguf_blocks, rtn

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ ONNX Runtime's contrib ops, as used here


def _session(nodes, inputs, outputs, inits):
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _nbits_session(b: Blocks):
    from onnx import TensorProto, helper

    from medusa_export.quantize import _matmul_nbits, _row_chunks

    inits = {"B": b.packed(), "S": b.scales.reshape(-1), "Z": b.packed_zero_points()}

    def add_init(name, arr):
        inits[name] = arr
        return name

    node = helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")
    parts = _row_chunks(b)
    if len(parts) == 1:
        ins = [["B", "S", "Z"]]
    else:
        ins = []
        for i, part in enumerate(parts):
            c = b.rows(part)
            inits.update(
                {f"B{i}": c.packed(), f"S{i}": c.scales.reshape(-1), f"Z{i}": c.packed_zero_points()}
            )
            ins.append([f"B{i}", f"S{i}", f"Z{i}"])
    nodes = _matmul_nbits(node, b, ins, "t", add_init)
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, b.k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, b.n])
    return _session(nodes, [a], [y], inits)


def _random_q4_k(n_rows: int, k: int) -> np.ndarray:
    """Valid Q4_K bytes: random scales/mins/quants with sane fp16 super-block scales."""
    nb = n_rows * k // 256
    raw = RNG.integers(0, 256, size=(nb, 144), dtype=np.uint8)
    raw[:, 0:2] = (RNG.random((nb, 1)) * 1e-3 + 1e-4).astype(np.float16).view(np.uint8)
    raw[:, 2:4] = (RNG.random((nb, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    return raw.reshape(n_rows, -1)


def _random_q6_k(n_rows: int, k: int) -> np.ndarray:
    nb = n_rows * k // 256
    raw = RNG.integers(0, 256, size=(nb, 210), dtype=np.uint8)
    raw[:, 208:210] = (RNG.random((nb, 1)) * 1e-3 + 1e-4).astype(np.float16).view(np.uint8)
    return raw.reshape(n_rows, -1)


def _gguf_raw(kind: str, w: np.ndarray) -> np.ndarray:
    """GGUF bytes [N, row bytes] of a float weight (Q8_0/Q5_0 via gguf's quantizer; K-quants random)."""
    import gguf

    n, k = w.shape
    if kind == "Q4_K":
        return _random_q4_k(n, k)
    if kind == "Q6_K":
        return _random_q6_k(n, k)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_gguf_blocks_equal_ggufs_own_dequantization(kind):
    import gguf

    n, k = 48, 512
    raw = _gguf_raw(kind, RNG.standard_normal((n, k)).astype(np.float32))
    b = gguf_blocks(raw, kind, (n, k))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(n, k)
    assert np.array_equal(b.dequantize(), want), f"{kind} blocks differ from gguf's dequantization"
    assert b.bits == (4 if kind == "Q4_K" else 8)
    assert int(b.q.max()) < 2**b.bits and (b.mins is not None) == (kind == "Q4_K")
    sub = b.rows(np.array([3, 0, 47]))
    assert np.array_equal(sub.dequantize(), want[[3, 0, 47]])


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_within_half_a_step(bits):
    w = RNG.standard_normal((16, 70)).astype(np.float32)  # K not a multiple of the block: padded
    b = rtn(w, bits)
    err = np.abs(b.dequantize() - w).reshape(16, -1)
    step = np.repeat(b.scales, 32, axis=1)[:, :70]
    assert (err <= step / 2 + 1e-6).all()
    assert b.packed().shape == (16, 3, 32 * bits // 8)


@pytest.mark.parametrize(
    "kind,bits", [("rtn", 4), ("rtn", 8), ("Q4_K", 4), ("Q6_K", 8), ("Q5_0", 8), ("Q8_0", 8)]
)
def test_matmul_nbits_matches_the_blocks_and_is_row_invariant(kind, bits):
    """The installed ONNX Runtime's MatMulNBits (uint8 zero points, accuracy_level 4, block 16/32, 4 and 8
    bits; Q4_K's minimum term as a separate MatMul) computes X @ W^T of the blocks' weights up to int8
    activation rounding, and each row the same whatever the number of rows (Medusa's verify vs plain steps)."""
    n, k = 96, 512
    w = RNG.standard_normal((n, k)).astype(np.float32) * 0.05
    b = rtn(w, bits) if kind == "rtn" else gguf_blocks(_gguf_raw(kind, w), kind, (n, k))
    sess = _nbits_session(b)
    x = RNG.standard_normal((8, k)).astype(np.float32)
    y = sess.run(None, {"A": x})[0]
    ref = x.astype(np.float64) @ b.dequantize().astype(np.float64).T
    assert np.abs(y - ref).max() <= 2e-2 * np.abs(ref).max()
    one = np.concatenate([sess.run(None, {"A": x[i : i + 1]})[0] for i in range(8)])
    assert np.array_equal(one, y), "MatMulNBits rows depend on how many rows run together"
    assert np.array_equal(sess.run(None, {"A": x[:4]})[0], y[:4])


def test_large_weights_split_into_row_chunks_compute_the_same(monkeypatch):
    """Weights over CHUNK_BYTES run as several MatMulNBits along N, concatenated: bitwise the same output."""
    import medusa_export.quantize as quantize

    n, k = 96, 512
    b = gguf_blocks(_gguf_raw("Q4_K", np.zeros((n, k), np.float32)), "Q4_K", (n, k))
    x = RNG.standard_normal((4, k)).astype(np.float32)
    whole = _nbits_session(b).run(None, {"A": x})[0]
    monkeypatch.setattr(quantize, "CHUNK_BYTES", n * k // 2 // 3)
    assert len(quantize._row_chunks(b)) == 3
    assert np.array_equal(_nbits_session(b).run(None, {"A": x})[0], whole)


def test_sibling_matmuls_fuse_into_one_with_the_same_columns(monkeypatch):
    """MatMulNBits that read the same input fuse into one (blocks stacked along N, then a Split): bitwise the
    same outputs, for one row and for a verify's several; a different input, a row chunk or a run past
    CHUNK_BYTES stays apart."""
    from onnx import TensorProto, helper, numpy_helper

    import medusa_export.quantize as quantize

    k = 256
    weights = {  # name: (input, blocks): 8-bit (Q5_0, Q8_0 as stored), 4-bit with Q4_K's minimum term
        "q": ("A", gguf_blocks(_gguf_raw("Q5_0", RNG.standard_normal((64, k), np.float32)), "Q5_0", (64, k))),
        "k": ("A", gguf_blocks(_gguf_raw("Q5_0", RNG.standard_normal((16, k), np.float32)), "Q5_0", (16, k))),
        "v": ("A", gguf_blocks(_gguf_raw("Q8_0", RNG.standard_normal((16, k), np.float32)), "Q8_0", (16, k))),
        "gate": ("A", gguf_blocks(_random_q4_k(32, k), "Q4_K", (32, k))),
        "up": ("A", gguf_blocks(_random_q4_k(48, k), "Q4_K", (48, k))),
        "other": ("B", rtn(RNG.standard_normal((32, k)).astype(np.float32), 8)),
    }

    def build(fuse: bool):
        inits = {}

        def add_init(name, arr):
            if name not in inits:
                inits[name] = numpy_helper.from_array(np.ascontiguousarray(arr), name)
            return name

        nodes, whole = [], set()
        for name, (x, b) in weights.items():
            ins = [
                [
                    add_init(f"{name}.q", b.packed()),
                    add_init(f"{name}.s", b.scales.reshape(-1)),
                    add_init(f"{name}.z", b.packed_zero_points()),
                ]
            ]
            made = quantize._matmul_nbits(
                helper.make_node("MatMul", [x, "W"], [name], name=name), b, ins, name, add_init
            )
            whole.add(made[0].name)
            nodes += made
        fused = 0
        if fuse:
            nodes, fused = quantize._fuse_siblings(nodes, whole, inits, add_init)
        live = {i for n in nodes for i in n.input}
        graph_inits = {n: numpy_helper.to_array(t) for n, t in inits.items() if n in live}
        ins = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, k]) for x in "AB"]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in weights]
        return _session(nodes, ins, outs, graph_inits), [n.op_type for n in nodes], fused

    apart, _, _ = build(False)
    together, ops, fused = build(True)
    assert fused == 3 and ops.count("MatMulNBits") == 3 and ops.count("Split") == 2  # q/k/v, gate/up, other
    for rows in (1, 5):
        feed = {x: RNG.standard_normal((rows, k)).astype(np.float32) for x in "AB"}
        for a, b in zip(apart.run(None, feed), together.run(None, feed)):
            assert np.array_equal(a, b)
    monkeypatch.setattr(quantize, "CHUNK_BYTES", 80 * k)  # q + k fit, v starts a new run on its own
    _, ops, fused = build(True)
    assert fused == 2 and ops.count("MatMulNBits") == 4


def test_gather_block_quantized_is_exact():
    from onnx import TensorProto, helper

    from medusa_export.quantize import _gather_quantized

    v, c = 100, 64
    b = rtn(RNG.standard_normal((v, c)).astype(np.float32), 8)
    inits = {"D": b.packed()}

    def add_init(name, arr):
        inits[name] = arr
        return name

    node = helper.make_node("Gather", ["E", "ids"], ["out"], name="g")
    nodes = _gather_quantized(node, b, "D", "t", add_init)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    sess = _session(nodes, [ids], [out], inits)
    pick = np.array([[0, 5, 99], [7, 7, 1]])
    got = sess.run(None, {"ids": pick})[0]
    assert got.shape == (2, 3, c)
    assert np.array_equal(got, b.dequantize()[pick])


# ------------------------------------------------------------------ tiny models: the round-to-nearest path


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory):
    from medusa_export.onnx_export import export_onnx

    cache = {}

    def get(name, weights):
        if (name, weights) not in cache:
            out = tmp_path_factory.mktemp("q") / f"{name}-{weights}"
            trees = {"cpu": "tree4", "gpu": "tree16"}
            cache[name, weights] = export_onnx(
                name, "random:4", out, max_seq=256, weights=weights, default_trees=trees, quiet=True
            )
        return cache[name, weights]

    return get


@pytest.mark.parametrize("name,weights", [("tiny-gemma3", "int4"), ("tiny-llama", "int8")])
def test_tiny_quantized_export_medusa_equals_plain(quantized_tiny, name, weights):
    import io

    import onnx

    from conftest import PROMPTS
    from medusa_export.validate import validate
    from medusa_runtime.api import MedusaRuntime
    from medusa_runtime.errors import MedusaError

    folder = quantized_tiny(name, weights)
    meta = json.loads((folder / "artifact.json").read_text())
    w = meta["weights"]
    assert w["scheme"] == weights and w["source"] == "rtn" and not w["unquantized"]
    assert w["weight_bytes_after"] < w["weight_bytes_before"] / 2
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "GatherBlockQuantized" in ops and ops.count("MatMulNBits") + w["matmuls_fused"] >= 2 * 7 + 4
    assert w["matmuls_fused"] >= 2 * 3  # per layer: q/k/v into one, gate/up into one
    inits = {t.name for t in model.graph.initializer}
    for n in model.graph.node:  # no float weight left behind a MatMul
        assert not (n.op_type == "MatMul" and n.input[1] in inits), n.name
    assert MedusaRuntime.open(folder).tree_name == "tree4"  # the CPU default of `default_trees`
    assert medusa_artifact(folder).default_tree("ort-cuda") == "tree16"
    assert medusa_artifact(folder).default_tree("trt") == "tree16"
    with pytest.raises(MedusaError, match="verifies up to 64 rows; on quantized weights"):
        MedusaRuntime.open(folder, tree="mc_sim_7b_63")  # beyond QUANTIZED_CPU_ROWS: refused on ort-cpu
    medusa = MedusaRuntime.open(folder, tree="tree16")
    plain = MedusaRuntime.open(folder, medusa=False)
    chain = MedusaRuntime.open(folder, tree="chain4")  # chains are exact by construction (README)
    for prompt in PROMPTS:
        a, b = medusa.generate(prompt, 40), plain.generate(prompt, 40)
        assert a.token_ids == b.token_ids == chain.generate(prompt, 40).token_ids
        assert a.mean_accepted > 1.0 or name == "tiny-llama"
    buf = io.StringIO()
    assert validate(folder, _prompts_file(folder), max_new_tokens=24, reference="auto", out=buf)
    text = buf.getvalue()
    assert "Medusa = plain on 3/3 prompts" in text and "agreement with transformers fp32" in text


def medusa_artifact(folder):
    from medusa_runtime.artifact import Artifact

    return Artifact.load(folder)


def _prompts_file(folder):
    from conftest import PROMPTS

    path = folder.parent / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def test_is_chain():
    from medusa_export.validate import is_chain

    assert is_chain([[0], [0, 0], [0, 0, 0]]) and is_chain([])
    assert not is_chain([[0], [0, 0], [1]])


def test_weights_option_refuses_bad_input(tmp_path):
    from medusa_export.onnx_export import export_onnx
    from medusa_runtime.errors import MedusaError

    with pytest.raises(MedusaError, match="--weights int4 quantizes from fp32"):
        export_onnx("tiny-llama", "random:2", tmp_path / "a", dtype="fp16", weights="int4", quiet=True)
    with pytest.raises(MedusaError, match="unknown --weights"):
        export_onnx("tiny-llama", "random:2", tmp_path / "b", weights="int3", quiet=True)


# ------------------------------------------------------------------ a tiny GGUF: the file's own values


TINY_GGUF_TYPES = {  # per Hugging Face parameter suffix: a GGUF type (K multiple of 256 for K-quants)
    "self_attn.q_proj": "Q5_0",
    "self_attn.k_proj": "Q8_0",
    "self_attn.v_proj": "Q5_0",
    "self_attn.o_proj": "Q4_K",
    "mlp.gate_proj": "Q5_0",
    "mlp.up_proj": "Q5_0",
    "mlp.down_proj": "Q6_K",
}


def _tiny_gguf_model(path):
    """A tiny Gemma 3 whose weights are the dequantized values of a GGUF file written here with the gguf
    package's writer (Q4_K/Q5_0/Q6_K/Q8_0 tensors). Returns the BaseModel."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medusa_export.models.source import BaseModel
    from medusa_export.models.tiny import byte_tokenizer, tiny_preset

    preset = tiny_preset("tiny-gemma3")
    cfg = dict(preset["config"], hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4)
    cfg["num_key_value_heads"] = 2
    config = AutoConfig.for_model(preset["model_type"], **cfg)
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    writer = gguf.GGUFWriter(str(path), "gemma3")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() != 2:
                continue
            kind = "Q8_0" if "embed" in name else TINY_GGUF_TYPES[name.split(".", 3)[-1].rsplit(".", 1)[0]]
            if name.endswith("layers.1.mlp.down_proj.weight"):
                kind = "Q4_K"
            w = (torch.randn_like(p) * 0.05).numpy()
            raw = _gguf_raw(kind, w)
            qtype = gguf.GGMLQuantizationType[kind]
            p.copy_(torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(p.shape)))
            gname = names.get_name(name.removeprefix("model.").removesuffix(".weight")) + ".weight"
            writer.add_tensor(gname, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    eos = config.eos_token_id
    return BaseModel(
        str(path), hf, byte_tokenizer(), config.bos_token_id, [eos] if isinstance(eos, int) else eos
    )


def test_tiny_gguf_values_carried_exactly(tmp_path, monkeypatch):
    import onnx

    import medusa_export.models as models
    from conftest import PROMPTS
    from medusa_export.onnx_export import export_onnx
    from medusa_runtime.api import MedusaRuntime

    path = tmp_path / "tiny-gemma3.gguf"
    base = _tiny_gguf_model(path)
    monkeypatch.setattr(models, "load_base", lambda spec, dtype="fp32": base)
    folder = export_onnx(str(path), "random:2", tmp_path / "art", max_seq=256, weights="int4", quiet=True)
    w = json.loads((folder / "artifact.json").read_text())["weights"]
    assert w["source"] == "gguf:tiny-gemma3.gguf"
    # quantized: Medusa = plain holds for single chains; the default is a chain of prompt-lookup tokens
    assert json.loads((folder / "artifact.json").read_text())["default_tree"] == "chain0+lookup3"
    assert w["max_abs_diff_vs_gguf"] == 0.0  # every GGUF tensor carried with its own values
    kinds = w["tensors"]
    assert kinds["Q4_K->4bit"] == 3 and kinds["Q6_K->8bit"] == 1 and kinds["Q8_0->8bit"] == 3
    assert kinds["Q5_0->8bit"] == 8 and kinds["rtn8->8bit"] == 2  # the two heads' own layers
    ops = [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("ReduceSum") == 3  # Q4_K's minimum term, once per Q4_K tensor
    medusa = MedusaRuntime.open(folder, tree="tree4")
    plain = MedusaRuntime.open(folder, medusa=False)
    default = MedusaRuntime.open(folder)
    assert default.tree_name == "chain0+lookup3" and default.tree.lookup == (1, 3)
    for prompt in PROMPTS:
        want = plain.generate(prompt, 32).token_ids
        assert medusa.generate(prompt, 32).token_ids == want == default.generate(prompt, 32).token_ids


def test_sequential_heads_read_the_quantized_embedding(tmp_path):
    """Sequential heads gather their previous token's embedding: on 4-bit weights every gather of the
    embedding reads the 8-bit blocks (GatherBlockQuantized), so no float copy of the table is kept."""
    import onnx

    from medusa_export.heads import random_heads, save_heads
    from medusa_export.models import load_base
    from medusa_export.onnx_export import export_onnx

    c = load_base("tiny-llama").config
    save_heads(
        random_heads(3, c.hidden_size, c.vocab_size, sequential=True), tmp_path / "heads", "tiny-llama"
    )
    folder = export_onnx("tiny-llama", str(tmp_path / "heads"), tmp_path / "art", weights="int4", quiet=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 + 3 and "GatherND" not in ops
    float_tables = [i.name for i in model.graph.initializer if list(i.dims) == [c.vocab_size, c.hidden_size]]
    assert not float_tables, float_tables
