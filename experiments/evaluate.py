"""Score finished decompose runs again with this version of the metrics:
`python -m experiments.evaluate RUN_DIR [RUN_DIR ...] [--figures]`.

Each RUN_DIR is a run dir written by ``experiments.decompose`` (a multi-seed one stands for its
``seed_<s>/`` dirs). The decomposition is not retrained: it is loaded, scored on the run's own
evaluation inputs (its ``n_eval`` and seed) and ``metrics.json`` is rewritten, the previous one kept
as ``metrics.prev.json``; ``--figures`` redraws ``figures/``. Use it after a metrics change (e.g.
``apd.mechanisms``) to bring old runs up to date. Errors (no run dir, an unfinished run) are one line
on stderr and exit status 1.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from apd.config import ConfigError
from apd.experiment import RunResult, load_run, reevaluate, seed_run_dirs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--figures", action="store_true", help="also redraw the run's figures/")
    args = parser.parse_args(argv)
    try:
        for arg in args.run_dirs:
            dirs = seed_run_dirs(arg)
            per_seed = []
            for d in dirs:
                per_seed.append(metrics := reevaluate(d))
                shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "/" not in k}
                print(f"{d}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
                if args.figures:
                    from experiments.figures import save_figures

                    art = load_run(d)
                    save_figures(RunResult(metrics, art.decomposition, art.target), art.run, d / "figures")
            if dirs != [arg]:  # a multi-seed run: its means over the seeds
                from experiments.decompose import seeds_summary

                (arg / "metrics_seeds.json").write_text(json.dumps(seeds_summary(per_seed), indent=2) + "\n")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
