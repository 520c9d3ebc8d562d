"""Figures of ``python -m experiments.compare`` (matplotlib, kept out of the library)."""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from apd.compare import CompareConfig, Comparison, Trained, best_settings, comparison_for, summarise  # noqa: E402
from apd.compare.report import has_shared_components  # noqa: E402
from apd.metrics.recovery import cosine_matrix  # noqa: E402

_MARKERS = "osD^vP*X"


_PANELS = [("mmcs", "MMCS (best cosine per feature)"), ("matched_mean_cos", "one-to-one (Hungarian) mean cosine"),
           ("loss_recovered", "loss recovered")]  # fmt: skip
_RESID_PANELS = _PANELS + [("n_features_dedicated", "features with a dedicated latent / component")]


_LM_PANELS = [("loss_recovered", "loss recovered (vs zero-ablating the MLP)"), ("kl", "KL to the target (nats / token)")]
_L0_AXIS = ("l0", "L0 (mean active latents / components per sample)")


def save_figures(comparison: Comparison, cfg: CompareConfig, out_dir: Path) -> list[Path]:
    """Pareto views (MMCS, one-to-one cosine and loss recovered against L0; residual MLP: also the
    features with a dedicated latent / component), the learned directions against the ground truth
    (2-D hidden layers), the transcoder width sweep, and for APD on +ID the identity figure. The
    language model (no ground truth): loss recovered and KL against L0, loss recovered against bits
    per token, and the log-density histograms. Any kind: the SAEs' training curves when they were
    recorded (``sae_train.eval_every``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = [training_curves(comparison.results, out_dir / "sae_training_curves.png")] if any(t.curve for t in comparison.results) else []
    if comparison.kind == "lm":
        return curves + [
            pareto(comparison.results, set(), out_dir / "loss_vs_l0.png", _LM_PANELS, ("l0", "L0 (active units per token)"),
                   "loss recovered and KL against L0 (markers: mean ± std over seeds; dots: seeds)"),
            pareto(comparison.results, set(), out_dir / "loss_vs_bits.png", _LM_PANELS[:1],
                   ("bits_per_token", "description length (bits per token)"),
                   "loss recovered against description length (markers: mean ± std over seeds; dots: seeds)"),
            density_histograms(comparison.results, out_dir / "log_density.png", comparison.data.n_tokens),
        ]  # fmt: skip
    results, truth = comparison.results, comparison.data.truth
    resid = comparison.kind == "resid_mlp"
    transcoders = {name for name, g in cfg.saes.items() if g.transcoder}
    paths = [pareto(results, comparison.side_methods, out_dir / "pareto_l0.png", _RESID_PANELS if resid else _PANELS)]
    if truth.shape[1] == 2:
        paths.append(directions(results, truth, out_dir / "directions.png", comparison_for(comparison.kind).best_key))
    if transcoders:
        title = ("Transcoders (MLP input → MLP output): feature splitting as width grows (mean ± std over seeds)" if resid
                 else "Transcoders across the identity: feature splitting as width grows (mean ± std over seeds)")  # fmt: skip
        paths.append(transcoder_sweep(results, transcoders, truth.shape[0], out_dir / "transcoder_sweep.png", title))
    apd_id = [r for r in results if has_shared_components(r.row["method"]) and "hidden" in r.parts]
    if apd_id:
        paths.append(apd_identity(apd_id, out_dir / "apd_identity.png"))
    return paths + curves


def training_curves(results: list[Trained], path: Path, window: float | None = None) -> Path:
    """The SAEs' held-out training curves: one panel per recorded metric (loss recovered, FVU, L0, ...)
    against the step, one line per SAE (solid: converged by the rule, dashed: not), the last
    ``window`` of each line (default: the run's ``converge_window`` share, 0.2) drawn thick."""
    curved = [t for t in results if t.curve]
    metrics = [m for m in dict.fromkeys(m for t in curved for m in t.curve) if m != "step"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.4), squeeze=False)
    colors = plt.cm.tab20(torch.linspace(0, 1, max(2, len(curved))).tolist())
    for ax, metric in zip(axes[0], metrics):
        for t, color in zip(curved, colors):
            r, steps = t.row, t.curve["step"]
            if metric not in t.curve:
                continue
            converged = r.get("converged") == 1.0
            change = r.get("curve_change", math.nan)
            label = (f"{r['method']} {r['sparsity_knob']}={r['sparsity']:g} s{r['seed']}: "
                     f"{'converged' if converged else 'not converged'} (Δ {change:+.4f})")  # fmt: skip
            ax.plot(steps, t.curve[metric], color=color, lw=1.0, ls="-" if converged else "--", label=label)
            last = steps[-1] * (1 - (window if window is not None else 0.2))
            tail = [(s, v) for s, v in zip(steps, t.curve[metric]) if s >= last]
            ax.plot([s for s, _ in tail], [v for _, v in tail], color=color, lw=2.4)
        ax.set(xlabel="training step", ylabel=metric, title=f"held-out {metric} during training")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.suptitle("SAE training curves on a fixed held-out batch (thick: the last 20% of training, judged for flatness; "
                 "Δ: its fitted change)", fontsize=9)  # fmt: skip
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _colors(methods: list[str]) -> dict[str, tuple]:
    return {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}


