"""`medusa-export train`: the k+2 target convention, the chunked cross-entropy, the data sources, training
on tiny models (loss, outputs, accuracy.json, --resume) and refusals. CPU only, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from conftest import SPECBENCH
from medusa_export import train as tr
from medusa_export import train_data as td
from medusa_export import train_objective as to
from medusa_export import train_recipe as rc
from medusa_export.heads import load_heads
from medusa_export.models import explicit_model
from medusa_runtime.errors import MedusaError
from medusa_runtime.tree import load_rank_accuracy, tree_from_accuracy

PERIOD = "abcdefg"  # distinct byte tokens: the token k+2 ahead differs from the one k+1 ahead


def _settings(out: Path, **kw) -> tr.TrainSettings:
    base = dict(num_samples=12, max_new_tokens=24, epochs=1, batch_size=4, holdout=0.25, quiet=True)
    return tr.TrainSettings("tiny-llama", out, **{**base, **kw})


def _periodic_file(path: Path, docs: int = 6, length: int = 120) -> Path:
    path.write_text("\n\n".join((PERIOD * length)[d : d + length] for d in range(docs)))
    return path


def _cli():
    app = typer.Typer()
    app.callback()(lambda: None)  # keep `train` a subcommand
    app.command("train")(tr.train_command)
    return app


# ---------------------------------------------------------------------------------------- alignment


def test_shifted_targets_follow_the_k_plus_2_convention():
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15, 0], [20, 21, 22, 23, 24, 25, 26]])
    lengths, starts = torch.tensor([6, 7]), torch.tensor([0, 3])
    targets = to.shifted_targets(tokens, lengths, starts, [1, *to.head_offsets(2)])
    i = to.IGNORE
    # base (t+1), head 0 (t+2), head 1 (t+3); row 0 ends at length 6, row 1's targets start at index 3
    assert targets[:, 0].tolist() == [
        [11, 12, 13, 14, 15, i, i],
        [12, 13, 14, 15, i, i, i],
        [13, 14, 15, i, i, i, i],
    ]
    assert targets[:, 1].tolist() == [
        [i, i, 23, 24, 25, 26, i],
        [i, 23, 24, 25, 26, i, i],
        [23, 24, 25, 26, i, i, i],
    ]
    assert to.head_offsets(4) == [2, 3, 4, 5]


def test_hidden_states_are_the_final_normed_states_the_graph_uses(tiny_base):
    """The training states equal transformers' last_hidden_state (after the final norm), and projecting
    them gives transformers' logits, sliding-window model included."""
    base = tiny_base("tiny-gemma3")
    decoder = explicit_model(base)
    tokens = torch.tensor([base.tokenizer.encode("Sliding windows over a prompt longer than eight").ids] * 2)
    hidden = td.hidden_states(decoder, tokens)
    with torch.no_grad():
        out = base.hf(tokens, output_hidden_states=True)
        ref = base.hf.model(tokens).last_hidden_state
    torch.testing.assert_close(hidden, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoder.project(hidden), out.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("train_weight", [False, True])
def test_chunked_cross_entropy_matches_autograd(monkeypatch, softcap, train_weight):
    monkeypatch.setattr(to, "_chunk_rows", lambda vocab, device: 3)  # several chunks, one partial
    g = torch.Generator().manual_seed(0)
    states = torch.randn(10, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g).requires_grad_(train_weight)
    targets = torch.randint(0, 30, (10,), generator=g)
    row_weights = torch.rand(10, generator=g)
    loss = to.linear_cross_entropy(states, weight, targets, row_weights, softcap)
    (2 * loss).backward()
    s2, w2 = states.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_(train_weight)
    logits = s2 @ w2.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = (F.cross_entropy(logits, targets, reduction="none") * row_weights).sum()
    (2 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(states.grad, s2.grad)
    if train_weight:
        torch.testing.assert_close(weight.grad, w2.grad)


def test_target_ranks_count_better_tokens():
    states = torch.eye(3)
    weight = torch.tensor([[3.0, 0, 0], [2.0, 1, 0], [1.0, 2, 0], [0, 0, 1]])  # logits = weight columns
    ranks = to.target_ranks(states, weight, torch.tensor([1, 2, 3]))
    assert ranks.tolist() == [1, 0, 0]


# --------------------------------------------------------------------------------------------- data


def test_seed_prompts_are_many_varied_and_unique():
    rows = [json.loads(line) for line in td.SEEDS_FILE.read_text().splitlines() if line.strip()]
    prompts = td.load_seed_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert len({row["category"] for row in rows}) >= 10


def test_seed_prompts_and_recipe_are_not_benchmark_prompts():
    def words(text: str) -> list[str]:
        return text.lower().split()

    def shingles(text: str, n: int = 8) -> set[str]:
        w = words(text)
        return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}

    turns = [
        t for line in SPECBENCH.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"]
    ]
    bench = {" ".join(words(t)) for t in turns}
    bench_shingles = set().union(*(shingles(t) for t in turns))

    def strings(value) -> list[str]:  # every string in the --recipe passages files (topics, templates)
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [str(value)]

    recipe = rc.load_recipe()
    for prompt in td.load_seed_prompts() + strings(recipe.topics) + strings(recipe.templates):
        assert " ".join(words(prompt)) not in bench, prompt
        assert not shingles(prompt) & bench_shingles, prompt


def test_data_file_formats(tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("first document\nstill first\n\n\nsecond one\n")
    assert td.read_data_file(text) == ("texts", ["first document\nstill first", "second one"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert td.read_data_file(rows) == ("texts", ["a", "b"])
    rows.write_text('{"prompt": "p1"}\n\n{"turns": ["t1", "t2"]}\n')
    assert td.read_data_file(rows) == ("prompts", ["p1", "t1"])
    rows.write_text('{"other": 1}\n')
    with pytest.raises(MedusaError, match="text"):
        td.read_data_file(rows)


def test_generation_jobs_start_greedy_then_sample():
    jobs = td.generation_jobs(num_prompts=5, num_samples=12, seed=0)
    assert [j.temperature for j in jobs[:5]] == [None] * 5
    assert sorted(j.prompt for j in jobs[:5]) == list(range(5))
    assert all(j.temperature is not None for j in jobs[5:])
    assert {(j.temperature, j.sampled_tokens) for j in jobs[5:10]} == {td.SAMPLED_PASSES[0]}


def test_one_batch_mixes_greedy_and_sampled_then_greedy_rows(tiny_base):
    """A greedy row is the greedy continuation; a row that samples 5 tokens then continues greedily from
    them; a fully sampled row differs from greedy."""
    from medusa_export.reference import hf_greedy

    base = tiny_base("tiny-llama")
    prompts = [base.tokenizer.encode(p).ids for p in ("Once upon a time", "x = 1", "Hello there")]
    jobs = [td.GenJob(0, None, None), td.GenJob(1, 1.0, 5), td.GenJob(2, 1.0, None)]
    torch.manual_seed(0)
    greedy, prefix_then_greedy, sampled = td.generate_batch(base, prompts, jobs, 16, "cpu")
    assert greedy == hf_greedy(base, prompts[0], 16).tokens
    out = prefix_then_greedy
    assert out[5:] == hf_greedy(base, prompts[1] + out[:5], len(out) - 5).tokens
    assert sampled != hf_greedy(base, prompts[2], 16).tokens


# ------------------------------------------------------------------------------------------ training


def test_heads_learn_a_periodic_sequence_k_plus_2_ahead(tmp_path, tiny_base):
    """Heads trained on a periodic text predict the token k+2 ahead of each position, checked here
    independently of the trainer's own target code."""
    data = _periodic_file(tmp_path / "periodic.txt")
    out = tmp_path / "heads"
    result = tr.train(_settings(out, data=data, epochs=25, lr=1e-2, seq_len=64, holdout=0.0))
    assert min(result.accuracy["top1"]) > 0.95
    base = tiny_base("tiny-llama")
    decoder = explicit_model(base)
    heads = load_heads(out, base.config.hidden_size, base.config.vocab_size)
    ids = base.tokenizer.encode((PERIOD * 20)[3:40]).ids
    hidden = td.hidden_states(decoder, torch.tensor([ids]))[0]
    with torch.no_grad():
        guesses = heads(hidden, decoder.lm_head_weight()).argmax(-1)  # [K, T]
    for k in range(heads.num_heads):
        t = range(1, len(ids) - 2 - k)  # skip the BOS position
        hits = sum(int(guesses[k, i]) == ids[i + 2 + k] for i in t) / len(t)
        assert hits > 0.9, (k, hits)
        misses = sum(int(guesses[k, i]) == ids[i + 1 + k] for i in t) / len(t)
        assert misses < 0.1, (k, misses)


def test_self_distillation_outputs_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "heads"
    runner = CliRunner()
    args = ["train", "tiny-llama", "--out", str(out), "--num-heads", "3", "--num-samples", "16"]
    args += ["--max-new-tokens", "24", "--batch-size", "4", "--holdout", "0.25", "--lr", "1e-2", "--quiet"]
    first = runner.invoke(_cli(), [*args, "--epochs", "3"])
    assert first.exit_code == 0, first.output
    assert "top1" in first.output and "t+2" in first.output
    heads = load_heads(out, 64, 320)
    assert (heads.num_heads, heads.num_layers, heads.shared_lm_head) == (3, 1, True)
    acc = json.loads((out / "accuracy.json").read_text())
    assert len(acc["rank_accuracy"]) == 3 and all(len(row) == to.MAX_RANK for row in acc["rank_accuracy"])
    for k in range(3):
        row = acc["rank_accuracy"][k]
        assert 0 <= acc["top1"][k] <= acc["top5"][k] <= sum(row) + 1e-6 <= 1 + 1e-6
        assert acc["top1"][k] == row[0]
    assert acc["base_top1"] > 0.9  # greedy-continued targets: the base agrees with itself at t+1
    assert acc["train"]["eval_on"] == "held-out" and acc["train"]["num_sequences"] == 16
    assert load_rank_accuracy(out / "accuracy.json") == acc["rank_accuracy"]
    assert tree_from_accuracy(acc["rank_accuracy"], 8)
    losses = json.loads((out / "accuracy.json").read_text())["train"]
    assert losses["final_loss"] < losses["first_loss"]
    steps = losses["steps"]

    def no_generation(*a, **kw):
        raise AssertionError("--resume must reuse the cached data")

    monkeypatch.setattr(td, "self_distill", no_generation)
    data_mtime = (out / td.DATA_FILE).stat().st_mtime_ns
    resumed = runner.invoke(_cli(), [*args, "--epochs", "5", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    acc2 = json.loads((out / "accuracy.json").read_text())["train"]
    assert acc2["steps"] > steps and acc2["steps_this_run"] == acc2["steps"] - steps
    assert (out / td.DATA_FILE).stat().st_mtime_ns == data_mtime


def test_loss_decreases_with_per_head_projections(tmp_path):
    result = tr.train(_settings(tmp_path, shared_lm_head=False, num_layers=2, epochs=4, lr=1e-2, num_heads=2))
    losses = result.losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    heads = load_heads(tmp_path, 64, 320)
    assert (heads.num_heads, heads.num_layers, heads.shared_lm_head) == (2, 2, False)


def test_resume_refuses_other_settings(tmp_path):
    tr.train(_settings(tmp_path))
    with pytest.raises(MedusaError, match="num_heads"):
        tr.train(_settings(tmp_path, num_heads=2, resume=True))
    with pytest.raises(MedusaError, match="num_samples"):
        tr.train(_settings(tmp_path, num_samples=13, resume=True))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model="no-such-model"), "unknown model"),
        (dict(num_heads=0), "--num-heads 0"),
        (dict(data=Path("/nonexistent/data.jsonl")), "--data file not found"),
        (dict(holdout=1.0), "--holdout"),
        (dict(dtype="int8"), "--dtype"),
    ],
)
def test_bad_input_is_a_medusa_error(tmp_path, change, message):
    settings = _settings(tmp_path)
    for key, value in change.items():
        setattr(settings, key, value)
    with pytest.raises(MedusaError, match=message):
        tr.train(settings)


def test_sequential_heads_use_the_token_before_their_target(tmp_path):
    """Text of pairs `qQ` with random letters: at an upper-case letter the next letter is random and the one
    after is its upper case. Head 0 (token t+2) can know that only from token t+1, which a sequential head
    reads and a Medusa head does not. Sequential heads save with their extra key."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    docs = ["".join(c + c.upper() for c in rng.choices(letters, k=60)) for _ in range(40)]
    data = tmp_path / "pairs.txt"
    data.write_text("\n\n".join(docs))
    top1 = {}
    for sequential in (False, True):
        out = tmp_path / f"heads-{sequential}"
        settings = _settings(
            out, data=data, epochs=12, lr=1e-2, seq_len=64, num_heads=2, sequential=sequential
        )
        top1[sequential] = tr.train(settings).accuracy["top1"][0]
    assert top1[True] > 0.4 > 0.15 > top1[False], top1  # about half the positions vs 1/26
    heads = load_heads(tmp_path / "heads-True", 64, 320)
    assert heads.sequential and heads.prev[0].weight.abs().sum() > 0
    assert json.loads((tmp_path / "heads-True" / "config.json").read_text())["sequential"] is True
