"""The `passages` training-data recipe (`medusa-export train --recipe passages`): self-distillation on
prompts that work on a given text, which the base model first writes itself.

Stage 1: topic seeds (configs/train_topics.jsonl), filled with invented names, places, dates and prices,
become document openings (configs/train_recipe.json `openers`: a news item's headline and dateline, an
email header, meeting notes, a product page, a story, a technical explanation, a dialogue, a table, a code
file, a German news item); the base model writes the rest (sampled at PASSAGE_TEMPERATURE with min-p).
Passages that loop, are too short, or share a 13-word run with data/specbench_dev.jsonl are dropped.
Stage 2: task prompts around the kept passages (`tasks`): summarize, answer a question about one passage
or about several retrieved ones (LONG_CONTEXT tokens where --seq-len leaves room), extract names, dates,
numbers and fields as lists or JSON, translate into French/German/Spanish/Chinese and German into English,
rewrite, explain/fix/complete code, and write on the same topics. They are continued by the usual
self-distillation (`self_distill`), beside the seed prompts of configs/train_seeds.jsonl.

Training data = the passages (continuations of their openings) + seed continuations + task continuations,
about PASSAGE_SHARE, SEED_SHARE and the rest of the target tokens (--target-tokens, else --num-samples x
--max-new-tokens). Groups for the held-out split are bundles of BUNDLE passages: a bundle's passages, the
prompts built on them and its multi-document prompts fall on the same side. Everything is seeded by --seed.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medusa_runtime.errors import MedusaError

from .progress import log, stage
from .prompts import read_jsonl

if TYPE_CHECKING:
    from .models.source import BaseModel
    from .train import TrainSettings
    from .train_data import TrainData

ROOT = Path(__file__).resolve().parent.parent
TOPICS_FILE = ROOT / "configs" / "train_topics.jsonl"
TEMPLATES_FILE = ROOT / "configs" / "train_recipe.json"
RECIPE_FILES = (TOPICS_FILE, TEMPLATES_FILE, ROOT / "configs" / "train_seeds.jsonl")
BENCH_FILE = ROOT / "data" / "specbench_dev.jsonl"  # only to drop passages that repeat it

TASK_KINDS = ("summarize", "question", "rag", "extract", "translate", "rewrite", "code", "write")
PASSAGE_TOKENS = 400  # new tokens per passage
PASSAGE_TEMPERATURE = 0.8
PASSAGE_SHARE, SEED_SHARE = 0.2, 0.25  # of the target tokens; task continuations get the rest
BUNDLE = 6  # passages per held-out group, and the documents a multi-document prompt draws from
TASKS_PER_PASSAGE = 3
RAG_PER_BUNDLE = 2
LONG_CONTEXT = (600, 1500)  # tokens of documents in a multi-document prompt, at most the room left
MARGIN = 64  # tokens kept for a template's own words around the passages
MIN_WORDS = 40
SHINGLE = 13  # words in a run that must not repeat the benchmark


@dataclass
class Passage:
    kind: str
    opening: str  # the stage-1 prompt, also the start of the passage
    facts: dict[str, str]  # the opening's fields (topic, names, place, date...), reused by the questions
    group: int
    text: str = ""  # opening + the base model's continuation, cleaned; "" if dropped
    tokens: int = 0


@dataclass(frozen=True)
class Task:
    kind: str  # one of TASK_KINDS
    prompt: str
    group: int


@dataclass
class Recipe:
    templates: dict[str, Any]
    topics: list[dict[str, Any]]


def load_recipe() -> Recipe:
    templates = json.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))
    topics = read_jsonl(TOPICS_FILE)
    bad = [row for row in topics if row.get("kind") not in templates["openers"] or not row.get("topic")]
    if bad:
        raise MedusaError(
            f"{TOPICS_FILE}: rows need a `topic` and a `kind` of {sorted(templates['openers'])}"
        )
    return Recipe(templates, topics)


# ------------------------------------------------------------------------------------------ stage 1


def _facts(row: dict[str, Any], rng: random.Random, t: dict[str, Any]) -> dict[str, str]:
    firsts, lasts = rng.sample(t["first_names"], 3), rng.sample(t["last_names"], 3)
    year, month, day = rng.randint(2016, 2025), rng.randint(1, 12), rng.randint(1, 28)
    date = rng.choice(t["date_formats"]).format(
        day=day, month=t["months"][month - 1], year=year, mm=f"{month:02d}", dd=f"{day:02d}"
    )
    company, city = rng.choice(t["companies"]), rng.choice(t["cities"])
    domain = re.sub(r"[^a-z]", "", company.lower()) + ".com"
    topic, lang, columns = row["topic"], row.get("lang", "python"), row.get("columns", [])
    first_word = topic.split()[0]
    return {
        "topic": topic,
        "topic_lower": topic if any(c.isupper() for c in first_word[1:]) else topic[0].lower() + topic[1:],
        "name": f"{firsts[0]} {lasts[0]}",
        "name2": f"{firsts[1]} {lasts[1]}",
        "name3": f"{firsts[2]} {lasts[2]}",
        "first": firsts[0],
        "FIRST": firsts[0].upper(),
        "first2": firsts[1],
        "last2": lasts[1],
        "title": rng.choice(t["titles"]),
        "email": f"{firsts[0]}.{lasts[0]}@{domain}".lower(),
        "email2": f"{firsts[1]}.{lasts[1]}@{domain}".lower(),
        "city": city,
        "CITY": city.upper(),
        "company": company,
        "date": date,
        "date_de": f"{day}. {t['months_de'][month - 1]} {year}",
        "year": str(year),
        "time": f"{rng.randint(8, 17)}:{rng.choice(('00', '15', '30', '45'))}",
        "price": f"{rng.randint(9, 400)}.{rng.choice(('00', '49', '95', '99'))}",
        "digit": str(rng.randint(1, 9)),
        "number": str(rng.randint(2, 30)),
        "lang": lang,
        "lang_name": t["lang_names"].get(lang, lang),
        "comment": t["comments"].get(lang, "#"),
        "columns": " | ".join(columns),
        "separator": " | ".join("---" for _ in columns),
        "columns_csv": ",".join(columns),
    }


def passage_openings(recipe: Recipe, count: int, seed: int) -> list[Passage]:
    """`count` stage-1 prompts: a passage kind by `passage_weights`, a topic of that kind, fresh facts."""
    rng = random.Random(seed)
    t = recipe.templates
    by_kind = defaultdict(list)
    for row in recipe.topics:
        by_kind[row["kind"]].append(row)
    kinds = sorted(by_kind)
    weights = [t["passage_weights"].get(kind, 1) for kind in kinds]
    out = []
    for i in range(count):
        kind = rng.choices(kinds, weights)[0]
        facts = _facts(rng.choice(by_kind[kind]), rng, t)
        out.append(Passage(kind, rng.choice(t["openers"][kind]).format(**facts), facts, i // BUNDLE))
    return out


def clean_passage(text: str, code: bool = False) -> str | None:
    """The passage up to where it starts repeating a sentence (or line), cut after its last full one
    unless it is code closed by a fence; None when it is too short or loops."""
    closed = code and "```" in text
    text = text.split("```")[0] if code else text
    seen, stop = set(), len(text)
    for unit in re.finditer(r"[^.!?\n]+[.!?]*", text):
        key = unit.group().strip()
        if len(key) >= 15 and key in seen:
            stop = unit.start()
            break
        seen.add(key)
    text = re.sub(r"\n{3,}", "\n\n", text[:stop].replace("\r", "")).strip()
    end = max(text.rfind(mark) for mark in ".!?\n")
    if end >= len(text) // 2 and not closed:
        text = text[: end + 1].rstrip()
    words = text.split()
    if len(words) < MIN_WORDS or len(set(zip(words, words[1:], words[2:]))) < 0.6 * (len(words) - 2):
        return None
    return text


def shingles(text: str, n: int = SHINGLE) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


@functools.cache
def benchmark_shingles(n: int = SHINGLE) -> frozenset[str]:
    """Every n-word run of the benchmark prompts (all turns), to drop passages that repeat one."""
    if not BENCH_FILE.is_file():
        return frozenset()
    rows = read_jsonl(BENCH_FILE)
    texts = [turn for row in rows for turn in row.get("turns", []) if isinstance(turn, str)]
    return frozenset().union(*(shingles(text, n) for text in texts))


# ------------------------------------------------------------------------------------------ stage 2


def _cut(text: str, limit: int) -> str:
    """At most `limit` characters, ending at a sentence or line end when one is in the second half."""
    if len(text) <= limit:
        return text
    text = text[:limit]
    end = max(text.rfind(mark) for mark in ".!?\n")
    return text[: end + 1].rstrip() if end > limit // 2 else text


def _fit(p: Passage, budget: int) -> str:
    """The passage, shortened to about `budget` tokens."""
    return p.text if p.tokens <= budget else _cut(p.text, len(p.text) * budget // p.tokens)


def _segment(text: str, rng: random.Random) -> str:
    """One to four consecutive sentences (or lines) of at least four words."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.split()) >= 4]
    if not sentences:
        return _cut(text, 400)
    i = rng.randrange(len(sentences))
    return " ".join(sentences[i : i + rng.choice((1, 1, 2, 3, 4))])


