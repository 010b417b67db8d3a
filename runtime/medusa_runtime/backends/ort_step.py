"""The fused-step backend: the artifact's step.onnx (one whole greedy Medusa step at fixed shapes) over
ONNX Runtime, replayed as a CUDA graph on the CUDA EP (`ort-cuda-graph`), or run on the CPU EP
(`ort-cpu-step`, the same graph, for tests and CI).

Prefill runs model.onnx (dynamic shapes, no graph) writing the prompt's KV straight into the cache; then
every step runs step.onnx, which reads the cache at full capacity and writes the accepted path's rows
into it on the device. Per tree (its size fixes the graph's symbols through free dimension overrides)
a StepRunner owns a session and fixed device buffers: tree constants, two sets (ping-pong) of
tokens/length buffers and one packed result, bound once to two IoBindings: step k reads set k % 2 and
writes the next step's tokens and length into the other set, so each binding (CUDA graph id) sees the
same addresses every time. The cache is updated in place by default (the graph's ScatterND output is
bound to its input's buffer: ONNX Runtime's ScatterND skips its input copy when the two coincide, and it
runs after every read of that cache); `inplace=False` ping-pongs two caches instead (a full copy per step).
Per step only the packed result (emitted tokens, their count, the last accepted node) crosses to the host;
with prompt-lookup chains in the tree, also the next step's N tokens, to put the lookup's over its nodes.

Several backends in one process (the server's workers are threads): while one thread captures a CUDA graph,
any allocation or synchronous copy from another thread breaks the capture ("operation not permitted when
stream is capturing"). So every backend of this module takes GPU_LOCK: shared for its ordinary work (runs,
replays, copies), exclusive for what allocates or may capture (sessions and buffers, the first runs of a
binding), and those wait for the shared holders to finish their step.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from .. import contract
from ..errors import MedusaError
from .base import Backend, StepOutput
from .ort import bind_token_inputs, execution_providers, run_bound

_NUMPY = {"int64": np.int64, "bool": np.bool_}
LOGITS, MEDUSA_LOGITS, NEXT_TOKENS, MEDUSA_TOPK = range(4)
CAPTURE_RUNS = 4  # runs of a binding that may capture: ONNX Runtime captures after a few warm-up runs


class SharedExclusiveLock:
    """Many holders in shared mode, or one in exclusive mode; a waiting exclusive holder goes first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive requests waiting: new shared holders wait behind them

    @contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


GPU_LOCK = SharedExclusiveLock()


