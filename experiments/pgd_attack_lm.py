"""KL under VPD's PGD mask attack for finished language-model runs (docs/results/lm.md, VPD's losses):
``python -m experiments.pgd_attack_lm RUN_DIR [RUN_DIR ...] [--windows 16] [--steps 20 40 80 160]``.

For each run dir (written by ``python -m experiments.decompose`` on an LM target): held-out windows
(a fixed generator, seed 0), then the KL to the target's logits with masks = the causal importances
g (and L0: subcomponents with g > τ per token, summed over matrices), under random masks
m = g + (1 − g)·r (one r per token and subcomponent, the stochastic losses' draw; the mean over 5
draws), at the attack's random start (sources shared across the batch, the mean over seeds 0-4),
and under the attack (``apd.pgd.attack_kl``: 0.1 per step, shared across the batch,
seed 0) at each number of steps."""

import argparse
import time
from pathlib import Path

import torch

from apd.experiment import load_run
from apd.losses.distance import output_distance
from apd.pgd import attack_kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    args = parser.parse_args()
    print("| run | L0 / token (g > τ) | KL, masks = g | KL, random masks (per token) | KL, attack's random start (shared) | "
          + " | ".join(f"KL, PGD {n} steps" for n in args.steps) + " | s |")
    for d in args.run_dirs:
        t0 = time.perf_counter()
        art = load_run(d)
        dec, target = art.decomposition, art.target
        x = art.run.target.heldout_batch(args.windows, torch.Generator().manual_seed(0))
        cm = dec.attach(target)
        with torch.no_grad():
            ci = dec.causal_importances(x, target)
            target_out = cm(x)
            at_g = float(output_distance(target_out, cm(x, masks=ci), "kl"))
            l0 = sum(float((g > dec.config.ci_threshold).float().sum(-1).mean()) for g in ci.values())
            gen = torch.Generator().manual_seed(0)
            per_token = []
            for _ in range(5):
                masks = {n: g + (1 - g) * torch.rand(g.shape, generator=gen) for n, g in ci.items()}
                deltas = {n: torch.rand(g.shape[:-1], generator=gen) for n, g in ci.items()} if dec.config.delta_component else None
                per_token.append(float(output_distance(target_out, cm(x, masks=masks, weight_delta_masks=deltas), "kl")))
        start = sum(attack_kl(cm, x, ci=ci, n_steps=0, seed=s, output_loss="kl", delta=dec.config.delta_component)
                    for s in range(5)) / 5
        attacked = [attack_kl(cm, x, ci=ci, n_steps=n, seed=0, output_loss="kl", delta=dec.config.delta_component)
                    for n in args.steps]
        print(f"| {d} | {l0:.1f} | {at_g:.4f} | {sum(per_token) / 5:.4f} | {start:.4f} | " + " | ".join(f"{v:.4f}" for v in attacked)
              + f" | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
