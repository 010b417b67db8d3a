"""Build data/calibration_prompts.jsonl: prompts to measure the heads' accuracy on (scripts/heads_calibration.py)
that share nothing with Spec-Bench (data/specbench_dev.jsonl) but cover the same 13 categories.

    python scripts/make_calibration_set.py [--out data/calibration_prompts.jsonl] [--seed 2026]   (CPU, ~2 min)

- The long-context categories (summarization, rag, extraction, translation, part of writing and coding) are
  the `passages` training recipe (medusa_export/train_recipe.py) run on CALIBRATION_TOPICS: new topic seeds,
  none of them in configs/train_topics.jsonl, filled with the recipe's invented names and dates under another
  seed than training's (0). The base model writes the passages (sampled, seeded); the recipe's task
  templates (configs/train_recipe.json) turn them into prompts. Those templates are the ones the
  passages heads were trained on; the passages and their facts are new.
- The short-prompt categories (qa, math, math_reasoning, reasoning, roleplay, stem, humanities, one writing
  and one coding prompt) are HANDWRITTEN below for this set, none of them in configs/train_seeds.jsonl.
- No prompt shares a 13-word run with Spec-Bench (checked here and by tests/test_calibration_set.py).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from medusa_export import train_recipe as rc

ROOT = Path(__file__).resolve().parent.parent
PASSAGE_TOKENS = 224  # the training recipe writes 400; shorter keeps the CPU run to a couple of minutes
PER_CATEGORY = 3
BUDGET = 700  # tokens of passage text in a prompt (the training recipe allows up to ~1,800)

# Topic seeds written for this set (configs/train_topics.jsonl format); none is a training topic.
CALIBRATION_TOPICS = [
    {"kind": "news", "topic": "Village school installs solar panels on its gym roof"},
    {"kind": "news", "topic": "Water utility announces six weeks of pipe repairs in the old town"},
    {"kind": "email", "topic": "Moving the quarterly supplier review to the following week"},
    {"kind": "meeting", "topic": "Planning the spring open day at the community garden"},
    {"kind": "product", "topic": "Foldable electric scooter with a removable battery"},
    {"kind": "story", "topic": "The lighthouse keeper who kept every lost letter"},
    {"kind": "explainer", "topic": "How a heat pump moves warmth out of cold outside air"},
    {"kind": "explainer", "topic": "Why bread dough rises and what yeast needs"},
    {"kind": "dialogue", "topic": "returning a faulty coffee grinder to the shop"},
    {
        "kind": "table",
        "topic": "Ferry timetable between the mainland and three islands",
        "columns": ["Route", "Departure", "Arrival", "Fare"],
    },
    {
        "kind": "code",
        "topic": "Read a CSV file of orders and total the amount per customer",
        "lang": "python",
    },
    {
        "kind": "code",
        "topic": "A debounce helper for a search box that waits for the user to stop typing",
        "lang": "javascript",
    },
    {"kind": "german", "topic": "Stadtbibliothek verlängert ihre Öffnungszeiten am Wochenende"},
    {"kind": "german", "topic": "Neue Straßenbahnlinie verbindet den Hauptbahnhof mit der Universität"},
]

# category -> (recipe task kind, passage kinds it may use), PER_CATEGORY prompts each
RECIPE_CATEGORIES = {
    "summarization": ("summarize", ["news", "story", "meeting", "explainer", "dialogue", "email"]),
    "extraction": ("extract", ["news", "email", "table", "product", "meeting"]),
    "translation": ("translate_german", ["german"]),
    "rag": ("rag", None),
}
RECIPE_EXTRA = {  # categories that mix recipe prompts with handwritten ones
    "writing": [("rewrite", ["explainer", "product", "news"]), ("write", ["story", "email"])],
    "coding": [("code", ["code"]), ("code", ["code"])],
}

HANDWRITTEN = {
    "qa": [
        "when did the first passenger railway open in england",
        "how many bones are there in the adult human hand",
        "who was the first woman to win a nobel prize",
    ],
    "math": [
        "A circle has its centre at (2, -1) and passes through the point (5, 3). What is its radius, and what is its area?",
        "Solve for x: 3(x - 4) + 7 = 2x + 9. Show each step.",
        "How many different four-digit even numbers can be made from the digits 1, 2, 3, 4 and 5 if no digit may be used twice?",
    ],
    "math_reasoning": [
        "A school orders 14 boxes of markers. Each box holds 12 markers and costs $9. The school gets a discount of $2 per box for ordering more than 10 boxes. How much does the order cost, and how much does each marker cost?",
        "Lena cycles 8 km to work and 8 km back every weekday, and rides 25 km on Saturday. How many kilometers does she cycle in four weeks?",
        "A water tank holds 1,200 liters and is three quarters full. A pump removes 45 liters every ten minutes. How many hours will it take to empty the tank?",
    ],
    "reasoning": [
        "Four runners, Ada, Bo, Cy and Dee, finished a race. Ada finished before Bo but after Dee. Cy was not last, and Bo was not third. In what order did they finish? Explain your reasoning.",
        "My neighbour's kitchen clock gains two minutes every hour. She set it to the correct time at 8 a.m. What time does the clock show when the correct time is 2 p.m.?",
        "A man looks at a photograph and says: \"Brothers and sisters I have none, but that man's father is my father's son.\" Who is in the photograph?",
    ],
    "roleplay": [
        "Pretend you are a tour guide in a small mountain village. A group of tourists has just got off the bus. Welcome them and tell them what they can do this afternoon.",
        "You are the captain of a sailing ship in 1850, writing in your logbook after a three-day storm. Describe what happened to the ship and the crew.",
        "Act as a friendly bookshop owner. A teenager says they like mysteries and space travel and asks what to read over the summer holidays. Answer in character.",
    ],
    "stem": [
        "How does a lithium-ion battery store and release energy? Explain the roles of the anode, the cathode and the electrolyte.",
        "What causes the seasons on Earth? Many people think it is the changing distance to the Sun; explain why that is wrong.",
        "Explain the difference between a virus and a bacterium, and why a doctor will not prescribe antibiotics for a cold.",
    ],
    "humanities": [
        "What role did the Hanseatic League play in trade in northern Europe, and why did it decline?",
        "Compare the Senate of the Roman Republic with a modern parliament. What powers did each have?",
        "How did the spread of railways in the nineteenth century change the way people measured and thought about time?",
    ],
    "writing": [
        "Write a short speech for the opening of a new public swimming pool in a small town. Keep it cheerful and under 200 words.",
    ],
    "coding": [
        "Write a Python function that merges overlapping intervals given as a list of (start, end) pairs, and show it on an example.",
    ],
}


def write_passages(seed: int) -> list[rc.Passage]:
    """The base model writes one passage per calibration topic (CPU, fp32, sampled as in training)."""
    from medusa_export.models import load_base
    from medusa_export.train_data import GenJob, continue_prompts

    recipe = rc.load_recipe()
    t, rng = recipe.templates, random.Random(seed)
    passages = []
    for i, row in enumerate(CALIBRATION_TOPICS):
        facts = rc._facts(row, rng, t)
        passages.append(
            rc.Passage(row["kind"], rng.choice(t["openers"][row["kind"]]).format(**facts), facts, i)
        )
    base = load_base("gemma3-270m", "fp32")
    tok = base.tokenizer
    encoded = [tok.encode(p.opening).ids for p in passages]
    jobs = [GenJob(i, rc.PASSAGE_TEMPERATURE, None) for i in range(len(passages))]
    pairs, meta = continue_prompts(base, encoded, jobs, PASSAGE_TOKENS, "cpu", 4, seed + 1, False, "passages")
    print(f"wrote {meta['generated_tokens']} tokens in {meta['generation_s']} s")
    for job, new in pairs:
        p = passages[job.prompt]
        text = rc.clean_passage(p.opening + tok.decode(new, skip_special_tokens=True), p.kind == "code")
        if text and not rc.shingles(text) & rc.benchmark_shingles():
            p.text, p.tokens = text, len(tok.encode(text).ids)
    kept = [p for p in passages if p.text]
    print(f"kept {len(kept)} of {len(passages)} passages: {dict(Counter(p.kind for p in kept))}")
    return kept


def recipe_prompt(
    task: str, kinds: list[str] | None, kept: list[rc.Passage], rng: random.Random, used: Counter
):
    t = rc.load_recipe().templates
    if task == "rag":
        docs = [p for p in kept if p.kind in t["rag_kinds"]]
        return rc._rag(rng.sample(docs, min(len(docs), rc.BUNDLE)), rng, t, BUDGET)
    pool = [p for p in kept if p.kind in kinds] or [p for p in kept if p.kind != "code"]
    p = min(pool, key=lambda p: (used[id(p)], rng.random()))  # spread the prompts over the passages
    used[id(p)] += 1
    return rng.choice(t["tasks"][task]).format(**rc._fields(p, rng, t, BUDGET))


def build(kept: list[rc.Passage], seed: int) -> list[dict]:
    rng, used, rows = random.Random(seed + 2), Counter(), []
    for category, (task, kinds) in RECIPE_CATEGORIES.items():
        rows += [
            {
                "category": category,
                "prompt": recipe_prompt(task, kinds, kept, rng, used),
                "source": f"recipe:{task}",
            }
            for _ in range(PER_CATEGORY)
        ]
    for category, specs in RECIPE_EXTRA.items():
        rows += [
            {
                "category": category,
                "prompt": recipe_prompt(task, kinds, kept, rng, used),
                "source": f"recipe:{task}",
            }
            for task, kinds in specs
        ]
    for category, prompts in HANDWRITTEN.items():
        rows += [{"category": category, "prompt": prompt, "source": "handwritten"} for prompt in prompts]
    rows.sort(key=lambda row: row["category"])
    return [{"id": i, **row} for i, row in enumerate(rows)]


def check(rows: list[dict]) -> None:
    """No 13-word run of Spec-Bench; no training topic or seed prompt reused."""
    banned = rc.benchmark_shingles()
    bench = {json.loads(line)["turns"][0].strip().lower() for line in rc.BENCH_FILE.open()}
    seeds = rc.read_jsonl(ROOT / "configs" / "train_seeds.jsonl")
    seed_shingles = frozenset().union(*(rc.shingles(row["prompt"]) for row in seeds))
    train_topics = {row["topic"].lower() for row in rc.load_recipe().topics}
    assert not {row["topic"].lower() for row in CALIBRATION_TOPICS} & train_topics, "a training topic"
    for row in rows:
        assert not rc.shingles(row["prompt"]) & banned, f"13-word run of Spec-Bench in {row['id']}"
        assert row["prompt"].strip().lower() not in bench, f"Spec-Bench prompt {row['id']}"
        if row["source"] == "handwritten":
            assert not rc.shingles(row["prompt"]) & seed_shingles, f"13-word run of a seed in {row['id']}"
    counts = Counter(row["category"] for row in rows)
    print(
        f"{len(rows)} prompts, {dict(sorted(counts.items()))}; no 13-word run shared with {rc.BENCH_FILE.name}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "calibration_prompts.jsonl")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    rows = build(write_passages(args.seed), args.seed)
    check(rows)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
