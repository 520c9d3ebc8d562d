"""Mechanisms from co-active units: the greedy description-length merge on hand-made activity."""

import math

import torch

from apd.mechanisms import description_bits, find_mechanisms, mechanisms_from_masks


def _activity(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_units_that_always_fire_together_merge_and_those_that_fire_apart_do_not():
    # units 0, 1 fire together (an identity's two directions); 2, 3, 4 each fire on their own inputs; 5 never
    active = _activity([[1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0]] * 5)
    groups = find_mechanisms(active)
    assert groups == [[0, 1], [2], [3], [4]]
    # merging saved bits: 4 groups instead of 5 live units
    before = description_bits(active, [[k] for k in range(5)], [{k} for k in range(5)])
    after = description_bits(active, groups, [{0, 1}, {2}, {3}, {4}])
    assert after < before
    # by hand: 5 live units, each active input pays log2(5 + 1) + 1 bits; 0, 1 fire on 20 inputs, 2-4 on 5 each
    assert before == (20 * 2 * (math.log2(6) + 1) + 3 * 5 * (math.log2(6) + 1)) / 20
    assert after == (20 * (math.log2(5) + 2) + 3 * 5 * (math.log2(5) + 1)) / 20


def test_a_rare_unit_is_not_folded_into_a_frequent_one_and_overlap_chains():
    # unit 1 fires on a tenth of the inputs where unit 0 fires; 2 and 3 overlap on 19 of 20 inputs
    active = torch.zeros(100, 4, dtype=torch.bool)
    active[:, 0] = True
    active[:10, 1] = True
    active[:20, 2] = True
    active[1:21, 3] = True
    assert find_mechanisms(active, threshold=0.9) == [[2, 3], [0], [1]]
    assert find_mechanisms(active, threshold=0.95) == [[0], [1], [2], [3]]


def test_the_two_uses_of_a_tied_matrix_share_their_pieces():
    masks = {"enc": torch.tensor([[0.9, 0.0], [0.0, 0.8]]).repeat(10, 1), "dec": torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(10, 1)}
    mechs, summary = mechanisms_from_masks(masks, tau=0.1, tied={"dec": "enc"})
    assert summary["n_mechanisms"] == 2 and summary["n_live_units"] == 4
    assert sorted(m.members for m in mechs) == [["enc:0", "dec:0"], ["enc:1", "dec:1"]]
    assert all(m.rank == 1 and m.layers == ["enc", "dec"] and m.frequency == 0.5 for m in mechs)
    assert summary["mechanism_bits"] < summary["mechanism_bits_unmerged"]


def test_shared_masks_make_one_unit_per_component_spanning_every_matrix():
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).repeat(4, 1)  # component 2 dead
    mechs, summary = mechanisms_from_masks(mask, tau=0.5, ranks={"enc": 2, "dec": 1})
    assert summary["n_live_units"] == 2 and [m.rank for m in mechs] == [3, 3]
