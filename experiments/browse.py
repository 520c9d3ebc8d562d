"""Build a run dir's static feature/component browser: `python -m experiments.browse RUN_DIR`.

RUN_DIR holds the browser data: ``browser_data.json`` (or gzip-compressed ``browser_data.json.gz``),
a :class:`apd.browser.BrowserData` written by ``BrowserData.save`` (the format is described in
``apd/browser/data.py``). For a run dir of a token model, a decompose run of any target whose
inputs are token ids (``experiment=spd_lm_1l``, or ``target=module`` with your own token model) or a
comparison run (SAEs, neurons and components side by side), the data file is built here when it is
missing or stale (its run's files or the settings changed, or ``--rebuild``) by ``apd.browser.lm``
on held-out text; other runs write theirs with ``apd.browser.extract_browser_data``. Writes into ``RUN_DIR/browser/`` (or ``--out``)::

    index.html                     all units, sortable by density and proxy scores
    units/<family>_<i>.html        one page per unit
    prompts/prompt_<j>.html        one page per prompt

Prompt pages come from the prompts stored in the data file, from ``--prompt-acts FILE`` (a JSON list
of ``PromptActs.to_json()``, computed where the model is), and from ``--prompt TEXT``. The last needs
the model to compute activations: on a run dir of the Shakespeare language model it is loaded here; other code
calls ``build(run_dir, texts, encoder=...)`` or ``main(argv, encoder=...)`` with a function
``text -> PromptActs``; without one ``--prompt`` fails.
Errors (a missing run dir or data file, a corrupt file, a run dir of another target, a prompt with
characters outside the vocabulary) are one line on stderr and exit status 1.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from apd.browser import DATA_FILENAMES, BrowserData, BrowserDataError, PromptActs, build_site
from apd.browser.lm import (
    LM_DATA_FILE,
    LMBrowserConfig,
    build_lm_browser_data,
    find_lm_run,
    lm_run_kind,
    load_lm_units,
    stale_reason,
)

PromptEncoder = Callable[[str], PromptActs]


def find_data_file(run_dir: Path) -> Path:
    """The browser data file in ``run_dir``; :class:`BrowserDataError` naming what is missing."""
    if not run_dir.is_dir():
        raise BrowserDataError(f"run dir {run_dir} does not exist")
    for name in DATA_FILENAMES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise BrowserDataError(
        f"{run_dir} has no {' or '.join(DATA_FILENAMES)}: write one with"
        " apd.browser.extract_browser_data(...).save(...)"
    )


def load_prompt_acts(path: Path) -> list[PromptActs]:
    """Prompts from a JSON file holding a list of ``PromptActs.to_json()``."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, list):
            raise TypeError(f"top level is {type(raw).__name__}, need a list")
        return [PromptActs.from_json(p) for p in raw]
    except FileNotFoundError as e:
        raise BrowserDataError(f"prompt file {path} not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise BrowserDataError(f"{path} is not a JSON list of PromptActs: {e!r}") from e


def _lm_data(
    run_dir: Path, rebuild: bool, lm_config: LMBrowserConfig | None, need_encoder: bool, log: Callable[[str], None]
) -> tuple[BrowserData, PromptEncoder | None]:
    """The data of a run dir of the language model (always ``browser_data.json.gz``), (re)built when
    missing or stale, and its prompt encoder when ``need_encoder`` (or when the data was built: the
    model is loaded then anyway)."""
    cfg = lm_config or LMBrowserConfig()
    layout = find_lm_run(run_dir, cfg)
    path = run_dir / LM_DATA_FILE
    data = None
    reason: str | None = "--rebuild" if rebuild else None
    if not rebuild and not path.is_file():
        reason = f"{LM_DATA_FILE} does not exist"
    elif not rebuild:
        try:
            data = BrowserData.load(path)
            reason = stale_reason(run_dir, cfg, data)
        except BrowserDataError as e:
            reason = f"it is unreadable: {e}"
    units = None
    if reason is not None:
        log(f"building {path} ({reason}) ...")
        units = load_lm_units(layout, cfg)
        data = build_lm_browser_data(units)
        data.save(path)
    elif need_encoder:
        units = load_lm_units(layout, cfg)
    assert data is not None
    return data, units


def build(
    run_dir: str | Path,
    prompt_texts: Sequence[str] = (),
    encoder: PromptEncoder | None = None,
    prompt_acts: Sequence[PromptActs] = (),
    out_dir: str | Path | None = None,
    rebuild: bool = False,
    lm_config: LMBrowserConfig | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Path:
    """Write the browser of ``run_dir`` (into ``out_dir``, default ``run_dir/browser``); returns the index path.

    On a run dir of the language model the data file is first built if missing or stale (or when
    ``rebuild``), with ``lm_config``, and ``--prompt`` texts are encoded by its model unless
    ``encoder`` is given. ``log`` receives progress lines."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BrowserDataError(f"run dir {run_dir} does not exist")
    if lm_run_kind(run_dir) is not None:
        data, lm_encoder = _lm_data(run_dir, rebuild, lm_config, bool(prompt_texts) and encoder is None, log)
        encoder = encoder or lm_encoder
    else:
        has_data = any((run_dir / name).is_file() for name in DATA_FILENAMES)
        if rebuild or (not has_data and (run_dir / "run.json").is_file()):
            find_lm_run(run_dir)  # raises, naming the run's target
        data = BrowserData.load(find_data_file(run_dir))
    if prompt_texts and encoder is None:
        raise BrowserDataError(
            "--prompt needs the model to compute activations, and no prompt encoder was given: store prompts in "
            "browser_data.json, pass --prompt-acts FILE, or call experiments.browse.build(..., encoder=...)"
        )
    prompts = [*prompt_acts, *(encoder(text) for text in prompt_texts)] if encoder else list(prompt_acts)
    return build_site(data, Path(out_dir) if out_dir is not None else run_dir / "browser", prompts)


def main(argv: Sequence[str] | None = None, encoder: PromptEncoder | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run dir of a token model, or one containing browser_data.json")
    parser.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="add a prompt page (repeatable)"
    )
    parser.add_argument(
        "--prompt-acts", type=Path, metavar="FILE", help="a JSON list of PromptActs to add as prompt pages"
    )
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/browser)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the language model's data file")
    parser.add_argument("--windows", type=int, metavar="N", help="language model: held-out windows to read "
                        f"(default {LMBrowserConfig.n_windows})")  # fmt: skip
    parser.add_argument("--all-seeds", action="store_true", help="comparison runs: every seed, not the lowest of each")
    parser.add_argument("--saes", action="append", metavar="PATTERN", help="comparison runs: only the SAEs whose "
                        "saes/ folder names match these fnmatch patterns (repeatable; default all)")  # fmt: skip
    args = parser.parse_args(argv)
    lm_config = None
    if args.windows is not None or args.all_seeds or args.saes:
        defaults = LMBrowserConfig()
        try:
            lm_config = LMBrowserConfig(n_windows=defaults.n_windows if args.windows is None else args.windows,
                                        all_seeds=args.all_seeds, sae_patterns=tuple(args.saes or defaults.sae_patterns))  # fmt: skip
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        extra = load_prompt_acts(args.prompt_acts) if args.prompt_acts else []
        index = build(args.run_dir, args.prompt, encoder, extra, args.out, args.rebuild, lm_config)
    except BrowserDataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {index}")
    return index


def cli() -> int:
    """The ``apd-browse`` console script (from any folder): ``main`` on the command line, exit status 0."""
    main()
    return 0


if __name__ == "__main__":
    main()
