"""Mechanisms from co-active units: the greedy description-length merge on hand-made activity."""

import math

import pytest
import torch

from apd.mechanisms import MechanismSearchTooLarge, description_bits, find_mechanisms, mechanisms_from_masks


def _activity(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_units_that_always_fire_together_merge_and_those_that_fire_apart_do_not():
    # units 0, 1 fire together (an identity's two directions); 2, 3, 4 each fire on their own inputs; 5 never
    active = _activity([[1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0]] * 5)
    groups = find_mechanisms(active)
    assert groups == [[0, 1], [2], [3], [4]]
    # merging saved bits: 4 groups instead of 5 live units
    before = description_bits(active, [[k] for k in range(5)], [{k} for k in range(5)], alpha=1.0)
    after = description_bits(active, groups, [{0, 1}, {2}, {3}, {4}], alpha=1.0)
    assert after < before
    # by hand: 5 live units, each active input pays log2(5 + 1) + 1 bits; 0, 1 fire on 20 inputs, 2-4 on 5 each
    assert before == pytest.approx((20 * 2 * (math.log2(6) + 1) + 3 * 5 * (math.log2(6) + 1)) / 20)
    assert after == pytest.approx((20 * (math.log2(5) + 2) + 3 * 5 * (math.log2(5) + 1)) / 20)


def test_a_rare_unit_is_not_folded_into_a_frequent_one_and_overlap_chains():
    # unit 1 fires on a tenth of the inputs where unit 0 fires; 2 and 3 overlap on 19 of 21 inputs
    active = torch.zeros(100, 4, dtype=torch.bool)
    active[:, 0] = True
    active[50:60, 1] = True
    active[:20, 2] = True
    active[1:21, 3] = True
    assert find_mechanisms(active) == [[2, 3], [0], [1]]
    # by hand, alpha = 3, bits per input Σ_g n_g (log2(K + 1) + 3 rank_g) / 100:
    # apart, K = 4: (20 + 20 + 100 + 10) (log2 5 + 3); found, K = 3: 21 (2 + 6) + (100 + 10) (2 + 3);
    # 1 folded into 0 as well, K = 2: (21 + 100) (log2 3 + 6)
    apart = description_bits(active, [[2], [3], [0], [1]], [{2}, {3}, {0}, {1}], alpha=3.0)
    found = description_bits(active, [[2, 3], [0], [1]], [{2, 3}, {0}, {1}], alpha=3.0)
    folded = description_bits(active, [[2, 3], [0, 1]], [{2, 3}, {0, 1}], alpha=3.0)
    assert apart == pytest.approx(150 * (math.log2(5) + 3) / 100)
    assert found == pytest.approx((21 * 8 + 110 * 5) / 100)
    assert folded == pytest.approx(121 * (math.log2(3) + 6) / 100)
    assert found < apart and found < folded  # the greedy merge stopped at the shortest of the three


def _greedy_by_brute_force(active: torch.Tensor, alpha: float, min_overlap: float = 0.5) -> list[list[int]]:
    """The greedy merge written out: each round recomputes description_bits for every allowed merge
    (groups firing together on >= min_overlap of the rarer one's inputs) and takes the shortest."""
    groups = [[k] for k in active.any(0).nonzero().flatten().tolist()]

    def bits(gs):
        return description_bits(active, gs, [set(x) for x in gs], alpha=alpha)

    while len(groups) > 1:
        current, best = bits(groups), None
        fired = [active[:, grp].any(1) for grp in groups]
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                if (fired[i] & fired[j]).sum() < min_overlap * min(fired[i].sum(), fired[j].sum()):
                    continue
                merged = [grp for k, grp in enumerate(groups) if k not in (i, j)] + [groups[i] + groups[j]]
                b = bits(merged)
                if b < current - 1e-9 and (best is None or b < best[0]):
                    best = (b, merged)
        if best is None:
            break
        groups = best[1]
    return sorted((sorted(grp) for grp in groups), key=lambda grp: (-len(grp), grp))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_the_greedy_merge_equals_recomputing_the_description_length_for_every_merge(seed, alpha):
    """find_mechanisms updates the merge savings incrementally; on random correlated activity (8 units
    driven by 4 causes, 10% of the bits flipped) it makes the same choices as recomputing the bits."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(300, 4, generator=g) < torch.tensor([0.5, 0.2, 0.1, 0.05])
    noise = torch.rand(300, 8, generator=g) < 0.1
    active = base[:, [0, 0, 1, 1, 1, 2, 3, 3]] ^ noise
    groups = find_mechanisms(active, alpha=alpha)
    assert groups == _greedy_by_brute_force(active, alpha)
    assert len(groups) < 8  # something merged (alpha 1 and 3 also keep some groups apart)


def test_the_pair_list_keeps_up_with_chains_of_merges_among_twenty_units():
    """find_mechanisms keeps only the pairs allowed to merge and re-derives the merged group's pairs;
    with 20 units from 5 causes (groups of 2 to 6 merge one unit at a time, each merge dropping and
    adding pairs) it still makes the brute-force choices."""
    g = torch.Generator().manual_seed(7)
    base = torch.rand(400, 5, generator=g) < torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05])
    noise = torch.rand(400, 20, generator=g) < 0.08
    active = base[:, [0] * 6 + [1] * 5 + [2] * 4 + [3] * 3 + [4] * 2] ^ noise
    groups = find_mechanisms(active, alpha=1.0)
    assert groups == _greedy_by_brute_force(active, 1.0)
    assert max(len(grp) for grp in groups) >= 4


def test_units_that_never_fire_together_stay_apart_where_names_alone_would_pay_for_joining_them():
    # 40 units, each on its own 1/40 of the inputs: with cheap pieces, every merge shortens every name
    active = torch.zeros(400, 40, dtype=torch.bool)
    for k in range(40):
        active[10 * k : 10 * (k + 1), k] = True
    assert len(find_mechanisms(active, alpha=0.5, min_overlap=0.0)) < 40
    assert find_mechanisms(active, alpha=0.5) == [[k] for k in range(40)]


def test_the_identity_and_each_features_two_uses_of_a_tied_matrix_come_out_as_mechanisms():
    # TMS + ID by hand: feature f on its own inputs uses enc:f and dec:f (one tied piece); the identity's
    # two pieces id:0, id:1 each fire on 4 of the 5 features' inputs; dec fires on a few extra inputs
    rows = []
    for f in range(5):
        for r in range(20):
            row = {"enc": [0.0] * 5, "dec": [0.0] * 5, "id": [0.0, 0.0]}
            row["enc"][f] = 1.0 if r < 18 else 0.0
            row["dec"][f] = 1.0
            row["id"] = [float(f != 4), float(f != 0)]
            rows.append(row)
    rows += [{"enc": [0.0] * 5, "dec": [0.0] * 5, "id": [0.0, 0.0]}] * 400  # no feature: nothing fires
    masks = {k: torch.tensor([r[k] for r in rows]) for k in ("enc", "id", "dec")}
    mechs, summary = mechanisms_from_masks(masks, tau=0.5, tied={"dec": "enc"})
    got = sorted((sorted(m.members), m.rank) for m in mechs)
    assert got == sorted([(["id:0", "id:1"], 2)] + [(sorted([f"enc:{f}", f"dec:{f}"]), 1) for f in range(5)])
    identity = next(m for m in mechs if m.layers == ["id"])
    assert abs(identity.frequency - 100 / 500) < 1e-6
    assert summary["n_mechanisms"] == 6 and summary["n_live_units"] == 12
    assert summary["mechanism_bits"] < summary["mechanism_bits_unmerged"]


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


def test_too_many_candidate_pairs_are_refused_before_the_search_and_evaluation_goes_on_without_mechanisms(monkeypatch):
    # units 0-3 always together: 6 pairs; units 4, 5 each on inputs of their own add none
    active = _activity([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]] * 3)
    assert find_mechanisms(active, max_pairs=6) == [[0, 1, 2, 3], [4], [5]]
    with pytest.raises(MechanismSearchTooLarge, match=r"6 pairs of the 6 live units .*max_pairs=5"):
        find_mechanisms(active, max_pairs=5)
    with pytest.raises(MechanismSearchTooLarge):
        mechanisms_from_masks({"a": active[:, :3].float(), "b": active[:, 3:].float()}, tau=0.5, max_pairs=5)
    # a run's evaluation: the cap hit, every other metric is still there and the mechanisms are marked skipped
    import apd.evaluation
    from apd import decompose
    from apd.methods.spd import SPDConfig
    from apd.targets import TMSTargetConfig, get_target

    target_cfg = TMSTargetConfig(name="tms_5_2")
    model, _ = get_target(target_cfg)
    config = SPDConfig(C=5, steps=2, faithfulness_warmup_steps=1, ci_threshold=0.0)
    dec = decompose(model, lambda: target_cfg.batch(64, None), config, target_cfg.modules(), progress=False)
    full = apd.evaluation.evaluate(dec, model, target_cfg, n_eval=64, seed=0)
    assert full["n_mechanisms"] >= 1 and "mechanisms_skipped" not in full
    monkeypatch.setattr(apd.evaluation, "MAX_PAIRS", 0)
    with pytest.warns(UserWarning, match="mechanisms skipped: .* pairs"):
        dense = apd.evaluation.evaluate(dec, model, target_cfg, n_eval=64, seed=0)
    assert dense["mechanisms_skipped"] == 1.0 and math.isnan(dense["n_mechanisms"]) and dense["mechanisms"] == []
    for k in ("faithfulness_loss", "ci_recon_mse", "l0"):
        assert dense[k] == pytest.approx(full[k]), k
