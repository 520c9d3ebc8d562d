"""A transcoder per layer's MLP against an SPD run of a multi-layer LM, layer by layer (#29's fair
baseline; definitions: :mod:`apd.compare.lm_layers`):
``python -m experiments.layer_transcoders RUN_DIR [RUN_DIR ...] [--width 1024] [--k 16] [--steps 800] [--tol 0.002]``.

Each RUN_DIR is a finished ``python -m experiments.decompose`` run on a character-LM target whose
decomposed matrices include each layer's MLP (``experiment=spd_lm_4l``); several runs must share
one target (the same weights), and the transcoders are trained once. For every ``*.mlp`` module
a TopK transcoder (MLP input → MLP output, AuxK) is trained on training windows until its held-out
loss recovered is flat over the last 20% of training (``--tol``; ``--steps`` is the cap; the curve
is read on ``--curve-windows`` held-out windows drawn from seed 1), then it and the run's SPD
subcomponents of the same MLP in each run are scored on ``--n-eval`` other held-out windows (seed 0).
Writes ``layer_transcoders.json`` (rows and curves), ``layer_transcoders.md`` (the table) and
``layer_transcoder_curves.png`` into ``--out`` (default: the first run's ``layer_transcoders/``), and the
transcoders (``transcoder_{module}/``, ``apd.baselines.save_sae``; ``load_sae`` reads them).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from apd.baselines import (  # noqa: E402
    SAE,
    SAETrainConfig,
    TopKSAE,
    TopKSAEConfig,
    capture_module_io,
    load_sae,
    save_sae,
    train_layer_transcoders,
    transcoder_scores,
)
from apd.compare.lm_layers import decomposition_layer_scores, mlp_modules, transcoder_layer_row  # noqa: E402
from apd.config import ConfigError  # noqa: E402
from apd.experiment import load_run  # noqa: E402
from apd.targets.lm import CharacterWindows  # noqa: E402
from apd.toy_models.lm import lm_loss  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--width", type=int, default=1024, help="latents per transcoder")
    p.add_argument("--k", type=int, default=16, help="active latents per token (TopK)")
    p.add_argument("--steps", type=int, default=800, help="the cap on training steps")
    p.add_argument("--batch-windows", type=int, default=32, help="training windows per step (seq_len tokens each)")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--tol", type=float, default=0.002, help="flat: loss recovered changes less than this over the last 20%%")
    p.add_argument("--curve-windows", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=64, help="held-out windows the table is scored on")
    p.add_argument("--bits-per-value", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--load-transcoders", type=Path, default=None, metavar="DIR",
                   help="score the transcoders an earlier invocation wrote to DIR (its --out) instead of training new ones")
    args = p.parse_args(argv)
    if not 1 <= args.k <= args.width:
        sys.exit(f"error: --k {args.k} must lie in [1, --width] = [1, {args.width}]")
    for name in ("steps", "batch_windows", "eval_every", "curve_windows", "n_eval"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if not (args.lr > 0 and args.tol > 0):
        sys.exit(f"error: --lr {args.lr} and --tol {args.tol} must be > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = []
    for d in args.run_dirs:
        try:
            runs.append(load_run(d))
        except ConfigError as e:
            sys.exit(f"error: {d} is not a run dir of experiments.decompose: {e}")
    target_cfg, model = runs[0].run.target, runs[0].target
    if not isinstance(target_cfg, CharacterWindows):
        sys.exit(f"error: the run's target {target_cfg.name!r} is not a character LM (lm_1l, lm_4l): this script draws its windows")
    weights = model.state_dict()
    for d, art in zip(args.run_dirs[1:], runs[1:]):
        other = art.target.state_dict()
        if other.keys() != weights.keys() or any(not torch.equal(other[k], weights[k]) for k in weights):
            sys.exit(f"error: {d}'s target is not {args.run_dirs[0]}'s (other weights): compare runs of one target")
    try:
        modules = mlp_modules(runs[0].decomposition.matrix_names)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if any(mlp_modules(art.decomposition.matrix_names) != modules for art in runs[1:]):
        sys.exit("error: the runs decompose different MLP matrices; compare runs of one preset")
    biased = [n for names in modules.values() for n in names if getattr(model.get_submodule(n), "bias", None) is not None]
    if biased:
        sys.exit(f"error: {biased} have biases, so zeroing the matrices is not zeroing the MLP's output and the two sides' "
                 "loss recovered would use other baselines; this comparison needs bias-free MLPs (lm_4l)")  # fmt: skip
    out = args.out or args.run_dirs[0] / "layer_transcoders"
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    L = target_cfg.seq_len + 1

    def loss_fn(m: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
        return lm_loss(m(w[:, :-1]), w[:, 1:])

    def draw(gen: torch.Generator) -> torch.Tensor:
        return target_cfg.windows("train", args.batch_windows, gen, length=L)

    curve_batch = target_cfg.windows("heldout", args.curve_windows, torch.Generator().manual_seed(1), length=L)
    score_batch = target_cfg.windows("heldout", args.n_eval, torch.Generator().manual_seed(0), length=L)
    cfg = SAETrainConfig(steps=args.steps, batch_size=args.batch_windows * target_cfg.seq_len, lr=args.lr, warmup_steps=10,
                         init_sample_size=args.batch_windows * target_cfg.seq_len, eval_every=args.eval_every,
                         converge_metric="loss_recovered", converge_tol=args.tol, until_converged=True, seed=args.seed)  # fmt: skip

    def make(name: str, d_in: int, d_out: int) -> TopKSAE:
        return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=args.width, k=args.k, d_out=d_out, apply_b_dec_to_input=False))

    x, y = score_batch[:, :-1], score_batch[:, 1:]
    io = capture_module_io(model, list(modules), lambda m: loss_fn(m, score_batch))
    t0 = time.perf_counter()
    if args.load_transcoders is None:
        layers = train_layer_transcoders(model, list(modules), make, draw, loss_fn, curve_batch, cfg)
        saes = {name: layer.sae for name, layer in layers.items()}
        records = {name: layer.result.curve_record() for name, layer in layers.items()}
        for name, sae in saes.items():
            save_sae(sae, out / f"transcoder_{name}")
    else:
        saes, records = loaded_transcoders(args.load_transcoders, list(modules))
        if args.load_transcoders.resolve() != out.resolve():
            for name, sae in saes.items():
                save_sae(sae, out / f"transcoder_{name}")
    train_s = time.perf_counter() - t0
    rows = [{"module": name, "transcoder": transcoder_layer_row(transcoder_scores(model, name, sae, score_batch, loss_fn, io[name]),
                                                                args.bits_per_value, records[name], sae.cfg.d_sae, sae.cfg.k), "spd": {}}
            for name, sae in saes.items()]  # fmt: skip
    for d, art in zip(args.run_dirs, runs):
        dec, target = art.decomposition, art.target.eval()  # each run's own copy of the (same) target
        cm = dec.attach(target)
        with torch.no_grad():
            ci = dec.causal_importances(x, target)
        for row in rows:
            row["spd"][str(d)] = decomposition_layer_scores(target, cm, ci, x, y, modules[row["module"]], dec.config.ci_threshold)
    record = {"run_dirs": [str(d) for d in args.run_dirs], "args": {k: str(v) for k, v in vars(args).items()}, "train_seconds": train_s,
              "n_eval_tokens": int(x.numel()), "rows": rows}  # fmt: skip
    (out / "layer_transcoders.json").write_text(json.dumps(record, indent=1))
    table = markdown(rows, args)
    (out / "layer_transcoders.md").write_text(table)
    curves(rows, out / "layer_transcoder_curves.png")
    made = f"loaded from {args.load_transcoders}" if args.load_transcoders else f"trained in {train_s:.0f} s"
    print(table + f"\ntranscoders {made}; written to {out}")


def loaded_transcoders(directory: Path, modules: list[str]) -> tuple[dict[str, SAE], dict[str, dict]]:
    """The transcoders an earlier invocation wrote to ``directory`` and their rows there (which hold
    the training records)."""
    path = directory / "layer_transcoders.json"
    if not path.is_file():
        sys.exit(f"error: --load-transcoders {directory}: no layer_transcoders.json there (pass an earlier --out)")
    earlier = {r["module"]: r["transcoder"] for r in json.loads(path.read_text())["rows"]}
    if sorted(earlier) != sorted(modules):
        sys.exit(f"error: --load-transcoders {directory} holds transcoders of {sorted(earlier)}, these runs' MLPs are {modules}")
    return {m: load_sae(directory / f"transcoder_{m}") for m in modules}, earlier  # its scores are recomputed


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = ["| MLP | model | L0 / token | loss recovered | bits / token | |", "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["transcoder"]
        lines.append(f"| {r['module']} | transcoder {t['n_latents']}, k {t['k']} | {t['l0']:.1f} | {t['loss_recovered']:.3f} | "
                     f"{t['bits_per_token']:.0f} | {t['steps_trained']} steps, {'converged' if t['converged'] else 'not converged'} |")  # fmt: skip
        for d, s in r["spd"].items():
            lines.append(f"| {r['module']} | SPD {d} | {s['l0']:.1f} | {s['loss_recovered']:.3f} | {s['bits_per_token']:.0f} | "
                         f"masks g > τ: {s['loss_recovered_thresholded']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def curves(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        t = r["transcoder"]
        c = t["curve"]
        ax.plot(c["step"], c["loss_recovered"], ls="-" if t["converged"] else "--",
                label=f"{r['module']}: {'converged' if t['converged'] else 'not converged'} (Δ {t['curve_change'] or float('nan'):+.4f})")
        for s in r["spd"].values():
            ax.axhline(s["loss_recovered"], color=ax.lines[-1].get_color(), lw=0.8, ls=":")
    ax.set(xlabel="training step", ylabel="held-out loss recovered", title="per-layer transcoders (dotted: SPD runs, CI masks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