def _methods(results: list[Trained], exclude: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    return list(dict.fromkeys(r.row["method"] for r in results if r.row["method"] not in exclude))


def pareto(results: list[Trained], exclude: set[str], path: Path, panels: list[tuple[str, str]] = _PANELS,
           x: tuple[str, str] = _L0_AXIS,
           title: str = "Pareto view: recovery and loss recovered against L0 (markers: mean ± std over seeds; dots: seeds)") -> Path:  # fmt: skip
    """Per setting (method × width × sparsity): mean ± std over seeds, seeds as faint dots; one
    panel per (column, label) against the ``x`` (column, label), L0 by default; the methods in
    ``exclude`` left out."""
    rows = [r.row for r in results if r.row["method"] not in exclude]
    methods = _methods(results, exclude)
    colors = _colors(methods)
    widths = sorted({r["width"] for r in rows})
    marker = {w: _MARKERS[i % len(_MARKERS)] for i, w in enumerate(widths)}
    groups = summarise(rows)
    x_col, x_label = x
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.4 * len(panels), 9.0), 5), squeeze=False)
    axes = axes[0]
    for ax, (col, label) in zip(axes, panels):
        for r in rows:
            ax.scatter(r[x_col], r[col], color=colors[r["method"]], marker=marker[r["width"]], alpha=0.25, s=14, lw=0)
        for a in groups:
            ax.errorbar(a[x_col], a[col], xerr=a[f"{x_col}_std"], yerr=a[f"{col}_std"], color=colors[a["method"]],
                        marker=marker[a["width"]], ms=7, capsize=2, lw=1, mec="k", mew=0.5)  # fmt: skip
        ax.set(xlabel=x_label, ylabel=label, title=f"{label.split(' (')[0]} vs {x_label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        xs = [r[x_col] for r in rows if r[x_col] > 0]
        if xs and max(xs) / min(xs) > 8:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in methods]
    handles += [plt.Line2D([], [], color="0.4", marker=marker[w], ls="", label=f"width {w}") for w in widths]
    axes[-1].legend(handles=handles, fontsize=8, loc="best")  # "best" keeps it off the points
    fig.suptitle(title)
    return _save(fig, path)


