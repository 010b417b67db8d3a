"""Medusa heads (Cai et al. 2024): K residual-block stacks on the base model's last hidden state.

Head k guesses the token k + 2 positions ahead. Checkpoints use the FasterDecoding/Medusa layout: a
folder with `config.json` (optional) and `medusa_lm_head.safetensors` or `medusa_lm_head.pt` holding the
state dict of the heads `ModuleList`, keys `{h}.{l}.linear.weight|bias` and, for per-head projections,
`{h}.{L}.weight`.

Sequential (Hydra-style, Ankner et al. 2024) heads also read the token before their target (trained on the
true one; graph.py drafts with the previous head's top-1, the root for head 0). Head k's blocks then start
from `h + prev_k(E[token])`, with E the base model's token embedding and `prev.{k}.weight` [H, H] one more key
in the same file (zero-initialised, so a fresh sequential head is a Medusa head); `config.json` says
`"sequential": true`. Plain Medusa checkpoints are unchanged.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_export.fsutil import atomic_file
from medusa_runtime.errors import MedusaError

CONFIG_FILE = "config.json"
WEIGHT_FILES = {"safetensors": "medusa_lm_head.safetensors", "pt": "medusa_lm_head.pt"}  # load prefers first
_KEY = re.compile(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)")  # head, index, parameter
_RANDOM_SPEC = re.compile(r"random:([1-9]\d*)(?::([1-9]\d*))?")
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "heads"  # trained heads shipped with the repo
DEFAULT_HEADS = "gemma3-270m-medusa"  # the GPU host's; its trees win where shipped heads share a tree name


def heads_path(spec: str) -> str:
    """A shipped heads name (a folder under heads/, e.g. gemma3-270m-medusa) as its path; other specs unchanged."""
    shipped = SHIPPED_HEADS / spec
    return str(shipped) if spec and "/" not in spec and (shipped / CONFIG_FILE).is_file() else spec


class ResBlock(nn.Module):
    """`x + silu(linear(x))`; zero-initialised by default so a fresh block is the identity."""

    def __init__(self, hidden_size: int, zero_init: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        if zero_init:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        return x + F.silu(self.linear(x).float()).to(x.dtype)  # activation in float32 (bf16/fp16 graphs)


class MedusaHeads(nn.Module):
    """K Medusa heads of L residual blocks each, plus a per-head `Linear(H, V)` unless `shared_lm_head`."""

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        num_heads: int,
        num_layers: int = 1,
        shared_lm_head: bool = True,
        sequential: bool = False,
    ) -> None:
        super().__init__()
        sizes = {
            "hidden_size": hidden_size,
            "vocab_size": vocab_size,
            "num_heads": num_heads,
            "num_layers": num_layers,
        }
        bad = [
            f"{name}={value!r}" for name, value in sizes.items() if not isinstance(value, int) or value < 1
        ]
        if bad:
            raise MedusaError(f"Medusa heads need positive integer sizes, got {', '.join(bad)}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers, self.shared_lm_head = num_heads, num_layers, shared_lm_head
        self.sequential = sequential
        self.heads = nn.ModuleList(
            nn.Sequential(
                *[ResBlock(hidden_size) for _ in range(num_layers)],
                *([] if shared_lm_head else [nn.Linear(hidden_size, vocab_size, bias=False)]),
            )
            for _ in range(num_heads)
        )
        self.prev = nn.ModuleList(
            nn.Linear(hidden_size, hidden_size, bias=False) for _ in range(num_heads if sequential else 0)
        )
        for proj in self.prev:
            nn.init.zeros_(proj.weight)

    def head_states(self, hidden: torch.Tensor, prev_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Residual blocks of every head, no projection: [..., H] -> [K, ..., H]. Sequential heads also take
        `prev_embeds` [K, ..., H], the embedding of the token before each head's target."""
        prev = [None] * self.num_heads if prev_embeds is None or not self.sequential else prev_embeds
        return torch.stack([self.head_state(k, hidden, prev[k]) for k in range(self.num_heads)])

    def head_state(
        self, k: int, hidden: torch.Tensor, prev_embed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Head k's residual blocks: [..., H] -> [..., H]; a sequential head adds prev_k(`prev_embed`) first."""
        if hidden.shape[-1] != self.hidden_size:
            raise MedusaError(
                f"hidden state has size {hidden.shape[-1]}, Medusa heads expect {self.hidden_size}"
            )
        if self.sequential:
            if prev_embed is None or prev_embed.shape != hidden.shape:
                got = None if prev_embed is None else tuple(prev_embed.shape)
                raise MedusaError(
                    "sequential (Hydra-style) heads draft from their parent's token: they need its "
                    f"embedding, shape {tuple(hidden.shape)}, got {got}"
                )
            hidden = hidden + self.prev[k](prev_embed)
        return self.heads[k][: self.num_layers](hidden)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The file's flat state dict: FasterDecoding keys, plus `prev.{k}.weight` for sequential heads."""
        return {**self.heads.state_dict(), **{f"prev.{k}": v for k, v in self.prev.state_dict().items()}}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        self.load_state_dict(
            {k if k.startswith("prev.") else f"heads.{k}": v for k, v in state.items()}, assign=assign
        )

    def logits(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor | None = None,
        prev_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draft logits of every head: [..., H] -> [K, ..., V].

        Shared heads project with the base `lm_head_weight` [V, H] (one matmul over the stacked states);
        per-head projections use each head's own Linear and ignore `lm_head_weight`.
        """
        states = self.head_states(hidden, prev_embeds)  # [K, ..., H]
        if not self.shared_lm_head:
            return torch.stack(
                [head[self.num_layers](state) for head, state in zip(self.heads, states, strict=True)]
            )
        expected = (self.vocab_size, self.hidden_size)
        if lm_head_weight is None or tuple(lm_head_weight.shape) != expected:
            got = None if lm_head_weight is None else tuple(lm_head_weight.shape)
            raise MedusaError(
                f"shared Medusa heads need the base lm_head weight of shape {expected}, got {got}"
            )
        return F.linear(states, lm_head_weight)

    forward = logits


def save_heads(
    heads: MedusaHeads,
    folder: str | os.PathLike[str],
    base_model_name_or_path: str,
    fmt: str = "safetensors",
    extra_config: dict[str, object] | None = None,
) -> Path:
    """Write `config.json` and `medusa_lm_head.<fmt>` into `folder` (FasterDecoding layout); return it.

    Any older weights file in `folder` is replaced; an interrupted save never leaves a half-written or
    mixed checkpoint that loads.
    """
    if fmt not in WEIGHT_FILES:
        raise MedusaError(f"unknown Medusa heads format {fmt!r}; use one of {', '.join(WEIGHT_FILES)}")
    folder = Path(folder)
    config = {
        "medusa_num_heads": heads.num_heads,
        "medusa_num_layers": heads.num_layers,
        "base_model_name_or_path": base_model_name_or_path,
        "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size,
        "shared_lm_head": heads.shared_lm_head,
        **({"sequential": True} if heads.sequential else {}),
        **(extra_config or {}),
    }
    state = {key: value.detach().cpu().contiguous() for key, value in heads.checkpoint_state().items()}
    try:
        _write_checkpoint(folder, config, state, fmt)
    except OSError as error:
        raise MedusaError(f"cannot save Medusa heads to {folder}: {_first_line(error)}") from error
    return folder


def load_heads(
    folder: str | os.PathLike[str], hidden_size: int, vocab_size: int, dtype: torch.dtype = torch.float32
) -> MedusaHeads:
    """Load a FasterDecoding-format heads folder for a base model of the given sizes, checking it first.

    K, L and shared-vs-per-head projection come from the tensor keys; `config.json` is optional but
    must agree when present. Every problem raises a one-line MedusaError; loading itself is strict.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedusaError(f"Medusa heads folder not found: {folder}")
    weights = next((folder / name for name in WEIGHT_FILES.values() if (folder / name).is_file()), None)
    if weights is None:
        raise MedusaError(f"{folder} has no {' or '.join(WEIGHT_FILES.values())}")
    tensors = _read_tensors(weights)
    num_heads, num_layers, shared = _infer_layout(tensors, weights)
    sequential = any(key.startswith("prev.") for key in tensors)
    _check_base_sizes(tensors, weights, hidden_size, vocab_size)
    layout = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers, "shared_lm_head": shared}
    _check_config(
        _read_config(folder / CONFIG_FILE),
        folder / CONFIG_FILE,
        tensors={**layout, "sequential": sequential},
        base_model={"hidden_size": hidden_size, "vocab_size": vocab_size},
    )
    with torch.device("meta"):  # structure and expected shapes only; no allocation
        heads = MedusaHeads(hidden_size, vocab_size, num_heads, num_layers, shared, sequential)
    _check_keys_and_shapes(tensors, heads.checkpoint_state(), weights)
    heads.load_checkpoint_state({key: value.to(dtype) for key, value in tensors.items()}, assign=True)
    return heads


def random_heads(
    num_heads: int,
    hidden_size: int,
    vocab_size: int,
    num_layers: int = 1,
    shared_lm_head: bool = True,
    seed: int = 0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    sequential: bool = False,
) -> MedusaHeads:
    """Seeded heads, every parameter ~ N(0, (scale / sqrt(H))^2): varied, non-identity outputs for tests."""
    heads = MedusaHeads(hidden_size, vocab_size, num_heads, num_layers, shared_lm_head, sequential)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (scale / hidden_size**0.5))
    return heads.to(dtype)


