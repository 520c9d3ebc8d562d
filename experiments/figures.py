"""Matplotlib figures of a decomposition run (kept out of the library)."""

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from apd.experiment import DecomposeRun, RunResult  # noqa: E402
from apd.methods import method_for  # noqa: E402
from apd.metrics import resid_mlp as rm  # noqa: E402


def save_figures(result: RunResult, run: DecomposeRun, out_dir: Path, metrics_log: Path | None = None) -> list[Path]:
    """The figures of the run's target kind (none for a kind without figures), and for every run its
    loss curves (from ``metrics_log``, default the run dir's ``metrics.jsonl`` beside ``out_dir``),
    its mechanisms (groups of co-active units, from metrics.json) and, for a method with per-matrix
    units (SPD) on a toy, its evaluation masks (causal importances) on one-feature inputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir.parent / "metrics.jsonl" if metrics_log is None else metrics_log
    loss_names = [loss.name for loss in method_for(result.decomposition.config).losses]
    paths = loss_curve_figure(log, loss_names, out_dir) + mechanism_figure(result, out_dir)
    if not method_for(result.decomposition.config).units_span_matrices and run.target.kind in ("tms", "resid_mlp"):
        paths += ci_figure(result, run, out_dir)
    figures = _FIGURES.get(run.target.kind)
    return paths + (figures(result, run, out_dir) if figures is not None else [])


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (one JSON object per logged step), in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve_series(records: Sequence[dict[str, Any]], loss_names: Sequence[str]) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} of ``total`` and of each loss term in ``loss_names`` that the log holds
    (terms switched off are absent from it), in the log's order."""
    out = {}
    for name in ["total", *loss_names]:
        rows = [(int(r["step"]), float(r[name])) for r in records if name in r]
        if rows:
            out[name] = ([s for s, _ in rows], [v for _, v in rows])
    return out


def plot_loss_curves(records: Sequence[dict[str, Any]], loss_names: Sequence[str]) -> plt.Figure:
    """Each logged loss term and the total against the step, on a log y axis (values <= 0, which a
    log axis cannot show, are left out of the line; the legend says how many)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (name, (steps, values)) in enumerate(loss_curve_series(records, loss_names).items()):
        kept = [(s, v) for s, v in zip(steps, values) if v > 0 and math.isfinite(v)]
        dropped = len(values) - len(kept)
        label = name + (f" ({dropped} values <= 0 not shown)" if dropped else "")
        ax.plot([s for s, _ in kept], [v for _, v in kept], label=label, lw=2.2 if name == "total" else 1.2,
                color="k" if name == "total" else plt.cm.tab10(k % 10), marker="." if len(kept) < 30 else None)  # fmt: skip
    ax.set(yscale="log", xlabel="step", ylabel="loss (unweighted term; total = weighted sum)", title="Loss curves")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def loss_curve_figure(log: Path, loss_names: Sequence[str], out_dir: Path) -> list[Path]:
    """``loss_curves.png`` from the run's ``metrics.jsonl`` (nothing when the log is missing or empty)."""
    records = read_metrics_log(log) if log.is_file() else []
    if not records:
        return []
    paths: list[Path] = []
    _save(plot_loss_curves(records, loss_names), out_dir / "loss_curves.png", paths)
    return paths


def mechanism_figure(result: RunResult, out_dir: Path) -> list[Path]:
    """Each mechanism (largest first, as in metrics.json): its rank-one pieces per layer (stacked
    bars) and the fraction of inputs it is active on (dots, right axis)."""
    mechs = result.metrics.get("mechanisms") or []
    if not mechs:
        return []
    mechs = mechs[:40]
    layers = list(dict.fromkeys(layer for m in mechs for member in m["members"] for layer in [member.rpartition(":")[0]]))
    counts = torch.tensor([[sum(1 for member in m["members"] if member.rpartition(":")[0] == layer) for layer in layers]
                           for m in mechs], dtype=torch.float)  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(mechs) + 2), 3.6))
    bottom = torch.zeros(len(mechs))
    for k, layer in enumerate(layers):
        ax.bar(range(len(mechs)), counts[:, k].numpy(), bottom=bottom.numpy(), label=layer, color=plt.cm.tab10(k % 10))
        bottom += counts[:, k]
    ax.set(xlabel="mechanism", ylabel="units (subcomponents / components)", title=f"{len(result.metrics.get('mechanisms', []))} "
           f"mechanisms of {int(result.metrics.get('n_live_units', 0))} live units ({result.decomposition.method.upper()})")  # fmt: skip
    ax2 = ax.twinx()
    ax2.plot(range(len(mechs)), [m["frequency"] for m in mechs], "k.", ms=5)
    ax2.set(ylabel="fraction of inputs active", yscale="log")
    ax.legend(fontsize=7, loc="upper right")
    paths: list[Path] = []
    _save(fig, out_dir / "mechanisms.png", paths)
    return paths


