"""Browser data of the language model (SPEC §6): its MLP neurons, SAE features and parameter
components side by side, on held-out text.

A run dir of the language model is either

- a **decompose run dir** (``python -m experiments.decompose experiment=spd_lm_1l``): ``run.json``
  whose target has kind ``"lm"``, and ``decomposition.pt``; or
- a **comparison run dir** (``python -m experiments.compare experiment=compare_lm_1l``): SAEs in
  ``saes/<label>_w<width>_<knob><value>_seed<s>/`` (``apd.baselines.load_sae``), decompositions
  in ``spd/.../seed<s>/`` and ``apd/.../seed<s>/`` (decompose run dirs). Whatever is present is
  used, except SAE folders its ``comparison.csv`` does not list (left by an earlier grid run into the
  same dir); by default the lowest seed of each SAE grid cell and of each decomposition setting
  (``LMBrowserConfig.all_seeds`` takes every seed).

:func:`write_lm_browser_data` reads ``n_windows`` evenly spaced, non-overlapping windows of the
held-out plays, runs the model and every unit family on them and writes ``browser_data.json.gz``
(with the default prompts' activations); :class:`LMUnits` is also the prompt encoder
(``text -> PromptActs``) of ``python -m experiments.browse RUN_DIR --prompt TEXT``.

Families, their activations and their logit effects (``W_U`` = ``unembed.weight``,
``W_down`` = ``mlp.down.weight``; every logit effect is the direct path through the unembedding
and ignores ``ln_f``'s normalisation scale, so only its direction and relative sizes mean much):

- ``neurons``: the 512 ReLU outputs of the MLP (active > 0); logit effects ``W_U W_down[:, i]``.
- ``<decomposition>.<module>`` for SPD (e.g. ``spd.mlp.up``): one family per decomposed matrix,
  its rank-one subcomponents U_c V_cᵀ. A subcomponent is active where its causal importance
  g_c > τ (``ci_threshold``), the run's own measure; its activation there is the norm of its
  masked output ‖g_c U_c V_cᵀ a‖ = g_c |V_c·a| ‖U_c‖ (0 elsewhere), so top examples rank by how
  much it writes, not by g alone, which saturates at 1 and would leave the top examples tied
  (``LMBrowserConfig.spd_activation="ci"`` shows g itself). Logit effects: ``mlp.down``:
  ``W_U U_c ‖V_c‖``; ``mlp.up``: ``W_U W_down U_c ‖V_c‖``, the linear path that ignores the ReLU
  (scaled by ‖V_c‖ so that they do not depend on how the rank-one factors share their norm).
- ``<decomposition>`` for APD: its components (each spans ``mlp.up`` and ``mlp.down``); the
  activation is the attribution where the component is selected by the run's evaluation top-k,
  0 elsewhere (batch top-k pools the positions of each batch of ``batch_windows`` windows, or of
  a prompt). Logit effects: ``W_U w_c`` with w_c = the mean over its active positions of its
  ``mlp.down`` part applied to the neurons, P_{c,down} a: its mean direct write to the residual
  stream.
- an SAE on the neurons (``saes/<name>``): latent activations ``sae.encode(neurons)``; logit
  effects ``W_U W_down W_dec[l]``. A transcoder (``d_out`` set) reads the MLP's input:
  ``sae.encode(mlp_in)``; logit effects ``W_U W_dec[l]`` (it writes the MLP's output).

Alignments (each unit's best matches in every other family, ``n_align`` each): the cosine of the
units' write directions in a space both write to: the 512-d neuron space if both do (neurons:
basis vectors; SAEs: decoder rows; SPD ``mlp.up``: U_c; APD: its mean write to the neurons'
pre-activations P_{c,up} x), else the 128-d residual stream (neurons: ``W_down`` columns; SAEs:
``W_down W_dec[l]``; transcoders: ``W_dec[l]``; SPD ``mlp.down``: U_c; SPD ``mlp.up``:
``W_down U_c``; APD: w_c); and the Pearson correlation of the activations on the tokens read.
"""

