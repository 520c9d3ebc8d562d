"""Finding what a run dir of a token model holds (nothing is loaded here but JSON).

A run dir the browser builds its data for is either

- a **decompose run dir** (``python -m experiments.decompose experiment=spd_lm_1l``, or any run of a
  target whose inputs are token ids ``[B, T]``, e.g. ``target=module`` with a token model):
  ``run.json`` and ``decomposition.pt`` (a multi-seed run: its ``seed_<s>/`` dirs); or
- a **comparison run dir** (``python -m experiments.compare experiment=compare_lm_1l``): SAEs in
  ``saes/<label>_w<width>_<knob><value>_seed<s>/`` (``apd.baselines.load_sae``), decompositions
  in ``<method>/.../seed<s>/`` for every registered method (``apd.methods.METHODS``: ``apd/``,
  ``spd/``), and runs it scored from elsewhere (``<method>.runs`` of its ``config.yaml``). Whatever
  is present is used, except SAE folders its ``comparison.csv`` does not list (left by an earlier
  grid run into the same dir); by default the lowest seed of each SAE grid cell and of each
  decomposition setting (``LMBrowserConfig.all_seeds`` takes every seed).
"""

import contextlib
import csv
import fnmatch
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apd.baselines.io import CONFIG_FILENAME, WEIGHTS_FILENAME
from apd.browser.config import LMBrowserConfig, LMRunError
from apd.compare.runs import sae_dir_name
from apd.decomposition import FILE_NAME
from apd.experiment import RUN_FILE
from apd.methods import METHODS
from apd.targets import TargetConfig, target_from_dict

__all__ = ["LMRunLayout", "lm_run_kind", "find_lm_run", "token_target", "family_name", "shown"]

_SEED_DIR = re.compile(r"seed_?(\d+)")
_SAE_DIR = re.compile(r"(.+)_seed(\d+)")


def token_target(target: dict[str, Any]) -> TargetConfig | None:
    """The target config of a run's ``run.json`` ``target`` entry if its inputs are token ids (a
    batch of it is an integer ``[B, T]`` tensor), else None (a toy with float inputs, or an entry
    that does not load)."""
    return _token_target(json.dumps(target, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _token_target(key: str) -> TargetConfig | None:
    try:
        cfg = target_from_dict(json.loads(key))
        x = cfg.batch(2, torch.Generator().manual_seed(0))
    except Exception:  # an entry of another version, a factory that fails: not browsable as a token run
        return None
    is_ids = isinstance(x, torch.Tensor) and x.ndim == 2 and not x.is_floating_point() and x.dtype != torch.bool
    return cfg if is_ids else None


def _methods_dirs() -> str:
    return " or ".join(f"{m}/" for m in METHODS)


@dataclass
class LMRunLayout:
    """What a run dir of a token model holds, found from its files (nothing loaded).

    ``decompositions``: (family prefix, decompose run dir); ``saes``: (family name, SAE dir);
    ``skipped``: lines saying what was left out and why.
    """

    run_dir: Path
    kind: str
    """``"decompose"`` or ``"comparison"``"""
    decompositions: list[tuple[str, Path]]
    saes: list[tuple[str, Path]]
    skipped: list[str] = field(default_factory=list)

    def inputs(self) -> dict[str, list[int]]:
        """{file relative to the run dir: [size, mtime_ns]} of every file the data is built from."""
        files = []
        for _, d in self.decompositions:
            files += [d / RUN_FILE, d / FILE_NAME]
        for _, d in self.saes:
            files += [d / CONFIG_FILENAME, d / WEIGHTS_FILENAME]
        out = {}
        for f in files:
            st = f.stat()
            out[shown(f, self.run_dir)] = [st.st_size, st.st_mtime_ns]
        return out


def family_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", text)
    return name if re.match(r"[A-Za-z0-9]", name) else f"u{name}"


def _read_run_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMRunError(f"{path} is not readable JSON: {e!r}") from e


def lm_run_kind(run_dir: str | Path) -> str | None:
    """``"decompose"`` (a decompose run dir of a token model), ``"comparison"`` (a comparison run
    dir: ``saes/`` or a folder named after a method), or None (neither; e.g. a decompose run of a toy
    with float inputs)."""
    d = Path(run_dir)
    if (d / RUN_FILE).is_file():
        return "decompose" if token_target(_read_run_json(d / RUN_FILE).get("target", {})) is not None else None
    if any((d / sub).is_dir() for sub in ("saes", *METHODS)):
        return "comparison"
    return None


def shown(path: Path, run_dir: Path) -> str:
    """``path`` relative to ``run_dir`` where it lies inside it, else as it is (a run scored from elsewhere)."""
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def _finished_runs_of_comparison(d: Path) -> list[Path]:
    """The decompose run dirs a comparison scored from outside its own folder (``spd.runs``,
    ``apd.runs`` of its ``config.yaml``), resolved as written (absolute, or relative to the current
    directory), then relative to the comparison's parent; missing ones are left out."""
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        return []
    from omegaconf import OmegaConf  # a dependency of hydra-core; only comparison dirs need it

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(cfg_file))
    except Exception:  # not a comparison's config: nothing to add
        return []
    found: list[Path] = []
    for key in METHODS:
        section = cfg.get(key) if isinstance(cfg, dict) else None
        entries = (section.get("runs") or []) if isinstance(section, dict) else []
        for entry in entries:
            for cand in (Path(entry), d.parent / entry):
                if (cand / RUN_FILE).is_file() and cand.resolve() not in [f.resolve() for f in found]:
                    found.append(cand)
                    break
    return found


def _saes_of_comparison(d: Path) -> set[str] | None:
    """The ``saes/`` folder names (:func:`apd.compare.runs.sae_dir_name`) of the SAEs a comparison
    scored, its ``comparison.csv`` rows; None without one (every SAE folder is taken)."""
    csv_file = d / "comparison.csv"
    if not csv_file.is_file():
        return None
    with csv_file.open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"method", "width", "sparsity_knob", "sparsity", "seed"} <= set(reader.fieldnames or []):
            return None
        rows = list(reader)
    names = set()
    for r in rows:  # rows without an SAE's numbers (neurons and decompositions: empty width; a short row: None) are not SAEs
        with contextlib.suppress(TypeError, ValueError):
            names.add(sae_dir_name(r["method"], int(float(r["width"])), r["sparsity_knob"], float(r["sparsity"]),
                                   int(float(r["seed"]))))  # fmt: skip
    return names