def step_tree_inputs(tree, num_heads: int, topk: int) -> dict[str, np.ndarray]:
    """The step graph's tree constants for `tree`; its tree_indices re-indexed into the graph's flat
    draft [root, head 0 top-`topk`, ..., head K-1 top-`topk`] (the tree's own top-k may be smaller).
    Lookup nodes point at the root: the graph drafts from the heads only, and the host writes the lookup's
    tokens over those nodes before each step (StepRunner.fill_lookup)."""
    if tree.depth > num_heads or tree.topk > topk:
        raise MedusaError(
            f"tree needs {tree.depth} heads / top-{tree.topk}: the artifact has {num_heads} / {topk}"
        )
    idx = np.asarray(tree.tree_indices, dtype=np.int64)
    k = max(tree.topk, 1)
    heads = (idx > 0) & (idx < tree.lookup_start)
    remapped = np.where(heads, 1 + ((idx - 1) // k) * topk + (idx - 1) % k, 0)
    return {
        "depth": np.ascontiguousarray(tree.position_ids, dtype=np.int64),
        "ancestors": np.ascontiguousarray(tree.attention_mask, dtype=np.bool_),
        "retrieve": np.ascontiguousarray(tree.retrieve_indices, dtype=np.int64),
        "tree_indices": remapped.astype(np.int64),
    }


class OrtStepBackend(Backend):
    """Prefill through model.onnx, then fused steps through step.onnx (see the module docstring)."""

    fused = True  # MedusaRuntime runs fused_decode.decode over this backend

    def __init__(
        self,
        artifact,
        device: str = "cuda",
        max_nodes: int = 64,
        threads: int | None = None,
        cuda_graph: bool | None = None,  # default: on for CUDA
        inplace: bool = True,
    ):
        import onnxruntime as ort

        self.ort, self.artifact, self.device = ort, artifact, device
        step = artifact.sidecar.step  # the sidecar's checks pair it with files.step
        if step is None:
            raise MedusaError(
                f"{artifact.folder} has no fused step graph: export it with `medusa-export onnx ... --gpu-step`"
            )
        m = artifact.model
        self.num_layers, self.kv_tail = m["num_layers"], (m["num_kv_heads"], m["head_dim"])
        self.kv_dtype = next(s.dtype for s in step.io.inputs if s.name.startswith("cache_"))
        self.capacity = step.capacity
        self.row_bytes = m["num_kv_heads"] * m["head_dim"] * contract.ITEMSIZE[self.kv_dtype]
        self.cuda_graph = (device == "cuda") if cuda_graph is None else cuda_graph
        self.inplace, self.threads, self.max_nodes = inplace, threads, max_nodes
        execution_providers(
            ort, device, self.kv_dtype, "ort-cuda-graph" if device == "cuda" else "ort-cpu-step"
        )
        if self.cuda_graph and device != "cuda":
            raise MedusaError("CUDA graphs need the CUDA EP")
        self.cache_names, self.updated_names = contract.step_cache_names(self.num_layers)
        with GPU_LOCK.exclusive():
            try:
                self.prefill_session = ort.InferenceSession(
                    str(artifact.path("model")), self._options(), providers=self._providers(False)
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                raise MedusaError(
                    f"ONNX Runtime could not load {artifact.folder}: {str(exc).splitlines()[0]}"
                ) from None
            # zeroed: attention reads the whole capacity (rows >= length masked, but NaN garbage would leak)
            self.caches = [[self._zeros([1, self.capacity, *self.kv_tail]) for _ in self.cache_names]]
            if not inplace:
                self.caches.append([self._zeros([1, self.capacity, *self.kv_tail]) for _ in self.cache_names])
            self.prefill_io = self.prefill_session.io_binding()
        self.runners: dict[tuple, StepRunner] = {}

    # -- sessions and buffers ----------------------------------------------------------------------------
    def _providers(self, graph: bool) -> list:
        return execution_providers(self.ort, self.device, self.kv_dtype, "", cuda_graph=graph)

    def _options(self, dims: dict[str, int] | None = None):
        opts = self.ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        for name, size in (dims or {}).items():
            opts.add_free_dimension_override_by_name(name, size)
        return opts

    def _alloc(self, shape, dtype: str):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape), contract.ONNX_ELEM[dtype], self.device, 0
        )

    def _zeros(self, shape):
        value = self._alloc(shape, self.kv_dtype)
        bits = {4: np.float32, 2: np.uint16}[contract.ITEMSIZE[self.kv_dtype]]  # bf16 as its bit pattern
        value.update_inplace(np.zeros(shape, dtype=bits))
        return value

    def _value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def runner(self, tree) -> StepRunner:
        """The step session and bindings for `tree` (made once per tree)."""
        key = (tree.num_nodes, tree.tree_indices.tobytes(), tree.retrieve_indices.tobytes())
        if key not in self.runners:
            with GPU_LOCK.exclusive():
                self.runners[key] = StepRunner(self, tree)
        return self.runners[key]

    # -- Backend: prefill through model.onnx ------------------------------------------------------------
    def forward(self, input_ids, positions, masks, rows, keep_all):
        """Prefill only (keep_all): the prompt's KV straight into cache set 0 at rows [length, length + T)."""
        if not keep_all:
            raise MedusaError("the fused-step backend verifies trees with step.onnx, not forward()")
        t = len(input_ids)
        if self.length + t > self.capacity:
            raise MedusaError(f"KV cache full: {self.length} + {t} tokens exceed max_seq {self.capacity}")
        io = self.prefill_io
        bind_token_inputs(io, input_ids, positions, masks, rows)
        elem = contract.ONNX_ELEM[self.kv_dtype]
        cache = self.caches[0]
        for name, value in zip(contract.past_names(self.num_layers), cache):
            io.bind_input(name, self.device, 0, elem, [1, self.length, *self.kv_tail], value.data_ptr())
        io.bind_output("logits", self.device)
        io.bind_output("medusa_logits", self.device)
        io.bind_output("next_tokens", "cpu")
        io.bind_output("medusa_topk", "cpu")
        for name, value in zip(contract.past_names(self.num_layers, "present"), cache):
            ptr = value.data_ptr() + self.length * self.row_bytes
            io.bind_output(name, self.device, 0, elem, [1, t, *self.kv_tail], ptr)
        with GPU_LOCK.shared():
            run_bound(self.prefill_session, io)
            outs = io.get_outputs()
            out = StepOutput(
                next_tokens=outs[NEXT_TOKENS].numpy()[0], medusa_topk=outs[MEDUSA_TOPK].numpy()[:, 0]
            )
        self.last_outputs = outs
        self.length += t
        return out

    def commit(self, rows):
        raise MedusaError("the fused-step backend commits the accepted KV inside step.onnx")

    def logits(self):
        with GPU_LOCK.shared():
            return self.last_outputs[LOGITS].numpy()[0]


class StepRunner:
    """step.onnx pinned to one tree: a session, fixed buffers and one IoBinding per parity."""

    def __init__(self, backend: OrtStepBackend, tree):
        self.backend, self.tree = backend, tree
        art = backend.artifact
        consts = step_tree_inputs(tree, art.num_heads, art.topk)
        n, (paths, plen) = tree.num_nodes, tree.retrieve_indices.shape
        self.num_nodes, self.path_len = n, plen
        # plain decoding (root only) runs the variant without the heads when the artifact has it
        self.role = "step_plain" if n == 1 and "step_plain" in art.sidecar.files else "step"
        dims = dict(zip(contract.STEP_SYMBOLS, (n, paths, plen)))
        ort = backend.ort
        try:
            self.session = ort.InferenceSession(
                str(art.path(self.role)),
                backend._options(dims),
                providers=backend._providers(backend.cuda_graph),
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise MedusaError(
                f"ONNX Runtime could not load {art.path(self.role)}: {str(exc).splitlines()[0]}"
            ) from None
        self.consts = {name: backend._value(array) for name, array in consts.items()}
        self.tokens = [backend._alloc([n], "int64") for _ in range(2)]
        self.length = [backend._alloc([1], "int64") for _ in range(2)]
        self.result = backend._alloc([plen + 2], "int64")
        idx = np.asarray(tree.tree_indices)
        self.lookup_nodes = np.flatnonzero(idx >= tree.lookup_start) if tree.lookup_chains else None
        self.lookup_slots = None if self.lookup_nodes is None else idx[self.lookup_nodes] - tree.lookup_start
        caches = backend.caches
        declared = {i.name: i for i in self.session.get_inputs()}  # a GQA plain step drops the tree inputs
        cache_shape = self._cache_shape(declared[backend.cache_names[0]].shape)
        if contract.STEP_TOTAL in declared:  # GroupQueryAttention reads the capacity on the host
            self.total = ort.OrtValue.ortvalue_from_numpy(np.array([backend.capacity], dtype=np.int32))
        elem = contract.ONNX_ELEM[backend.kv_dtype]
        self.bindings, self.run_options = [], []
        for parity in (0, 1):
            io = self.session.io_binding()
            other = 1 - parity
            io.bind_ortvalue_input(contract.STEP_TOKENS, self.tokens[parity])
            io.bind_ortvalue_input(contract.STEP_LENGTH, self.length[parity])
            for name, value in self.consts.items():
                if name in declared:
                    io.bind_ortvalue_input(name, value)
            if contract.STEP_TOTAL in declared:
                io.bind_ortvalue_input(contract.STEP_TOTAL, self.total)
            src = caches[parity % len(caches)]
            dst = caches[other % len(caches)]
            for name, value in zip(backend.cache_names, src):
                io.bind_input(name, backend.device, 0, elem, cache_shape, value.data_ptr())
            io.bind_ortvalue_output(contract.STEP_NEXT_TOKENS, self.tokens[other])
            io.bind_ortvalue_output(contract.STEP_NEXT_LENGTH, self.length[other])
            io.bind_ortvalue_output(contract.STEP_RESULT, self.result)
            for name, value in zip(backend.updated_names, dst):
                io.bind_output(name, backend.device, 0, elem, cache_shape, value.data_ptr())
            self.bindings.append(io)
            ro = ort.RunOptions()
            if backend.cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", str(parity + 1))
            self.run_options.append(ro)
        self.parity = 0
        self.runs = [0, 0]  # per binding: the first CAPTURE_RUNS may capture a CUDA graph

    def _cache_shape(self, declared: list) -> list[int]:
        """The cache shape the graph declares (contract.step_cache_shape): [1, capacity, KV, D], or
        [1, KV, capacity, D] for a GroupQueryAttention plain step, the same bytes only for one KV head."""
        kv, d = self.backend.kv_tail
        shape = list(contract.step_cache_shape(kv, d, self.backend.capacity))
        if kv == 1 and list(declared) == list(contract.step_cache_shape(kv, d, self.backend.capacity, True)):
            return list(declared)
        if list(declared) != shape:
            raise MedusaError(f"{self.role}.onnx declares caches {declared}; this runtime binds {shape}")
        return shape

    def start(self, tokens: np.ndarray) -> None:
        """Begin after a prefill: this step's tree tokens, the cache's length; the cache is set 0."""
        self.parity = 0  # prefill wrote cache set 0, which parity 0 reads
        self.set_tokens(tokens)
        with GPU_LOCK.shared():
            self.length[0].update_inplace(np.array([self.backend.length], dtype=np.int64))

    def set_tokens(self, tokens: np.ndarray) -> None:
        """Replace the next step's tree tokens (a drafter's, instead of the graph's own draft)."""
        with GPU_LOCK.shared():
            self.tokens[self.parity].update_inplace(np.ascontiguousarray(tokens, dtype=np.int64))

    def fill_lookup(self, found: np.ndarray) -> None:
        """Write the lookup's tokens [chains, length] over the next step's lookup nodes (the graph has
        drafted the heads' nodes into the same buffer): a read of the N tokens and a write back."""
        buffer = self.tokens[self.parity]
        with GPU_LOCK.shared():
            tokens = buffer.numpy()
            tokens[self.lookup_nodes] = found.reshape(-1)[self.lookup_slots]
            buffer.update_inplace(tokens)

    def step(self) -> tuple[list[int], int]:
        """One fused step: (emitted tokens, last accepted node)."""
        b = self.backend
        if b.length + self.num_nodes > b.capacity:
            raise MedusaError(
                f"KV cache full: {b.length} + a {self.num_nodes}-node tree exceed max_seq {b.capacity}"
            )
        p = self.parity
        capturing = self.backend.cuda_graph and self.runs[p] < CAPTURE_RUNS
        with GPU_LOCK.exclusive() if capturing else GPU_LOCK.shared():
            run_bound(self.session, self.bindings[p], self.run_options[p])
            result = self.result.numpy()
        self.runs[p] += 1
        count, last = int(result[-2]), int(result[-1])
        b.length += count
        self.parity = 1 - p
        return [int(t) for t in result[:count]], last