def resolve_heads(
    spec: str, hidden_size: int, vocab_size: int, dtype: torch.dtype = torch.float32, **random_kw: Any
) -> MedusaHeads:
    """Heads from `random:K` or `random:K:L` (extra keywords go to `random_heads`), a shipped name or a folder."""
    spec = heads_path(spec)
    if spec == "random" or spec.startswith("random:"):
        match = _RANDOM_SPEC.fullmatch(spec)
        if match is None:
            raise MedusaError(
                f"bad Medusa heads spec {spec!r}: expected random:K or random:K:L (positive integers)"
            )
        num_layers = int(match[2] or 1)
        return random_heads(int(match[1]), hidden_size, vocab_size, num_layers, dtype=dtype, **random_kw)
    if not spec:
        raise MedusaError("empty Medusa heads spec: give random:K, random:K:L or a heads folder")
    if random_kw:
        raise MedusaError(f"{', '.join(sorted(random_kw))} only apply to random: heads, not to folder {spec}")
    return load_heads(spec, hidden_size, vocab_size, dtype)


def check_finite(heads: MedusaHeads, spec: str) -> None:
    """Refuse heads with NaN or Inf weights (they would export and run, producing garbage drafts)."""
    bad = [name for name, p in heads.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise MedusaError(f"Medusa heads {spec}: {len(bad)} tensor(s) hold NaN or Inf, first {bad[0]}")


def _write_checkpoint(
    folder: Path, config: dict[str, object], state: dict[str, torch.Tensor], fmt: str
) -> None:
    """Weights renamed into place last, after any older weights go: only a complete folder loads."""
    with atomic_file(folder / WEIGHT_FILES[fmt]) as temp_weights:
        if fmt == "safetensors":
            save_file(state, temp_weights, metadata={"format": "pt"})
        else:
            torch.save(state, temp_weights)
        for name in WEIGHT_FILES.values():  # a stale config alone is not loadable
            (folder / name).unlink(missing_ok=True)
        with atomic_file(folder / CONFIG_FILE) as temp_config:
            temp_config.write_text(json.dumps(config, indent=2) + "\n")


def _first_line(error: Exception) -> str:
    return next(iter(str(error).splitlines()), "") or type(error).__name__


def _few(items: Iterable[str], shown: int = 3) -> str:
    """`a, b, c (+2 more)`: names a few items of a possibly long list, in order."""
    items = list(items)
    more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or pickled non-tensor content
        raise MedusaError(f"cannot read {path}: {_first_line(error)}") from error
    if not isinstance(tensors, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in tensors.items()
    ):
        raise MedusaError(f"{path} is not a flat state dict of named tensors")
    return tensors


def _read_config(path: Path) -> dict[str, object]:
    """`config.json` as a dict; empty when absent (some FasterDecoding releases ship only the tensors)."""
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise MedusaError(f"cannot read {path}: {_first_line(error)}") from error
    if not isinstance(config, dict):
        raise MedusaError(f"{path} is not a JSON object")
    return config


def _infer_layout(tensors: dict[str, torch.Tensor], path: Path) -> tuple[int, int, bool]:
    """(num_heads, num_layers, shared_lm_head) from keys like `3.0.linear.weight` and `3.1.weight`."""
    blocks: dict[int, set[int]] = defaultdict(set)  # head -> residual block indices
    projections: dict[int, set[int]] = defaultdict(set)  # head -> projection indices (normally {L})
    for key in tensors:
        if match := _KEY.fullmatch(key):
            (projections if match[3] == "weight" else blocks)[int(match[1])].add(int(match[2]))
    present = sorted(blocks.keys() | projections.keys())
    if not present:
        raise MedusaError(
            f"{path} holds no Medusa head tensors (like 0.0.linear.weight); has {_few(sorted(tensors))}"
        )
    with_projection = [head for head in present if projections[head]]
    if 0 < len(with_projection) < len(present):
        without = [head for head in present if not projections[head]]
        raise MedusaError(
            f"{path}: inconsistent heads: {with_projection} have their own projection, {without} do not"
        )
    layers = {
        head: max(projections[head]) if projections[head] else max(blocks[head]) + 1 for head in present
    }
    if len(set(layers.values())) > 1:
        raise MedusaError(f"{path}: inconsistent heads: residual layer count differs per head {layers}")
    return present[-1] + 1, layers[present[0]], not with_projection


def _check_base_sizes(
    tensors: dict[str, torch.Tensor], path: Path, hidden_size: int, vocab_size: int
) -> None:
    """Hidden size from the block weights [H, H] and vocab from projection rows [V, H] vs the base model."""
    kinds: dict[str, set[int]] = {"linear.weight": set(), "weight": set()}
    for key, tensor in tensors.items():
        if (match := _KEY.fullmatch(key)) and match[3] in kinds and tensor.dim() == 2:
            kinds[match[3]].add(tensor.shape[1 if match[3] == "linear.weight" else 0])
    if kinds["linear.weight"] and hidden_size not in kinds["linear.weight"]:
        raise MedusaError(
            f"{path}: hidden size mismatch: heads have {sorted(kinds['linear.weight'])}, "
            f"base model has {hidden_size}"
        )
    if kinds["weight"] and vocab_size not in kinds["weight"]:
        raise MedusaError(
            f"{path}: vocab size mismatch: head projections have {sorted(kinds['weight'])} rows, "
            f"base model vocab is {vocab_size}"
        )


def _check_config(
    config: dict[str, object], path: Path, tensors: dict[str, object], base_model: dict[str, object]
) -> None:
    """Every value config.json states must match what the tensors or the base model say."""
    for source, values in (("the tensors", tensors), ("the base model", base_model)):
        for key, value in values.items():
            if key in config and config[key] != value:
                raise MedusaError(f"{path}: {key}={config[key]!r} disagrees with {source} ({value!r})")


def _check_keys_and_shapes(
    tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path
) -> None:
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        problems = [
            f"{kind} keys {_few(keys)}"
            for kind, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise MedusaError(f"{path}: {'; '.join(problems)}")
    wrong = [
        f"{key} {tuple(tensor.shape)} (expected {tuple(expected[key].shape)})"
        for key, tensor in tensors.items()
        if tensor.shape != expected[key].shape
    ]
    if wrong:
        raise MedusaError(f"{path}: wrong shapes: {_few(wrong)}")
