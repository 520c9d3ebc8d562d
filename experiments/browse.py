"""Build a run dir's static feature/component browser: `python -m experiments.browse RUN_DIR`.

RUN_DIR must contain ``browser_data.json`` (or gzip-compressed ``browser_data.json.gz``): a
:class:`apd.browser.BrowserData` written by ``BrowserData.save``. A decompose run writes one with
its components, a comparison run with its SAE features, neurons and components side by side
(``apd.browser.extract_browser_data`` on held-out text; the format is described in
``apd/browser/data.py``). Writes into ``RUN_DIR/browser/`` (or ``--out``)::

    index.html                     all units, sortable by density and proxy scores
    units/<family>_<i>.html        one page per unit
    prompts/prompt_<j>.html        one page per prompt

Prompt pages come from the prompts stored in the data file, from ``--prompt-acts FILE`` (a JSON list
of ``PromptActs.to_json()``, computed where the model is), and from ``--prompt TEXT``. The last needs
the model to compute activations: code that has it calls ``build(run_dir, texts, encoder=...)`` or
``main(argv, encoder=...)`` with a function ``text -> PromptActs``; without one ``--prompt`` fails.
Errors (a missing run dir or data file, a corrupt file) are one line on stderr and exit status 1.
"""

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from apd.browser import DATA_FILENAMES, BrowserData, BrowserDataError, PromptActs, build_site

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


def build(
    run_dir: str | Path,
    prompt_texts: Sequence[str] = (),
    encoder: PromptEncoder | None = None,
    prompt_acts: Sequence[PromptActs] = (),
    out_dir: str | Path | None = None,
) -> Path:
    """Write the browser of ``run_dir`` (into ``out_dir``, default ``run_dir/browser``); returns the index path."""
    run_dir = Path(run_dir)
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
    parser.add_argument("run_dir", type=Path, help="a run dir containing browser_data.json")
    parser.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="add a prompt page (needs an encoder)"
    )
    parser.add_argument(
        "--prompt-acts", type=Path, metavar="FILE", help="a JSON list of PromptActs to add as prompt pages"
    )
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/browser)")
    args = parser.parse_args(argv)
    try:
        extra = load_prompt_acts(args.prompt_acts) if args.prompt_acts else []
        index = build(args.run_dir, args.prompt, encoder, extra, args.out)
    except BrowserDataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {index}")
    return index


if __name__ == "__main__":
    main()
