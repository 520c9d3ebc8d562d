"""The SAE training-curve figure of `python -m experiments.compare` is written from the recorded curves."""

import torch

from apd.compare.scoring import Trained
from experiments.compare_figures import training_curves


def test_the_training_curve_figure_is_written(tmp_path):
    def trained(seed: int, converged: float) -> Trained:
        steps = [10.0 * i for i in range(1, 21)]
        row = {"method": "topk", "sparsity_knob": "k", "sparsity": 8, "seed": seed, "converged": converged, "curve_change": 0.001}
        return Trained(row=row, arrows=torch.zeros(0, 1), arrows_live=torch.zeros(0, dtype=torch.bool),
                       curve={"step": steps, "loss_recovered": [1 - 1 / s for s in steps], "fvu": [1 / s for s in steps]})  # fmt: skip

    path = training_curves([trained(0, 1.0), trained(1, 0.0)], tmp_path / "sae_training_curves.png")
    assert path.stat().st_size > 10_000