def _fields(p: Passage, rng: random.Random, t: dict[str, Any], budget: int) -> dict[str, str]:
    """What a task template may name: the passage's facts, its (shortened) text, a segment, the first half
    of its lines, a question about it, a target language..."""
    doc = t["doc_names"][p.kind]
    questions = t["questions"].get(p.kind, []) + t["questions"]["any"]
    lines = p.text.split("\n")
    return {
        **p.facts,
        "doc": doc,
        "text": _fit(p, budget),
        "segment": _segment(p.text, rng),
        "head": "\n".join(lines[: max(1, len(lines) // 2)]) + "\n",
        "question": rng.choice(questions).format(**p.facts, doc=doc),
        "target_lang": rng.choice(t["languages"]),  # "lang" is a code passage's own language (its facts)
        "n": rng.choice(t["counts"]),
        "fields": t["fields"].get(p.kind, t["fields"]["any"]),
    }


def _pick(rng: random.Random, weights: dict[str, float], k: int) -> list[str]:
    """k task kinds by weight, distinct until every kind has been drawn once."""
    out, names, left = [], [], []
    while len(out) < k:
        if not names:
            names, left = list(weights), list(weights.values())
        i = rng.choices(range(len(names)), left)[0]
        out.append(names.pop(i))
        left.pop(i)
    return out


def _rag(docs: list[Passage], rng: random.Random, t: dict[str, Any], budget: int) -> str:
    """A multi-document prompt: a question about one passage among others of its bundle, as retrieved."""
    target = rng.choice(docs)
    room = min(rng.randint(*LONG_CONTEXT), budget)
    chosen, used = [target], min(target.tokens, budget)
    for doc in rng.sample(docs, len(docs)):
        if doc is not target and used + doc.tokens <= room:
            chosen.append(doc)
            used += doc.tokens
    rng.shuffle(chosen)
    style = rng.choice(t["doc_styles"])
    docs_text = style["sep"].join(
        style["item"].format(i=i, topic=d.facts["topic"], text=_fit(d, budget // len(chosen)))
        for i, d in enumerate(chosen, 1)
    )
    return rng.choice(t["tasks"]["rag"]).format(**_fields(target, rng, t, budget), docs=docs_text)


def task_prompts(passages: list[Passage], recipe: Recipe, seed: int, budget: int) -> list[Task]:
    """Stage-2 prompts: TASKS_PER_PASSAGE per passage (kinds by its `passage_tasks` weights) and
    RAG_PER_BUNDLE multi-document prompts per bundle; `budget` bounds a prompt's passage tokens."""
    rng = random.Random(seed)
    t = recipe.templates
    tasks, bundles = [], defaultdict(list)
    for p in passages:
        for kind in _pick(rng, t["passage_tasks"][p.kind], TASKS_PER_PASSAGE):
            key = "translate_german" if p.kind == "german" else kind
            tasks.append(
                Task(kind, rng.choice(t["tasks"][key]).format(**_fields(p, rng, t, budget)), p.group)
            )
        if p.kind in t["rag_kinds"]:
            bundles[p.group].append(p)
    for group, docs in sorted(bundles.items()):
        tasks += [Task("rag", _rag(docs, rng, t, budget), group) for _ in range(RAG_PER_BUNDLE)]
    return tasks


# ------------------------------------------------------------------------------------------- driver


def _targets(data: TrainData) -> int:
    return sum(len(s) - start for s, start in zip(data.sequences, data.starts, strict=True))


def recipe_data(
    base: BaseModel, seeds: list[str], settings: TrainSettings, device, gen_batch: int
) -> TrainData:
    """Stage 1 (passages), then the seed prompts and the stage-2 task prompts self-distilled."""
    from .train_data import GenJob, TrainData, continue_prompts, distilled_data, self_distill, sized

    recipe, tok, quiet = load_recipe(), base.tokenizer, settings.quiet
    total = settings.num_samples * settings.max_new_tokens
    room = settings.seq_len - settings.max_new_tokens  # longest task prompt
    if room - MARGIN < 2 * MARGIN:
        raise MedusaError(
            f"--recipe passages: --seq-len {settings.seq_len} leaves too little room for a passage after "
            f"{settings.max_new_tokens} new tokens; use --seq-len {settings.max_new_tokens + 3 * MARGIN} "
            "or more (2048 for long contexts)"
        )
    passages = passage_openings(
        recipe, max(1, math.ceil(PASSAGE_SHARE * total / PASSAGE_TOKENS)), settings.seed
    )
    encoded = [tok.encode(p.opening).ids for p in passages]
    jobs = [GenJob(i, PASSAGE_TEMPERATURE, None) for i in range(len(passages))]
    with stage(f"recipe stage 1: writing {len(passages)} passages of up to {PASSAGE_TOKENS} tokens", quiet):
        pairs, meta = continue_prompts(
            base, encoded, jobs, PASSAGE_TOKENS, device, gen_batch, settings.seed + 1, quiet, "passages"
        )
    kept, banned = [], benchmark_shingles()
    for job, new in pairs:
        p = passages[job.prompt]
        text = clean_passage(p.opening + tok.decode(new, skip_special_tokens=True), p.kind == "code")
        if text and not shingles(text) & banned:
            p.text, p.tokens = text, len(tok.encode(text).ids)
            kept.append((job, new))
    written = distilled_data(encoded, kept, settings.seq_len, meta)
    written.groups = [passages[g].group for g in written.groups]
    good = [p for p in passages if p.text]
    tasks = [
        task
        for task in task_prompts(good, recipe, settings.seed, room - MARGIN)
        if len(tok.encode(task.prompt).ids) <= room
    ]
    if not tasks:
        raise MedusaError("--recipe passages: the base model wrote no usable passage (too short or looping)")
    log(f"kept {len(good)} of {len(passages)} passages; {len(tasks)} task prompts", quiet)
    with stage(f"recipe: continuing {len(seeds)} seed prompts", quiet):
        seeded = self_distill(base, seeds, sized(settings, SEED_SHARE * total), device, gen_batch)
    seeded.groups = [passages[-1].group + 1 + g for g in seeded.groups]
    left = max(settings.max_new_tokens, total - _targets(written) - _targets(seeded))
    with stage(f"recipe stage 2: continuing {len(tasks)} task prompts", quiet):
        asked = self_distill(base, [task.prompt for task in tasks], sized(settings, left), device, gen_batch)
    asked.groups = [tasks[g].group for g in asked.groups]
    parts = (written, seeded, asked)
    generated = sum(part.meta["generated_tokens"] for part in parts)
    seconds = sum(part.meta["generation_s"] for part in parts)
    return TrainData(
        [s for part in parts for s in part.sequences],
        [s for part in parts for s in part.starts],
        [g for part in parts for g in part.groups],
        {},
        {
            "generated_tokens": generated,
            "generation_s": round(seconds, 2),
            "generation_tok_s": round(generated / max(seconds, 1e-9), 1),
            "num_items": len(good) + len(seeds) + len(tasks),
            "recipe": {
                "passages": len(passages),
                "passages_kept": len(good),
                "passage_kinds": dict(sorted(Counter(p.kind for p in good).items())),
                "task_prompts": dict(sorted(Counter(task.kind for task in tasks).items())),
                "seed_prompts": len(seeds),
                "target_tokens": {
                    "passages": _targets(written),
                    "seeds": _targets(seeded),
                    "tasks": _targets(asked),
                },
            },
        },
    )