import contextlib
import csv
import fnmatch
import json
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apd.attributions import compute_attributions
from apd.baselines import SAE, SAELoadError, load_sae
from apd.baselines.io import CONFIG_FILENAME, WEIGHTS_FILENAME
from apd.browser.data import BrowserData, BrowserDataError, PromptActs
from apd.browser.extract import (
    AlignmentTable,
    ExtractConfig,
    FamilyActs,
    correlation_matrix,
    cosine_alignment,
    extract_browser_data,
    top_matches,
)
from apd.checkpoint import FILE_NAME, CheckpointError
from apd.compare.runs import sae_dir_name
from apd.config import ConfigError
from apd.experiment import RUN_FILE, RunArtifacts, load_run
from apd.methods import method_for
from apd.targets import LMTargetConfig, get_target, target_from_dict
from apd.toy_models.lm import MLPActivations, TransformerLM
from apd.toy_models.lm_data import HELDOUT_PLAYS, Split, load_corpus, load_tokenizer
from apd.topk import topk_mask

__all__ = [
    "LM_DATA_FILE",
    "LM_DATA_VERSION",
    "DEFAULT_PROMPTS",
    "SPDActivation",
    "LMBrowserConfig",
    "LMRunError",
    "LMRunLayout",
    "LMFamily",
    "LMUnits",
    "lm_run_kind",
    "find_lm_run",
    "load_lm_units",
    "heldout_windows",
    "build_lm_browser_data",
    "write_lm_browser_data",
    "stale_reason",
]

LM_DATA_FILE = "browser_data.json.gz"
LM_DATA_VERSION = 1
"""Bumped when the definitions above change: a data file of another version is rebuilt."""

DEFAULT_PROMPTS = (
    "Ham.\nTo be, or not to be,--that is the question:--\nWhether 'tis nobler in the mind to suffer\n",
    "GLOSTER\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n",
    "ANTONY.\nFriends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n",
)
"""Prompts stored in every LM data file, so the site always has prompt pages, in the corpus's layout
(speaker, newline, verse): Hamlet is held out; Richard III and Julius Caesar are training plays."""

_SEED_DIR = re.compile(r"seed_?(\d+)")
_SAE_DIR = re.compile(r"(.+)_seed(\d+)")
NEURON_SPACE = "cosine in neuron space"
RESID_SPACE = "cosine in the residual stream"
CORRELATION = "activation correlation"


class LMRunError(BrowserDataError):
    """A run dir that is not a usable run of the language model (or whose files are broken)."""


class SPDActivation(str, Enum):
    """What an SPD subcomponent's activation is (it is active where g > τ either way)."""

    output_norm = "output_norm"
    """‖g_c U_c V_cᵀ a‖ where g_c > τ, else 0"""
    ci = "ci"
    """the causal importance g_c itself"""


def _lm_extract_config() -> ExtractConfig:
    # characters are short tokens: a wider window than sae_vis's ±5 reads as a phrase
    return ExtractConfig(ctx_before=20, ctx_after=6)


@dataclass(kw_only=True)
class LMBrowserConfig:
    """What :func:`build_lm_browser_data` reads and keeps.

    - ``n_windows`` evenly spaced windows of ``seq_len`` (the model's) held-out tokens, run
      ``batch_windows`` at a time; 128 windows = 16,384 tokens, enough to resolve densities
      down to about 1e-4.
    - ``n_align``: best matches kept per unit and other family, by cosine and (``correlation``)
      by activation correlation.
    - ``spd_activation``: see :class:`SPDActivation`.
    - ``all_seeds``: every seed of a comparison's SAE cells and decompositions (default: the
      lowest seed of each); ``sae_patterns``: fnmatch patterns on the ``saes/`` folder names.
    - ``prompts``: texts whose activations are stored with the data (prompt pages).
    - ``extract``: per-unit statistics (contexts, quantiles, histograms; ``ExtractConfig``).
    """

    n_windows: int = 128
    batch_windows: int = 16
    n_align: int = 3
    correlation: bool = True
    spd_activation: SPDActivation = SPDActivation.output_norm
    all_seeds: bool = False
    sae_patterns: tuple[str, ...] = ("*",)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    extract: ExtractConfig = field(default_factory=_lm_extract_config)
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.spd_activation = SPDActivation(self.spd_activation)
        self.sae_patterns, self.prompts = tuple(self.sae_patterns), tuple(self.prompts)
        if self.n_windows < 1 or self.batch_windows < 1 or self.n_align < 1:
            raise ValueError(f"n_windows={self.n_windows}, batch_windows={self.batch_windows}, n_align={self.n_align}:"
                             " each must be >= 1")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The settings that determine the data file (``device`` excluded)."""
        d = asdict(self)
        d.pop("device")
        d["spd_activation"] = self.spd_activation.value
        d["sae_patterns"], d["prompts"] = list(self.sae_patterns), list(self.prompts)
        d["extract"] = self.extract.to_json()
        return d


# ---------------------------------------------------------------------------------------------
# Finding what a run dir holds
# ---------------------------------------------------------------------------------------------


@dataclass
class LMRunLayout:
    """What a run dir of the language model holds, found from its files (nothing loaded).

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
            out[_shown(f, self.run_dir)] = [st.st_size, st.st_mtime_ns]
        return out


