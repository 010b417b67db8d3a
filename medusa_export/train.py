"""Train Medusa-1 heads on a frozen base model (`medusa-export train`).

Convention (tested in tests/test_train.py): at position t the final-normed hidden state h_t has read
tokens[0..t]; the base model predicts tokens[t+1] from it, and head k (0-indexed) predicts tokens[t+2+k].
The hidden states are the explicit decoder's output (`explicit_model(base)`), the very states the exported
graph feeds the heads. Shared heads are scored through the frozen base lm_head (with the family's logit
soft-capping, as `decoder.project` does); per-head projections start as copies of it and are trained.

`--sequential` trains Hydra-style heads (heads.py): head k at position t also reads tokens[t+1+k].

Loss: sum over heads of w_k * CE_k / sum(w_k), w_k = head_decay**k (0.8 in the Medusa paper; 1 gives the
plain mean), CE_k the mean cross-entropy of head k over its target positions. The vocabulary projection and
its cross-entropy run in chunks of rows with the gradient computed on the fly, so memory stays bounded with
a 262k vocabulary.

Data, by default self-distillation: the base continues the seed prompts of configs/train_seeds.jsonl
(encoded like the runtime encodes prompts: the tokenizer's own special tokens, no chat template). Pass 0
over the prompts is greedy; each later pass samples its first m tokens (temperature tau, min-p 0.05) and
then continues greedily (m = all: fully sampled), which keeps the text close to what greedy decoding sees
at inference while varying it. Every row has its own mode, so one left-padded batch mixes them all. Only
continuation tokens are targets. `--data FILE` gives either a JSONL file (`text`
rows are trained on directly; `prompt` or `turns` rows are continued like the seeds) or a text file of
blank-line-separated documents. `--recipe passages` adds prompts that work on a given text: the base
model first writes passages (news, emails, notes, tables, code, German text...), then continues summaries,
questions, extraction, translation, rewriting and code tasks built on them (`train_recipe.py`).
`--target-tokens N` sizes the self-distillation to about N generated tokens. The held-out split is by
prompt (or document; a bundle of passages for the recipe), so that no continuation of a held-out prompt is
trained on.

Files in --out: `config.json` + `medusa_lm_head.safetensors` (FasterDecoding format, from `save_heads`),
`accuracy.json` (held-out per-head top-1/top-5 and `rank_accuracy` [K][10], plus the run's metadata),
`train_data.pt` (the token ids: reused when the data settings match, and always by --resume) and
`checkpoint.pt` (heads, optimizer, step; written every --save-every steps and at the end), and
`draft_vocab.json` (target token ids by frequency, for `--draft-vocab N` at export).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medusa_runtime.errors import MedusaError

from .fsutil import atomic_file
from .progress import log, stage
from .train_data import (
    MIN_TARGETS,
    TrainData,
    epoch_batches,
    hidden_states,
    make_batch,
    prepare_data,
    split_groups,
)
from .train_objective import (
    IGNORE,
    MAX_RANK,
    draft_remap,
    head_offsets,
    linear_cross_entropy,
    previous_tokens,
    shifted_targets,
    target_ranks,
    to_draft,
)

if TYPE_CHECKING:
    import torch

    from .heads import MedusaHeads
    from .models.common import ExplicitDecoder

CHECKPOINT_FILE, ACCURACY_FILE = "checkpoint.pt", "accuracy.json"


@dataclass
class TrainSettings:
    """Everything `medusa-export train` takes; defaults are sized for gemma3-270m on one H200."""

    model: str
    out: Path
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    sequential: bool = False  # Hydra-style heads: each also reads the token before its target (heads.py)
    data: Path | None = None
    recipe: str = "seeds"  # seeds | passages (see train_recipe.py); without --data
    target_tokens: int = 0  # >0: about this many generated tokens (sets num_samples); 0: num_samples
    resume: bool = False
    device: str = "auto"  # auto | cpu | cuda[:N]
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 32  # sequences per optimizer step
    seq_len: int = 512  # longest training sequence (longer text is split, continuations cut)
    num_samples: int = 8000
    max_new_tokens: int = 192
    gen_batch_size: int = 0  # 0: 1024 on CUDA, 16 on CPU
    holdout: float = 0.1
    seed: int = 0
    head_decay: float = 0.8
    save_every: int = 200
    warmup: float = 0.05  # fraction of steps with a linear learning-rate warm-up (then cosine to zero)
    draft_vocab: int = (
        0  # >0: softmax over the N most frequent target tokens only (export with --draft-vocab N)
    )
    quiet: bool = False
    force: bool = False  # replace heads already in --out


@dataclass
class TrainResult:
    out: Path
    accuracy: dict[str, Any]
    losses: list[float]  # one per optimizer step, this run and resumed ones
    step: int
    regenerated: bool  # False when the data came from the cache


# -------------------------------------------------------------------------------------------- training


@dataclass
class Scorer:
    """How head states become logits: the frozen base projection (shared) or each head's own Linear."""

    heads: MedusaHeads
    lm_head: torch.Tensor  # [V, C] frozen, in the compute dtype ([N, C] rows of a draft vocabulary)
    softcap: float | None
    compute_dtype: torch.dtype
    remap: torch.Tensor | None = None  # [V]: full id -> draft-vocabulary index, IGNORE outside it
    embed: torch.Tensor | None = None  # [V, C] the base token embedding, for sequential heads

    def states(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Head states [K, B, T, C]; a sequential head k at position t reads tokens[t + 1 + k], the true token
        before its target (teacher forcing; the exported graphs give it the previous head's top-1)."""
        if not self.heads.sequential:
            return self.heads.head_states(hidden)
        prev = previous_tokens(tokens, self.heads.num_heads)
        return self.heads.head_states(hidden, self.embed[prev].to(hidden.dtype))

    def draft_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets as indices of the draft vocabulary (IGNORE where absent); unchanged without one."""
        return targets if self.remap is None else to_draft(targets, self.remap)

    def weight(self, k: int) -> torch.Tensor:
        if self.heads.shared_lm_head:
            return self.lm_head
        return self.heads.heads[k][self.heads.num_layers].weight

    def loss(
        self, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, head_decay: float
    ) -> tuple[torch.Tensor, int]:
        """The heads' weighted cross-entropy (see the module docstring) and the number of targets."""
        import torch

        states = self.states(hidden, tokens)  # [K, B, T, C]
        targets = self.draft_targets(targets)
        decay = [head_decay**k for k in range(self.heads.num_heads)]
        valid = targets != IGNORE  # [K, B, T]
        counts = valid.flatten(1).sum(-1).tolist()
        used = [k for k, count in enumerate(counts) if count]
        if not used:
            return hidden.new_zeros(()), 0
        norm = sum(decay[k] for k in used)
        rows = [states[k][valid[k]] for k in used]
        labels = [targets[k][valid[k]] for k in used]
        weights = [
            x.new_full((len(x),), decay[k] / (counts[k] * norm)) for k, x in zip(used, rows, strict=True)
        ]
        if self.heads.shared_lm_head:  # one chunked pass over the rows of all heads
            loss = linear_cross_entropy(
                torch.cat(rows),
                self.lm_head,
                torch.cat(labels),
                torch.cat(weights),
                self.softcap,
                self.compute_dtype,
            )
        else:
            loss = sum(
                linear_cross_entropy(x, self.weight(k), y, w, None, self.compute_dtype)
                for k, x, y, w in zip(used, rows, labels, weights, strict=True)
            )
        return loss, sum(counts)

    def ranks(self, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """Per head, the rank of the correct token at each target position (MAX_RANK: outside the draft
        vocabulary, so never proposed)."""
        import torch

        states = self.states(hidden, tokens)
        drafted = self.draft_targets(targets)
        out = []
        for i in range(self.heads.num_heads):
            valid = targets[i] != IGNORE
            inside = drafted[i][valid] != IGNORE
            weight = self.weight(i).detach().to(self.compute_dtype)
            ranks = torch.full((int(valid.sum()),), MAX_RANK, dtype=torch.long, device=states.device)
            ranks[inside] = target_ranks(states[i][valid][inside], weight, drafted[i][valid][inside])
            out.append(ranks)
        return out


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of steps, then cosine decay to zero."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def init_heads(decoder: ExplicitDecoder, settings: TrainSettings) -> MedusaHeads:
    """Fresh heads: zero residual blocks (each head starts as the base prediction), own projections
    (when not shared) copied from the base lm_head."""
    import torch

    from .heads import MedusaHeads

    cfg = decoder.cfg
    heads = MedusaHeads(
        cfg.hidden_size,
        cfg.vocab_size,
        settings.num_heads,
        settings.num_layers,
        settings.shared_lm_head,
        settings.sequential,
    )
    if not settings.shared_lm_head:
        with torch.no_grad():
            for head in heads.heads:
                head[settings.num_layers].weight.copy_(decoder.lm_head_weight().float())
    return heads


def save_checkpoint(path: Path, heads, optimizer, step: int, losses: list[float], meta: dict) -> None:
    import torch

    state = {
        "heads": heads.checkpoint_state(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "losses": losses,
        "meta": json.dumps(meta),
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, heads, optimizer, meta: dict) -> tuple[int, list[float]]:
    """Restore heads and optimizer from `path`; returns (step, losses). The layout must match."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["meta"])
    except Exception as error:
        raise MedusaError(f"cannot read checkpoint {path}: {error}") from error
    different = sorted(k for k in meta if saved.get(k) != meta[k])
    if different:
        raise MedusaError(
            f"--resume: {path} was trained with other settings ({', '.join(different)}: "
            f"{', '.join(f'{saved.get(k)!r} vs {meta[k]!r}' for k in different)})"
        )
    heads.load_checkpoint_state(state["heads"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def run_training(
    decoder: ExplicitDecoder,
    scorer: Scorer,
    data: TrainData,
    train_idx: list[int],
    settings: TrainSettings,
    device,
    pad: int,
) -> tuple[int, list[float], dict[str, Any]]:
    """The optimizer loop, resumable; returns (step, losses, stats)."""
    import torch
    from tqdm import tqdm

    heads = scorer.heads
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train_idx) / settings.batch_size)  # batches per epoch (the last may be short)
    total = per_epoch * settings.epochs
    ckpt_meta = {
        "model": settings.model,
        "num_heads": settings.num_heads,
        "num_layers": settings.num_layers,
        "shared_lm_head": settings.shared_lm_head,
        **({"sequential": True} if settings.sequential else {}),  # older checkpoints lack the key
        "data": data.key,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "holdout": settings.holdout,
    }
    step, losses = 0, []
    ckpt = settings.out / CHECKPOINT_FILE
    if settings.resume and ckpt.is_file():
        step, losses = load_checkpoint(ckpt, heads, optimizer, ckpt_meta)
        log(f"resuming from step {step} of {total}", settings.quiet)
    elif settings.resume:
        log(f"no checkpoint in {settings.out}: starting from scratch", settings.quiet)
    offsets = head_offsets(heads.num_heads)
    tokens, start, first_step = 0, time.perf_counter(), step
    bar = tqdm(
        total=total,
        initial=min(step, total),
        desc="training",
        unit="step",
        disable=settings.quiet,
        file=sys.stderr,
    )
    heads.train()
    for epoch in range(step // max(1, per_epoch), settings.epochs):
        batches = epoch_batches(train_idx, settings.batch_size, settings.seed, epoch)
        for batch_indices in batches[step % per_epoch :]:  # a resumed epoch skips its done batches
            batch = make_batch(data, batch_indices, pad, device)
            hidden = hidden_states(decoder, batch.tokens)
            targets = shifted_targets(batch.tokens, batch.lengths, batch.starts, offsets)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, settings.lr, settings.warmup)
            loss, count = scorer.loss(hidden, batch.tokens, targets, settings.head_decay)
            optimizer.zero_grad(set_to_none=True)
            if count:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            step += 1
            tokens += count
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
            if settings.save_every and step % settings.save_every == 0:
                save_checkpoint(ckpt, heads, optimizer, step, losses, ckpt_meta)
    bar.close()
    heads.eval()
    save_checkpoint(ckpt, heads, optimizer, step, losses, ckpt_meta)
    seconds = time.perf_counter() - start
    stats = {
        "steps_this_run": step - first_step,
        "head_targets_this_run": tokens,
        "training_s": round(seconds, 2),
        "head_targets_per_s": round(tokens / max(seconds, 1e-9), 1),
    }
    if step > first_step:
        log(
            f"trained {step - first_step} steps in {seconds:.1f}s ({stats['head_targets_per_s']:.0f} "
            "head targets/s)",
            settings.quiet,
        )
    return step, losses, stats


def evaluate(
    decoder: ExplicitDecoder,
    scorer: Scorer,
    data: TrainData,
    eval_idx: list[int],
    settings: TrainSettings,
    device,
    pad: int,
) -> dict[str, Any]:
    """Per-head top-1, top-5 and rank_accuracy [K][MAX_RANK] on the given sequences, and the base model's
    own top-1 on the same positions' next tokens (about 1 on greedy self-distilled text)."""
    import torch

    k = scorer.heads.num_heads
    counts = torch.zeros(k, MAX_RANK, dtype=torch.long)
    totals = torch.zeros(k, dtype=torch.long)
    base_hits = base_total = 0
    lm_head = decoder.lm_head_weight().detach()
    for indices in epoch_batches(eval_idx, settings.batch_size, settings.seed, -1):
        batch = make_batch(data, indices, pad, device)
        hidden = hidden_states(decoder, batch.tokens)
        targets = shifted_targets(batch.tokens, batch.lengths, batch.starts, head_offsets(k))
        with torch.no_grad():
            for i, ranks in enumerate(scorer.ranks(hidden, batch.tokens, targets)):
                totals[i] += len(ranks)
                counts[i] += torch.bincount(ranks.clamp(max=MAX_RANK), minlength=MAX_RANK + 1)[
                    :MAX_RANK
                ].cpu()
            nxt = shifted_targets(batch.tokens, batch.lengths, batch.starts, [1])[0]
            valid = nxt != IGNORE
            base_ranks = target_ranks(hidden[valid], lm_head, nxt[valid])
        base_hits += int((base_ranks == 0).sum())
        base_total += len(base_ranks)
    denom = totals.clamp(min=1).double()[:, None]
    rank_acc = (counts.double() / denom).tolist()
    return {
        "rank_accuracy": [[round(p, 6) for p in row] for row in rank_acc],
        "top1": [round(row[0], 6) for row in rank_acc],
        "top5": [round(sum(row[:5]), 6) for row in rank_acc],
        "eval_targets": totals.tolist(),
        "base_top1": round(base_hits / max(1, base_total), 6),
    }


# ---------------------------------------------------------------------------------------------- driver


def resolve_device(device: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MedusaError(f"--device {device}: CUDA is not available here (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise MedusaError(f"unknown --device {device!r}: use cpu, cuda or cuda:N")
    return torch.device(device)


def check_settings(settings: TrainSettings) -> None:
    positive = {
        name: getattr(settings, name)
        for name in ("num_heads", "num_layers", "epochs", "batch_size", "num_samples", "max_new_tokens")
    }
    bad = [f"--{name.replace('_', '-')} {value}" for name, value in positive.items() if value < 1]
    if bad:
        raise MedusaError(f"{', '.join(bad)}: must be at least 1")
    if settings.seq_len < MIN_TARGETS + 1:
        raise MedusaError(f"--seq-len {settings.seq_len}: must be at least {MIN_TARGETS + 1}")
    if not 0.0 <= settings.holdout < 1.0:
        raise MedusaError(f"--holdout {settings.holdout}: must be in [0, 1)")
    if not (math.isfinite(settings.lr) and settings.lr > 0):
        raise MedusaError(f"--lr {settings.lr}: must be a positive number")
    if not (math.isfinite(settings.head_decay) and 0 < settings.head_decay <= 1):
        raise MedusaError(f"--head-decay {settings.head_decay}: must be in (0, 1]")
    if not (math.isfinite(settings.warmup) and 0 <= settings.warmup < 1):
        raise MedusaError(f"--warmup {settings.warmup}: must be in [0, 1)")
    check_train_out(settings.out, settings.resume or settings.force)
    if settings.recipe not in ("seeds", "passages"):
        raise MedusaError(f"unknown --recipe {settings.recipe!r}: use seeds or passages")
    if settings.recipe != "seeds" and settings.data is not None:
        raise MedusaError(f"--recipe {settings.recipe} makes its own data: drop --data (or the recipe)")
    if settings.target_tokens < 0:
        raise MedusaError(f"--target-tokens {settings.target_tokens}: must be 0 (use --num-samples) or more")
    if settings.data is not None and not settings.data.is_file():
        raise MedusaError(f"--data file not found: {settings.data}")
    if settings.draft_vocab and not settings.shared_lm_head:
        raise MedusaError("--draft-vocab trains through the shared lm_head: drop --no-shared-lm-head")
    if settings.dtype not in ("auto", "fp32", "fp16", "bf16"):
        raise MedusaError(f"unknown --dtype {settings.dtype!r}: use auto, fp32, fp16 or bf16")


def check_train_out(out: Path, replace: bool) -> None:
    """--out is a new or empty folder, or an earlier run's (its heads replaced only with --force/--resume)."""
    from .heads import CONFIG_FILE
    from .train_data import DATA_FILE

    if out.exists() and not out.is_dir():
        raise MedusaError(f"--out {out} exists and is not a folder: train writes a heads folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = {CONFIG_FILE, ACCURACY_FILE, CHECKPOINT_FILE, DATA_FILE}
    if not ours & {p.name for p in out.iterdir()}:
        raise MedusaError(
            f"--out {out} is a non-empty folder that no training run wrote: refusing to write into it"
        )
    if (out / CONFIG_FILE).is_file() and not replace:
        raise MedusaError(f"--out {out} already holds heads: pass --force to replace them (or --resume)")


def train(settings: TrainSettings) -> TrainResult:
    """Make or reuse the data, train (or resume), evaluate on the held-out split, write the heads."""
    import torch

    from .draft_vocab import write_draft_vocab
    from .heads import save_heads
    from .models import explicit_model, load_base

    check_settings(settings)
    wall = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = settings.dtype if settings.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    gen_batch = settings.gen_batch_size or (1024 if device.type == "cuda" else 16)
    torch.manual_seed(settings.seed)
    with stage(f"loading {settings.model} ({dtype}) on {device}", settings.quiet):
        base = load_base(settings.model, dtype)
        base.hf.to(device).requires_grad_(False)
        decoder = explicit_model(base).to(device)
    settings.out.mkdir(parents=True, exist_ok=True)
    data, regenerated = prepare_data(base, settings, device, gen_batch)
    ranked = write_draft_vocab(
        settings.out, (seq[start:] for seq, start in zip(data.sequences, data.starts, strict=True))
    )
    train_idx, eval_idx = split_groups(data.groups, settings.holdout, settings.seed)
    heads = init_heads(decoder, settings).to(device)
    lm_head = decoder.lm_head_weight().detach()
    remap = None
    if 0 < min(settings.draft_vocab, len(ranked)) < decoder.cfg.vocab_size:
        # the ids just counted (not a lookup by name: --out may spell a shipped heads folder)
        ids = torch.tensor(ranked[: settings.draft_vocab], dtype=torch.int64, device=device)
        remap = draft_remap(ids, decoder.cfg.vocab_size)
        lm_head = lm_head[ids]
    scorer = Scorer(
        heads,
        lm_head,
        decoder.cfg.final_logit_softcap if settings.shared_lm_head else None,
        lm_head.dtype,
        remap,
        decoder.embed_weight().detach() if settings.sequential else None,
    )
    pad = base.pad_token_id
    step, losses, stats = run_training(decoder, scorer, data, train_idx, settings, device, pad)
    with stage(f"evaluating on {len(eval_idx)} held-out sequences", settings.quiet):
        accuracy = evaluate(decoder, scorer, data, eval_idx, settings, device, pad)
    # heads that rank only a draft vocabulary record its size: export must restrict them to it
    extra = {"draft_vocab": len(lm_head)} if remap is not None else None
    save_heads(heads.cpu().float(), settings.out, settings.model, extra_config=extra)
    accuracy["train"] = _metadata(
        settings, data, train_idx, eval_idx, step, losses, stats, device, dtype, time.perf_counter() - wall
    )
    with atomic_file(settings.out / ACCURACY_FILE) as tmp:
        tmp.write_text(json.dumps(accuracy, indent=1) + "\n")
    return TrainResult(settings.out, accuracy, losses, step, regenerated)


def _metadata(
    settings, data: TrainData, train_idx, eval_idx, step, losses, stats, device, dtype, seconds: float
) -> dict[str, Any]:
    settings_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}
    tail = losses[-max(1, len(losses) // 20) :] if losses else []
    return {
        "data_source": data.key.get("source"),
        "data": data.meta,
        "num_sequences": len(data.sequences),
        "num_tokens": data.num_tokens,
        "train_sequences": len(train_idx),
        "eval_sequences": len(eval_idx),
        "eval_on": "held-out" if set(eval_idx) != set(train_idx) else "train",
        "steps": step,
        "epochs": settings.epochs,
        "first_loss": round(losses[0], 6) if losses else None,
        "final_loss": round(sum(tail) / len(tail), 6) if tail else None,
        "device": str(device) + (f" ({_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": dtype,
        "total_s": round(seconds, 2),
        **stats,
        "settings": settings_dict,
    }


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def format_table(accuracy: dict[str, Any]) -> str:
    """A short per-head table: offset, top-1, top-5 and the first ranks' accuracies."""
    lines = [f"{'head':>4} {'predicts':>8} {'top1':>6} {'top5':>6}  rank accuracy r0..r4"]
    for k, row in enumerate(accuracy["rank_accuracy"]):
        ranks = " ".join(f"{p:.3f}" for p in row[:5])
        lines.append(
            f"{k:>4} {f't+{k + 2}':>8} {accuracy['top1'][k]:>6.3f} {accuracy['top5'][k]:>6.3f}  {ranks}"
        )
    lines.append(f"base model top-1 on the same text (t+1): {accuracy['base_top1']:.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI


_Model = Annotated[
    str, typer.Argument(help="gemma3-270m, tiny-llama|tiny-qwen2|tiny-gemma3, HF folder or .gguf")
]
_Out = Annotated[Path, typer.Option("--out", help="folder for the heads, accuracy.json, data and checkpoint")]
_Data = Annotated[
    Path | None,
    typer.Option(
        "--data", help="JSONL (text | prompt | turns rows) or a text file; default: self-distillation"
    ),
]
_Shared = Annotated[
    bool, typer.Option("--shared-lm-head/--no-shared-lm-head", help="project with the frozen base lm_head")
]


def _opt(name: str, help: str = "") -> Any:
    return typer.Option(name, help=help)


_D = TrainSettings  # defaults


def train_command(
    model: _Model,
    out: _Out,
    num_heads: Annotated[int, _opt("--num-heads", "K: head k predicts the token k+2 ahead")] = _D.num_heads,
    num_layers: Annotated[int, _opt("--num-layers", "residual blocks per head")] = _D.num_layers,
    shared_lm_head: _Shared = _D.shared_lm_head,
    sequential: Annotated[
        bool, _opt("--sequential", "Hydra-style heads: each also reads the token before its target")
    ] = _D.sequential,
    data: _Data = None,
    recipe: Annotated[
        str, _opt("--recipe", "self-distillation prompts: seeds | passages (tasks on self-written passages)")
    ] = _D.recipe,
    target_tokens: Annotated[
        int, _opt("--target-tokens", "about N generated tokens (sets --num-samples); 0: --num-samples")
    ] = _D.target_tokens,
    resume: Annotated[bool, _opt("--resume", "continue from --out's checkpoint and cached data")] = False,
    device: Annotated[str, _opt("--device", "auto | cpu | cuda | cuda:N")] = _D.device,
    dtype: Annotated[
        str, _opt("--dtype", "base model dtype: auto (bf16 on CUDA, else fp32) | fp32 | bf16")
    ] = _D.dtype,
    epochs: Annotated[int, _opt("--epochs")] = _D.epochs,
    lr: Annotated[float, _opt("--lr", "peak AdamW learning rate (linear warm-up, cosine decay)")] = _D.lr,
    batch_size: Annotated[int, _opt("--batch-size", "sequences per optimizer step")] = _D.batch_size,
    seq_len: Annotated[int, _opt("--seq-len", "longest training sequence in tokens")] = _D.seq_len,
    num_samples: Annotated[
        int, _opt("--num-samples", "self-distilled sequences to generate")
    ] = _D.num_samples,
    max_new_tokens: Annotated[int, _opt("--max-new-tokens", "tokens per continuation")] = _D.max_new_tokens,
    gen_batch_size: Annotated[
        int, _opt("--gen-batch-size", "0: 1024 on CUDA, 16 on CPU")
    ] = _D.gen_batch_size,
    holdout: Annotated[float, _opt("--holdout", "held-out fraction of prompts (documents)")] = _D.holdout,
    head_decay: Annotated[float, _opt("--head-decay", "loss weight of head k: decay**k")] = _D.head_decay,
    save_every: Annotated[
        int, _opt("--save-every", "checkpoint every N steps (0: only at the end)")
    ] = _D.save_every,
    seed: Annotated[int, _opt("--seed")] = _D.seed,
    draft_vocab: Annotated[
        int, _opt("--draft-vocab", "softmax over the N most frequent target tokens (fast on CPU; 0: all)")
    ] = _D.draft_vocab,
    quiet: Annotated[bool, _opt("--quiet", "no progress output")] = False,
    force: Annotated[bool, _opt("--force", "replace heads already in --out")] = False,
) -> None:
    """Train Medusa-1 heads on the frozen base model (self-distillation by default); write FasterDecoding
    heads, accuracy.json (top-1, top-5, rank_accuracy per head) and a resumable checkpoint into --out."""
    settings = TrainSettings(
        model=model,
        out=out,
        num_heads=num_heads,
        num_layers=num_layers,
        shared_lm_head=shared_lm_head,
        sequential=sequential,
        data=data,
        recipe=recipe,
        target_tokens=target_tokens,
        resume=resume,
        device=device,
        dtype=dtype,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        gen_batch_size=gen_batch_size,
        holdout=holdout,
        seed=seed,
        head_decay=head_decay,
        save_every=save_every,
        draft_vocab=draft_vocab,
        quiet=quiet,
        force=force,
    )
    result = train(settings)
    meta = result.accuracy["train"]
    typer.echo(format_table(result.accuracy))
    typer.echo(
        f"wrote {result.out} ({meta['steps']} steps, final loss {meta['final_loss']}, "
        f"{meta['total_s']:.0f}s on {meta['device']})"
    )
