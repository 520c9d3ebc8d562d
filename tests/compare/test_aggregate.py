"""apd.compare.aggregate: means and stds over seeds."""

import math

import pytest

from apd.compare import summarise


def test_summarise_means_and_stds_over_seeds():
    rows = [{"method": "a", "width": 5, "sparsity": 1.0, "seed": s, "sparsity_knob": "k", "x": v, "y": float("nan")}
            for s, v in enumerate([1.0, 3.0])]  # fmt: skip
    (agg,) = summarise(rows)
    assert agg["n"] == 2 and agg["x"] == 2.0 and agg["x_std"] == pytest.approx(math.sqrt(2))
    assert math.isnan(agg["y"]) and agg["sparsity_knob"] == "k" and "seed" not in agg
