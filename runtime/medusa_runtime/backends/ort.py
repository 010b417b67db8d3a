"""ONNX Runtime backend (CPU and CUDA execution providers) over IO binding.

The KV cache is one preallocated OrtValue per layer and kind, [1, capacity, KV, D], on the device.
`past` inputs are bound as the cache's first `length` rows (a contiguous prefix, no copy); new KV
is written by the graph straight into rows [length, length + T) (keep_all) or into a scratch area
that the artifact's kv_commit graph gathers from, on the device, into the cache. Only input ids,
masks and the argmax/top-k ids travel between host and device.
"""

from __future__ import annotations

import numpy as np

from .. import contract
from ..errors import MedusaError
from .base import Backend, StepOutput

LOGITS, MEDUSA_LOGITS, NEXT_TOKENS, MEDUSA_TOPK = range(4)


def bind_token_inputs(io, input_ids, positions, masks, rows) -> None:
    """Clear an IoBinding of model.onnx and bind its host inputs (ids, positions, masks, output rows)."""
    io.clear_binding_inputs()
    io.clear_binding_outputs()
    io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64)[None])
    io.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64)[None])
    io.bind_cpu_input("attention_mask", masks[0])
    if masks[1] is not None:
        io.bind_cpu_input("sliding_attention_mask", masks[1])
    io.bind_cpu_input("output_rows", np.ascontiguousarray(rows, dtype=np.int64))


def cuda_provider_options(device_id: int = 0, cuda_graph: bool = False) -> dict[str, str]:
    """CUDA EP options. TF32 off: ONNX Runtime would otherwise run float32 MatMul/GEMM in TF32, which
    breaks fp32 token identity with the reference (seen on an H200: 15/16 prompts); bf16 is unaffected."""
    opts = {"device_id": str(device_id), "use_tf32": "0"}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return opts


def execution_providers(ort, device: str, kv_dtype: str, backend: str, cuda_graph: bool = False) -> list:
    """The providers for a session on `device`, after checking that this onnxruntime and artifact can run there."""
    if device == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MedusaError(
                f"backend {backend} needs onnxruntime-gpu with a CUDA device (pip install .[gpu])"
            )
        return [
            ("CUDAExecutionProvider", cuda_provider_options(cuda_graph=cuda_graph)),
            "CPUExecutionProvider",
        ]
    if device != "cpu":
        raise MedusaError(f"unknown ONNX Runtime device {device!r}")
    if kv_dtype == "bfloat16":
        raise MedusaError(
            f"ONNX Runtime's CPU EP has no bf16 kernels: run a bf16 artifact on a CUDA backend, not {backend}"
        )
    return ["CPUExecutionProvider"]