def ci_figure(result: RunResult, run: DecomposeRun, out_dir: Path) -> list[Path]:
    """SPD's causal importances on the one-feature inputs x = e_j (value 1), per layer: rows are
    features, columns the live subcomponents (ordered by the feature they fire most on)."""
    dec = result.decomposition
    cm = dec.component_model if dec.component_model is not None else dec.attach(result.target)
    n = run.target.n_features  # type: ignore[attr-defined]
    with torch.no_grad():
        ci = {k: v.cpu() for k, v in method_for(dec.config).eval_masks(cm, torch.eye(n, device=run.device)).items()}  # type: ignore[union-attr]
    fig, axes = plt.subplots(1, len(ci), figsize=(3.2 * len(ci) + 1, 3.2), squeeze=False)
    for ax, (name, g) in zip(axes[0], ci.items()):
        live = (g > 0.1).any(0).nonzero().flatten()
        g = g[:, live]
        order = g.argmax(0).argsort() if g.numel() else live
        im = ax.imshow(g[:, order].numpy() if g.numel() else torch.zeros(n, 1).numpy(), vmin=0, vmax=1, cmap="Blues",
                       aspect="auto")  # fmt: skip
        ax.set(title=f"{name}: {len(live)} live of {cm.layers[name].C}", xlabel="live subcomponent (ordered by feature)",
               ylabel="input feature j (x = e_j)")  # fmt: skip
        ax.title.set_fontsize(8)
        fig.colorbar(im, ax=ax, label="causal importance g")
    fig.suptitle("SPD causal importances on one-feature inputs")
    paths: list[Path] = []
    _save(fig, out_dir / "causal_importances.png", paths)
    return paths


def _save(fig: plt.Figure, path: Path, paths: list[Path], tight: bool = True) -> None:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)