def _family_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", text)
    return name if re.match(r"[A-Za-z0-9]", name) else f"u{name}"


def _read_run_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMRunError(f"{path} is not readable JSON: {e!r}") from e


def lm_run_kind(run_dir: str | Path) -> str | None:
    """``"decompose"`` (a decompose run dir of the language model), ``"comparison"`` (a comparison
    run dir: ``saes/``, ``spd/`` or ``apd/``), or None (neither; e.g. a decompose run of a toy)."""
    d = Path(run_dir)
    if (d / RUN_FILE).is_file():
        return "decompose" if _read_run_json(d / RUN_FILE).get("target", {}).get("kind") == "lm" else None
    if any((d / sub).is_dir() for sub in ("saes", "spd", "apd")):
        return "comparison"
    return None


def _shown(path: Path, run_dir: Path) -> str:
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
    for key in ("spd", "apd"):
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
    dir of the language model or holds nothing to browse."""
    cfg = config or LMBrowserConfig()
    d = Path(run_dir)
    if not d.is_dir():
        raise LMRunError(f"run dir {d} does not exist")
    kind = lm_run_kind(d)
    if kind is None and (d / RUN_FILE).is_file():
        target = _read_run_json(d / RUN_FILE).get("target", {})
        raise LMRunError(
            f"{d} is a decompose run of {target.get('name', '?')!r} (target kind {target.get('kind')!r}): the LM "
            "browser reads runs of the language model (kind 'lm'); for other runs write browser_data.json with "
            "apd.browser.extract_browser_data"
        )
    if kind is None:
        raise LMRunError(f"{d} is not a run dir of the language model: it has no {RUN_FILE} (a decompose run) and no "
                         "saes/, spd/ or apd/ (a comparison run)")  # fmt: skip
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

    # a comparison: decompose run dirs under spd/ and apd/, SAEs under saes/
    groups: dict[str, list[tuple[int, str, Path]]] = {}
    for sub in ("spd", "apd"):
        for run_file in sorted((d / sub).rglob(RUN_FILE)) if (d / sub).is_dir() else []:
            rd = run_file.parent
            run = _read_run_json(run_file)
            if int(run.get("n_seeds", 1)) > 1:
                continue  # a multi-seed parent: its seed_<s>/ dirs are found themselves
            rel = rd.relative_to(d)
            if not (rd / FILE_NAME).is_file():
                skipped.append(f"{rel} (unfinished: no {FILE_NAME})")
                continue
            if run.get("target", {}).get("kind") != "lm":
                raise LMRunError(f"{rd} decomposes {run.get('target', {}).get('name', '?')!r}, not the language model")
            group = str(rel.parent) if _SEED_DIR.fullmatch(rd.name) else str(rel)
            groups.setdefault(group, []).append((_seed_of(rd, run), _family_name(str(rel).replace("/", ".")), rd))
    for rd in _finished_runs_of_comparison(d):  # runs a comparison scored from elsewhere (spd.runs, apd.runs)
        run = _read_run_json(rd / RUN_FILE)
        if run.get("target", {}).get("kind") != "lm":
            raise LMRunError(f"{rd} decomposes {run.get('target', {}).get('name', '?')!r}, not the language model")
        if not (rd / FILE_NAME).is_file():
            skipped.append(f"{rd} (unfinished: no {FILE_NAME})")
            continue
        method, seed = str(run.get("method", "run")), _seed_of(rd, run)
        members = groups.setdefault(f"runs:{method}", [])
        name = _family_name(f"{method}.seed{seed}")
        if any(n == name for _, n, _ in members):  # two runs of one seed: tell them apart by their folder
            name = _family_name(f"{method}.seed{seed}.{rd.name}")
        members.append((seed, name, rd))
    decs = []
    for members in groups.values():
        members.sort()
        keep = members if cfg.all_seeds else members[:1]
        skipped += [f"{_shown(p, d)} (all_seeds=False)" for _, _, p in members[len(keep):]]
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
        saes += [(_family_name(p.name), p) for _, p in kept]
    if not decs and not saes:
        raise LMRunError(f"{d} holds no finished decomposition under spd/ or apd/ and no SAE under saes/"
                         + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))  # fmt: skip
    return LMRunLayout(d, kind, decs, saes, skipped)


# ---------------------------------------------------------------------------------------------
# Unit families
# ---------------------------------------------------------------------------------------------


@dataclass
class LMFamily:
    """One family of units and what the browser shows about it beyond activations.

    ``neuron_dirs`` [U, d_mlp] and ``resid_dirs`` [U, d_model]: each unit's write direction into
    the neurons (pre-activations) and into the residual stream, where it has one (the alignments'
    spaces); ``logit_effects`` [U, vocab]: the direct path of ``resid_dirs`` to the logits.
    """

    name: str
    kind: str
    act_label: str
    description: str
    n_units: int
    threshold: float = 0.0
    logit_effects: Float[Tensor, "U V"] | None = None
    neuron_dirs: Float[Tensor, "U d_mlp"] | None = None
    resid_dirs: Float[Tensor, "U d_model"] | None = None


class _Source(ABC):
    """Something that gives one or more families their activations from a batch of windows."""

    families: list[LMFamily]

    @abstractmethod
    def activations(self, tokens: Int[Tensor, "B T"], io: MLPActivations) -> dict[str, Float[Tensor, "B T U"]]:
        """{family name: activations} on ``tokens`` (``io``: the target's MLP on them)."""

    def reset(self) -> None:
        """Forget the held-out statistics (default: none kept)."""

    def observe(self, acts: dict[str, Tensor], io: MLPActivations) -> None:
        """Accumulate statistics on the held-out windows (default: none)."""

    def finish(self) -> None:
        """Set what depends on the held-out statistics (default: nothing)."""


def _mlp_weights(model: TransformerLM) -> tuple[Tensor, Tensor]:
    """(unembed.weight [vocab, d_model], mlp.down.weight [d_model, d_mlp]) on the CPU."""
    return model.unembed.weight.detach().cpu(), model.mlp.down.weight.detach().cpu()


class _Neurons(_Source):
    def __init__(self, model: TransformerLM):
        W_U, W_down = _mlp_weights(model)
        d_mlp = W_down.shape[1]
        self.families = [LMFamily(
            name="neurons", kind="neuron", act_label="ReLU output", n_units=d_mlp,
            description=f"The MLP's {d_mlp} ReLU neurons, active where > 0. Logit effects: unembed \u00b7 mlp.down[:, i], "
                        "the direct path to the logits (ln_f's scale ignored).",
            logit_effects=(W_U @ W_down).T, neuron_dirs=torch.eye(d_mlp), resid_dirs=W_down.T.clone(),
        )]  # fmt: skip

    def activations(self, tokens: Tensor, io: MLPActivations) -> dict[str, Tensor]:
        return {"neurons": io.acts}


class _SAE(_Source):
    def __init__(self, name: str, sae: SAE, model: TransformerLM, where: str):
        W_U, W_down = _mlp_weights(model)
        d_model, d_mlp = W_down.shape
        cfg = sae.cfg
        self.sae, self.name = sae, name
        W_dec = sae.W_dec.detach().cpu()
        if not cfg.is_transcoder and cfg.d_in == d_mlp:
            self.transcoder = False
            desc = (f"{sae.architecture} SAE on the {d_mlp} MLP neurons, {cfg.d_sae:,} latents ({where}). Activation: "
                    "sae.encode(neurons). Logit effects: unembed \u00b7 mlp.down \u00b7 W_dec[l] (direct path; ln_f's "
                    "scale ignored).")  # fmt: skip
            fam = LMFamily(name=name, kind="SAE feature", act_label="latent activation", n_units=cfg.d_sae,
                           description=desc, logit_effects=(W_U @ W_down @ W_dec.T).T, neuron_dirs=W_dec,
                           resid_dirs=(W_down @ W_dec.T).T)  # fmt: skip
        elif cfg.is_transcoder and cfg.d_in == d_model and cfg.d_target == d_model:
            self.transcoder = True
            desc = (f"{sae.architecture} transcoder from the MLP's input to its output, {cfg.d_sae:,} latents ({where}). "
                    "Activation: sae.encode(mlp_in). Logit effects: unembed \u00b7 W_dec[l] (direct path; ln_f's scale "
                    "ignored).")  # fmt: skip
            fam = LMFamily(name=name, kind="transcoder feature", act_label="latent activation", n_units=cfg.d_sae,
                           description=desc, logit_effects=(W_U @ W_dec.T).T, resid_dirs=W_dec)  # fmt: skip
        else:
            raise LMRunError(f"{where}: an SAE with d_in={cfg.d_in}, d_out={cfg.d_out} fits neither the model's {d_mlp} "
                             f"neurons nor its {d_model}-d MLP input and output")  # fmt: skip
        self.families = [fam]

    def activations(self, tokens: Tensor, io: MLPActivations) -> dict[str, Tensor]:
        return {self.name: self.sae.encode(io.mlp_in if self.transcoder else io.acts)}


class _SPD(_Source):
    def __init__(self, prefix: str, art: RunArtifacts, model: TransformerLM, activation: SPDActivation, device: str,
                 where: str):  # fmt: skip
        dec = art.decomposition
        self.cm = art.component_model().to(device).eval()
        self.method = method_for(dec.config)
        self.tau = float(dec.config.ci_threshold)  # type: ignore[attr-defined]
        self.activation = activation
        self.names = {n: _family_name(f"{prefix}.{n}") for n in dec.matrix_names}
        W_U, W_down = _mlp_weights(model)
        self.u_norm: dict[str, Tensor] = {}
        self.families = []
        for n in dec.matrix_names:
            A, B = dec.A[n], dec.B[n]  # [C, 1, d_in], [C, d_out, 1]
            if A.shape[1] != 1:
                raise LMRunError(f"{art.run_dir}: SPD subcomponents of {n} have rank {A.shape[1]}, expected 1")
            U, V = B[:, :, 0].float(), A[:, 0, :].float()
            self.u_norm[n] = U.norm(dim=1).to(device)
            U_eff = U * V.norm(dim=1, keepdim=True)  # the output per unit of input along V_c's direction
            if n == "mlp.up":
                dirs = {"neuron_dirs": U, "resid_dirs": (W_down @ U.T).T, "logit_effects": (W_U @ W_down @ U_eff.T).T}
                logit_text = "unembed \u00b7 mlp.down \u00b7 U_c\u2016V_c\u2016 (linear path: the ReLU ignored; ln_f's scale ignored)"
            elif n == "mlp.down":
                dirs = {"resid_dirs": U, "logit_effects": (W_U @ U_eff.T).T}
                logit_text = "unembed \u00b7 U_c\u2016V_c\u2016 (direct path; ln_f's scale ignored)"
            else:
                dirs, logit_text = {}, "none (not an MLP matrix)"
            if activation is SPDActivation.output_norm:
                label = "masked output norm"
                act_text = (f"active where the causal importance g_c > \u03c4 = {self.tau:g}; activation there "
                            "\u2016g_c U_c V_c\u1d40a\u2016, the norm of its masked output (0 elsewhere)")  # fmt: skip
            else:
                label = "causal importance"
                act_text = f"activation: the causal importance g_c (active above \u03c4 = {self.tau:g})"
            self.families.append(LMFamily(
                name=self.names[n], kind="SPD subcomponent", act_label=label, n_units=A.shape[0],
                threshold=0.0 if activation is SPDActivation.output_norm else self.tau,
                description=f"SPD rank-one subcomponents U_c V_c\u1d40 of {n} ({where}, step {dec.step}); "
                            f"{act_text}. Logit effects: {logit_text}.",
                **dirs,
            ))  # fmt: skip

    def activations(self, tokens: Tensor, io: MLPActivations) -> dict[str, Tensor]:
        cm = self.cm
        with cm.capture(cm.layer_names, inputs=True) as a_in:
            g = self.method.causal_importances(cm, tokens)
        out = {}
        for n, name in self.names.items():
            if self.activation is SPDActivation.ci:
                out[name] = g[n]
                continue
            inner = cm.layers[n].component_acts(a_in[n])[..., 0]  # V_c·a, [B, T, C]
            out[name] = torch.where(g[n] > self.tau, g[n] * inner.abs() * self.u_norm[n], 0.0)
        return out


class _APD(_Source):
    def __init__(self, prefix: str, art: RunArtifacts, model: TransformerLM, device: str, where: str):
        dec = art.decomposition
        self.cm = art.component_model().to(device).eval()
        self.config = dec.config
        self.dec, self.name, self.model = dec, _family_name(prefix), model
        self.reset()
        C, c = dec.C, self.config
        sel = "no top-k (every component)" if c.topk is None else f"{'batch ' if c.batch_topk else ''}top-k, k = {c.topk:g}"  # type: ignore[attr-defined]
        self.families = [LMFamily(
            name=self.name, kind="APD component", act_label="attribution when selected", n_units=C,
            description=f"APD components over {', '.join(dec.matrix_names)} ({where}, step {dec.step}); activation: "
                        f"its attribution ({c.attribution.value}) where it is selected ({sel}), else 0. "  # type: ignore[attr-defined]
                        "Logit effects: unembed \u00b7 (mean over its active tokens of its mlp.down part applied to the "
                        "neurons): its mean direct write (ln_f's scale ignored).",
        )]  # fmt: skip

    def activations(self, tokens: Tensor, io: MLPActivations) -> dict[str, Tensor]:
        c = self.config
        attr = compute_attributions(self.cm, tokens, c.attribution).detach()  # type: ignore[attr-defined]
        mask = torch.ones_like(attr) if c.topk is None else topk_mask(attr, c.topk, c.batch_topk)  # type: ignore[attr-defined]
        return {self.name: mask * attr}

    def reset(self) -> None:
        d_model, d_mlp = self.model.mlp.down.weight.shape
        C = self.dec.C
        self.sum_acts = torch.zeros(C, d_mlp, dtype=torch.float64)  # Σ over active tokens of the neurons
        self.sum_in = torch.zeros(C, d_model, dtype=torch.float64)  # Σ over active tokens of the MLP's input
        self.count = torch.zeros(C, dtype=torch.float64)

    def observe(self, acts: dict[str, Tensor], io: MLPActivations) -> None:
        a = acts[self.name]
        active = (a > 0).reshape(-1, a.shape[-1]).double().cpu()
        self.sum_acts += active.T @ io.acts.reshape(active.shape[0], -1).double().cpu()
        self.sum_in += active.T @ io.mlp_in.reshape(active.shape[0], -1).double().cpu()
        self.count += active.sum(0)

    def finish(self) -> None:
        fam, dec = self.families[0], self.dec
        n = self.count.clamp(min=1)[:, None]
        W_U, _ = _mlp_weights(self.model)
        if "mlp.down" in dec.matrix_names:
            B, A = dec.B["mlp.down"].double(), dec.A["mlp.down"].double()
            fam.resid_dirs = torch.einsum("com,cmi,ci->co", B, A, self.sum_acts / n).float()
            fam.logit_effects = (W_U @ fam.resid_dirs.T).T
        if "mlp.up" in dec.matrix_names:
            B, A = dec.B["mlp.up"].double(), dec.A["mlp.up"].double()
            fam.neuron_dirs = torch.einsum("com,cmi,ci->co", B, A, self.sum_in / n).float()


# ---------------------------------------------------------------------------------------------
# Loading a run dir's units, and running them
# ---------------------------------------------------------------------------------------------


def heldout_windows(seq_len: int, n_windows: int) -> Int[Tensor, "n_windows seq_len"]:
    """``n_windows`` evenly spaced, non-overlapping windows of ``seq_len`` tokens of the held-out plays."""
    stream = load_corpus(Split.heldout)
    n_avail = stream.numel() // seq_len
    if not 1 <= n_windows <= n_avail:
        raise BrowserDataError(f"n_windows={n_windows}: the held-out plays hold 1 to {n_avail} windows of {seq_len} tokens")
    starts = torch.linspace(0, n_avail - 1, n_windows).round().long() * seq_len
    return stream[starts[:, None] + torch.arange(seq_len)]


class LMUnits:
    """The language model and every unit family of a run dir, ready to run on text.

    ``activations(tokens)`` gives every family's activations on ``[B, T]`` windows;
    ``prompt_acts(text)`` (also callable as ``units(text)``) is the prompt encoder.
    """

    def __init__(self, layout: LMRunLayout, model: TransformerLM, target: LMTargetConfig, sources: list[_Source],
                 config: LMBrowserConfig, notes: list[str]):  # fmt: skip
        self.layout, self.model, self.target, self.sources, self.config = layout, model, target, sources, config
        self.notes = notes
        self.tokenizer = load_tokenizer()

    @property
    def families(self) -> list[LMFamily]:
        return [f for s in self.sources for f in s.families]

    @property
    def thresholds(self) -> dict[str, float]:
        return {f.name: f.threshold for f in self.families}

    @torch.no_grad()
    def activations(self, tokens: Int[Tensor, "B T"]) -> dict[str, Float[Tensor, "B T U"]]:
        """Every family's activations on ``tokens`` (on the CPU)."""
        x = tokens.to(self.config.device)
        io = self.model.mlp_io(x)
        return {name: a.cpu() for src in self.sources for name, a in src.activations(x, io).items()}

    @torch.no_grad()
    def heldout_activations(self, tokens: Int[Tensor, "S T"]) -> dict[str, Float[Tensor, "N U"]]:
        """Every family's activations on the held-out windows ``tokens``, ``[S*T, U]`` each, in
        ``batch_windows`` batches; the sources' held-out statistics (APD's write directions) are set."""
        S, T = tokens.shape
        out = {f.name: torch.empty(S * T, f.n_units) for f in self.families}
        bw = self.config.batch_windows
        for src in self.sources:
            src.reset()
        for s0 in range(0, S, bw):
            x = tokens[s0 : s0 + bw].to(self.config.device)
            io = self.model.mlp_io(x)
            for src in self.sources:
                acts = src.activations(x, io)
                src.observe(acts, io)
                for name, a in acts.items():
                    out[name][s0 * T : (s0 + x.shape[0]) * T] = a.reshape(-1, a.shape[-1]).float().cpu()
        for src in self.sources:
            src.finish()
        return out

    def encode(self, text: str) -> Int[Tensor, "T"]:
        """``text`` as token ids; :class:`BrowserDataError` naming unknown characters or a text too long."""
        if not text:
            raise BrowserDataError("the prompt is empty")
        missing = sorted(set(text) - set(self.tokenizer.tokens))
        if missing:
            raise BrowserDataError(f"prompt {text[:40]!r}: characters {missing} are not in the model's vocabulary of "
                                   f"{self.tokenizer.vocab_size} characters (the Shakespeare corpus's)")  # fmt: skip
        ids = self.tokenizer.encode(text)
        if ids.numel() > self.target.seq_len:
            raise BrowserDataError(f"prompt {text[:40]!r} has {ids.numel()} characters; the model reads at most "
                                   f"{self.target.seq_len}")  # fmt: skip
        return ids

    def prompt_acts(self, text: str) -> PromptActs:
        """Every unit active on ``text`` (per position, above its family's threshold, largest first)."""
        ids = self.encode(text)
        acts = self.activations(ids[None])
        return PromptActs.from_dense(text, ids, {n: a[0] for n, a in acts.items()}, self.thresholds)

    __call__ = prompt_acts

    def alignments(self, acts: dict[str, Float[Tensor, "N U"]] | None) -> list[AlignmentTable]:
        """Each family's best matches in every other family: by write-direction cosine in a shared
        space, and (with ``acts`` and ``config.correlation``) by activation correlation."""
        k = self.config.n_align
        tables = []
        fams = self.families
        for a in fams:
            for b in fams:
                if a is b:
                    continue
                if a.neuron_dirs is not None and b.neuron_dirs is not None:
                    tables.append(cosine_alignment(a.name, b.name, a.neuron_dirs, b.neuron_dirs, k, NEURON_SPACE))
                elif a.resid_dirs is not None and b.resid_dirs is not None:
                    tables.append(cosine_alignment(a.name, b.name, a.resid_dirs, b.resid_dirs, k, RESID_SPACE))
        if acts is not None and self.config.correlation:
            for i, a in enumerate(fams):
                for b in fams[i + 1 :]:
                    corr = correlation_matrix(acts[a.name], acts[b.name])
                    for src, tgt, m in ((a, b, corr), (b, a, corr.T)):
                        idx, scores = top_matches(m, k)
                        tables.append(AlignmentTable(src.name, tgt.name, CORRELATION, idx, scores))
        return tables


def load_lm_units(layout: LMRunLayout, config: LMBrowserConfig | None = None) -> LMUnits:
    """Load the target, decompositions and SAEs that ``layout`` lists."""
    cfg = config or LMBrowserConfig()
    runs: list[tuple[str, RunArtifacts]] = []
    for prefix, d in layout.decompositions:
        try:
            runs.append((prefix, load_run(d)))
        except (ConfigError, CheckpointError, OSError, KeyError, ValueError) as e:
            raise LMRunError(f"cannot load the decomposition in {d}: {e}") from e
    targets = {json.dumps(a.run.target.to_dict(), sort_keys=True) for _, a in runs}
    if len(targets) > 1:
        raise LMRunError(f"{layout.run_dir}: the decompositions decompose different targets; browse one at a time")
    notes = []
    if runs:
        target_cfg = runs[0][1].run.target
        model = runs[0][1].target
    else:
        target_cfg = LMTargetConfig()
        model, _ = get_target(target_cfg)
        notes.append(f"target: the shipped {target_cfg.name} (no decomposition in the run dir names one)")
    if not isinstance(target_cfg, LMTargetConfig) or not isinstance(model, TransformerLM):
        raise LMRunError(f"{layout.run_dir}: the target is a {type(target_cfg).__name__}, not the language model")
    model = model.to(cfg.device).eval()
    sources: list[_Source] = [_Neurons(model)]
    for prefix, art in runs:
        where = _shown(art.run_dir, layout.run_dir) if art.run_dir != layout.run_dir else layout.run_dir.name
        if art.decomposition.method == "spd":
            sources.append(_SPD(prefix, art, model, cfg.spd_activation, cfg.device, where))
        elif art.decomposition.method == "apd":
            sources.append(_APD(prefix, art, model, cfg.device, where))
        else:
            raise LMRunError(f"{art.run_dir}: no browser families for method {art.decomposition.method!r}")
    for name, d in layout.saes:
        try:
            sae = load_sae(d, cfg.device)
        except SAELoadError as e:
            raise LMRunError(str(e)) from e
        sources.append(_SAE(name, sae, model, str(d.relative_to(layout.run_dir))))
    names = [f.name for s in sources for f in s.families]
    if len(set(names)) != len(names):
        raise LMRunError(f"{layout.run_dir}: two unit families would share a name: {names}")
    return LMUnits(layout, model, target_cfg, sources, cfg, notes)


def _plays() -> str:
    return ", ".join(p.replace("_", " ").title() for p in HELDOUT_PLAYS)


def build_lm_browser_data(units: LMUnits) -> BrowserData:
    """The browser data of every family of ``units`` on the held-out windows, with alignments and
    the configured prompts; ``settings["lm_browser"]`` records what it was built from."""
    cfg, layout = units.config, units.layout
    T = units.target.seq_len
    tokens = heldout_windows(T, cfg.n_windows)
    acts = units.heldout_activations(tokens)
    families = [
        FamilyActs(name=f.name, acts=acts[f.name], kind=f.kind, threshold=f.threshold, logit_effects=f.logit_effects,
                   description=f.description, act_label=f.act_label)  # fmt: skip
        for f in units.families
    ]
    alignments = units.alignments(acts)
    prompts = [units.prompt_acts(text) for text in cfg.prompts]
    m = units.model.config
    meta: dict[str, Any] = {
        "run": str(layout.run_dir),
        "run kind": f"{layout.kind} run",
        "model": f"{units.target.name}: one-layer transformer, d_model {m.d_model}, {m.d_mlp} ReLU MLP neurons, "
                 f"{m.vocab_size} characters",
        "text": f"{cfg.n_windows} evenly spaced windows of {T} characters of the held-out plays ({_plays()})",
        "logit effects": "direct path through the unembedding; ln_f's normalisation scale ignored",
        "alignments": f"{NEURON_SPACE} (512-d) where both units write there, else {RESID_SPACE} (128-d)"
                      + (f"; {CORRELATION} on the tokens read" if cfg.correlation else ""),
    }  # fmt: skip
    if layout.skipped:
        meta["left out"] = "; ".join(layout.skipped)
    if units.notes:
        meta["notes"] = "; ".join(units.notes)
    title = f"{layout.run_dir.name}: neurons, SAE features and components of {units.target.name}"
    data = extract_browser_data(tokens, units.tokenizer.tokens, families, alignments, cfg.extract, prompts, title, meta)
    data.settings["lm_browser"] = {"version": LM_DATA_VERSION, "config": cfg.to_json(), "inputs": layout.inputs()}
    return data


def write_lm_browser_data(run_dir: str | Path, config: LMBrowserConfig | None = None) -> Path:
    """Build the browser data of an LM run dir and write ``run_dir/browser_data.json.gz``; returns its path.

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
