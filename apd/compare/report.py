"""What every comparison report (``comparison.md``) shares: its inputs and the table cells.

Each registered comparison (:class:`apd.compare.registry.TargetComparison`) owns its report
function, ``report(inputs, comparison) -> str``; ``python -m experiments.compare`` only writes what
it returns. A results row's ``method`` is data: per-method behaviour comes from the method's class
(:func:`apd.methods.method_class`), never from its name.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apd.compare.config import CompareConfig
from apd.experiment import DecomposeRun
from apd.methods import Units, is_method, method_class

__all__ = ["ReportInputs", "fmt_cell", "fmt_number", "setting", "markdown_table", "has_shared_components", "is_decomposition"]


@dataclass
class ReportInputs:
    """What a comparison's report reads besides the scored models (:class:`apd.compare.Comparison`)."""

    cfg: CompareConfig
    """the comparison's settings (grids, seeds, thresholds)"""
    apd_run: DecomposeRun
    """the decompose run the APD rows were built on (its target is the comparison's)"""
    spd_run: DecomposeRun | None = None
    """the decompose run of the SPD rows trained inside the comparison (None: none, or finished runs)"""
    apd_preset: str = ""
    """the decompose preset (``experiment=<name>``) of ``apd_run``, and the overrides given on top of it"""
    apd_overrides: list[str] = field(default_factory=list)
    spd_preset: str | None = None
    spd_overrides: list[str] = field(default_factory=list)
    wall: float = 0.0
    """wall seconds of the whole invocation"""
    figures: list[Path] = field(default_factory=list)
    """the figures written, relative to the report's folder"""


def fmt_cell(mean: float, std: float, decimals: int | str | None) -> str:
    """``decimals``: digits after the point, a format spec (e.g. ".2e"), or None for an integer without std."""
    if isinstance(mean, float) and math.isnan(mean):
        return "–"
    if decimals is None:
        return f"{mean:.0f}"
    spec = decimals if isinstance(decimals, str) else f".{decimals}f"
    return f"{mean:{spec}} ± {std:{spec}}"


def fmt_number(value: float, decimals: int) -> str:
    """One number without a std ("–" for NaN, not applicable)."""
    return "–" if math.isnan(value) else f"{value:.{decimals}f}"


def setting(a: dict[str, Any]) -> str:
    """``knob=value``; "–" for a row without a sparsity setting (the language model's neurons)."""
    return "–" if a["sparsity_knob"] == "none" else f"{a['sparsity_knob']}={a['sparsity']:g}"


def markdown_table(groups: list[dict[str, Any]], columns: list[tuple[str, str, int | str | None]]) -> list[str]:
    """One line per aggregated setting: method, width, setting, n, then ``columns`` (column, header, decimals)."""
    lines = ["| method | width | setting | n | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for a in groups:
        cells = [fmt_cell(a[c], a.get(f"{c}_std", 0.0), d) for c, _, d in columns]
        lines.append(f"| {a['method']} | {a['width']} | {setting(a)} | {a['n']} | " + " | ".join(cells) + " |")
    return lines


def is_decomposition(method: str) -> bool:
    """Whether a row's ``method`` is a registered decomposition method (not an SAE grid or the neurons)."""
    return is_method(method)


def has_shared_components(method: str) -> bool:
    """Whether a row's ``method`` is a decomposition whose components span every matrix (``Units.shared``:
    APD), so that one component can carry a whole matrix such as TMS + ID's identity."""
    return is_method(method) and method_class(method).units is Units.shared