def tms_figures(result: RunResult, run: DecomposeRun, out_dir: Path) -> list[Path]:
    """The paper's pentagon figure (when n_hidden = 2: the target's columns and each live component's
    columns) and heatmaps of every component's W."""
    W = result.target.W.detach().cpu()
    P = result.decomposition.component_weights()["enc"]
    paths: list[Path] = []
    C = P.shape[0]
    if W.shape[0] == 2:
        live = [c for c in range(C) if P[c].norm() > 1e-3 * W.norm()]  # dead (e.g. merged) ones are left out
        fig, axes = plt.subplots(1, len(live) + 1, figsize=(2.2 * (len(live) + 1), 2.5), squeeze=False)
        lim = 1.1 * W.norm(dim=0).max().item()
        for ax, (title, M) in zip(axes[0], [("target W", W)] + [(f"component {c}", P[c]) for c in live]):
            for j in range(M.shape[1]):
                ax.plot([0, M[0, j]], [0, M[1, j]], lw=2, color=plt.cm.tab10(j % 10), label=f"feature {j}")
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title, xticks=[], yticks=[])
        axes[0][0].legend(fontsize=6, loc="lower left")
        dead = f"; {C - len(live)} dead components not shown" if len(live) < C else ""
        fig.suptitle(f"TMS: columns W[:, j] of the target and of each live component (colour = feature){dead}")
        _save(fig, out_dir / "tms_columns.png", paths)
    cols = min(C, 10)
    rows = (C + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows + 0.6), squeeze=False)
    vmax = P.abs().max().item()
    im = None
    for c, ax in enumerate(axes.flat):
        ax.set(xticks=[], yticks=[])
        if c < C:
            im = ax.imshow(P[c].numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
            ax.set_title(f"P_{c}", fontsize=8)
            ax.set_xlabel("feature", fontsize=7)
            ax.set_ylabel("hidden", fontsize=7)
        else:
            ax.axis("off")
    fig.suptitle("component weights of W (rows: hidden, columns: features; red < 0 < blue)")
    fig.tight_layout()
    fig.colorbar(im, ax=axes.ravel().tolist(), label="weight", shrink=0.8)
    _save(fig, out_dir / "component_heatmaps.png", paths, tight=False)
    return paths


def resid_mlp_figures(result: RunResult, run: DecomposeRun, out_dir: Path) -> list[Path]:
    """Neuron contributions of target vs best component (first 10 features; SPD: its W_in
    subcomponents through the decomposed W_out), and for APD the scrub / anti-scrub histogram with
    the monosemantic baseline and per-feature top-1 MSE."""
    target, dec = result.target, result.decomposition
    cm = dec.component_model if dec.component_model is not None else dec.attach(target)
    W_E = target.W_E
    nc_t = rm.target_neuron_contributions(target).cpu()
    method = method_for(dec.config)
    units = method.mlp_units(W_E, dec.component_weights(), target.mlp_pairs())  # SPD: a feature's W_in pieces per layer
    nc_c, groups = units.nc.cpu(), units.layer
    best = nc_c.abs().amax(-1).argmax(0)  # (n_features,)
    matched = rm.matched_neuron_contributions(nc_c, groups)
    per_layer = len(target.mlp_pairs()) > 1 and groups is not None
    what = "best W_in subcomponent per layer" if per_layer else "best-matching component"
    paths: list[Path] = []

    fig, axes = plt.subplots(2, 5, figsize=(14, 5), sharey=True)
    for i, ax in enumerate(axes.flat):
        ax.bar(range(nc_t.shape[1]), nc_t[i], color="0.6", label="target")
        ax.plot(range(nc_t.shape[1]), matched[i], "r.", ms=4, label=what)
        ax.set_title(f"feature {i}" if per_layer else f"feature {i} (component {best[i].item()})", fontsize=9)
        ax.set_xlabel("neuron")
    axes[0][0].set_ylabel("contribution")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Neuron contributions: target (bars) vs {what} (dots)")
    _save(fig, out_dir / "neuron_contributions.png", paths)
    if not method.units_span_matrices:  # the scrubbing and top-1 figures switch whole components
        return paths

    def attributions(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return method.unit_scores(cm, x)  # type: ignore[return-value]

    with torch.no_grad():
        masked = lambda x, s: cm(x, masks=s)  # noqa: E731
        feat_comp = rm.feature_to_component(nc_c, 0.04)
        scrub, anti = rm.scrub_antiscrub_mse(target, masked, feat_comp, cm.C, nc_t.shape[0], 100,
                                             torch.Generator().manual_seed(run.seed))  # fmt: skip
        top1 = rm.top1_onehot_mse(target, masked, attributions, nc_t.shape[0]).cpu()
        mono = run.target.monosemantic()  # type: ignore[union-attr]
        x = run.target.batch(run.n_eval, torch.Generator().manual_seed(run.seed + 1))
        mono_mse = (mono(x) - target(x)).pow(2).mean().item()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ok = ~torch.isnan(scrub)
    bins = torch.logspace(-8, 0, 50).numpy()
    ax.hist(scrub[ok].clamp_min(1e-8).numpy(), bins=bins, alpha=0.6, label="scrubbed (feature's component on)")
    ax.hist(anti[ok].clamp_min(1e-8).numpy(), bins=bins, alpha=0.6, label="anti-scrubbed (its component off)")
    ax.axvline(mono_mse, color="k", ls="--", label="monosemantic baseline vs target")
    ax.set(xscale="log", xlabel="output MSE to the target", ylabel="features", title="Scrubbing: random halves of the components")
    ax.legend(fontsize=7)
    _save(fig, out_dir / "scrub_antiscrub.png", paths)

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(len(top1)), top1.clamp_min(1e-10).numpy())
    ax.set(yscale="log", xlabel="feature", ylabel="MSE", title="Top-1 component on one-hot inputs: output MSE to the target")
    _save(fig, out_dir / "top1_onehot_mse.png", paths)
    return paths


_FIGURES = {"tms": tms_figures, "resid_mlp": resid_mlp_figures}
