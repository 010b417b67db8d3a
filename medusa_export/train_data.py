"""Training data for Medusa heads: self-distillation from seed prompts, text/JSONL files, a cache, batches,
and the hidden states the heads train on (the explicit decoder's, exactly what the exported graph feeds)."""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medusa_runtime.errors import MedusaError

from .fsutil import atomic_file
from .progress import log, stage
from .prompts import read_jsonl, row_prompt

if TYPE_CHECKING:
    import torch

    from .models.common import ExplicitDecoder
    from .models.source import BaseModel
    from .train import TrainSettings

SEEDS_FILE = Path(__file__).resolve().parent.parent / "configs" / "train_seeds.jsonl"
DATA_FILE = "train_data.pt"
# pass p >= 1 of self-distillation: sample the first m tokens (None: all) at temperature tau, then greedy
SAMPLED_PASSES = ((0.8, 16), (1.0, 8), (0.7, None), (0.9, 32), (1.0, 24), (0.8, None))
MIN_TARGETS = 3  # shorter sequences give no head-target
GEN_WIDTH = 512  # generation batches hold at most gen_batch * GEN_WIDTH prompt + new tokens
MIN_P = 0.05  # sampling keeps the tokens at least this fraction as likely as the most likely one


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


# ----------------------------------------------------------------------------------------------- data


def load_seed_prompts(path: Path = SEEDS_FILE) -> list[str]:
    """The `prompt` of each row of the seeds JSONL file."""
    rows = read_jsonl(path)
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
        rows = read_jsonl(path)
        if rows and all(isinstance(r.get("text"), str) for r in rows):
            return "texts", [r["text"] for r in rows if r["text"].strip()]
        prompts = [row_prompt(r) for r in rows]
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

    pad = base.pad_token_id
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


def continue_prompts(
    base: BaseModel,
    encoded: list[list[int]],
    jobs: list[GenJob],
    max_new_tokens: int,
    device,
    gen_batch: int,
    seed: int,
    quiet: bool,
    desc: str = "generating",
) -> tuple[list[tuple[GenJob, list[int]]], dict[str, Any]]:
    """Each job's continuation of its encoded prompt, in batches of similar prompt lengths (seeded per
    batch; fewer than `gen_batch` rows where prompt + continuation exceed GEN_WIDTH tokens, which bounds
    the prefill's attention memory): ([(job, new tokens)] in generation order, generation stats)."""
    import torch
    from tqdm import tqdm

    batches: list[list[GenJob]] = []
    for job in sorted(jobs, key=lambda job: len(encoded[job.prompt])):  # similar lengths share a batch
        width = len(encoded[job.prompt]) + max_new_tokens  # the widest row yet: rows are sorted
        last = batches[-1] if batches else []
        if last and len(last) < gen_batch and (len(last) + 1) * width <= gen_batch * GEN_WIDTH:
            last.append(job)
        else:
            batches.append([job])
    pairs, generated = [], 0
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=desc, unit="seq", disable=quiet, file=sys.stderr)
    for number, batch in enumerate(batches):
        torch.manual_seed(seed * 100_003 + number)
        outs = generate_batch(base, [encoded[j.prompt] for j in batch], batch, max_new_tokens, device)
        pairs += zip(batch, outs, strict=True)
        generated += sum(len(new) for new in outs)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    meta = {
        "generated_tokens": generated,
        "generation_s": round(seconds, 2),
        "generation_tok_s": round(generated / max(seconds, 1e-9), 1),
    }
    log(f"generated {generated} tokens in {seconds:.1f}s ({meta['generation_tok_s']:.0f} tokens/s)", quiet)
    return pairs, meta


def distilled_data(
    encoded: list[list[int]], pairs: list[tuple[GenJob, list[int]]], seq_len: int, meta: dict[str, Any]
) -> TrainData:
    """Sequences = prompt + continuation (cut to `seq_len`), only the continuation a target, grouped by
    prompt; continuations shorter than MIN_TARGETS are left out."""
    sequences, starts, groups = [], [], []
    for job, new in pairs:
        if len(new) >= MIN_TARGETS:
            sequences.append((encoded[job.prompt] + new)[:seq_len])
            starts.append(len(encoded[job.prompt]))
            groups.append(job.prompt)
    return TrainData(sequences, starts, groups, {}, meta)


def self_distill(
    base: BaseModel, prompts: list[str], settings: TrainSettings, device, gen_batch: int
) -> TrainData:
    """Sequences = prompt + the base model's own continuation; only the continuation is a target."""
    encoded = [base.tokenizer.encode(p).ids[: max(1, settings.seq_len - MIN_TARGETS)] for p in prompts]
    jobs = generation_jobs(len(prompts), settings.num_samples, settings.seed)
    pairs, meta = continue_prompts(
        base, encoded, jobs, settings.max_new_tokens, device, gen_batch, settings.seed, settings.quiet
    )
    data = distilled_data(encoded, pairs, settings.seq_len, meta)
    if not data.sequences:
        raise MedusaError("the base model produced no continuation long enough to train on (EOS at once?)")
    return data


def sized(settings: TrainSettings, tokens: int) -> TrainSettings:
    """`settings` with --num-samples set to about `tokens` generated tokens."""
    return replace(settings, num_samples=max(1, math.ceil(tokens / settings.max_new_tokens)))


def data_key(settings: TrainSettings) -> dict[str, Any]:
    """What the training data depends on: a cached copy with the same key is reused."""
    if settings.data is not None:
        source, paths = "file:" + str(settings.data.resolve()), [settings.data]
    elif settings.recipe == "passages":
        from .train_recipe import RECIPE_FILES

        source, paths = "passages:" + ",".join(map(str, RECIPE_FILES)), list(RECIPE_FILES)
    else:
        source, paths = "seeds:" + str(SEEDS_FILE), [SEEDS_FILE]
    stats = [path.stat() for path in paths if path.is_file()]
    return {
        "model": settings.model,
        "source": source,
        "source_size": sum(stat.st_size for stat in stats) if stats else None,
        "source_mtime": max(int(stat.st_mtime) for stat in stats) if stats else None,
        "recipe": settings.recipe,
        "target_tokens": settings.target_tokens,
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
            log(f"reusing {len(cached.sequences)} cached sequences from {path}", settings.quiet)
            return cached, False
        if settings.resume:
            changed = sorted(k for k in key if cached.key.get(k) != key[k])
            raise MedusaError(
                f"--resume: the cached data in {path} was made with other settings "
                f"({', '.join(changed)}); drop --resume to start over"
            )
    if settings.data is not None:
        kind, items = read_data_file(settings.data)
    else:  # the passages recipe continues the seed prompts too
        kind, items = ("passages" if settings.recipe == "passages" else "prompts"), load_seed_prompts()
    if settings.target_tokens:
        settings = sized(settings, settings.target_tokens)
    if kind == "texts":
        data = text_sequences(base.tokenizer, items, settings.seq_len)
    elif kind == "passages":
        from .train_recipe import recipe_data

        data = recipe_data(base, items, settings, device, gen_batch)
    else:
        with stage(
            f"self-distillation: {settings.num_samples} continuations of {len(items)} prompts, "
            f"{settings.max_new_tokens} new tokens each",
            settings.quiet,
        ):
            data = self_distill(base, items, settings, device, gen_batch)
    data.key = key
    data.meta.update(source=key["source"], kind=kind)
    data.meta.setdefault("num_items", len(items))
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
