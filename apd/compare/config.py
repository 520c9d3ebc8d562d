"""What a comparison trains and scores: the SAE grids, the decomposition grid and their shared settings.

Plain dataclasses (``experiments/compare_schema.py`` registers :class:`CompareConfig` in Hydra's
ConfigStore); each checks its own fields on construction, so a typo fails before anything trains.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from apd.baselines import SAEConfig, SAETrainConfig, get_sae_class
from apd.config import MethodConfig
from apd.methods.apd import APDConfig

__all__ = ["SPARSITY_KNOBS", "SAEGrid", "APDGrid", "CompareConfig"]

SPARSITY_KNOBS = {"standard": "l1_coeff", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coeff"}
"""The default sparsity knob of each SAE architecture (a field of its config)."""


@dataclass(kw_only=True)
class SAEGrid:
    """One SAE architecture over widths × sparsity values (each trained once per seed)."""

    architecture: str = "topk"
    """registry name: standard, topk, batchtopk, jumprelu"""
    widths: list[int] = field(default_factory=lambda: [5])
    """dictionary sizes d_sae"""
    sparsity_knob: str | None = None
    """config field swept by ``sparsity_values``; None = the architecture's (SPARSITY_KNOBS)"""
    sparsity_values: list[float] = field(default_factory=lambda: [1.0])
    transcoder: bool = False
    """read the hidden layer's input, reconstruct its output (for +ID: across the identity)"""
    options: dict[str, Any] = field(default_factory=dict)
    """further SAE config fields, e.g. {threshold_init: 0.1} for JumpReLU"""
    train: dict[str, Any] = field(default_factory=dict)
    """overrides of the shared SAE training config for this architecture, e.g. {lr: 3e-3}"""

    def __post_init__(self) -> None:
        self.widths, self.sparsity_values = list(self.widths), list(self.sparsity_values)
        self.options, self.train = dict(self.options), dict(self.train)
        _, cfg_cls = get_sae_class(self.architecture)  # raises on an unknown name
        if self.sparsity_knob is None:
            self.sparsity_knob = SPARSITY_KNOBS.get(self.architecture)
        fields = {f.name for f in dataclasses.fields(cfg_cls)}
        if self.sparsity_knob not in fields:
            raise ValueError(f"sparsity_knob={self.sparsity_knob!r} is not a field of {cfg_cls.__name__}; "
                             f"choose one of {sorted(fields)}")  # fmt: skip
        reserved = {"d_in", "d_sae", "d_out", "apply_b_dec_to_input", self.sparsity_knob}
        bad = sorted(set(self.options) - (fields - reserved))
        if bad:
            raise ValueError(f"options {bad} are not settable fields of {cfg_cls.__name__} (d_in/d_sae/d_out and "
                             f"the sparsity knob are set by the grid); settable: {sorted(fields - reserved)}")  # fmt: skip
        train_fields = {f.name for f in dataclasses.fields(SAETrainConfig)} - {"seed"}
        bad = sorted(set(self.train) - train_fields)
        if bad:
            raise ValueError(f"train {bad} are not SAETrainConfig fields (seed comes from the grid); choose from {sorted(train_fields)}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths={self.widths}: give at least one width, each >= 1")
        if not self.sparsity_values:
            raise ValueError("sparsity_values is empty: give at least one value")

    @property
    def knob(self) -> str:
        assert self.sparsity_knob is not None
        return self.sparsity_knob

    def sae_config(self, d_in: int, width: int, value: float, d_out: int | None = None) -> SAEConfig:
        """The architecture's config for one grid cell (``d_out`` for a transcoder)."""
        _, cfg_cls = get_sae_class(self.architecture)
        transcoder = {"d_out": d_out if d_out is not None else d_in, "apply_b_dec_to_input": False} if self.transcoder else {}
        return cfg_cls(d_in=d_in, d_sae=width, **transcoder, **self.options, **{self.knob: value})