def density_histograms(results: list[Trained], path: Path, n_tokens: int) -> Path:
    """Bricken et al.'s view: per method one panel, the histogram of log10 of each live unit's
    density on the evaluation tokens (one line per setting and family of units, first seed), the
    dead units counted in the legend; the resolution 1/N marked."""
    methods = _methods(results)
    cols = min(len(methods), 4)
    n_rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 3.6 * n_rows), squeeze=False)
    lo = math.log10(1 / n_tokens)
    bins = torch.linspace(lo - 0.25, 0.0, 41).tolist()
    for ax, method in zip(axes.flat, methods):
        seen: set[tuple] = set()
        for t in results:
            r = t.row
            setting = (r["width"], r["sparsity"])
            if r["method"] != method or setting in seen or not getattr(t, "densities", None):
                continue
            seen.add(setting)
            for family, density in t.densities.items():  # type: ignore[attr-defined]
                live = density[density > 0]
                label = f"w{r['width']} {r['sparsity_knob']}={r['sparsity']:g}" + (f" {family}" if len(t.densities) > 1 else "")  # type: ignore[attr-defined]
                ax.hist(live.log10().tolist(), bins=bins, histtype="step", lw=1.4,
                        label=f"{label} ({len(density) - len(live)} dead)")  # fmt: skip
        ax.axvline(lo, color="0.5", ls=":", lw=1)
        ax.set(xlabel="log10 density (fraction of tokens active)", ylabel="units", title=method)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle(f"Log-density histograms of live units on {n_tokens} evaluation tokens (dotted: 1/N, the resolution)", fontsize=9)
    return _save(fig, path)


def _best(results: list[Trained], method: str, key: Callable[[dict[str, Any]], tuple]) -> Trained:
    """The best seed of the method's best setting (:func:`apd.compare.best_settings` by ``key``)."""
    setting = next(a for a in best_settings([r.row for r in results], key) if a["method"] == method)
    members = [r for r in results if r.row["method"] == method and r.row["width"] == setting["width"]
               and r.row["sparsity"] == setting["sparsity"]]  # fmt: skip
    return max(members, key=lambda r: (r.row["all_recovered"], r.row["matched_mean_cos"]))


def directions(results: list[Trained], truth: torch.Tensor, path: Path, key: Callable[[dict[str, Any]], tuple]) -> Path:
    """Each method's best model (its best setting by ``key``): its latents' (components') arrows
    over the ground-truth columns of W."""
    methods = _methods(results)
    cols = min(len(methods), 4)
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 4.1 * rows), squeeze=False)
    T = truth.detach().float().cpu()
    for ax, method in zip(axes.flat, methods):
        best = _best(results, method, key)
        arrows = best.arrows.float()
        feature = cosine_matrix(T, arrows).argmax(0)  # colour = the feature each arrow is closest to
        lim = 1.25 * max(T.norm(dim=1).max().item(), arrows.norm(dim=1).max().item())
        for j in range(T.shape[0]):
            ax.annotate("", xy=(T[j, 0], T[j, 1]), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="-|>", color="0.75", lw=5, alpha=0.8))  # fmt: skip
            ax.text(1.08 * T[j, 0], 1.08 * T[j, 1], f"f{j}", fontsize=8, color="0.4", ha="center", va="center")
        for i in range(arrows.shape[0]):
            live = bool(best.arrows_live[i])
            ax.annotate("", xy=(arrows[i, 0], arrows[i, 1]), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="-|>", color=plt.cm.tab10(int(feature[i]) % 10), lw=1.6,
                                        ls="-" if live else ":", alpha=1.0 if live else 0.5))  # fmt: skip
            if best.arrow_labels:
                ax.text(arrows[i, 0], arrows[i, 1], best.arrow_labels[i], fontsize=7, color=plt.cm.tab10(int(feature[i]) % 10))
        r = best.row
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[],
               title=f"{method}: width {r['width']}, {r['sparsity_knob']}={r['sparsity']:g}, seed {r['seed']}\n"
                     f"1-1 cos {r['matched_mean_cos']:.3f}, shrinkage {r['shrinkage']:.2f}")  # fmt: skip
        ax.title.set_fontsize(8)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle("Each method's best setting, best seed: learned directions (colour = nearest feature; dotted = dead) "
                 "over W's columns (grey)\n"
                 "SAE: decoder row × its largest activation on a one-feature input; APD: every non-negligible column "
                 "P_c[:, j], labelled by its component", fontsize=9)  # fmt: skip
    return _save(fig, path)