def _seed_of(path: Path, run: dict[str, Any]) -> int:
    m = _SEED_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else int(run.get("seed", 0))


def find_lm_run(run_dir: str | Path, config: LMBrowserConfig | None = None) -> LMRunLayout:
    """What ``run_dir`` holds (see the module docstring); :class:`LMRunError` when it is not a run
    dir of a token model or holds nothing to browse."""
    cfg = config or LMBrowserConfig()
    d = Path(run_dir)
    if not d.is_dir():
        raise LMRunError(f"run dir {d} does not exist")
    kind = lm_run_kind(d)
    if kind is None and (d / RUN_FILE).is_file():
        target = _read_run_json(d / RUN_FILE).get("target", {})
        raise LMRunError(
            f"{d} is a decompose run of {target.get('name', '?')!r} (target kind {target.get('kind')!r}), whose inputs "
            "are not token ids: the browser builds its data for runs of token models; for other runs write "
            "browser_data.json with apd.browser.extract_browser_data"
        )
    if kind is None:
        raise LMRunError(f"{d} is not a run dir of a token model: it has no {RUN_FILE} (a decompose run) and no "
                         f"saes/ or {_methods_dirs()} (a comparison run)")  # fmt: skip
    skipped: list[str] = []
    if kind == "decompose":
        run = _read_run_json(d / RUN_FILE)
        n_seeds = int(run.get("n_seeds", 1))
        decs: list[tuple[str, Path]]
        if n_seeds > 1:
            dirs = [(int(run["seed"]) + i, d / f"seed_{int(run['seed']) + i}") for i in range(n_seeds)]
            dirs = [(s, p) for s, p in dirs if (p / FILE_NAME).is_file()]
            if not cfg.all_seeds and len(dirs) > 1:
                skipped.append(f"seeds {[s for s, _ in dirs[1:]]} of {d.name} (all_seeds=False)")
                dirs = dirs[:1]
            decs = [(f"{run['method']}.seed{s}", p) for s, p in dirs]
        else:
            decs = [(str(run["method"]), d)] if (d / FILE_NAME).is_file() else []
        if not decs:
            raise LMRunError(f"{d} holds no finished decomposition ({FILE_NAME}); let the run finish first")
        return LMRunLayout(d, kind, decs, [], skipped)

    # a comparison: decompose run dirs under a folder per method, SAEs under saes/
    groups: dict[str, list[tuple[int, str, Path]]] = {}
    for sub in METHODS:
        for run_file in sorted((d / sub).rglob(RUN_FILE)) if (d / sub).is_dir() else []:
            rd = run_file.parent
            run = _read_run_json(run_file)
            if int(run.get("n_seeds", 1)) > 1:
                continue  # a multi-seed parent: its seed_<s>/ dirs are found themselves
            rel = rd.relative_to(d)
            if not (rd / FILE_NAME).is_file():
                skipped.append(f"{rel} (unfinished: no {FILE_NAME})")
                continue
            if token_target(run.get("target", {})) is None:
                raise LMRunError(f"{rd} decomposes {run.get('target', {}).get('name', '?')!r}, not a token model")
            group = str(rel.parent) if _SEED_DIR.fullmatch(rd.name) else str(rel)
            groups.setdefault(group, []).append((_seed_of(rd, run), family_name(str(rel).replace("/", ".")), rd))
    for rd in _finished_runs_of_comparison(d):  # runs a comparison scored from elsewhere (spd.runs, apd.runs)
        run = _read_run_json(rd / RUN_FILE)
        if token_target(run.get("target", {})) is None:
            raise LMRunError(f"{rd} decomposes {run.get('target', {}).get('name', '?')!r}, not a token model")
        if not (rd / FILE_NAME).is_file():
            skipped.append(f"{rd} (unfinished: no {FILE_NAME})")
            continue
        method, seed = str(run.get("method", "run")), _seed_of(rd, run)
        members = groups.setdefault(f"runs:{method}", [])
        name = family_name(f"{method}.seed{seed}")
        if any(n == name for _, n, _ in members):  # two runs of one seed: tell them apart by their folder
            name = family_name(f"{method}.seed{seed}.{rd.name}")
        members.append((seed, name, rd))
    decs = []
    for members in groups.values():
        members.sort()
        keep = members if cfg.all_seeds else members[:1]
        skipped += [f"{shown(p, d)} (all_seeds=False)" for _, _, p in members[len(keep):]]
        decs += [(name, p) for _, name, p in keep]
    sae_groups: dict[str, list[tuple[int, Path]]] = {}
    scored = _saes_of_comparison(d)
    for cfg_file in sorted((d / "saes").glob(f"*/{CONFIG_FILENAME}")) if (d / "saes").is_dir() else []:
        sd = cfg_file.parent
        if not any(fnmatch.fnmatchcase(sd.name, p) for p in cfg.sae_patterns):
            continue
        if scored is not None and sd.name not in scored:  # e.g. a grid cell of an earlier run into this dir
            skipped.append(f"saes/{sd.name} (not in comparison.csv: left from an earlier grid)")
            continue
        if not (sd / WEIGHTS_FILENAME).is_file():
            skipped.append(f"saes/{sd.name} (no {WEIGHTS_FILENAME})")
            continue
        m = _SAE_DIR.fullmatch(sd.name)
        group, seed = (m.group(1), int(m.group(2))) if m else (sd.name, 0)
        sae_groups.setdefault(group, []).append((seed, sd))
    saes: list[tuple[str, Path]] = []
    for sae_members in sae_groups.values():
        sae_members.sort()
        kept = sae_members if cfg.all_seeds else sae_members[:1]
        skipped += [f"saes/{p.name} (all_seeds=False)" for _, p in sae_members[len(kept):]]
        saes += [(family_name(p.name), p) for _, p in kept]
    if not decs and not saes:
        raise LMRunError(f"{d} holds no finished decomposition under {_methods_dirs()} and no SAE under saes/"
                         + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))  # fmt: skip
    return LMRunLayout(d, kind, decs, saes, skipped)


