"""apd.compare.scoring: target-independent pieces of a row, on hand-made cases."""

import math

import pytest
import torch

from apd.compare import component_bits, feature_splitting, live_components, mask_bits, n_dead_components
from apd import APDConfig
from apd.methods import method_for

mask_l0 = method_for(APDConfig()).mask_l0


def test_duplicated_latents_count_as_split_features_and_duplicate_pairs():
    truth = torch.eye(3)
    dirs = torch.stack([truth[0], truth[0] * 2, truth[1], truth[2], -truth[2]])
    live = torch.tensor([True, True, True, True, True])
    s = feature_splitting(dirs, truth, live, tau=0.9)
    assert s == {"latents_per_feature": pytest.approx(4 / 3), "n_split_features": 1, "n_duplicate_pairs": 1}
    live[1] = False  # a dead copy is not a split
    assert feature_splitting(dirs, truth, live)["n_split_features"] == 0


def test_mask_numbers_take_a_shared_mask_or_per_module_masks():
    shared = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # APD: one mask for every module, C = 3
    assert live_components(shared).tolist() == [True, True, False]
    assert n_dead_components(shared) == 1
    assert mask_bits(shared) == pytest.approx(1.5 * math.log2(3)) == component_bits(mask_l0(shared)["l0"], 3)
    # SPD: per-module causal importances, C = 2 in "enc" and 4 in "dec" (values in [0, 1])
    per_module = {"enc": torch.tensor([[0.5, 0.0], [1.0, 0.0]]), "dec": torch.tensor([[0.2, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.3]])}
    assert live_components(per_module, "enc").tolist() == [True, False]
    assert live_components(per_module, "dec").tolist() == [True, False, False, True]
    assert n_dead_components(per_module) == 1 + 2
    assert mask_bits(per_module) == pytest.approx(1 * math.log2(2) + 1.5 * math.log2(4))
    assert mask_l0(per_module)["l0"] == pytest.approx(1 + 1.5)
    with pytest.raises(ValueError, match="per module"):
        live_components(per_module)
