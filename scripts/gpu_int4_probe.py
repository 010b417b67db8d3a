"""Do 4-bit weights pay on the GPU? The weight matmuls of one Gemma 3 270M step, in bf16/fp16, as plain MatMuls
against com.microsoft MatMulNBits (4-bit blocks of 32; the tied lm_head at 4 or 8 bits), on ONNX Runtime's CUDA
EP, replayed from a CUDA graph: time per step at 1 / 16 / 64 rows (plain step, verify steps).

The graph is the step's weight path without attention: per layer x -> qkv [640 -> 1536] -> the q part -> o
[1024 -> 640] -> gate, up [640 -> 2048] -> sigmoid(gate) * up -> down [2048 -> 640], 18 layers, then the lm_head
[640 -> 262144] (and the heads' 8,192-token draft projection). Weights are random (never zeros), scaled to keep
activations near unit size; each variant's output is checked against a float64 product of the same
(dequantized) weights before it is timed.

    python scripts/gpu_int4_probe.py --device cuda --dtype bf16 --out $OUT/int4-probe.json
    python scripts/gpu_int4_probe.py --device cpu --dtype fp32 --rows 1,4   # the graph itself, on this machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from medusa_export.gguf_blocks import rtn  # noqa: E402
from medusa_runtime.contract import DTYPES, ONNX_ELEM  # noqa: E402

HIDDEN, QKV, Q, FF, LAYERS, VOCAB, DRAFT = 640, 1536, 1024, 2048, 18, 262144, 8192
FLOAT = ONNX_ELEM["float32"]


def weights(rng, layers: int, vocab: int) -> list[tuple[str, np.ndarray]]:
    """(name, W [N, K]) in the order the graph uses them."""
    out = []
    for i in range(layers):
        for name, n, k in (
            ("qkv", QKV, HIDDEN),
            ("o", HIDDEN, Q),
            ("gate", FF, HIDDEN),
            ("up", FF, HIDDEN),
            ("down", HIDDEN, FF),
        ):
            # sigmoid(gate) * up has ~0.29 of up's mean square: down makes it up, so activations stay near 1
            gain = 1.86 if name == "down" else 1.0
            out.append((f"l{i}.{name}", gain * rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)))
    out.append(("lm_head", rng.standard_normal((vocab, HIDDEN), dtype=np.float32) / np.sqrt(HIDDEN)))
    out.append(("draft", rng.standard_normal((DRAFT, HIDDEN), dtype=np.float32) / np.sqrt(HIDDEN)))
    return out


def build(ws, variant: str, dtype: str):
    """variant: fp (MatMul), int4 (MatMulNBits, lm_head 8-bit), int4all (lm_head 4-bit too). Returns the model
    and the float32 weights it computes with (dequantized where quantized)."""
    from onnx import helper, numpy_helper

    elem = ONNX_ELEM[DTYPES[dtype]]
    nodes, inits, used = [], [], {}

    def const(name, arr):
        t = numpy_helper.from_array(arr, name)
        inits.append(t)
        return name

    def float_init(name, arr):
        if dtype == "bf16":  # round to nearest even bf16 via the bit pattern, stored as raw bf16
            bits = arr.astype(np.float32).view(np.uint32)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            inits.append(helper.make_tensor(name, elem, arr.shape, bits.tobytes(), raw=True))
            return name, (bits.astype(np.uint32) << 16).view(np.float32).reshape(arr.shape)
        np_dtype = {"fp32": np.float32, "fp16": np.float16}[dtype]
        a = arr.astype(np_dtype)
        return const(name, a), a.astype(np.float32)

    def matmul(x, name, w):
        if variant == "fp":
            bits = 0
        elif name == "draft" or (name == "lm_head" and variant == "int4"):
            bits = 8
        else:
            bits = 4
        if bits == 0:
            wname, wf = float_init(name + ".wT", np.ascontiguousarray(w.T))
            nodes.append(helper.make_node("MatMul", [x, wname], [name + ".y"], name=name))
            used[name] = wf.T
            return name + ".y"
        b = rtn(w, bits)
        sname, sf = float_init(name + ".scales", b.scales.reshape(-1))
        b.scales = sf.reshape(b.scales.shape)
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, const(name + ".q", b.packed()), sname, const(name + ".zp", b.packed_zero_points())],
                [name + ".y"],
                name=name,
                domain="com.microsoft",
                K=b.k,
                N=b.n,
                bits=bits,
                block_size=b.block_size,
            )
        )
        used[name] = b.dequantize()
        return name + ".y"

    nodes.append(helper.make_node("Cast", ["x"], ["x.cast"], to=elem))  # float32 I/O, the dtype inside
    x = "x.cast"
    wd = dict(ws)
    layers = sum(n.endswith(".qkv") for n, _ in ws)
    starts = const("q_start", np.array([0], np.int64))
    ends = const("q_end", np.array([Q], np.int64))
    axes = const("last", np.array([1], np.int64))
    for i in range(layers):
        qkv = matmul(x, f"l{i}.qkv", wd[f"l{i}.qkv"])
        nodes.append(helper.make_node("Slice", [qkv, starts, ends, axes], [f"l{i}.q"]))
        h = matmul(f"l{i}.q", f"l{i}.o", wd[f"l{i}.o"])
        g = matmul(h, f"l{i}.gate", wd[f"l{i}.gate"])
        u = matmul(h, f"l{i}.up", wd[f"l{i}.up"])
        nodes.append(helper.make_node("Sigmoid", [g], [f"l{i}.sg"]))
        nodes.append(helper.make_node("Mul", [f"l{i}.sg", u], [f"l{i}.gu"]))
        x = matmul(f"l{i}.gu", f"l{i}.down", wd[f"l{i}.down"])
    logits = matmul(x, "lm_head", wd["lm_head"])
    draft = matmul(x, "draft", wd["draft"])
    nodes.append(helper.make_node("Cast", [logits], ["logits"], to=FLOAT))
    nodes.append(helper.make_node("Cast", [draft], ["draft_logits"], to=FLOAT))
    graph = helper.make_graph(
        nodes,
        f"probe_{variant}",
        [helper.make_tensor_value_info("x", FLOAT, ["rows", HIDDEN])],
        [
            helper.make_tensor_value_info("logits", FLOAT, ["rows", None]),
            helper.make_tensor_value_info("draft_logits", FLOAT, ["rows", DRAFT]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    return model, used


def reference(x: np.ndarray, used: dict, layers: int) -> np.ndarray:
    h = x.astype(np.float64)
    for i in range(layers):
        q = (h @ used[f"l{i}.qkv"].T.astype(np.float64))[:, :Q]
        o = q @ used[f"l{i}.o"].T.astype(np.float64)
        g = o @ used[f"l{i}.gate"].T.astype(np.float64)
        gu = 1.0 / (1.0 + np.exp(-g)) * (o @ used[f"l{i}.up"].T.astype(np.float64))
        h = gu @ used[f"l{i}.down"].T.astype(np.float64)
    return h @ used["lm_head"].T.astype(np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--variants", default="fp,int4,int4all")
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    import onnxruntime as ort

    if a.device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    rng = np.random.default_rng(0)
    ws = weights(rng, a.layers, a.vocab)
    rows = [int(r) for r in a.rows.split(",")]
    results = []
    for variant in a.variants.split(","):
        t0 = time.perf_counter()
        model, used = build(ws, variant, a.dtype)
        blob = model.SerializeToString()
        wbytes = sum(len(t.raw_data) for t in model.graph.initializer)
        print(
            f"[probe] {variant}: graph built in {time.perf_counter() - t0:.1f} s, weights {wbytes / 2**20:.0f} MiB",
            flush=True,
        )
        for m in rows:
            x = rng.standard_normal((m, HIDDEN), dtype=np.float32)
            row = {"variant": variant, "dtype": a.dtype, "rows": m, "weight_mib": round(wbytes / 2**20, 1)}
            try:
                so = ort.SessionOptions()
                so.log_severity_level = 3
                if a.device == "cuda":
                    providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1", "use_tf32": "0"})]
                else:
                    providers = ["CPUExecutionProvider"]
                    so.intra_op_num_threads = 2
                sess = ort.InferenceSession(blob, so, providers=providers)
                placed = sess.get_providers()
                dev = "cuda" if a.device == "cuda" else "cpu"
                xv = ort.OrtValue.ortvalue_from_numpy(x, dev, 0)
                out_names = [o.name for o in sess.get_outputs()]
                outs = [
                    ort.OrtValue.ortvalue_from_numpy(np.full((m, n), np.nan, np.float32), dev, 0)  # poisoned
                    for n in (a.vocab, DRAFT)
                ]
                io = sess.io_binding()
                io.bind_ortvalue_input("x", xv)
                for name, v in zip(out_names, outs):
                    io.bind_ortvalue_output(name, v)
                sess.run_with_iobinding(io)  # the capture run on CUDA
                io.synchronize_outputs()
                got = outs[0].numpy()
                ref = reference(x, used, a.layers)
                rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                row["rel_err_vs_float64"] = rel
                row["argmax_agree"] = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
                row["placed"] = placed
                if not np.isfinite(rel) or rel > 0.1:  # bf16 over 92 products: ~0.04; a wrong kernel: ~1.4
                    raise RuntimeError(f"output off the float64 reference: rel {rel:.3g}")
                times = []
                for _ in range(20):
                    sess.run_with_iobinding(io)
                for _ in range(a.iters):
                    t = time.perf_counter()
                    sess.run_with_iobinding(io)
                    io.synchronize_outputs()
                    times.append(time.perf_counter() - t)
                row["ms_median"] = statistics.median(times) * 1e3
                row["ms_p10"] = sorted(times)[len(times) // 10] * 1e3
            except Exception as e:  # a variant the EP cannot run is a result too
                row["error"] = str(e).splitlines()[0][:300]
            results.append(row)
            print("[probe]", json.dumps(row), flush=True)
    print(
        f"\n| variant ({a.dtype}, {a.device}) | rows | weights MiB | ms / step (median) | rel err | argmax agree |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        ms = f"{r['ms_median']:.3f}" if "ms_median" in r else r.get("error", "")[:60]
        err = f"{r['rel_err_vs_float64']:.1e}" if "rel_err_vs_float64" in r else "-"
        agree = f"{r['argmax_agree']:.2f}" if "argmax_agree" in r else "-"
        print(f"| {r['variant']} | {r['rows']} | {r['weight_mib']} | {ms} | {err} | {agree} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
