"""Settings of the browser data of a token run (``apd.browser.lm``), and its error type."""

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from apd.browser.data import BrowserDataError
from apd.browser.extract import ExtractConfig

__all__ = ["DEFAULT_PROMPTS", "LMRunError", "UnitActivation", "LMBrowserConfig"]

DEFAULT_PROMPTS = (
    "Ham.\nTo be, or not to be,--that is the question:--\nWhether 'tis nobler in the mind to suffer\n",
    "GLOSTER\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n",
    "ANTONY.\nFriends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n",
)
"""Prompts stored in every data file of a model with the Shakespeare tokenizer, so the site always
has prompt pages, in the corpus's layout (speaker, newline, verse): Hamlet is held out; Richard III
and Julius Caesar are training plays."""


class LMRunError(BrowserDataError):
    """A run dir that is not a usable run of a token model (or whose files are broken)."""


class UnitActivation(str, Enum):
    """What the browser shows as the activation of a method whose units are per matrix (SPD's
    subcomponents); it is active where the method's score (causal importance g) exceeds the method's
    threshold τ either way. Units spanning matrices (APD's components) show their score where the
    evaluation masks select them."""

    output_norm = "output_norm"
    """the norm of its masked output ‖g_c P_c a‖ where g_c > τ, else 0"""
    score = "score"
    """the score (the causal importance g_c) itself"""


def _lm_extract_config() -> ExtractConfig:
    # characters are short tokens: a wider window than sae_vis's ±5 reads as a phrase
    return ExtractConfig(ctx_before=20, ctx_after=6)


@dataclass(kw_only=True)
class LMBrowserConfig:
    """What :func:`apd.browser.lm.build_lm_browser_data` reads and keeps.

    - ``n_windows`` windows of ``seq_len`` (the model's) tokens, run ``batch_windows`` at a time:
      for the Shakespeare model evenly spaced windows of the held-out plays (128 windows = 16,384
      tokens, enough to resolve densities down to about 1e-4), for other token targets
      ``target.eval_batch`` drawn with ``text_seed``.
    - ``n_align``: best matches kept per unit and other family, by cosine and (``correlation``)
      by activation correlation.
    - ``unit_activation``: see :class:`UnitActivation`.
    - ``n_weight_dims``: entries (largest |weight|) and tokens (largest and most negative
      projection) shown per read and write direction on a unit's page.
    - ``all_seeds``: every seed of a comparison's SAE cells and decompositions (default: the
      lowest seed of each); ``sae_patterns``: fnmatch patterns on the ``saes/`` folder names.
    - ``prompts``: texts whose activations are stored with the data (prompt pages; only for a
      model whose tokenizer the browser has).
    - ``extract``: per-unit statistics (contexts, quantiles, histograms; ``ExtractConfig``).
    """

    n_windows: int = 128
    batch_windows: int = 16
    text_seed: int = 0
    n_align: int = 3
    correlation: bool = True
    unit_activation: UnitActivation = UnitActivation.output_norm
    n_weight_dims: int = 8
    all_seeds: bool = False
    sae_patterns: tuple[str, ...] = ("*",)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    extract: ExtractConfig = field(default_factory=_lm_extract_config)
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.unit_activation = UnitActivation(self.unit_activation)
        self.sae_patterns, self.prompts = tuple(self.sae_patterns), tuple(self.prompts)
        if min(self.n_windows, self.batch_windows, self.n_align, self.n_weight_dims) < 1:
            raise ValueError(f"n_windows={self.n_windows}, batch_windows={self.batch_windows}, n_align={self.n_align}, "
                             f"n_weight_dims={self.n_weight_dims}: each must be >= 1")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The settings that determine the data file (``device`` excluded)."""
        d = asdict(self)
        d.pop("device")
        d["unit_activation"] = self.unit_activation.value
        d["sae_patterns"], d["prompts"] = list(self.sae_patterns), list(self.prompts)
        d["extract"] = self.extract.to_json()
        return d