class OrtBackend(Backend):
    def __init__(
        self,
        artifact,
        device: str = "cpu",
        max_nodes: int = 64,
        threads: int | None = None,
        profile: str | None = None,  # file prefix: write ONNX Runtime's per-node profile of the model graph
    ):
        import onnxruntime as ort

        self.artifact, self.device = artifact, device
        m = artifact.model
        self.num_layers, kv_heads, head_dim = m["num_layers"], m["num_kv_heads"], m["head_dim"]
        self.kv_dtype = next(s["dtype"] for s in artifact.io("inputs") if s["name"].startswith("past_"))
        self.capacity = artifact.max_seq
        self.row_bytes = kv_heads * head_dim * contract.ITEMSIZE[self.kv_dtype]
        self.kv_tail = (kv_heads, head_dim)

        providers = execution_providers(ort, device, self.kv_dtype, f"ort-{device}")

        def options(profile_prefix: str | None = None):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
            if profile_prefix:
                opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
            return opts

        try:
            self.session = ort.InferenceSession(
                str(artifact.path("model")), options(profile), providers=providers
            )
            self.commit_session = ort.InferenceSession(
                str(artifact.path("commit")), options(), providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise MedusaError(
                f"ONNX Runtime could not load {artifact.folder}: {str(exc).splitlines()[0]}"
            ) from None
        if device == "cuda" and self.session.get_provider_options().get("CUDAExecutionProvider", {}).get(
            "use_tf32"
        ) not in ("0", None):
            raise MedusaError("ONNX Runtime ignored use_tf32=0: fp32 results would not be exact")
        artifact.check_io(
            "inputs", [(i.name, contract.FROM_ORT.get(i.type, i.type)) for i in self.session.get_inputs()]
        )
        artifact.check_io(
            "outputs", [(o.name, contract.FROM_ORT.get(o.type, o.type)) for o in self.session.get_outputs()]
        )

        def alloc(rows):
            shape = [1, rows, kv_heads, head_dim]
            return ort.OrtValue.ortvalue_from_shape_and_type(
                shape, contract.ONNX_ELEM[self.kv_dtype], device, 0
            )

        n = 2 * self.num_layers
        self.cache = [alloc(self.capacity) for _ in range(n)]
        self.scratch = [alloc(max_nodes) for _ in range(n)]
        self.max_nodes = max_nodes
        self.past_names = contract.past_names(self.num_layers)
        self.present_names, self.kept_names = contract.commit_names(self.num_layers)
        self.io = self.session.io_binding()
        self.commit_io = self.commit_session.io_binding()
        self.last_tokens = 0

    def _bind_kv(self, bind, name: str, value, row: int, rows: int) -> None:
        bind(
            name,
            self.device,
            0,
            contract.ONNX_ELEM[self.kv_dtype],
            [1, rows, *self.kv_tail],
            value.data_ptr() + row * self.row_bytes,
        )

    def forward(self, input_ids, positions, masks, rows, keep_all):
        t = len(input_ids)
        if self.length + t > self.capacity:
            raise MedusaError(f"KV cache full: {self.length} + {t} tokens exceed max_seq {self.capacity}")
        if not keep_all and t > self.max_nodes:
            raise MedusaError(
                f"a tree of {t} nodes exceeds this backend's {self.max_nodes}-node scratch area"
            )
        io = self.io
        bind_token_inputs(io, input_ids, positions, masks, rows)
        for name, value in zip(self.past_names, self.cache):
            self._bind_kv(io.bind_input, name, value, 0, self.length)
        # get_outputs() follows binding order: LOGITS, MEDUSA_LOGITS, NEXT_TOKENS, MEDUSA_TOPK, then KV
        io.bind_output("logits", self.device)
        io.bind_output("medusa_logits", self.device)
        io.bind_output("next_tokens", "cpu")
        io.bind_output("medusa_topk", "cpu")
        for name, value, dest in zip(self.present_names, self.cache, self.scratch):
            target, row = (value, self.length) if keep_all else (dest, 0)
            self._bind_kv(io.bind_output, name, target, row, t)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        self.last_outputs = outs
        if keep_all:
            self.length += t
        self.last_tokens = t
        return StepOutput(
            next_tokens=outs[NEXT_TOKENS].numpy()[0],
            medusa_topk=outs[MEDUSA_TOPK].numpy()[:, 0],
        )

    def commit(self, rows):
        n = len(rows)
        if self.length + n > self.capacity:
            raise MedusaError(f"KV cache full: {self.length} + {n} tokens exceed max_seq {self.capacity}")
        io = self.commit_io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input(contract.COMMIT_ROWS, np.ascontiguousarray(rows, dtype=np.int64))
        for src, dst, scratch, cache in zip(self.present_names, self.kept_names, self.scratch, self.cache):
            self._bind_kv(io.bind_input, src, scratch, 0, self.last_tokens)
            self._bind_kv(io.bind_output, dst, cache, self.length, n)
        self.commit_session.run_with_iobinding(io)
        self.length += n

    def logits(self):
        return self.last_outputs[LOGITS].numpy()[0]
