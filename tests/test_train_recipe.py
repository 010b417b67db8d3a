"""The `passages` training-data recipe (train_recipe.py): stage-1 openings and stage-2 task prompts of
every kind, deterministic, clear of Spec-Bench, and an end-to-end `train --recipe passages` on a tiny model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import SPECBENCH
from medusa_export import train as tr
from medusa_export import train_data as td
from medusa_export import train_recipe as rc
from medusa_runtime.errors import MedusaError

FILLER = (
    "The committee met on a rainy Tuesday and agreed to extend the trial by six months. Costs rose by "
    "twelve percent over the year. Several members said the early results were encouraging.\n"
)


def _passages(seed: int = 0, count: int = 120) -> list[rc.Passage]:
    """Openings with a stand-in for what the base model would write."""
    passages = rc.passage_openings(rc.load_recipe(), count, seed)
    for p in passages:
        p.text = p.opening + FILLER * 3
        p.tokens = len(p.text) // 4
    return passages


def _bench_shingles(n: int = 8) -> set[str]:
    rows = [json.loads(line) for line in SPECBENCH.read_text().splitlines() if line.strip()]
    return set().union(*(rc.shingles(t, n) for row in rows for t in row["turns"]))


def test_recipe_files_are_varied():
    recipe = rc.load_recipe()
    kinds = Counter(row["kind"] for row in recipe.topics)
    assert set(kinds) == set(recipe.templates["openers"]) and min(kinds.values()) >= 20
    assert len({row["topic"] for row in recipe.topics}) == len(recipe.topics)
    assert set(recipe.templates["tasks"]) >= set(rc.TASK_KINDS)


def test_openings_and_tasks_cover_every_kind_and_are_deterministic():
    passages = _passages()
    assert {p.kind for p in passages} == set(rc.load_recipe().templates["openers"])
    assert max(p.group for p in passages) == (len(passages) - 1) // rc.BUNDLE
    tasks = rc.task_prompts(passages, rc.load_recipe(), 0, 1800)
    assert {t.kind for t in tasks} == set(rc.TASK_KINDS)
    assert all(
        t.prompt.strip() and "{" not in t.prompt.replace(FILLER, "") for t in tasks if t.kind != "code"
    )
    assert len(tasks) >= rc.TASKS_PER_PASSAGE * len(passages)
    assert [(p.opening, p.group) for p in _passages()] == [(p.opening, p.group) for p in passages]
    assert rc.task_prompts(_passages(), rc.load_recipe(), 0, 1800) == tasks
    assert [p.opening for p in _passages(seed=1)] != [p.opening for p in passages]
    # a task belongs to the bundle of its passage(s); German passages are translated into English
    german = {p.group for p in passages if p.kind == "german"}
    assert any("English" in t.prompt for t in tasks if t.kind == "translate" and t.group in german)
    # a code task's fence names its passage's programming language, never a translation target
    code_langs = {p.group: p.facts["lang"] for p in passages if p.kind == "code"}
    fenced = [t for t in tasks if t.kind == "code" and "```" in t.prompt and t.group in code_langs]
    assert fenced and all(f"```{code_langs[t.group]}" in t.prompt for t in fenced)


def test_multi_document_prompts_reach_long_contexts_within_the_budget():
    tasks = rc.task_prompts(_passages(count=240), rc.load_recipe(), 0, 1800)
    lengths = [len(t.prompt) // 4 for t in tasks if t.kind == "rag"]  # the stand-in's 4 chars a token
    assert max(lengths) > rc.LONG_CONTEXT[0] and max(lengths) <= 1800 + rc.MARGIN
    small = rc.task_prompts(_passages(count=24), rc.load_recipe(), 0, 200)
    assert max(len(t.prompt) // 4 for t in small) <= 200 + rc.MARGIN


def test_recipe_text_does_not_overlap_the_benchmark():
    bench = _bench_shingles()
    passages = _passages(count=300)
    tasks = rc.task_prompts(passages, rc.load_recipe(), 0, 1800)
    for text in [p.opening for p in passages] + [t.prompt for t in tasks]:
        assert not rc.shingles(text, 8) & bench, text
    # passages the base model writes are dropped when they repeat a benchmark prompt
    turn = json.loads(SPECBENCH.read_text().splitlines()[0])["turns"][0]
    assert rc.shingles(turn) <= rc.benchmark_shingles()
    assert not rc.shingles(FILLER * 3) & rc.benchmark_shingles()


def test_clean_passage_cuts_loops_and_drops_short_text():
    line = "The river rose two metres overnight and the bridge was closed."
    text = "Flood warning\n\n" + FILLER + line + "\nSchools stay shut until Friday, officials said.\n"
    text += "Volunteers filled sandbags near the old mill while farmers moved cattle uphill.\n"
    text += "\n".join([line, line, line])
    cleaned = rc.clean_passage(text + " And then the", code=False)
    assert cleaned.endswith(".") and cleaned.count(line + "\n") <= 1 and "And then" not in cleaned
    assert rc.clean_passage("Too short to be a passage.") is None
    assert rc.clean_passage(" ".join(["spam spam spam"] * 30)) is None
    code = "# sum a list\n" + "\n".join(f"x{i} = compute(values[{i}], weight_{i})" for i in range(12))
    assert rc.clean_passage(code + "\n```\nThis code adds numbers.", code=True) == code


def test_settings_and_data_key(tmp_path):
    seeds = tr.TrainSettings("tiny-llama", tmp_path)
    passages = tr.TrainSettings("tiny-llama", tmp_path, recipe="passages")
    assert td.data_key(seeds)["recipe"] == "seeds" and td.data_key(passages)["recipe"] == "passages"
    assert td.data_key(seeds)["source"] != td.data_key(passages)["source"]
    for change, message in [
        (dict(recipe="nope"), "--recipe"),
        (dict(recipe="passages", data=Path(__file__)), "drop --data"),
        (dict(target_tokens=-1), "--target-tokens"),
    ]:
        with pytest.raises(MedusaError, match=message):
            tr.check_settings(tr.TrainSettings("tiny-llama", tmp_path / "x", **change))


def test_train_with_the_passages_recipe_on_a_tiny_model(tmp_path, monkeypatch):
    """Stage 1 on the tiny model (random bytes, so kept as written), stage 2 and the seeds continued,
    grouped by bundle, trained and evaluated on held-out groups; the cache is keyed by the recipe."""
    monkeypatch.setattr(rc, "PASSAGE_TOKENS", 48)
    monkeypatch.setattr(rc, "clean_passage", lambda text, code=False: text)
    out = tmp_path / "heads"
    args = ["train", "tiny-llama", "--out", str(out), "--recipe", "passages", "--target-tokens", "4800"]
    args += ["--max-new-tokens", "16", "--seq-len", "320", "--epochs", "1", "--batch-size", "16", "--quiet"]
    app = tr.typer.Typer()
    app.callback()(lambda: None)
    app.command("train")(tr.train_command)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "accuracy.json").read_text())["train"]
    recipe = meta["data"]["recipe"]
    assert recipe["passages"] == recipe["passages_kept"] == 20  # 0.2 * 4800 / 48
    assert recipe["seed_prompts"] == len(td.load_seed_prompts())
    assert set(recipe["task_prompts"]) >= {"summarize", "question", "rag", "translate"}
    assert all(recipe["target_tokens"][part] > 0 for part in ("passages", "seeds", "tasks"))
    assert meta["eval_on"] == "held-out" and meta["settings"]["recipe"] == "passages"
    data = td.load_data(out / td.DATA_FILE)
    assert data.key["recipe"] == "passages" and data.key["target_tokens"] == 4800
    assert all(len(s) <= 320 for s in data.sequences)
    bundles = {g for g in data.groups if g < 4}  # 20 passages in bundles of 6: groups 0-3
    assert bundles == {0, 1, 2, 3} and len(set(data.groups)) > 4
    train_idx, eval_idx = td.split_groups(data.groups, 0.1, 0)
    assert not {data.groups[i] for i in train_idx} & {data.groups[i] for i in eval_idx}
    assert torch.tensor([len(s) - st for s, st in zip(data.sequences, data.starts)]).min() >= td.MIN_TARGETS


def test_generation_batches_hold_fewer_long_rows(monkeypatch):
    sizes = []

    def fake_generate(base, prompts, jobs, max_new_tokens, device):
        sizes.append(len(prompts))
        return [[5] * max_new_tokens for _ in prompts]

    monkeypatch.setattr(td, "generate_batch", fake_generate)
    encoded = [[1] * 10] * 8 + [[1] * 1000] * 8
    jobs = [td.GenJob(i, None, None) for i in range(16)]
    pairs, meta = td.continue_prompts(None, encoded, jobs, 24, "cpu", 4, 0, True)
    assert sizes == [4, 4, 2, 2, 2, 2]  # 2 rows of 1,024 tokens fill 4 rows of GEN_WIDTH 512
    assert sorted(job.prompt for job, _ in pairs) == list(range(16)) and meta["generated_tokens"] == 16 * 24
