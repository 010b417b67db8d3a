"""data/calibration_prompts.jsonl (scripts/make_calibration_set.py): the heads-calibration prompts cover
Spec-Bench's categories without sharing a 13-word run, or a prompt, with data/specbench_dev.jsonl."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

from conftest import ROOT, SPECBENCH
from medusa_export import train_recipe as rc

CALIBRATION = ROOT / "data" / "calibration_prompts.jsonl"


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_calibration_set_covers_the_benchmark_categories():
    rows = _rows(CALIBRATION)
    counts = Counter(row["category"] for row in rows)
    assert set(counts) == {row["category"] for row in _rows(SPECBENCH)}
    assert min(counts.values()) >= 2
    assert all(isinstance(row["prompt"], str) and row["prompt"].strip() for row in rows)
    assert len({row["prompt"] for row in rows}) == len(rows)


def test_calibration_set_shares_no_13_word_run_with_specbench():
    banned = rc.benchmark_shingles(13)
    assert banned  # the benchmark file is there and long enough to check against
    bench = {turn.strip().lower() for row in _rows(SPECBENCH) for turn in row["turns"]}
    for row in _rows(CALIBRATION):
        assert not rc.shingles(row["prompt"], 13) & banned, row["id"]
        assert row["prompt"].strip().lower() not in bench, row["id"]


def test_calibration_topics_are_not_training_topics():
    spec = importlib.util.spec_from_file_location(
        "make_calibration_set", ROOT / "scripts" / "make_calibration_set.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    training = {row["topic"].lower() for row in rc.load_recipe().topics}
    assert not {row["topic"].lower() for row in module.CALIBRATION_TOPICS} & training
    seeds = {row["prompt"].lower() for row in _rows(ROOT / "configs" / "train_seeds.jsonl")}
    handwritten = [p for prompts in module.HANDWRITTEN.values() for p in prompts]
    assert not {p.lower() for p in handwritten} & seeds
