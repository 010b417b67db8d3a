"""What ONNX Runtime's com.microsoft GroupQueryAttention does on this machine, for the plain decode step.

    python3 scripts/gqa_check.py [--device cuda|cpu] [--dtype fp16|fp32] [--cuda-graph]

One query token at slot L over a cache bound at full capacity and shared with the present output (the
past_present_share_buffer mode): is the new K/V row written in place at slot L, are the other rows kept,
and which keys does `local_window_size = W` let the token see (the last W keys, as Hugging Face's sliding
window, or W + 1)? Compares with a float64 reference for windows -1 (none), W and W + 1, at several L
(also L beyond W, where the window matters), with fresh random inputs each time. With --cuda-graph the
session captures a CUDA graph and replays it with new seqlens_k values on the device (total_sequence_length
stays at the capacity). Prints one line per case and a verdict. fp16 stands in for bf16 (the same kernels;
ONNX Runtime's Python API cannot read a bf16 tensor back).

H200, onnxruntime-gpu 1.31.1, fp16, with and without a CUDA graph (2026-11-30): in place, other rows kept,
`local_window_size = W` sees the last W keys (Hugging Face's sliding window), relative error 2.7e-4.
"""

from __future__ import annotations

import argparse

import numpy as np

H, KV, D, CAP, W = 4, 1, 256, 64, 8  # Gemma 3 270M's heads and head size; a small window and cache
ELEM = {"fp32": 1, "fp16": 10}  # ONNX element types


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the array of `dtype` the session takes."""
    return x.astype(np.float16 if dtype == "fp16" else np.float32)


def session(ort, dtype: str, window: int, device: str, graph: bool):
    from onnx import TensorProto as T
    from onnx import helper as h

    t = {"fp32": T.FLOAT, "fp16": T.FLOAT16}[dtype]
    node = h.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"],
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=H,
        kv_num_heads=KV,
        local_window_size=window,
        scale=D**-0.5,
    )
    cache = [1, KV, CAP, D]
    g = h.make_graph(
        [node],
        "gqa",
        [
            h.make_tensor_value_info("q", t, [1, 1, H * D]),
            h.make_tensor_value_info("k", t, [1, 1, KV * D]),
            h.make_tensor_value_info("v", t, [1, 1, KV * D]),
            h.make_tensor_value_info("past_k", t, cache),
            h.make_tensor_value_info("past_v", t, cache),
            h.make_tensor_value_info("seqlens_k", T.INT32, [1]),
            h.make_tensor_value_info("total", T.INT32, [1]),
        ],
        [
            h.make_tensor_value_info("out", t, [1, 1, H * D]),
            h.make_tensor_value_info("present_k", t, cache),
            h.make_tensor_value_info("present_v", t, cache),
        ],
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # what ONNX Runtime 1.2x-1.3x reads (onnx's helper writes its newest)
    if device == "cuda":
        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1" if graph else "0"})]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), providers=providers)


def reference(q, keys, values, length: int, window: int | None) -> np.ndarray:
    """Attention of the token at slot `length` over slots 0..length (float64); window: the last W keys."""
    slots = np.arange(length + 1)
    ok = np.ones(length + 1, bool) if window is None else (length - slots) < window
    scores = q.reshape(H, D).astype(np.float64) @ keys[: length + 1].T.astype(np.float64) * D**-0.5
    scores[:, ~ok] = -np.inf
    p = np.exp(scores - scores.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (p @ values[: length + 1].astype(np.float64)).reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=sorted(ELEM))
    ap.add_argument("--cuda-graph", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort

    if args.device == "cuda":
        ort.preload_dlls()
    rng = np.random.default_rng(0)
    dev, dt = args.device, args.dtype
    verdicts = {}
    for window in (-1, W):
        s = session(ort, dt, window, dev, args.cuda_graph)
        alloc = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(shape, ELEM[dt], dev, 0)
            for name, shape in (
                ("q", [1, 1, H * D]),
                ("k", [1, 1, KV * D]),
                ("v", [1, 1, KV * D]),
                ("past_k", [1, KV, CAP, D]),
                ("past_v", [1, KV, CAP, D]),
                ("out", [1, 1, H * D]),
            )
        }
        seqlens = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int32), dev, 0)
        total = ort.OrtValue.ortvalue_from_numpy(np.array([CAP], np.int32), "cpu", 0)
        io = s.io_binding()
        for name in ("q", "k", "v", "past_k", "past_v"):
            io.bind_ortvalue_input(name, alloc[name])
        io.bind_ortvalue_input("seqlens_k", seqlens)
        io.bind_ortvalue_input("total", total)
        io.bind_ortvalue_output("out", alloc["out"])
        io.bind_ortvalue_output("present_k", alloc["past_k"])  # shared with the past: written in place
        io.bind_ortvalue_output("present_v", alloc["past_v"])
        errors = {None: [], W: [], W + 1: []}
        in_place = kept = True
        for length in (3, 5, 12, 20, 40, 63, 7, 30):
            x = {n: rng.standard_normal(a.shape()).astype(np.float32) for n, a in alloc.items() if n != "out"}
            for n, a in x.items():
                alloc[n].update_inplace(stored(a, dt))
            seqlens.update_inplace(np.array([length], np.int32))
            s.run_with_iobinding(io)
            back = {n: alloc[n].numpy().astype(np.float32) for n in ("past_k", "past_v", "out")}
            kk, vv = (stored(x[n], dt).astype(np.float32)[0, 0] for n in ("past_k", "past_v"))
            newk, newv = (stored(x[n], dt).astype(np.float32).reshape(-1) for n in ("k", "v"))
            in_place &= bool(np.array_equal(back["past_k"][0, 0, length], newk))
            in_place &= bool(np.array_equal(back["past_v"][0, 0, length], newv))
            kept &= bool(np.array_equal(np.delete(back["past_k"][0, 0], length, 0), np.delete(kk, length, 0)))
            kk[length], vv[length] = newk, newv
            q = stored(x["q"], dt).astype(np.float32)
            for win in errors:
                ref = reference(q, kk, vv, length, win)
                errors[win].append(float(np.linalg.norm(back["out"].reshape(-1) - ref) / np.linalg.norm(ref)))
        worst = {win: max(e) for win, e in errors.items()}
        best = min(worst, key=worst.get)
        label = "none" if best is None else f"last {best} keys"
        print(
            f"{dev} {dt} graph={args.cuda_graph} local_window_size={window}: in place {in_place}, other rows kept"
            f" {kept}; relative error vs window none/{W}/{W + 1}: "
            + " / ".join(f"{worst[w]:.1e}" for w in errors)
            + f" -> sees {label}",
            flush=True,
        )
        verdicts[window] = (in_place and kept, best, worst[best])
    ok = verdicts[-1][:2] == (True, None) and verdicts[W][0]
    print(
        f"verdict: share-buffer {'works' if ok else 'FAILS'}; local_window_size=W sees {verdicts[W][1]} keys"
    )


if __name__ == "__main__":
    main()
