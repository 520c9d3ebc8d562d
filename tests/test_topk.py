import pytest
import torch

from apd import topk_mask

ATTR = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.5, 0.2, 0.1, 0.3], [9.0, 8.0, 7.0, 6.0]])


def test_per_sample_topk_keeps_k_largest_per_row():
    expected = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.float)
    assert torch.equal(topk_mask(ATTR, 2, batch_topk=False), expected)


def test_batch_topk_keeps_floor_kB_largest_over_the_batch():
    # k = 1.5, B = 3 -> floor(4.5) = 4 pairs: 9, 8, 7, 6 all in row 2; row 1 gets nothing
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    assert torch.equal(topk_mask(ATTR, 1.5, batch_topk=True), expected)
    # k = 2 -> 6 pairs: 9, 8, 7, 6, 5, 3
    m = topk_mask(ATTR, 2, batch_topk=True)
    assert m.sum() == 6 and m[0].tolist() == [1, 0, 1, 0]


def test_batch_topk_fractional_average_and_at_least_one():
    attr = torch.rand(1000, 10)
    assert topk_mask(attr, 1.28).sum() == 1280
    assert topk_mask(torch.rand(2, 10), 0.1).sum() == 1


def test_fractional_k_needs_batch_topk():
    with pytest.raises(ValueError, match="batch_topk"):
        topk_mask(ATTR, 1.5, batch_topk=False)


def test_mask_carries_no_gradient():
    attr = torch.rand(4, 3, requires_grad=True)
    assert not topk_mask(attr, 1).requires_grad


def test_with_best_samples_switches_each_component_on_where_its_attribution_is_largest():
    from apd.topk import with_best_samples

    attr = torch.tensor([[9.0, 0.1, 0.0], [8.0, 0.3, 0.0], [7.0, 0.2, 0.5]])
    mask = topk_mask(attr, 1.0, batch_topk=True)  # the three largest: component 0 on every sample
    assert mask.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
    out = with_best_samples(mask, attr, 1)
    assert out.tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]  # comp 1 best on sample 1, comp 2 on sample 2
    assert with_best_samples(mask, attr, 0) is mask
    assert with_best_samples(mask, attr, 10).sum() == 9  # n larger than the batch: everything on
    assert mask.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]  # the input mask is not modified
