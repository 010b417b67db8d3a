"""Tests for medusa_export.heads: structure, logits, FasterDecoding-format save/load and its refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from medusa_export import heads as heads_module
from medusa_export.heads import (
    MedusaHeads,
    ResBlock,
    load_heads,
    random_heads,
    resolve_heads,
    save_heads,
)
from medusa_runtime.errors import MedusaError

H, V, K, L = 16, 40, 3, 2


def _hidden(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, H, generator=torch.Generator().manual_seed(seed))


def _lm_head(seed: int = 2) -> torch.Tensor:
    return torch.randn(V, H, generator=torch.Generator().manual_seed(seed))


def _write(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, fmt: str = "pt"
) -> Path:
    """A checkpoint written by hand, the way FasterDecoding/Medusa scripts do it."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":
        torch.save(tensors, folder / "medusa_lm_head.pt")
    else:
        save_file(tensors, folder / "medusa_lm_head.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _saved(tmp_path: Path, shared: bool = False, fmt: str = "safetensors") -> Path:
    return save_heads(random_heads(K, H, V, L, shared_lm_head=shared), tmp_path / "heads", "base/model", fmt)


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "medusa_lm_head.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("shared", [True, False])
def test_state_dict_keys_are_fasterdecoding_format(shared: bool) -> None:
    heads = MedusaHeads(H, V, K, L, shared_lm_head=shared)
    expected = {f"{h}.{layer}.linear.{p}" for h in range(K) for layer in range(L) for p in ("weight", "bias")}
    if not shared:
        expected |= {f"{h}.{L}.weight" for h in range(K)}
    assert set(heads.heads.state_dict()) == expected


def test_fresh_blocks_are_identity_and_per_head_projection_has_no_bias() -> None:
    x = _hidden(5)
    assert torch.equal(ResBlock(H)(x), x)
    heads = MedusaHeads(H, V, K, L, shared_lm_head=True)
    assert torch.equal(heads.head_states(x), x.expand(K, 5, H))
    assert MedusaHeads(H, V, K, L, shared_lm_head=False).heads[0][L].bias is None


def test_blocks_do_not_share_parameters() -> None:
    heads = MedusaHeads(H, V, K, L, shared_lm_head=False)
    pointers = [p.data_ptr() for p in heads.parameters()]
    assert len(pointers) == len(set(pointers)) == K * (2 * L + 1)
    with torch.no_grad():
        heads.heads[0][0].linear.weight.fill_(1.0)
    assert all(
        not heads.heads[h][i].linear.weight.any() for h in range(K) for i in range(L) if (h, i) != (0, 0)
    )


def test_resblock_formula() -> None:
    block = ResBlock(H, zero_init=False)
    x = _hidden(4)
    assert torch.allclose(block(x), x + F.silu(x @ block.linear.weight.T + block.linear.bias))


def test_shared_logits_match_per_row_projection() -> None:
    heads = random_heads(K, H, V, L, shared_lm_head=True)
    hidden, weight = _hidden(2, 3), _lm_head()
    logits = heads.logits(hidden, weight)
    assert logits.shape == (K, 2, 3, V)
    states = heads.head_states(hidden)
    for k in range(K):
        for b in range(2):
            for t in range(3):
                assert torch.allclose(logits[k, b, t], weight @ states[k, b, t], atol=1e-5)
    assert torch.equal(heads(hidden, weight), logits)


def test_per_head_logits_use_each_heads_own_projection() -> None:
    heads = random_heads(K, H, V, L, shared_lm_head=False)
    hidden = _hidden(3)
    logits = heads.logits(hidden)
    states = heads.head_states(hidden)
    for k in range(K):
        assert torch.allclose(logits[k], states[k] @ heads.heads[k][L].weight.T, atol=1e-6)
    assert not torch.allclose(logits[0], logits[1])


def test_logits_refuse_wrong_inputs() -> None:
    heads = random_heads(K, H, V, L, shared_lm_head=True)
    with pytest.raises(MedusaError, match="lm_head weight"):
        heads.logits(_hidden(2))
    with pytest.raises(MedusaError, match="lm_head weight"):
        heads.logits(_hidden(2), _lm_head()[:-1])
    with pytest.raises(MedusaError, match="hidden state has size"):
        heads.logits(torch.zeros(2, H + 1), _lm_head())


@pytest.mark.parametrize("sizes", [(0, V, K, L), (H, V, 0, L), (H, V, K, 0), (H, -1, K, L)])
def test_bad_sizes_refused(sizes: tuple[int, int, int, int]) -> None:
    with pytest.raises(MedusaError, match="positive integer sizes"):
        MedusaHeads(*sizes)


def test_random_heads_are_seeded_varied_and_not_identity() -> None:
    hidden = _hidden(4)
    states = random_heads(K, H, V, L, seed=3).head_states(hidden)
    assert torch.equal(states, random_heads(K, H, V, L, seed=3).head_states(hidden))
    assert not torch.allclose(states, random_heads(K, H, V, L, seed=4).head_states(hidden))
    assert not torch.allclose(states[0], hidden)
    assert not torch.allclose(states[0], states[1])


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("shared", [True, False])
def test_round_trip(tmp_path: Path, shared: bool, fmt: str) -> None:
    heads = random_heads(K, H, V, L, shared_lm_head=shared, seed=7)
    folder = save_heads(heads, tmp_path / "out", "org/base", fmt=fmt)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", f"medusa_lm_head.{fmt}"])
    config = json.loads((folder / "config.json").read_text())
    assert config == {
        "medusa_num_heads": K,
        "medusa_num_layers": L,
        "base_model_name_or_path": "org/base",
        "hidden_size": H,
        "vocab_size": V,
        "shared_lm_head": shared,
    }
    loaded = load_heads(folder, H, V)
    assert (loaded.num_heads, loaded.num_layers, loaded.shared_lm_head) == (K, L, shared)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded.parameters())
    hidden = _hidden(2, 5)
    assert torch.equal(loaded.logits(hidden, _lm_head()), heads.logits(hidden, _lm_head()))