def transcoder_sweep(results: list[Trained], transcoders: set[str], n_features: int, path: Path, title: str) -> Path:
    """Do features split as transcoders widen? Against APD's count of components carrying the identity."""
    rows = [r.row for r in results if r.row["method"] in transcoders]
    groups = summarise(rows)
    apd = [r.row for r in results if has_shared_components(r.row["method"]) and not math.isnan(r.row["id_n_components"])]
    colors = _colors(sorted(transcoders))
    panels = [("aligned", "live latents with cos ≥ tau to a feature\n(APD: components carrying I)"),
              ("latents_per_feature", "latents per feature (cos ≥ tau)"),
              ("n_duplicate_pairs", "duplicate latent pairs (cos > tau)"), ("mmcs", "MMCS")]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    # one line per grid and sparsity value (a line through several sparsities would zigzag)
    lines = list(dict.fromkeys((a["method"], a["sparsity"]) for a in groups))
    # within one method, its n-th sparsity value gets the n-th marker
    marker = {(n, s): _MARKERS[[s2 for n2, s2 in lines if n2 == n].index(s) % len(_MARKERS)] for n, s in lines}
    for ax, (col, label) in zip(axes, panels):
        for name, sparsity in lines:
            g = sorted((a for a in groups if (a["method"], a["sparsity"]) == (name, sparsity)), key=lambda a: a["width"])
            if col == "aligned":
                ys = [a["latents_per_feature"] * n_features for a in g]
                es = [a["latents_per_feature_std"] * n_features for a in g]
            else:
                ys, es = [a[col] for a in g], [a[f"{col}_std"] for a in g]
            knob = g[0].get("sparsity_knob", "sparsity")
            ax.errorbar([a["width"] for a in g], ys, yerr=es, color=colors[name], marker=marker[name, sparsity],
                        capsize=3, label=f"{name} {knob}={sparsity:g}")  # fmt: skip
        if col == "aligned" and apd:
            mean = sum(r["id_n_components"] for r in apd) / len(apd)
            ax.axhline(mean, color="k", ls="--", lw=1, label=f"APD: components carrying I (mean {mean:.1f})")
        if col == "aligned":
            ax.axhline(n_features, color="0.6", ls=":", lw=1, label="number of features")
        ax.set(xlabel="transcoder width", ylabel=label, xscale="log", title=label.split("\n")[0])
        ax.set_xticks(sorted({r["width"] for r in rows}), labels=[str(w) for w in sorted({r["width"] for r in rows})])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def apd_identity(apd: list[Trained], path: Path) -> Path:
    """The best APD seed: each component's part of the identity (heatmap) and of W (its columns)."""
    best = max(apd, key=lambda r: (r.row["all_recovered"], r.row["matched_mean_cos"]))
    Ph, Pe = best.parts["hidden"], best.parts["enc"]
    C = Ph.shape[0]
    fig, axes = plt.subplots(2, C, figsize=(2.3 * C, 4.8), squeeze=False)
    vmax = max(Ph.abs().max().item(), 1.0)
    for c in range(C):
        d = best.details[c]
        ax = axes[0][c]
        ax.imshow(Ph[c].numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax)
        for (i, j), v in ((ij, Ph[c][ij].item()) for ij in [(a, b) for a in range(Ph.shape[1]) for b in range(Ph.shape[2])]):
            if Ph.shape[1] <= 4:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set(xticks=[], yticks=[], title=f"c{c}: I share {d['share']:.2f}\ncos I {d['cos_identity']:.2f}, "
                                           f"Π_{d['best_projector_feature']:.0f} {d['projector_cos']:.2f}")  # fmt: skip
        ax.title.set_fontsize(7)
        ax = axes[1][c]
        ax.imshow(Pe[c].numpy(), cmap="RdBu", vmin=-Pe.abs().max().item(), vmax=Pe.abs().max().item(), aspect="auto")
        ax.set(xticks=range(Pe.shape[2]), yticks=[], xlabel="feature",
               title=f"W part: feature {d['enc_feature']:.0f} (cos {d['enc_cos']:.2f})")  # fmt: skip
        ax.title.set_fontsize(7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("part of I", fontsize=8)
    axes[1][0].set_ylabel("part of W", fontsize=8)
    r = best.row
    fig.suptitle(f"APD on +ID, best seed ({r['seed']}): each component's part of the identity (top) and of W (bottom)",
                 fontsize=9)  # fmt: skip
    return _save(fig, path)
