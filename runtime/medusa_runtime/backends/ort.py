"""ONNX Runtime backend (CPU and CUDA execution providers) over IO binding.

The KV cache is one preallocated OrtValue per layer and kind, [1, capacity, KV, D], on the device.
`past` inputs are bound as the cache's first `length` rows (a contiguous prefix, no copy); new KV
is written by the graph straight into rows [length, length + T) (keep_all) or, for a tree on CUDA, into
a scratch area that the artifact's kv_commit graph gathers from, on the device, into the cache. On the
CPU a tree's KV goes into rows [length, length + T) as well, and commit() moves the accepted rows down
in host memory (nothing to move for a root-first prefix, i.e. any accepted chain): no kv_commit run and
its 2 x layers x 2 bindings a step. Only input ids, masks and the argmax/top-k ids travel between host
and device. On the CPU, the weights ONNX Runtime reads in place from the mapped model.onnx.data (the
embedding table) are released before each prefill (FilePages): a process serving many prompts otherwise
keeps every embedding row any prompt touched resident; and the sidecar's read_in_place bytes are read
sparsely (FilePages.read_sparsely), so that a row's fault maps that row, not a 2 MiB folio around it.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .. import contract
from ..errors import BackendError, MedusaError
from ..file_pages import FilePages
from .base import Backend, StepOutput

LOGITS, MEDUSA_LOGITS, NEXT_TOKENS, MEDUSA_TOPK = range(4)
# The most rows a verify on quantized weights may have on the CPU: up to 16 rows, each row of ONNX Runtime's
# (1.32, MLAS) MatMulNBits is bitwise the one-row product; from 17, even row 0 differs
# (tests/test_cpu_step.py::test_verify_rows_equal_plain_steps_real).
QUANTIZED_CPU_ROWS = 16
# A prompt goes into a CPU session in pieces of this many tokens: a long prompt's activations (the attention
# scores grow with its square) and masks stay small. 1,513 tokens, 4-bit gemma3-270m: peak RSS 794 -> 636
# MiB, prefill time within 3% (BENCHMARKS.md, round 10).
CPU_PREFILL_CHUNK = 512


def run_bound(session, io, run_options=None) -> None:
    """session.run_with_iobinding, its failures (out of device memory, a kernel's error) as a BackendError."""
    try:
        session.run_with_iobinding(io, run_options)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackendError(f"ONNX Runtime failed: {first[:300]}") from exc


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
        release_pages: bool = True,  # CPU only: drop the mapped weights' resident pages per sequence
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
        if device == "cpu" and artifact.sidecar.weights and max_nodes > QUANTIZED_CPU_ROWS:
            raise MedusaError(
                f"a tree of {max_nodes} nodes verifies up to {max_nodes} rows; on quantized weights ONNX Runtime's "
                f"CPU MatMulNBits computes a verify of more than {QUANTIZED_CPU_ROWS} rows differently from a plain "
                f"step, so Medusa would leave plain decoding: use at most {QUANTIZED_CPU_ROWS} nodes "
                f"(e.g. chain0+lookupauto{QUANTIZED_CPU_ROWS - 1})"
            )

        def options(profile_prefix: str | None = None):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
            if profile_prefix:
                opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
            return opts

        release_pages = release_pages and device == "cpu"
        weight_files = [artifact.path("model")] + [
            artifact.folder / n for n in artifact.sidecar.external_data
        ]
        mapped_before = FilePages.mapped(weight_files) if release_pages else set()
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
        self.in_place = device == "cpu"  # a tree's KV into the cache itself (host memory), see commit()
        self.prefill_chunk = CPU_PREFILL_CHUNK if device == "cpu" else 0
        self.scratch = [] if self.in_place else [alloc(max_nodes) for _ in range(n)]
        self.elem = contract.ONNX_ELEM[self.kv_dtype]
        self.cache_ptrs = [v.data_ptr() for v in self.cache]
        self.scratch_ptrs = [v.data_ptr() for v in self.scratch]
        # host views [capacity, row bytes] of the cache (CPU only): commit() moves accepted rows with them
        self.cache_rows = (
            [
                np.frombuffer(
                    (ctypes.c_char * (self.capacity * self.row_bytes)).from_address(p), np.uint8
                ).reshape(self.capacity, self.row_bytes)
                for p in self.cache_ptrs
            ]
            if self.in_place
            else []
        )
        self.max_nodes = max_nodes
        self.past_names = contract.past_names(self.num_layers)
        self.present_names, self.kept_names = contract.commit_names(self.num_layers)
        self.io = self.session.io_binding()
        self.commit_io = self.commit_session.io_binding()
        self.last_tokens = 0
        self.file_pages = FilePages(weight_files, before=mapped_before) if release_pages else None
        if self.file_pages is not None:
            self.file_pages.release()
            self.file_pages.read_sparsely(
                [(artifact.folder / r.file, r.offset, r.length) for r in artifact.sidecar.read_in_place]
            )

    def reset(self) -> None:
        """A new sequence: drop the mapped weights' pages the last one faulted in (see FilePages)."""
        super().reset()
        if self.file_pages is not None:
            self.file_pages.release()

    def _bind_kv(self, bind, names, ptrs, rows: int, offset: int = 0) -> None:
        """Bind each name to rows of its buffer ([1, rows, KV, D] from byte `offset`), a loop of C calls."""
        device, elem, shape = self.device, self.elem, [1, rows, *self.kv_tail]
        for name, ptr in zip(names, ptrs):
            bind(name, device, 0, elem, shape, ptr + offset)

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
        self._bind_kv(io.bind_input, self.past_names, self.cache_ptrs, self.length)
        # get_outputs() follows binding order: LOGITS, MEDUSA_LOGITS, NEXT_TOKENS, MEDUSA_TOPK, then KV
        io.bind_output("logits", self.device)
        io.bind_output("medusa_logits", self.device)
        io.bind_output("next_tokens", "cpu")
        io.bind_output("medusa_topk", "cpu")
        if keep_all or self.in_place:
            self._bind_kv(
                io.bind_output, self.present_names, self.cache_ptrs, t, self.length * self.row_bytes
            )
        else:
            self._bind_kv(io.bind_output, self.present_names, self.scratch_ptrs, t)
        run_bound(self.session, io)
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
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        n = len(rows)
        if self.length + n > self.capacity:
            raise MedusaError(f"KV cache full: {self.length} + {n} tokens exceed max_seq {self.capacity}")
        if n and (rows.min() < 0 or rows.max() >= self.last_tokens):
            raise MedusaError(
                f"commit rows {rows.tolist()} are not rows of the last {self.last_tokens}-token forward"
            )
        if self.in_place:
            # the forward wrote its T rows at [length, length + T): keep the accepted ones, in order, from
            # `length` (the rows are gathered before they are written, so the ranges may overlap)
            if not np.array_equal(rows, np.arange(n)):
                src, dst = self.length + rows, slice(self.length, self.length + n)
                for view in self.cache_rows:
                    view[dst] = view[src]
            self.length += n
            return
        io = self.commit_io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input(contract.COMMIT_ROWS, rows)
        self._bind_kv(io.bind_input, self.present_names, self.scratch_ptrs, self.last_tokens)
        self._bind_kv(io.bind_output, self.kept_names, self.cache_ptrs, n, self.length * self.row_bytes)
        run_bound(self.commit_session, io)
        self.length += n

    def logits(self):
        return self.last_outputs[LOGITS].numpy()[0]

    def draft_confidence(self, row: int) -> np.ndarray:
        """From the heads' logits of the last forward ([K, 1, R, V or N]: over the draft vocabulary when the
        artifact has one), which stay in host memory on the CPU."""
        logits = self.last_outputs[MEDUSA_LOGITS].numpy()[:, 0, row]
        return 1.0 / np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1)
