"""Merging parallel components (apd.merge, APDConfig.merge_threshold): hand-built cases."""

import pytest
import torch
from torch import nn

from apd import APDConfig, ConfigError, decompose, decompose_seeds
from apd.component_model import ComponentModel
from apd.merge import merge_parallel_, merge_parallel_components, parallel_groups
from apd.train import train_step


def _rank1(b: list[float], a: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(a)[None, None, :], torch.tensor(b)[None, :, None]  # A [1, 1, d_in], B [1, d_out, 1]


def _layer(pairs):
    A, B = zip(*(_rank1(b, a) for b, a in pairs))
    return torch.cat(A), torch.cat(B)


def test_parallel_groups_finds_split_mechanisms_and_keeps_the_largest_first():
    # components 0 and 2 point the same way (2 is half of 0... scaled by 0.5), 1 is orthogonal, 3 is dead
    A, B = _layer([([1.0, 0.0], [2.0, 0.0, 0.0]), ([0.0, 1.0], [0.0, 1.0, 0.0]), ([0.5, 0.0], [2.0, 0.0, 0.0]), ([0.0, 0.0], [0.0, 0.0, 0.0])])
    W = {"l": torch.einsum("com,cmi->coi", B, A)}
    assert parallel_groups(W, 0.99) == [[0, 2]]
    # anti-parallel and merely similar components are left alone
    A2, B2 = _layer([([1.0, 0.0], [1.0, 0.0, 0.0]), ([-1.0, 0.0], [1.0, 0.0, 0.0]), ([1.0, 0.2], [1.0, 0.0, 0.0])])
    assert parallel_groups({"l": torch.einsum("com,cmi->coi", B2, A2)}, 0.99) == []
    with pytest.raises(ValueError, match="threshold"):
        parallel_groups(W, 1.5)


def test_parallel_groups_needs_every_matrix_to_agree():
    # parallel in layer "a" but not in layer "b": one multi-layer component each, not a split
    Aa, Ba = _layer([([1.0], [1.0, 0.0]), ([1.0], [1.0, 0.0])])
    Ab, Bb = _layer([([1.0], [1.0, 0.0]), ([1.0], [0.0, 1.0])])
    W = {n: torch.einsum("com,cmi->coi", B, A) for n, (A, B) in {"a": (Aa, Ba), "b": (Ab, Bb)}.items()}
    assert parallel_groups(W, 0.99) == []


def test_merge_moves_the_sum_into_the_keeper_and_zeroes_the_rest_and_their_moments():
    A, B = _layer([([1.0, 0.0], [2.0, 0.0, 0.0]), ([0.0, 1.0], [0.0, 1.0, 0.0]), ([0.5, 0.0], [2.0, 0.0, 0.0])])
    total_before = torch.einsum("com,cmi->oi", B, A).clone()
    state = {"exp_avg": torch.ones_like(B), "exp_avg_sq": torch.ones_like(B), "step": torch.tensor(7.0)}
    groups = merge_parallel_({"l": A}, {"l": B}, 0.99, [(B, state)])
    assert groups == [[0, 2]]
    W = torch.einsum("com,cmi->coi", B, A)
    torch.testing.assert_close(W.sum(0), total_before)  # exactly parallel: the sum is unchanged
    torch.testing.assert_close(W[0], torch.tensor([[3.0, 0, 0], [0, 0, 0]]))  # 2 + 0.5·2 along e_0
    assert W[2].abs().max() == 0 and A[2].abs().max() == 0
    assert state["exp_avg"][2].abs().max() == 0 and state["exp_avg_sq"][2].abs().max() == 0
    assert state["exp_avg"][0].min() == 1 and state["step"] == 7  # the keeper's and scalar state stay


def _two_layer_with_split() -> tuple[nn.Module, ComponentModel]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    cm = ComponentModel(model, ["0", "2"], C=4, rank=1)
    with torch.no_grad():  # component 3 := 0.3 × component 1 (parallel in both layers)
        for n in cm.matrix_names:
            cm.layers[n].A[3] = cm.layers[n].A[1]
            cm.layers[n].B[3] = 0.3 * cm.layers[n].B[1]
    return model, cm


def test_merged_component_stays_dead_through_training_steps():
    model, cm = _two_layer_with_split()
    cfg = APDConfig(C=4, rank=1, topk=2.0, min_active=4, simplicity_coeff=1.0, schatten_p=0.9, lr=1e-2, steps=20,
                    finetune_frac=0.5, merge_threshold=0.99)  # fmt: skip
    opt = torch.optim.Adam(cm.component_parameters(), lr=cfg.lr)
    x = torch.randn(64, 4)
    for step in range(3):  # moments build up on every component before the merge
        train_step(cm, opt, x, cfg, step)
    with torch.no_grad():
        for n in cm.matrix_names:  # make the split exact again after the steps
            cm.layers[n].A[3] = cm.layers[n].A[1]
            cm.layers[n].B[3] = 0.3 * cm.layers[n].B[1]
    before = {n: w.sum(0) for n, w in cm.component_weights().items()}
    assert merge_parallel_components(cm, opt, 0.99) == [[1, 3]]
    for n, w in cm.component_weights().items():
        assert w[3].abs().max() == 0
        torch.testing.assert_close(w.sum(0), before[n])  # exact split: the sum is unchanged
    for step in range(cfg.finetune_start, cfg.steps):
        train_step(cm, opt, x, cfg, step)
    for w in cm.component_weights().values():
        assert w[3].abs().max() == 0


def _dropped(weights: dict[str, torch.Tensor], threshold: float) -> list[int]:
    return sorted(c for _, *drop in parallel_groups(weights, threshold) for c in drop)


def test_decompose_merges_at_the_finetune_start():
    """The run with merging ends with exactly the components dead that the same run, stopped at the
    fine-tune start, had parallel (a loose threshold makes random components 'parallel')."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    kw = dict(C=6, rank=1, topk=2.0, lr=1e-3, log_every=1)
    torch.manual_seed(0)
    head = decompose(model, lambda: torch.randn(32, 6), APDConfig(**kw, steps=7), ["0", "2"], progress=False)
    expected = _dropped(head.component_weights(include_tied=False), 0.05)
    assert 0 < len(expected) < 6
    torch.manual_seed(0)
    cfg = APDConfig(**kw, steps=10, finetune_frac=0.3, merge_threshold=0.05)
    dec = decompose(model, lambda: torch.randn(32, 6), cfg, ["0", "2"], progress=False)
    norms = torch.cat([w.flatten(1) for w in dec.component_weights(include_tied=False).values()], 1).norm(dim=1)
    assert (norms == 0).nonzero().flatten().tolist() == expected


def test_decompose_seeds_merges_each_instance():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    kw = dict(C=6, rank=1, topk=2.0, lr=1e-3, log_every=1)
    torch.manual_seed(0)
    heads = decompose_seeds(model, lambda: torch.randn(32, 6), APDConfig(**kw, steps=7), ["0", "2"], [0, 1], progress=False)
    torch.manual_seed(0)
    cfg = APDConfig(**kw, steps=10, finetune_frac=0.3, merge_threshold=0.05)
    decs = decompose_seeds(model, lambda: torch.randn(32, 6), cfg, ["0", "2"], [0, 1], progress=False)
    for head, dec in zip(heads, decs):
        expected = _dropped(head.component_weights(include_tied=False), 0.05)
        norms = torch.cat([w.flatten(1) for w in dec.component_weights(include_tied=False).values()], 1).norm(dim=1)
        assert (norms == 0).nonzero().flatten().tolist() == expected


def test_merge_threshold_config_checks():
    with pytest.raises(ConfigError, match="finetune_frac"):
        APDConfig(merge_threshold=0.99)
    with pytest.raises(ConfigError, match="merge_threshold"):
        APDConfig(merge_threshold=0.0, finetune_frac=0.1)
    assert APDConfig(merge_threshold=0.99, finetune_frac=0.1).merge_threshold == 0.99
