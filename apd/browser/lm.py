"""The browser data of a token run: a run dir's units (``apd.browser.runs`` finds them,
``apd.browser.units`` computes them) formatted as a :class:`~apd.browser.data.BrowserData`.

:func:`write_lm_browser_data` reads ``n_windows`` windows of the target's text (the Shakespeare
model: evenly spaced, non-overlapping windows of the held-out plays), runs the model and every unit
family on them and writes ``browser_data.json.gz`` with each unit's statistics, its alignments, its
weights' read and write directions (top entries, and top tokens through the embedding and the
unembedding) and the default prompts' activations; :class:`LMUnits` is also the prompt encoder
(``text -> PromptActs``) of ``python -m experiments.browse RUN_DIR --prompt TEXT``. What the families
are and how their numbers are defined: ``apd/browser/units.py``; which run dirs are read:
``apd/browser/runs.py``.
"""

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from apd.browser.config import DEFAULT_PROMPTS, LMBrowserConfig, LMRunError, UnitActivation
from apd.browser.data import BrowserData, BrowserDataError, Direction, round_sig
from apd.browser.extract import FamilyActs, extract_browser_data
from apd.browser.runs import LMRunLayout, find_lm_run, lm_run_kind
from apd.browser.units import (
    CORRELATION,
    NEURON_SPACE,
    RESID_SPACE,
    LMFamily,
    LMUnits,
    WeightDirections,
    heldout_windows,
    load_lm_units,
)
from apd.toy_models.lm_data import HELDOUT_PLAYS

__all__ = [
    "LM_DATA_FILE",
    "LM_DATA_VERSION",
    "DEFAULT_PROMPTS",
    "UnitActivation",
    "LMBrowserConfig",
    "LMRunError",
    "LMRunLayout",
    "LMFamily",
    "LMUnits",
    "lm_run_kind",
    "find_lm_run",
    "load_lm_units",
    "heldout_windows",
    "unit_directions",
    "build_lm_browser_data",
    "write_lm_browser_data",
    "stale_reason",
]

LM_DATA_FILE = "browser_data.json.gz"
LM_DATA_VERSION = 2
"""Bumped when the definitions change (2: weights' read and write directions; any token run): a
data file of another version is rebuilt."""


def _plays() -> str:
    return ", ".join(p.replace("_", " ").title() for p in HELDOUT_PLAYS)


def _top(values: Tensor, k: int) -> list[tuple[int, float]]:
    v, i = values.topk(min(k, values.numel()))
    return [(int(t), round_sig(float(x))) for x, t in zip(v, i)]


def unit_directions(w: WeightDirections, unit: int, k: int) -> list[Direction]:
    """Unit ``unit``'s read and write :class:`Direction` in matrix ``w.matrix``: the ``k`` entries of
    largest magnitude, and where it has a token space (``apd.browser.units``) the ``k`` tokens of
    largest projection and the ``k`` of most negative (fewer in a vocabulary under 2k: no token is in both)."""
    out = []
    for side, vec, tokens, dims_family, space in (
        ("read", w.read[unit], w.read_tokens, w.read_dims_family, "embedding"),
        ("write", w.write[unit], w.write_tokens, w.write_dims_family, "unembedding"),
    ):
        idx = vec.abs().topk(min(k, vec.numel())).indices
        proj = None if tokens is None else tokens[unit]
        out.append(Direction(
            matrix=w.matrix, side=side, sigma=round_sig(float(w.sigma[unit])), dims_family=dims_family,
            top_dims=[(int(i), round_sig(float(vec[i]))) for i in idx],
            tokens_pos=None if proj is None else _top(proj, k),
            tokens_neg=None if proj is None else [(t, -v) for t, v in _top(-proj, min(k, proj.numel() - k))],
            token_space="" if proj is None else space,
        ))  # fmt: skip
    return out


def _describe_model(units: LMUnits) -> str:
    if units.tm.lm is not None:
        m = units.tm.lm.config
        what = "characters" if units.tokenizer is not None else "tokens"
        return f"{units.target.name}: one-layer transformer, d_model {m.d_model}, {m.d_mlp} ReLU MLP neurons, {m.vocab_size} {what}"
    n_params = sum(p.numel() for p in units.model.parameters())
    return f"{units.target.name}: {type(units.model).__name__}, {n_params:,} parameters, {units.tm.vocab_size} tokens"


def _kinds_phrase(kinds: list[str]) -> str:
    """The index title's list of what the run's families are ("neurons, SAE features and SPD
    subcomponents"), in family order, each kind once."""
    plural = [k + "s" for k in dict.fromkeys(kinds)]
    if len(plural) <= 1:
        return plural[0] if plural else "units"
    return ", ".join(plural[:-1]) + " and " + plural[-1]


