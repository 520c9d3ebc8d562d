"""experiments/figures.py: a loss-curve figure for every run (every target kind), whose lines are
metrics.jsonl's numbers, and colour bars and axis labels on every heatmap."""

import json

import matplotlib
import pytest
from matplotlib.image import AxesImage, imread

from apd.experiment import DecomposeRun, run_decompose
from apd.targets import LMTargetConfig
from apd.methods import APDConfig, SPDConfig, method_for
from apd.targets import ModuleTargetConfig, ResidMLPTargetConfig, TMSTargetConfig
from experiments import figures

MODULE = ModuleTargetConfig(factory="experiments.examples.mlp:trained_mlp", data="experiments.examples.mlp:batch",
                            decompose=["0", "2"], factory_kwargs={"steps": 20})  # fmt: skip
RUNS = {
    "tms": lambda: DecomposeRun(target=TMSTargetConfig(name="tms_5_2"), method=SPDConfig(C=6, steps=5, log_every=2),
                                batch_size=16, n_eval=16),  # fmt: skip
    "resid_mlp": lambda: DecomposeRun(target=ResidMLPTargetConfig(name="resid_mlp_1"),
                                      method=APDConfig(C=12, topk=2, steps=4, log_every=1), batch_size=8, n_eval=16),
    "lm": lambda: DecomposeRun(target=LMTargetConfig(), method=SPDConfig(C=8, steps=3, log_every=1), batch_size=2, n_eval=2),
    "module": lambda: DecomposeRun(target=MODULE, method=APDConfig(C=4, topk=1, steps=6, log_every=1), batch_size=16,
                                   n_eval=16),  # fmt: skip
}


@pytest.fixture
def captured(monkeypatch):
    """The figures save_figures draws, kept open (by path name) so their axes can be read back."""
    kept = {}
    real = figures._save

    def save(fig, path, paths, tight=True):
        kept[path.name] = fig
        monkeypatch.setattr(figures.plt, "close", lambda f=None: None)
        real(fig, path, paths, tight)

    monkeypatch.setattr(figures, "_save", save)
    yield kept
    for fig in kept.values():
        matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("kind", list(RUNS))
def test_every_run_gets_loss_curves_equal_to_its_log(kind, tmp_path, captured):
    run = RUNS[kind]()
    result = run_decompose(run, tmp_path, progress=False)
    paths = figures.save_figures(result, run, tmp_path / "figures")
    png = tmp_path / "figures" / "loss_curves.png"
    assert png in paths and imread(png).shape[0] > 100
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ax = captured["loss_curves.png"].axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "step"
    lines = {line.get_label().split(" (")[0]: line for line in ax.get_lines()}
    names = [loss.name for loss in method_for(run.method).losses if loss.name in records[0]]
    assert names and set(lines) == {"total", *names}
    for name, line in lines.items():
        want = [(r["step"], r[name]) for r in records if r[name] > 0]
        assert list(zip(line.get_xdata().tolist(), line.get_ydata().tolist())) == want, name
    assert [r["step"] for r in records] == list(range(run.steps)) if run.method.log_every == 1 else True
    # every heatmap the run drew has labelled axes and a labelled colour bar (its own, or one shared
    # with heatmaps of the same colour scale)
    for name, fig in captured.items():
        images = [(ax, im) for ax in fig.axes for im in ax.get_children() if isinstance(im, AxesImage)]
        bars = [im.colorbar for _, im in images if im.colorbar is not None]
        for ax, im in images:
            scale = (im.get_cmap().name, im.get_clim())
            assert any((b.mappable.get_cmap().name, b.mappable.get_clim()) == scale for b in bars), f"{name}: no colour bar"
            assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: a heatmap without axis labels"
        assert all(b.ax.get_ylabel() for b in bars), f"{name}: an unlabelled colour bar"


def test_the_loss_curves_leave_out_values_a_log_axis_cannot_show(tmp_path):
    records = [{"step": 0, "total": 2.0, "a": 1.0, "b": 0.0}, {"step": 5, "total": 1.0, "a": 0.5, "b": 0.25},
               {"step": 9, "total": 0.5, "b": 0.125}]  # fmt: skip
    assert figures.loss_curve_series(records, ["a", "b", "c"]) == {
        "total": ([0, 5, 9], [2.0, 1.0, 0.5]), "a": ([0, 5], [1.0, 0.5]), "b": ([0, 5, 9], [0.0, 0.25, 0.125])}
    fig = figures.plot_loss_curves(records, ["a", "b"])
    b = next(line for line in fig.axes[0].get_lines() if line.get_label().startswith("b"))
    assert b.get_label() == "b (1 values <= 0 not shown)" and b.get_xdata().tolist() == [5, 9]
    matplotlib.pyplot.close(fig)
