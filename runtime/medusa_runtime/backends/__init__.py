"""Backends run one forward over T new tokens on top of a KV cache they own (see base.Backend)."""

from __future__ import annotations

from ..errors import MedusaError

RUNTIME_BACKENDS = ("ort-cpu", "ort-cuda", "trt", "ort-cuda-graph", "ort-cpu-step")
# fused-step backends (artifact exported with --gpu-step): one step.onnx run per Medusa step, greedy only
FUSED_BACKENDS = {"ort-cuda-graph": "cuda", "ort-cpu-step": "cpu"}
GPU_BACKENDS = ("ort-cuda", "ort-cuda-graph", "trt")  # their artifacts' gpu default tree; a CUDA reference


def open_backend(name: str, artifact, max_nodes: int, **options):
    """The backend called `name` over an artifact (and, for trt, its engine)."""
    if name in ("ort-cpu", "ort-cuda"):
        from .ort import OrtBackend

        return OrtBackend(artifact, device=name.removeprefix("ort-"), max_nodes=max_nodes, **options)
    if name in FUSED_BACKENDS:
        from .ort_step import OrtStepBackend

        return OrtStepBackend(artifact, device=FUSED_BACKENDS[name], max_nodes=max_nodes, **options)
    if name == "trt":
        from .trt import TrtBackend

        return TrtBackend(artifact, max_nodes=max_nodes, **options)
    raise MedusaError(f"unknown backend {name!r}: use one of {', '.join(RUNTIME_BACKENDS)}")