def build_lm_browser_data(units: LMUnits) -> BrowserData:
    """The browser data of every family of ``units`` on the configured windows, with alignments,
    weight directions and (with a tokenizer) the configured prompts; ``settings["lm_browser"]``
    records what it was built from."""
    cfg, layout = units.config, units.layout
    tokens = units.windows()
    acts = units.heldout_activations(tokens)
    families = [
        FamilyActs(name=f.name, acts=acts[f.name], kind=f.kind, threshold=f.threshold, logit_effects=f.logit_effects,
                   description=f.description, act_label=f.act_label)  # fmt: skip
        for f in units.families
    ]
    alignments = units.alignments(acts)
    prompts = [units.prompt_acts(text) for text in cfg.prompts] if units.tokenizer is not None else []
    T = tokens.shape[1]
    text = (f"{cfg.n_windows} evenly spaced windows of {T} characters of the held-out plays ({_plays()})"
            if units.tokenizer is not None else f"{tokens.shape[0]} {units.text_description()} of {T} tokens")  # fmt: skip
    meta: dict[str, Any] = {
        "run": str(layout.run_dir),
        "run kind": f"{layout.kind} run",
        "model": _describe_model(units),
        "text": text,
        "logit effects": "direct path through the unembedding; LayerNorms' normalisation ignored",
        "weights": "per unit and matrix the top singular pair σ u vᵀ of its weight: read direction v, write "
                   f"direction u; tokens through the embedding (v) and the unembedding (u): {units.tm.stream_rule()}",
        "alignments": (f"{NEURON_SPACE} where both units write there, else " if units.tm.lm is not None else "")
                      + RESID_SPACE + (f"; {CORRELATION} on the tokens read" if cfg.correlation else ""),
    }  # fmt: skip
    if layout.skipped:
        meta["left out"] = "; ".join(layout.skipped)
    notes = list(units.notes)
    if units.tokenizer is None:
        notes.append("tokens are shown by id (the browser has no tokenizer for this target); no stored prompts")
    if notes:
        meta["notes"] = "; ".join(notes)
    kinds = _kinds_phrase([f.kind for f in units.families])
    title = f"{layout.run_dir.name}: {kinds} of {units.target.name}"
    data = extract_browser_data(tokens, units.vocab, families, alignments, cfg.extract, prompts, title, meta)
    for fam in units.families:
        records = data.family(fam.name).units
        for w in fam.weights:
            for u, rec in enumerate(records):
                rec.directions += unit_directions(w, u, cfg.n_weight_dims)
    data.settings["lm_browser"] = {"version": LM_DATA_VERSION, "config": cfg.to_json(), "inputs": layout.inputs()}
    return data


def write_lm_browser_data(run_dir: str | Path, config: LMBrowserConfig | None = None) -> Path:
    """Build the browser data of a token run dir and write ``run_dir/browser_data.json.gz``; returns its path.

    A comparison calls this at its end; ``python -m experiments.browse RUN_DIR`` then renders the site."""
    cfg = config or LMBrowserConfig()
    layout = find_lm_run(run_dir, cfg)
    data = build_lm_browser_data(load_lm_units(layout, cfg))
    return data.save(layout.run_dir / LM_DATA_FILE)


def stale_reason(run_dir: str | Path, config: LMBrowserConfig | None = None, data: BrowserData | None = None) -> str | None:
    """Why ``run_dir``'s LM data file must be (re)built, or None if it is current: missing,
    unreadable, built by another version of this module, with other settings, or from other files.
    ``data``: the file's contents, if already loaded. A data file not written by this module is
    current (it is rebuilt only on request)."""
    cfg = config or LMBrowserConfig()
    path = Path(run_dir) / LM_DATA_FILE
    if not path.is_file():
        return f"{LM_DATA_FILE} does not exist"
    layout = find_lm_run(run_dir, cfg)
    if data is None:
        try:
            data = BrowserData.load(path)
        except BrowserDataError as e:
            return f"it is unreadable ({e})"
    saved = data.settings.get("lm_browser")
    if not isinstance(saved, dict):
        return None
    if saved.get("version") != LM_DATA_VERSION:
        return f"it was built by version {saved.get('version')} of the LM browser, this is {LM_DATA_VERSION}"
    if saved.get("config") != json.loads(json.dumps(cfg.to_json())):
        return "it was built with other settings"
    now, before = layout.inputs(), saved.get("inputs", {})
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        return f"its inputs changed ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''})"
    return None
