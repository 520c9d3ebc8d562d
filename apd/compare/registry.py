"""Comparisons by target kind: what ``python -m experiments.compare`` runs for a target.

A target module (:mod:`apd.compare.tms`, :mod:`apd.compare.resid`) registers one
:class:`TargetComparison` under its targets' ``TargetConfig.kind``: the function that runs the
comparison, the CSV columns of its rows, the key that picks each method's best setting and its
report (``comparison.md``). Generic
code picks it with :func:`comparison_for` and never names a target. A duplicate kind raises.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apd.compare.config import CompareConfig
from apd.compare.report import ReportInputs
from apd.compare.runs import Comparison
from apd.experiment import DecomposeRun

__all__ = ["TargetComparison", "COMPARISONS", "register_comparison", "comparison_for", "check_target_kind"]

RunComparison = Callable[..., Comparison]
"""``run(cfg, apd_run, out_dir, log, spd_run=None) -> Comparison``"""
Report = Callable[[ReportInputs, Comparison], str]
"""``report(inputs, comparison) -> str``: the markdown of ``comparison.md``"""


@dataclass(frozen=True)
class TargetComparison:
    """The comparison of one target kind."""

    kind: str
    """``TargetConfig.kind`` of the targets it covers"""
    run: RunComparison
    """``run(cfg, apd_run, out_dir, log, spd_run=None)``: every model of ``cfg`` on ``apd_run``'s target
    (SPD rows from ``spd_run``, its decompose preset, when ``cfg.spd.enabled``), scored"""
    columns: list[str]
    """its rows' columns, in CSV order"""
    best_key: Callable[[dict[str, Any]], tuple]
    """orders a method's aggregated settings (:func:`apd.compare.aggregate.best_settings`)"""
    report: Report
    """the markdown report of a finished comparison (:class:`apd.compare.report.ReportInputs`)"""


COMPARISONS: dict[str, TargetComparison] = {}


def register_comparison(comparison: TargetComparison) -> TargetComparison:
    """Make ``comparison`` the one of its kind; a second one for the same kind raises."""
    if comparison.kind in COMPARISONS:
        raise ValueError(f"a comparison of target kind {comparison.kind!r} is already registered "
                         f"({COMPARISONS[comparison.kind].run.__name__})")  # fmt: skip
    COMPARISONS[comparison.kind] = comparison
    return comparison


def comparison_for(kind: str) -> TargetComparison:
    """The comparison registered for target kind ``kind``."""
    if kind not in COMPARISONS:
        raise ValueError(f"no comparison is registered for target kind {kind!r} (a comparison scores against the "
                         f"target's ground truth); registered kinds: {sorted(COMPARISONS)}")  # fmt: skip
    return COMPARISONS[kind]


def check_target_kind(apd_run: DecomposeRun, kind: str, runner: str) -> None:
    """Raise a TypeError naming the right comparison when ``apd_run``'s target is not of ``kind``
    (``runner``: the name of the function that covers ``kind``)."""
    got = apd_run.target.kind
    if got == kind:
        return
    other = f"use apd.compare.{COMPARISONS[got].run.__name__}" if got in COMPARISONS else "no comparison covers it"
    raise TypeError(f"{runner} covers the {kind} targets, not {type(apd_run.target).__name__} (kind {got!r}): {other} "
                    "(apd.compare.comparison_for(kind) picks the comparison of a target kind)")  # fmt: skip