def test_load_casts_to_dtype(tmp_path: Path) -> None:
    loaded = load_heads(_saved(tmp_path), H, V, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_resave_in_other_format_replaces_old_weights(tmp_path: Path) -> None:
    folder = _saved(tmp_path, fmt="safetensors")
    newer = random_heads(K, H, V, L, shared_lm_head=False, seed=9)
    save_heads(newer, folder, "base/model", fmt="pt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "medusa_lm_head.pt"]
    assert torch.equal(load_heads(folder, H, V).logits(_hidden(2)), newer.logits(_hidden(2)))


def test_interrupted_save_keeps_old_checkpoint_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(heads_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_heads(random_heads(K, H, V, L, seed=5), folder, "base/model")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(KeyboardInterrupt):
        save_heads(random_heads(K, H, V, L, seed=5), tmp_path / "fresh", "base/model")
    assert list((tmp_path / "fresh").iterdir()) == []


def test_unknown_format_refused(tmp_path: Path) -> None:
    with pytest.raises(MedusaError, match="unknown Medusa heads format 'bin'"):
        save_heads(random_heads(K, H, V), tmp_path, "base/model", fmt="bin")


def test_unwritable_target_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(MedusaError, match="cannot save Medusa heads"):
        save_heads(random_heads(K, H, V), tmp_path / "file", "base/model")


def _fasterdecoding_state(shared: bool, num_layers: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for h in range(K):
        for i in range(num_layers):
            state[f"{h}.{i}.linear.weight"] = torch.randn(H, H, generator=g) / H
            state[f"{h}.{i}.linear.bias"] = torch.randn(H, generator=g) / H
        if not shared:
            state[f"{h}.{num_layers}.weight"] = torch.randn(V, H, generator=g)
    return state


@pytest.mark.parametrize("with_config", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_fasterdecoding_checkpoint_loads(tmp_path: Path, shared: bool, with_config: bool) -> None:
    state = _fasterdecoding_state(shared)
    config = {
        "medusa_num_heads": K,
        "medusa_num_layers": 1,
        "base_model_name_or_path": "lmsys/vicuna-7b-v1.3",
    }
    folder = _write(tmp_path / "fd", state, config if with_config else None)
    heads = load_heads(folder, H, V)
    assert (heads.num_heads, heads.num_layers, heads.shared_lm_head) == (K, 1, shared)
    hidden, lm_head = _hidden(4), _lm_head()
    for h in range(K):
        state_h = hidden + F.silu(hidden @ state[f"{h}.0.linear.weight"].T + state[f"{h}.0.linear.bias"])
        projection = lm_head if shared else state[f"{h}.1.weight"]
        assert torch.allclose(heads.logits(hidden, lm_head)[h], state_h @ projection.T, atol=1e-5)


def test_safetensors_preferred_over_pt(tmp_path: Path) -> None:
    folder = _write(tmp_path / "both", _fasterdecoding_state(True, seed=1), fmt="pt")
    _write(folder, _fasterdecoding_state(True, num_layers=2, seed=2), fmt="safetensors")
    assert load_heads(folder, H, V).num_layers == 2


def _drop_key(tensors: dict[str, torch.Tensor]) -> None:
    del tensors["1.0.linear.bias"]


def _add_key(tensors: dict[str, torch.Tensor]) -> None:
    tensors["medusa_head.extra"] = torch.zeros(1)


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    tensors["0.0.linear.bias"] = torch.zeros(H + 1)


def _drop_one_projection(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[f"1.{L}.weight"]


def _drop_one_block(tensors: dict[str, torch.Tensor]) -> None:
    """Head 2 keeps L - 1 blocks, its projection renumbered right after them."""
    del tensors[f"2.{L - 1}.linear.weight"], tensors[f"2.{L - 1}.linear.bias"]
    tensors[f"2.{L - 1}.weight"] = tensors.pop(f"2.{L}.weight")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_key, r"missing keys 1\.0\.linear\.bias$"),
        (_add_key, r"unexpected keys medusa_head\.extra$"),
        (_wrong_shape, r"wrong shapes: 0\.0\.linear\.bias \(17,\) \(expected \(16,\)\)"),
        (_drop_one_projection, r"inconsistent heads: \[0, 2\] have their own projection, \[1\] do not"),
        (_drop_one_block, r"inconsistent heads: residual layer count differs per head \{0: 2, 1: 2, 2: 1\}"),
    ],
)
def test_bad_tensors_refused(
    tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None], message: str
) -> None:
    folder = _saved(tmp_path, shared=False)
    _edit_tensors(folder, edit)
    with pytest.raises(MedusaError, match=message):
        load_heads(folder, H, V)


def test_missing_head_named_briefly_on_one_line(tmp_path: Path) -> None:
    folder = _saved(tmp_path, shared=True)
    _edit_tensors(folder, lambda tensors: [tensors.pop(key) for key in list(tensors) if key.startswith("1.")])
    (folder / "config.json").unlink()
    with pytest.raises(
        MedusaError,
        match=r"missing keys 1\.0\.linear\.bias, 1\.0\.linear\.weight, 1\.1\.linear\.bias \(\+1 more\)$",
    ) as error:
        load_heads(folder, H, V)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"medusa_num_heads": K + 2}, "medusa_num_heads=5 disagrees with the tensors"),
        ({"medusa_num_layers": 1}, "medusa_num_layers=1 disagrees with the tensors"),
        ({"shared_lm_head": True}, "shared_lm_head=True disagrees with the tensors"),
    ],
)
def test_config_disagreeing_with_tensors_refused(tmp_path: Path, changes: dict, message: str) -> None:
    folder = _saved(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(MedusaError, match=message):
        load_heads(folder, H, V)


@pytest.mark.parametrize("shared", [True, False])
def test_hidden_size_mismatch_refused(tmp_path: Path, shared: bool) -> None:
    with pytest.raises(
        MedusaError, match=rf"hidden size mismatch: heads have \[{H}\], base model has {H * 2}"
    ):
        load_heads(_saved(tmp_path, shared=shared), H * 2, V)


def test_vocab_mismatch_refused(tmp_path: Path) -> None:
    with pytest.raises(MedusaError, match=rf"vocab size mismatch: head projections have \[{V}\] rows"):
        load_heads(_saved(tmp_path, shared=False), H, V + 1)
    with pytest.raises(MedusaError, match=rf"vocab_size={V} disagrees with the base model \({V + 1}\)"):
        load_heads(_saved(tmp_path / "tied", shared=True), H, V + 1)


def test_missing_or_unreadable_checkpoints_refused(tmp_path: Path) -> None:
    with pytest.raises(MedusaError, match="Medusa heads folder not found"):
        load_heads(tmp_path / "nowhere", H, V)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedusaError, match="has no medusa_lm_head.safetensors or medusa_lm_head.pt"):
        load_heads(tmp_path / "empty", H, V)
    (tmp_path / "empty" / "medusa_lm_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(MedusaError, match="cannot read"):
        load_heads(tmp_path / "empty", H, V)
    folder = _write(tmp_path / "other", {"model.embed.weight": torch.zeros(2)})
    with pytest.raises(MedusaError, match="holds no Medusa head tensors.*model.embed.weight"):
        load_heads(folder, H, V)
    folder = _write(tmp_path / "pickle", _fasterdecoding_state(True))
    torch.save({"state": _fasterdecoding_state(True)}, folder / "medusa_lm_head.pt")
    with pytest.raises(MedusaError, match="not a flat state dict"):
        load_heads(folder, H, V)
    (folder / "medusa_lm_head.pt").unlink()
    _write(folder, _fasterdecoding_state(True))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(MedusaError, match="cannot read .*config.json"):
        load_heads(folder, H, V)


def test_resolve_heads(tmp_path: Path) -> None:
    heads = resolve_heads("random:4", H, V)
    assert (heads.num_heads, heads.num_layers, heads.shared_lm_head) == (4, 1, True)
    heads = resolve_heads("random:2:3", H, V, dtype=torch.float16, shared_lm_head=False, seed=1)
    assert (heads.num_heads, heads.num_layers, heads.shared_lm_head) == (2, 3, False)
    assert heads.heads[0][3].weight.dtype == torch.float16
    folder = _saved(tmp_path)
    assert resolve_heads(str(folder), H, V).num_heads == K
    with pytest.raises(MedusaError, match="seed only apply to random: heads"):
        resolve_heads(str(folder), H, V, seed=1)


@pytest.mark.parametrize(
    "spec", ["random", "random:", "random:x", "random:0", "random:2:0", "random:1:2:3", ""]
)
def test_resolve_heads_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(MedusaError, match="Medusa heads spec"):
        resolve_heads(spec, H, V)


@pytest.mark.parametrize("name", sorted(p.name for p in heads_module.SHIPPED_HEADS.iterdir() if p.is_dir()))
def test_shipped_heads_load_by_name_with_their_trees(name: str) -> None:
    """Every heads folder in heads/ loads by its name for Gemma 3 270M (640 wide, 262,144 tokens), finite,
    with an accuracy record and the trees built from it."""
    from medusa_runtime.tree import build_tree, expected_accept_length, load_choices

    heads = resolve_heads(name, 640, 262144)
    assert heads.num_heads == 4 and all(torch.isfinite(p).all() for p in heads.parameters())
    folder = heads_module.SHIPPED_HEADS / name
    accuracy = json.loads((folder / "accuracy.json").read_text())
    assert len(accuracy["top1"]) == heads.num_heads
    expected = []
    for n in (4, 8, 16, 32, 64):
        _, choices = load_choices(folder / "trees" / f"gemma3-270m-{n}.json")
        assert build_tree(choices, heads.num_heads).num_nodes == n  # the root included
        expected.append(expected_accept_length(choices, accuracy["rank_accuracy"]))
    assert expected == sorted(expected) and expected[0] > 1.0  # bigger trees are predicted to accept more


def test_sequential_heads_round_trip_and_need_the_parent_token(tmp_path: Path) -> None:
    heads = random_heads(K, H, V, L, seed=7, sequential=True)
    folder = save_heads(heads, tmp_path / "out", "org/base")
    assert json.loads((folder / "config.json").read_text())["sequential"] is True
    loaded = load_heads(folder, H, V)
    assert loaded.sequential and set(loaded.checkpoint_state()) == set(heads.checkpoint_state())
    hidden, prev = _hidden(2, 5), torch.randn(K, 2, 5, H)
    assert torch.equal(loaded.logits(hidden, _lm_head(), prev), heads.logits(hidden, _lm_head(), prev))
    assert not torch.allclose(
        heads.logits(hidden, _lm_head(), prev), heads.logits(hidden, _lm_head(), 0 * prev)
    )
    with pytest.raises(MedusaError, match="parent's token"):
        heads.logits(hidden, _lm_head())
    fresh = MedusaHeads(H, V, K, L, sequential=True)  # zero projections: a Medusa head
    assert torch.equal(fresh.head_states(hidden, prev), MedusaHeads(H, V, K, L).head_states(hidden))
    _edit_config(folder, sequential=False)
    with pytest.raises(MedusaError, match="sequential"):
        load_heads(folder, H, V)
