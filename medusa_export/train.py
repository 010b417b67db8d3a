"""Train Medusa-1 heads on a frozen base model (`medusa-export train`).

Convention (tested in tests/test_train.py): at position t the final-normed hidden state h_t has read
tokens[0..t]; the base model predicts tokens[t+1] from it, and head k (0-indexed) predicts tokens[t+2+k].
The hidden states are the explicit decoder's output (`explicit_model(base)`), the very states the exported
graph feeds the heads. Shared heads are scored through the frozen base lm_head (with the family's logit
soft-capping, as `decoder.project` does); per-head projections start as copies of it and are trained.

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
blank-line-separated documents. The held-out split is by prompt (or document), so that no continuation of
a held-out prompt is trained on.

Files in --out: `config.json` + `medusa_lm_head.safetensors` (FasterDecoding format, from `save_heads`),
`accuracy.json` (held-out per-head top-1/top-5 and `rank_accuracy` [K][10], plus the run's metadata),
`train_data.pt` (the token ids: reused when the data settings match, and always by --resume) and
`checkpoint.pt` (heads, optimizer, step; written every --save-every steps and at the end), and
`draft_vocab.json` (target token ids by frequency, for `--draft-vocab N` at export).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medusa_runtime.errors import MedusaError

from .fsutil import atomic_file
from .progress import stage

if TYPE_CHECKING:
    import torch

    from .heads import MedusaHeads
    from .models.common import ExplicitDecoder
    from .models.source import BaseModel

IGNORE = -100
MAX_RANK = 10  # columns of rank_accuracy
SEEDS_FILE = Path(__file__).resolve().parent.parent / "configs" / "train_seeds.jsonl"
DATA_FILE, CHECKPOINT_FILE, ACCURACY_FILE = "train_data.pt", "checkpoint.pt", "accuracy.json"
# pass p >= 1 of self-distillation: sample the first m tokens (None: all) at temperature tau, then greedy
SAMPLED_PASSES = ((0.8, 16), (1.0, 8), (0.7, None), (0.9, 32), (1.0, 24), (0.8, None))
MIN_P = 0.05  # sampling keeps the tokens at least this fraction as likely as the most likely one
MIN_TARGETS = 3  # shorter sequences give no head-target


@dataclass
class TrainSettings:
    """Everything `medusa-export train` takes; defaults are sized for gemma3-270m on one H200."""

    model: str
    out: Path
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    data: Path | None = None
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


@dataclass
class TrainData:
    """Token sequences to train on: `starts[i]` is the first index of sequence i that is a target."""

    sequences: list[list[int]]
    starts: list[int]
    groups: list[int]  # prompt or document index, for the held-out split
    key: dict[str, Any]  # the settings that made it: a cached copy is reused only when they match
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclass
class TrainResult:
    out: Path
    accuracy: dict[str, Any]
    losses: list[float]  # one per optimizer step, this run and resumed ones
    step: int
    regenerated: bool  # False when the data came from the cache


# --------------------------------------------------------------------------------------------- targets


def shifted_targets(
    tokens: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, offsets: Sequence[int]
) -> torch.Tensor:
    """Targets [len(offsets), B, T]: row j at position t is tokens[t + offsets[j]], or IGNORE where that
    index is past the sequence's length or before its first target `starts`.

    With offsets (1,) this is the base model's next token; with (2, 3, ..., K+1) the K Medusa heads'.
    """
    import torch

    b, t = tokens.shape
    out = torch.full((len(offsets), b, t), IGNORE, dtype=torch.long, device=tokens.device)
    index = torch.arange(t, device=tokens.device)
    for j, offset in enumerate(offsets):
        if offset >= t:
            continue
        source = index[offset:]  # target indices for positions 0 .. t-offset-1
        valid = (source[None] < lengths[:, None]) & (source[None] >= starts[:, None])
        out[j, :, : t - offset] = torch.where(valid, tokens[:, offset:], IGNORE)
    return out


def head_offsets(num_heads: int) -> list[int]:
    """Head k predicts the token k + 2 positions after the one its hidden state has just read."""
    return [k + 2 for k in range(num_heads)]


# ------------------------------------------------------------------------------ chunked cross-entropy


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk of [rows, vocab] float32 logits: about 2 GiB on CUDA, 64 MiB on CPU."""
    budget = 2**29 if device.type == "cuda" else 2**24
    return max(1, budget // vocab)


@functools.cache
def _linear_ce():
    """The autograd Function behind `linear_cross_entropy` (made on first use: torch imports lazily)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, states, weight, targets, row_weights, softcap, compute_dtype):
            loss, grad_states, grad_weight = _ce_forward(
                states, weight, targets, row_weights, softcap, compute_dtype, weight.requires_grad
            )
            ctx.save_for_backward(grad_states, grad_weight)
            return loss

        @staticmethod
        def backward(ctx, grad_out):
            grad_states, grad_weight = ctx.saved_tensors
            grad_weight = None if grad_weight is None else grad_weight * grad_out
            return grad_states * grad_out, grad_weight, None, None, None, None

    return LinearCrossEntropy


def linear_cross_entropy(
    states: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    softcap: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """sum_i row_weights[i] * CE(softcap(states[i] @ weight.T), targets[i]), chunk by chunk.

    Never holds more than one chunk of [rows, V] logits: the gradients w.r.t. the states (and the weight,
    when it requires grad) are computed in the forward pass and only scaled in backward. The matmuls run
    in `compute_dtype` (default: the weight's), the softmax in float32.
    """
    return _linear_ce().apply(states, weight, targets, row_weights, softcap, compute_dtype or weight.dtype)


def _ce_forward(states, weight, targets, row_weights, softcap, compute_dtype, weight_grad: bool):
    """Loss and gradients, one chunk of rows at a time: logits in `compute_dtype`, softmax in float32,
    the row weights folded into the gradient matmuls (few full passes over the [rows, V] chunk)."""
    import torch

    chunk = _chunk_rows(weight.shape[0], states.device)
    w = weight.detach().to(compute_dtype)
    loss = torch.zeros((), dtype=torch.float32, device=states.device)
    grad_states = torch.empty_like(states, dtype=torch.float32)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=w.device) if weight_grad else None
    for i in range(0, states.shape[0], chunk):
        x = states[i : i + chunk].detach().to(compute_dtype)
        y, rw = targets[i : i + chunk], row_weights[i : i + chunk, None]
        rows = torch.arange(len(y), device=y.device)
        z = x @ w.t()  # [r, V]
        if softcap:
            tanh = torch.tanh(z.float() / softcap)
            z = tanh * softcap
        grad = torch.softmax(z, dim=-1, dtype=torch.float32)  # becomes d loss / d z
        loss -= (torch.log(grad[rows, y].clamp_min(1e-38)) * rw[:, 0]).sum()
        grad[rows, y] -= 1.0
        if softcap:
            grad.mul_(1.0 - tanh * tanh)
        grad = grad.to(compute_dtype)
        grad_states[i : i + chunk] = (grad @ w).float() * rw
        if grad_weight is not None:
            grad_weight += (grad.t() @ (x * rw.to(compute_dtype))).float()
    return loss, grad_states, grad_weight


def target_ranks(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each row's target among its logits `states @ weight.T` (0: the top token), chunked."""
    import torch

    chunk = _chunk_rows(weight.shape[0], states.device)
    ranks = []
    with torch.no_grad():
        for i in range(0, states.shape[0], chunk):
            z = (states[i : i + chunk].to(weight.dtype) @ weight.t()).float()
            target = z.gather(1, targets[i : i + chunk, None])
            ranks.append((z > target).sum(-1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=states.device)


# ----------------------------------------------------------------------------------------------- data


def load_seed_prompts(path: Path = SEEDS_FILE) -> list[str]:
    """The `prompt` of each row of the seeds JSONL file."""
    rows = _read_jsonl(path)
    prompts = [row.get("prompt") for row in rows]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise MedusaError(f"{path}: every row needs a non-empty `prompt` string")
    return prompts


def read_data_file(path: Path) -> tuple[str, list[str]]:
    """("texts", documents) or ("prompts", prompts) from a JSONL file (`text`, `prompt` or `turns` rows)
    or a plain text file of blank-line-separated documents."""
    if not path.is_file():
        raise MedusaError(f"--data file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
        if rows and all(isinstance(r.get("text"), str) for r in rows):
            return "texts", [r["text"] for r in rows if r["text"].strip()]
        prompts = [_row_prompt(r) for r in rows]
        if not prompts or not all(prompts):
            raise MedusaError(
                f"{path}: each JSONL row needs a `text`, a `prompt` or a non-empty `turns` list"
            )
        return "prompts", prompts
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MedusaError(f"cannot read --data file {path}: {error}") from error
    docs = [block.strip() for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]
    if not docs:
        raise MedusaError(f"--data file {path} holds no text")
    return "texts", docs


def _row_prompt(row: dict[str, Any]) -> str | None:
    prompt = row.get("prompt")
    if prompt is None and isinstance(row.get("turns"), list) and row["turns"]:
        prompt = row["turns"][0]
    return prompt if isinstance(prompt, str) and prompt.strip() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise MedusaError(f"file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise MedusaError(f"{path}:{number}: not JSON: {error}") from error
        if not isinstance(row, dict):
            raise MedusaError(f"{path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def text_sequences(tokenizer, docs: list[str], seq_len: int) -> TrainData:
    """Tokenized documents cut into windows of `seq_len` tokens, every token a target."""
    sequences, groups = [], []
    for index, doc in enumerate(docs):
        ids = tokenizer.encode(doc).ids
        for i in range(0, len(ids), seq_len):
            if len(ids[i : i + seq_len]) >= MIN_TARGETS:
                sequences.append(ids[i : i + seq_len])
                groups.append(index)
    if not sequences:
        raise MedusaError("the --data documents are too short to train on")
    return TrainData(sequences, [0] * len(sequences), groups, {})


@dataclass(frozen=True)
class GenJob:
    prompt: int  # index into the prompt list
    temperature: float | None  # None: greedy
    sampled_tokens: int | None  # sample this many tokens, then greedy; None: sample all


def generation_jobs(num_prompts: int, num_samples: int, seed: int) -> list[GenJob]:
    """`num_samples` continuations: pass 0 over the (shuffled) prompts greedy, later passes sampled."""
    order = list(range(num_prompts))
    random.Random(seed).shuffle(order)
    jobs = []
    for i in range(num_samples):
        p = i // num_prompts
        temperature, sampled = SAMPLED_PASSES[(p - 1) % len(SAMPLED_PASSES)] if p else (None, None)
        jobs.append(GenJob(order[i % num_prompts], temperature, sampled))
    return jobs


@functools.cache
def _row_sampling_class():
    from transformers import LogitsProcessor

    class RowSampling(LogitsProcessor):
        """Each row's own sampling mode within one batched `generate(do_sample=True)`: row i samples its
        first `sampled[i]` tokens at `temperature[i]` with min-p filtering, then keeps only its argmax, so
        that it continues greedily (a greedy row has sampled[i] = 0)."""

        def __init__(self, prompt_width: int, temperature, sampled) -> None:
            self.prompt_width, self.temperature, self.sampled = prompt_width, temperature, sampled

        def __call__(self, input_ids, scores):
            import torch

            scores = scores.float() / self.temperature[:, None]
            top = scores.argmax(-1, keepdim=True)  # the first of tied maxima, as greedy decoding picks
            keep = scores >= scores.gather(1, top) + math.log(MIN_P)  # min-p, in logit space
            greedy = (self.sampled <= input_ids.shape[1] - self.prompt_width)[:, None]
            keep = torch.where(greedy, torch.zeros_like(keep).scatter_(1, top, True), keep)
            return scores.masked_fill(~keep, -math.inf)

    return RowSampling


def generate_batch(
    base: BaseModel, prompts: list[list[int]], jobs: list[GenJob], max_new_tokens: int, device
) -> list[list[int]]:
    """Continue left-padded prompts with transformers' generate, each row in its job's sampling mode;
    each result is cut after its first EOS."""
    import torch
    from transformers import LogitsProcessorList

    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    temperature = torch.tensor([j.temperature or 1.0 for j in jobs], device=device)
    sampled = [
        0 if j.temperature is None else max_new_tokens if j.sampled_tokens is None else j.sampled_tokens
        for j in jobs
    ]
    processor = _row_sampling_class()(width, temperature, torch.tensor(sampled, device=device))
    with torch.no_grad():
        out = base.hf.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=True,  # sampling modes are the processor's: no other warper
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            logits_processor=LogitsProcessorList([processor]),
            pad_token_id=pad,
            eos_token_id=base.eos_token_ids or None,
        )
    results = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in base.eos_token_ids), len(row))
        results.append(row[:end])
    return results


def self_distill(
    base: BaseModel, prompts: list[str], settings: TrainSettings, device, gen_batch: int
) -> TrainData:
    """Sequences = prompt + the base model's own continuation; only the continuation is a target."""
    import torch
    from tqdm import tqdm

    encoded = [base.tokenizer.encode(p).ids[: max(1, settings.seq_len - MIN_TARGETS)] for p in prompts]
    jobs = generation_jobs(len(prompts), settings.num_samples, settings.seed)
    jobs.sort(key=lambda job: len(encoded[job.prompt]))  # similar prompt lengths share a batch
    batches = [jobs[i : i + gen_batch] for i in range(0, len(jobs), gen_batch)]
    sequences, starts, groups, generated = [], [], [], 0
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="generating", unit="seq", disable=settings.quiet, file=sys.stderr)
    for number, batch in enumerate(batches):
        torch.manual_seed(settings.seed * 100_003 + number)
        outs = generate_batch(
            base, [encoded[j.prompt] for j in batch], batch, settings.max_new_tokens, device
        )
        for job, new in zip(batch, outs, strict=True):
            prompt = encoded[job.prompt]
            generated += len(new)
            if len(new) >= MIN_TARGETS:
                sequences.append((prompt + new)[: settings.seq_len])
                starts.append(len(prompt))
                groups.append(job.prompt)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    if not sequences:
        raise MedusaError("the base model produced no continuation long enough to train on (EOS at once?)")
    meta = {
        "generated_tokens": generated,
        "generation_s": round(seconds, 2),
        "generation_tok_s": round(generated / max(seconds, 1e-9), 1),
    }
    _log(
        f"generated {generated} tokens in {seconds:.1f}s ({meta['generation_tok_s']:.0f} tokens/s)",
        settings.quiet,
    )
    return TrainData(sequences, starts, groups, {}, meta)


def data_key(settings: TrainSettings) -> dict[str, Any]:
    """What the training data depends on: a cached copy with the same key is reused."""
    source = "seeds:" + str(SEEDS_FILE) if settings.data is None else "file:" + str(settings.data.resolve())
    path = SEEDS_FILE if settings.data is None else settings.data
    stat = path.stat() if path.is_file() else None
    return {
        "model": settings.model,
        "source": source,
        "source_size": stat.st_size if stat else None,
        "source_mtime": int(stat.st_mtime) if stat else None,
        "num_samples": settings.num_samples,
        "max_new_tokens": settings.max_new_tokens,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
    }


def save_data(data: TrainData, path: Path) -> None:
    import torch

    flat = [t for s in data.sequences for t in s]
    payload = {
        "tokens": torch.tensor(flat, dtype=torch.int32),
        "lengths": torch.tensor([len(s) for s in data.sequences], dtype=torch.int64),
        "starts": torch.tensor(data.starts, dtype=torch.int64),
        "groups": torch.tensor(data.groups, dtype=torch.int64),
        "key": json.dumps(data.key),
        "meta": json.dumps(data.meta),
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_data(path: Path) -> TrainData:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        lengths = payload["lengths"].tolist()
        flat = payload["tokens"].tolist()
        offsets = [0, *itertools.accumulate(lengths)]
        sequences = [flat[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
        return TrainData(
            sequences,
            payload["starts"].tolist(),
            payload["groups"].tolist(),
            json.loads(payload["key"]),
            json.loads(payload["meta"]),
        )
    except Exception as error:
        raise MedusaError(
            f"cannot read cached training data {path}: {error}; delete it to regenerate"
        ) from error


def prepare_data(base: BaseModel, settings: TrainSettings, device, gen_batch: int) -> tuple[TrainData, bool]:
    """The training data from the cache in --out when its key matches, else made now (and cached).
    Returns (data, made_now)."""
    key = data_key(settings)
    path = settings.out / DATA_FILE
    if path.is_file():
        cached = load_data(path)
        if cached.key == key:
            _log(f"reusing {len(cached.sequences)} cached sequences from {path}", settings.quiet)
            return cached, False
        if settings.resume:
            changed = sorted(k for k in key if cached.key.get(k) != key[k])
            raise MedusaError(
                f"--resume: the cached data in {path} was made with other settings "
                f"({', '.join(changed)}); drop --resume to start over"
            )
    if settings.data is not None:
        kind, items = read_data_file(settings.data)
    else:
        kind, items = "prompts", load_seed_prompts()
    if kind == "texts":
        data = text_sequences(base.tokenizer, items, settings.seq_len)
    else:
        with stage(
            f"self-distillation: {settings.num_samples} continuations of {len(items)} prompts, "
            f"{settings.max_new_tokens} new tokens each",
            settings.quiet,
        ):
            data = self_distill(base, items, settings, device, gen_batch)
    data.key = key
    data.meta.update(source=key["source"], kind=kind, num_items=len(items))
    save_data(data, path)
    return data, True


def split_groups(groups: list[int], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) sequence indices; whole groups (prompts, documents) go to one side.
    With holdout 0, or a single group, the held-out side is the training data itself."""
    distinct = sorted(set(groups))
    random.Random(seed + 1).shuffle(distinct)
    n_eval = min(len(distinct) - 1, max(1, round(holdout * len(distinct)))) if holdout > 0 else 0
    held = set(distinct[:n_eval])
    train = [i for i, g in enumerate(groups) if g not in held]
    evaluate = [i for i, g in enumerate(groups) if g in held]
    return train, (evaluate or train)


# ------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] right-padded
    lengths: torch.Tensor  # [B]
    starts: torch.Tensor  # [B]


def make_batch(data: TrainData, indices: list[int], pad: int, device) -> Batch:
    import torch

    width = max(len(data.sequences[i]) for i in indices)
    tokens = torch.full((len(indices), width), pad, dtype=torch.long)
    for row, i in enumerate(indices):
        tokens[row, : len(data.sequences[i])] = torch.tensor(data.sequences[i])
    lengths = torch.tensor([len(data.sequences[i]) for i in indices])
    starts = torch.tensor([data.starts[i] for i in indices])
    return Batch(tokens.to(device), lengths.to(device), starts.to(device))


def epoch_batches(indices: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a seeded shuffle, the same again on --resume."""
    order = list(indices)
    random.Random(seed * 7919 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def hidden_states(decoder: ExplicitDecoder, tokens: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states [B, T, C] in float32: the explicit decoder, causal masks, no cache."""
    import numpy as np
    import torch

    from medusa_runtime.masks import causal, step_masks

    from .models.common import empty_past

    b, t = tokens.shape
    full, sliding = step_masks(0, np.arange(t), causal(t), decoder.cfg.sliding_window)
    device, dtype = tokens.device, decoder.lm_head_weight().dtype
    positions = torch.arange(t, device=device).expand(b, t)
    sliding_mask = None if sliding is None else torch.from_numpy(sliding).to(device)
    with torch.no_grad():
        hidden, _ = decoder(
            tokens,
            positions,
            torch.from_numpy(full).to(device),
            sliding_mask,
            empty_past(decoder.cfg, b, dtype, device),
        )
    return hidden.float()


# -------------------------------------------------------------------------------------------- training


@dataclass
class Scorer:
    """How head states become logits: the frozen base projection (shared) or each head's own Linear."""

    heads: MedusaHeads
    lm_head: torch.Tensor  # [V, C] frozen, in the compute dtype ([N, C] rows of a draft vocabulary)
    softcap: float | None
    compute_dtype: torch.dtype
    remap: torch.Tensor | None = None  # [V]: full id -> draft-vocabulary index, IGNORE outside it

    def draft_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets as indices of the draft vocabulary (IGNORE where absent); unchanged without one."""
        import torch

        if self.remap is None:
            return targets
        return torch.where(targets != IGNORE, self.remap[targets.clamp(min=0)], IGNORE)

    def weight(self, k: int) -> torch.Tensor:
        if self.heads.shared_lm_head:
            return self.lm_head
        return self.heads.heads[k][self.heads.num_layers].weight

    def loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, head_decay: float
    ) -> tuple[torch.Tensor, int]:
        """The heads' weighted cross-entropy (see the module docstring) and the number of targets."""
        import torch

        states = self.heads.head_states(hidden)  # [K, B, T, C]
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

    def ranks(self, hidden: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """Per head, the rank of the correct token at each target position (MAX_RANK: outside the draft
        vocabulary, so never proposed)."""
        import torch

        states = self.heads.head_states(hidden)
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
        cfg.hidden_size, cfg.vocab_size, settings.num_heads, settings.num_layers, settings.shared_lm_head
    )
    if not settings.shared_lm_head:
        with torch.no_grad():
            for head in heads.heads:
                head[settings.num_layers].weight.copy_(decoder.lm_head_weight().float())
    return heads


def save_checkpoint(path: Path, heads, optimizer, step: int, losses: list[float], meta: dict) -> None:
    import torch

    state = {
        "heads": heads.heads.state_dict(),
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
    heads.heads.load_state_dict(state["heads"])
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
    per_epoch = len(epoch_batches(train_idx, settings.batch_size, settings.seed, 0))
    total = per_epoch * settings.epochs
    ckpt_meta = {
        "model": settings.model,
        "num_heads": settings.num_heads,
        "num_layers": settings.num_layers,
        "shared_lm_head": settings.shared_lm_head,
        "data": data.key,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "holdout": settings.holdout,
    }
    step, losses = 0, []
    ckpt = settings.out / CHECKPOINT_FILE
    if settings.resume and ckpt.is_file():
        step, losses = load_checkpoint(ckpt, heads, optimizer, ckpt_meta)
        _log(f"resuming from step {step} of {total}", settings.quiet)
    elif settings.resume:
        _log(f"no checkpoint in {settings.out}: starting from scratch", settings.quiet)
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
            loss, count = scorer.loss(hidden, targets, settings.head_decay)
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
        _log(
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
            for i, ranks in enumerate(scorer.ranks(hidden, targets)):
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
    if not settings.lr > 0:
        raise MedusaError(f"--lr {settings.lr}: must be positive")
    if settings.data is not None and not settings.data.is_file():
        raise MedusaError(f"--data file not found: {settings.data}")
    if settings.draft_vocab and not settings.shared_lm_head:
        raise MedusaError("--draft-vocab trains through the shared lm_head: drop --no-shared-lm-head")
    if settings.dtype not in ("auto", "fp32", "fp16", "bf16"):
        raise MedusaError(f"unknown --dtype {settings.dtype!r}: use auto, fp32, fp16 or bf16")


def train(settings: TrainSettings) -> TrainResult:
    """Make or reuse the data, train (or resume), evaluate on the held-out split, write the heads."""
    import torch

    from .draft_vocab import draft_ids, write_draft_vocab
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
    write_draft_vocab(
        settings.out, (seq[start:] for seq, start in zip(data.sequences, data.starts, strict=True))
    )
    train_idx, eval_idx = split_groups(data.groups, settings.holdout, settings.seed)
    heads = init_heads(decoder, settings).to(device)
    lm_head = decoder.lm_head_weight().detach()
    remap = None
    if settings.draft_vocab:
        ranked = json.loads((settings.out / "draft_vocab.json").read_text())["ids"]
        ids = draft_ids(str(settings.out), min(settings.draft_vocab, len(ranked)), decoder.cfg.vocab_size)
        if ids is not None:
            ids = ids.to(device)
            remap = torch.full((decoder.cfg.vocab_size,), IGNORE, dtype=torch.long, device=device)
            remap[ids] = torch.arange(len(ids), device=device)
            lm_head = lm_head[ids]
    scorer = Scorer(
        heads,
        lm_head,
        decoder.cfg.final_logit_softcap if settings.shared_lm_head else None,
        lm_head.dtype,
        remap,
    )
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    step, losses, stats = run_training(decoder, scorer, data, train_idx, settings, device, pad)
    with stage(f"evaluating on {len(eval_idx)} held-out sequences", settings.quiet):
        accuracy = evaluate(decoder, scorer, data, eval_idx, settings, device, pad)
    save_heads(heads.cpu().float(), settings.out, settings.model)
    if remap is not None:  # these heads rank only the draft vocabulary: export must restrict them to it
        config = json.loads((settings.out / "config.json").read_text())
        config["draft_vocab"] = len(lm_head)
        (settings.out / "config.json").write_text(json.dumps(config, indent=2))
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


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[medusa-export] {message}", file=sys.stderr, flush=True)


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
    data: _Data = None,
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
) -> None:
    """Train Medusa-1 heads on the frozen base model (self-distillation by default); write FasterDecoding
    heads, accuracy.json (top-1, top-5, rank_accuracy per head) and a resumable checkpoint into --out."""
    settings = TrainSettings(
        model=model,
        out=out,
        num_heads=num_heads,
        num_layers=num_layers,
        shared_lm_head=shared_lm_head,
        data=data,
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
    )
    result = train(settings)
    meta = result.accuracy["train"]
    typer.echo(format_table(result.accuracy))
    typer.echo(
        f"wrote {result.out} ({meta['steps']} steps, final loss {meta['final_loss']}, "
        f"{meta['total_s']:.0f}s on {meta['device']})"
    )