@dataclass(kw_only=True)
class APDGrid:
    """APD over numbers of components C × top-k values; empty lists take the APD preset's value."""

    enabled: bool = True
    widths: list[int] = field(default_factory=list)
    """numbers of components C (empty = the preset's C)"""
    topks: list[float] = field(default_factory=list)
    """top-k values (empty = the preset's topk)"""
    steps: int | None = None
    """APD steps (None = the preset's)"""
    runs: list[str] = field(default_factory=list)
    """finished decomposition run dirs (``python -m experiments.decompose ...``) to score instead of
    training (each loaded with ``apd.load_decomposition``; its method, seed and settings come from its
    own config, so ``widths``/``topks``/``steps`` and the comparison's ``seeds`` do not apply to them)"""

    def __post_init__(self) -> None:
        self.widths, self.topks, self.runs = list(self.widths), list(self.topks), [str(r) for r in self.runs]

    def settings(self, method: MethodConfig) -> list[APDConfig]:
        """One APD config per (C, topk) cell, the preset's other settings unchanged."""
        if not isinstance(method, APDConfig):
            raise TypeError(f"the apd grid sweeps APD's C and topk, but the decompose preset's method is a "
                            f"{type(method).__name__}; score finished runs of other methods with apd.runs")  # fmt: skip
        widths = self.widths or [method.C]
        topks = self.topks or [method.topk]
        steps = self.steps if self.steps is not None else method.steps
        return [dataclasses.replace(method, C=C, topk=k, steps=steps) for C in widths for k in topks]


@dataclass(kw_only=True)
class SPDRuns:
    """SPD in a comparison: its decompose preset × the comparison's seeds, or finished run dirs."""

    enabled: bool = False
    steps: int | None = None
    """SPD steps (None = the preset's)"""
    runs: list[str] = field(default_factory=list)
    """finished SPD run dirs to score instead of training (their own seeds and settings)"""

    def __post_init__(self) -> None:
        self.runs = [str(r) for r in self.runs]


@dataclass(kw_only=True)
class CompareConfig:
    """The whole comparison: the decompositions and every SAE grid, each over the same seeds and
    evaluation data."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    apd: APDGrid = field(default_factory=APDGrid)
    spd: SPDRuns = field(default_factory=SPDRuns)
    saes: dict[str, SAEGrid] = field(default_factory=dict)
    """method label -> architecture grid"""
    sae_train: SAETrainConfig = field(default_factory=SAETrainConfig)
    """training config shared by every SAE (``seed`` is set per run)"""
    n_eval: int = 10_000
    """evaluation samples, the same for every model (language model: held-out windows of seq_len tokens)"""
    eval_seed: int = 12_345
    bits_per_value: float = 8.0
    """b: bits to encode one active SAE latent's value in the description length"""
    tau: float = 0.9
    """cosine above which a latent (component) counts as a feature's copy, or two as duplicates"""
    negligible: float = 0.1
    """norm fraction below which a component's part of a feature column or of the identity is ignored"""
    serve_threshold: float = 0.04
    """residual MLP: a component (latent) serves feature i when its contribution to output i on
    x = e_i exceeds this (APD: max over neurons of |NC_c(i)|, SPEC §3.2)"""
    ultralow_density: float = 1e-4
    """language model: a live unit active on fewer than this fraction of the evaluation tokens is
    "ultralow density" (Bricken et al. used 1e-6 over far more tokens; the evaluation resolves
    1/(n_eval·seq_len))"""
    proxy_top_k: int = 50
    """language model: top-activating tokens per unit that the monosemanticity proxies and the
    SAE-component token overlap read"""
    curve_n_eval: int = 32
    """language model: held-out windows (drawn from ``eval_seed`` + 1, apart from the scoring tokens) on
    which an SAE's training curve records loss recovered, FVU and L0 every ``sae_train.eval_every`` steps"""
    save_models: bool = True

    def __post_init__(self) -> None:
        self.seeds = list(self.seeds)
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed (>= 5 for the reported comparison)")
        if self.n_eval < 100:
            raise ValueError(f"n_eval={self.n_eval}: use at least 100 evaluation samples")
        if not 0 < self.tau < 1 or not 0 < self.negligible < 1:
            raise ValueError(f"tau={self.tau}, negligible={self.negligible}: both must lie in (0, 1)")
        if self.serve_threshold <= 0:
            raise ValueError(f"serve_threshold={self.serve_threshold}: must be > 0 (the paper uses 0.04)")
        if self.curve_n_eval < 1:
            raise ValueError(f"curve_n_eval={self.curve_n_eval}: give at least one held-out window for the training curves")
        if not 0 < self.ultralow_density < 1 or self.proxy_top_k < 1:
            raise ValueError(f"ultralow_density={self.ultralow_density}, proxy_top_k={self.proxy_top_k}: the density must "
                             "lie in (0, 1) and proxy_top_k be >= 1")  # fmt: skip
