"""A static feature/component browser: per-unit pages for SAE features, parameter components and
neurons, an index of all of them, and prompt views.

Three steps, each usable alone:

1. The caller (who has the model) computes activations on held-out text and calls
   :func:`extract_browser_data` (``apd.browser.extract``) to get a :class:`BrowserData`.
2. ``data.save(run_dir / "browser_data.json")`` writes it as JSON (``apd.browser.data``).
3. :func:`build_site` (``apd.browser.render``) writes the HTML. ``python -m experiments.browse
   RUN_DIR`` reads a run dir's data file and does this step.

For a run of a token model (the language model of SPEC §6, or any target whose inputs are token
ids, e.g. ``target=module``) three modules do step 1 and 2 from a run dir: ``apd.browser.runs`` finds
what the run dir holds (decompositions, a comparison's SAEs), ``apd.browser.units`` computes each
unit family's activations, logit effects, alignments and weights' read and write directions (which
families a decomposition gives is asked of its method: ``Method.units_span_matrices``), and
``apd.browser.lm`` formats them into the data file (``write_lm_browser_data``) and encodes prompts
(``LMUnits``); ``experiments.browse`` calls it when the data file is missing or stale.
"""

from apd.browser.data import (
    DATA_FILENAMES,
    Alignment,
    BrowserData,
    BrowserDataError,
    Context,
    Direction,
    Histogram,
    PromptActs,
    QuantileGroup,
    UnitFamily,
    UnitRecord,
)
from apd.browser.extract import (
    AlignmentTable,
    ExtractConfig,
    FamilyActs,
    correlation_alignment,
    correlation_matrix,
    cosine_alignment,
    extract_browser_data,
    extract_family,
    top_matches,
)
from apd.browser.render import build_site

__all__ = [
    "DATA_FILENAMES",
    "Alignment",
    "AlignmentTable",
    "BrowserData",
    "BrowserDataError",
    "Context",
    "Direction",
    "ExtractConfig",
    "FamilyActs",
    "Histogram",
    "PromptActs",
    "QuantileGroup",
    "UnitFamily",
    "UnitRecord",
    "build_site",
    "correlation_alignment",
    "correlation_matrix",
    "cosine_alignment",
    "extract_browser_data",
    "extract_family",
    "top_matches",
]
