"""What the feature/component browser shows: JSON-serialisable dataclasses, and the data file.

A *unit* is anything with a scalar activation per token: an SAE feature, a parameter component or
subcomponent, an MLP neuron. Units come in *families* (one SAE, one decomposed layer, one MLP's
neurons); a family's units share an activation threshold and a kind. :func:`apd.browser.extract`
computes a :class:`BrowserData` from a token stream and per-family activation matrices;
:func:`apd.browser.render.build_site` turns one into a static site.

Token ids index :attr:`BrowserData.vocab`; every position ``pos`` is a position of the flattened
token stream ``tokens.reshape(-1)`` (``pos = s * seq_len + t`` for a ``[S, T]`` stream). Floats are
rounded when extracted (activations to 4 significant digits), so a page shows exactly the numbers
the data file holds, and ``from_json(to_json(x)) == x``.

The data file (``browser_data.json``, or gzip-compressed ``browser_data.json.gz``) is
``BrowserData.to_json()`` written as JSON: ``{"format_version": 1, "title", "vocab", "n_tokens",
"seq_len", "settings", "meta", "families": [UnitFamily...], "prompts": [PromptActs...]}``.
"""

import gzip
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "FORMAT_VERSION",
    "DATA_FILENAMES",
    "BrowserDataError",
    "Histogram",
    "Context",
    "QuantileGroup",
    "Alignment",
    "Direction",
    "UnitRecord",
    "UnitFamily",
    "PromptActs",
    "BrowserData",
    "round_sig",
    "check_family_name",
]

FORMAT_VERSION = 1
DATA_FILENAMES = ("browser_data.json", "browser_data.json.gz")
_FAMILY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class BrowserDataError(ValueError):
    """Browser data that is inconsistent, or a data file that is missing, corrupt or of another version."""


def round_sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (NaN and ±inf unchanged)."""
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def check_family_name(name: str) -> str:
    """``name`` if it is usable in a file name (letters, digits, ``_.-``, not starting with ``.``/``-``)."""
    if not isinstance(name, str) or not _FAMILY_NAME.fullmatch(name):
        raise BrowserDataError(f"family name {name!r} must match {_FAMILY_NAME.pattern} (it names the unit pages)")
    return name


def _pairs(items: Sequence[Sequence[Any]]) -> list[tuple[int, float]]:
    return [(int(a), float(b)) for a, b in items]


@dataclass
class Histogram:
    """Counts of values in ``len(counts)`` bins; ``edges`` (ascending, one more than ``counts``) are
    the bin boundaries, log-spaced when ``log`` (then drawn on a log axis)."""

    edges: list[float]
    counts: list[int]
    log: bool = False

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.counts) + 1:
            raise BrowserDataError(f"histogram has {len(self.counts)} counts but {len(self.edges)} edges")

    def to_json(self) -> dict[str, Any]:
        return {"edges": self.edges, "counts": self.counts, "log": self.log}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Histogram":
        return cls(edges=[float(e) for e in d["edges"]], counts=[int(c) for c in d["counts"]], log=bool(d["log"]))


@dataclass
class Context:
    """A window of the token stream around one position, with one unit's activation on each token.

    ``tokens[center]`` is the token at stream position ``pos``; the window holds up to
    ``ExtractConfig.ctx_before`` tokens before it and ``ctx_after`` after it, clipped at the edges of
    its sequence (a window never spans two sequences).
    """

    pos: int
    center: int
    tokens: list[int]
    acts: list[float]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.acts) or not 0 <= self.center < len(self.tokens):
            raise BrowserDataError(
                f"context at {self.pos}: {len(self.tokens)} tokens, {len(self.acts)} acts, center {self.center}"
            )

    @property
    def act(self) -> float:
        """The unit's activation on the example's own token."""
        return self.acts[self.center]

    def to_json(self) -> dict[str, Any]:
        return {"pos": self.pos, "center": self.center, "tokens": self.tokens, "acts": self.acts}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Context":
        return cls(
            pos=int(d["pos"]),
            center=int(d["center"]),
            tokens=[int(t) for t in d["tokens"]],
            acts=[float(a) for a in d["acts"]],
        )


@dataclass
class QuantileGroup:
    """Examples drawn at random from one quantile interval of a unit's active activations.

    Sorting the unit's ``n_active`` activations ascending, the interval holds ranks
    ``floor(q_lo * n_active)`` to ``floor(q_hi * n_active) - 1``: ``n`` tokens with activations from
    ``act_lo`` to ``act_hi``. ``examples`` (at most ``ExtractConfig.n_per_quantile``, drawn without
    replacement, deterministic given the seed) are sorted by activation, largest first.
    """

    q_lo: float
    q_hi: float
    act_lo: float
    act_hi: float
    n: int
    examples: list[Context]

    def to_json(self) -> dict[str, Any]:
        return {
            "q_lo": self.q_lo,
            "q_hi": self.q_hi,
            "act_lo": self.act_lo,
            "act_hi": self.act_hi,
            "n": self.n,
            "examples": [e.to_json() for e in self.examples],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "QuantileGroup":
        return cls(
            q_lo=float(d["q_lo"]),
            q_hi=float(d["q_hi"]),
            act_lo=float(d["act_lo"]),
            act_hi=float(d["act_hi"]),
            n=int(d["n"]),
            examples=[Context.from_json(e) for e in d["examples"]],
        )


@dataclass
class Alignment:
    """Unit ``index`` of family ``family`` matches the record's unit with ``score`` under ``measure``
    (e.g. ``"decoder cosine"``, ``"activation correlation"``); higher is a better match."""

    family: str
    index: int
    score: float
    measure: str

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "index": self.index, "score": self.score, "measure": self.measure}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Alignment":
        return cls(family=str(d["family"]), index=int(d["index"]), score=float(d["score"]), measure=str(d["measure"]))


@dataclass
class Direction:
    """One weight direction of a decomposition's unit in one matrix: its ``side="read"`` direction v
    (the input it responds to) or ``"write"`` direction u (the output it writes), unit vectors of
    the top singular pair σ u vᵀ of its weight there.

    ``top_dims``: (dimension, entry) for the entries of largest magnitude, largest first;
    ``dims_family``: the family whose unit i is dimension i (e.g. ``"neurons"``), or None.
    ``tokens_pos``/``tokens_neg``: (token, projection) for the tokens of largest / most negative
    projection on the embedding (read side: ``W_E v``) or unembedding (write side: ``W_U u``), where
    the matrix reads / writes the residual stream; ``token_space`` says which (``"embedding"``,
    ``"unembedding"``), empty when there are none.
    """

    matrix: str
    side: str
    sigma: float
    top_dims: list[tuple[int, float]]
    dims_family: str | None = None
    tokens_pos: list[tuple[int, float]] | None = None
    tokens_neg: list[tuple[int, float]] | None = None
    token_space: str = ""

    def __post_init__(self) -> None:
        if self.side not in ("read", "write"):
            raise BrowserDataError(f"direction of {self.matrix}: side must be 'read' or 'write', got {self.side!r}")

    def to_json(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "side": self.side, "sigma": self.sigma, "top_dims": [list(p) for p in self.top_dims],
                "dims_family": self.dims_family, "token_space": self.token_space,
                "tokens_pos": None if self.tokens_pos is None else [list(p) for p in self.tokens_pos],
                "tokens_neg": None if self.tokens_neg is None else [list(p) for p in self.tokens_neg]}  # fmt: skip

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Direction":
        return cls(matrix=str(d["matrix"]), side=str(d["side"]), sigma=float(d["sigma"]), top_dims=_pairs(d["top_dims"]),
                   dims_family=None if d.get("dims_family") is None else str(d["dims_family"]),
                   tokens_pos=None if d.get("tokens_pos") is None else _pairs(d["tokens_pos"]),
                   tokens_neg=None if d.get("tokens_neg") is None else _pairs(d["tokens_neg"]),
                   token_space=str(d.get("token_space", "")))  # fmt: skip


@dataclass
class UnitRecord:
    """Everything the browser shows about one unit.

    Activation statistics are over the positions where the unit is *active* (activation above its
    family's threshold). ``None`` marks a statistic that does not exist (a dead unit has no proxy
    scores and no histogram; a family without logit effects has no logit fields).

    - ``density``: active positions / all positions. ``n_active``: their count.
    - ``max_act``, ``mean_act``: largest and mean activation over active positions (0 when dead).
    - ``top_token_frac``: of the unit's top ``ExtractConfig.n_proxy`` activating positions, the
      fraction whose current token is their most common current token (1 = always the same token).
    - ``top_bigram_frac``: the same for the bigram (previous token, current token); a position that
      starts its sequence has previous token "beginning of sequence". Never above ``top_token_frac``.
    - ``token_entropy``: entropy in bits of the current token over all active positions (0 = fires on
      one token only; at most log2 of the vocabulary size).
    - ``top_tokens``: (token, fraction of active positions) for the current tokens the unit is
      active on most often, most frequent first.
    - ``act_hist``: histogram of the activations at active positions.
    - ``top_contexts``: the top ``ExtractConfig.n_top`` activating positions (active ones only),
      largest first, each with its window.
    - ``quantile_groups``: examples from quantile intervals of the active activations.
    - ``logits_pos``/``logits_neg``: (token, effect) for the largest / most negative direct logit
      effects (``FamilyActs.logit_effects``), in that order; ``logit_hist``: histogram over all tokens.
    - ``aligned``: best-matching units of other families (or of the same family), best first.
    - ``directions``: a decomposition's unit's read and write directions per matrix (:class:`Direction`).
    """

    family: str
    index: int
    density: float
    n_active: int
    max_act: float
    mean_act: float
    top_token_frac: float | None
    top_bigram_frac: float | None
    token_entropy: float | None
    top_tokens: list[tuple[int, float]]
    act_hist: Histogram | None
    top_contexts: list[Context]
    quantile_groups: list[QuantileGroup]
    logits_pos: list[tuple[int, float]] | None = None
    logits_neg: list[tuple[int, float]] | None = None
    logit_hist: Histogram | None = None
    aligned: list[Alignment] = field(default_factory=list)
    directions: list[Direction] = field(default_factory=list)

    @property
    def key(self) -> str:
        """``"<family>_<index>"``: the unit's page name."""
        return f"{self.family}_{self.index}"

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "index": self.index,
            "density": self.density,
            "n_active": self.n_active,
            "max_act": self.max_act,
            "mean_act": self.mean_act,
            "top_token_frac": self.top_token_frac,
            "top_bigram_frac": self.top_bigram_frac,
            "token_entropy": self.token_entropy,
            "top_tokens": [list(p) for p in self.top_tokens],
            "act_hist": None if self.act_hist is None else self.act_hist.to_json(),
            "top_contexts": [c.to_json() for c in self.top_contexts],
            "quantile_groups": [g.to_json() for g in self.quantile_groups],
            "logits_pos": None if self.logits_pos is None else [list(p) for p in self.logits_pos],
            "logits_neg": None if self.logits_neg is None else [list(p) for p in self.logits_neg],
            "logit_hist": None if self.logit_hist is None else self.logit_hist.to_json(),
            "aligned": [a.to_json() for a in self.aligned],
            "directions": [x.to_json() for x in self.directions],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "UnitRecord":
        def opt_float(x: Any) -> float | None:
            return None if x is None else float(x)

        return cls(
            family=str(d["family"]),
            index=int(d["index"]),
            density=float(d["density"]),
            n_active=int(d["n_active"]),
            max_act=float(d["max_act"]),
            mean_act=float(d["mean_act"]),
            top_token_frac=opt_float(d["top_token_frac"]),
            top_bigram_frac=opt_float(d["top_bigram_frac"]),
            token_entropy=opt_float(d["token_entropy"]),
            top_tokens=_pairs(d["top_tokens"]),
            act_hist=None if d["act_hist"] is None else Histogram.from_json(d["act_hist"]),
            top_contexts=[Context.from_json(c) for c in d["top_contexts"]],
            quantile_groups=[QuantileGroup.from_json(g) for g in d["quantile_groups"]],
            logits_pos=None if d.get("logits_pos") is None else _pairs(d["logits_pos"]),
            logits_neg=None if d.get("logits_neg") is None else _pairs(d["logits_neg"]),
            logit_hist=None if d.get("logit_hist") is None else Histogram.from_json(d["logit_hist"]),
            aligned=[Alignment.from_json(a) for a in d.get("aligned", [])],
            directions=[Direction.from_json(x) for x in d.get("directions", [])],
        )


@dataclass
class UnitFamily:
    """A family of units: ``units[i]`` is unit ``i``.

    ``kind`` says what a unit is, for display (``"SAE feature"``, ``"component"``, ``"neuron"``);
    ``act_label`` what its activation is (``"latent activation"``, ``"causal importance"``, ...);
    ``threshold``: a unit is active where its activation is above it.
    """

    name: str
    kind: str
    units: list[UnitRecord]
    description: str = ""
    act_label: str = "activation"
    threshold: float = 0.0

    def __post_init__(self) -> None:
        check_family_name(self.name)
        for i, unit in enumerate(self.units):
            if unit.index != i or unit.family != self.name:
                raise BrowserDataError(f"family {self.name!r}: unit {i} is recorded as {unit.family!r}/{unit.index}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "act_label": self.act_label,
            "threshold": self.threshold,
            "units": [u.to_json() for u in self.units],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "UnitFamily":
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            description=str(d.get("description", "")),
            act_label=str(d.get("act_label", "activation")),
            threshold=float(d.get("threshold", 0.0)),
            units=[UnitRecord.from_json(u) for u in d["units"]],
        )


@dataclass
class PromptActs:
    """Every unit active on one prompt, for the prompt view (computed by the caller, who has the model).

    ``tokens`` are the prompt's token ids (``text`` is shown as the title; the page shows the tokens).
    ``active[family][t]`` lists ``(unit, activation)`` for the units of ``family`` active at prompt
    position ``t`` (activation above the family's threshold), largest activation first; its length is
    ``len(tokens)``. Build one from dense activations with :meth:`from_dense`.
    """

    text: str
    tokens: list[int]
    active: dict[str, list[list[tuple[int, float]]]]

    def __post_init__(self) -> None:
        for family, per_pos in self.active.items():
            if len(per_pos) != len(self.tokens):
                raise BrowserDataError(
                    f"prompt {self.text[:30]!r}: family {family!r} has {len(per_pos)} positions"
                    f" for {len(self.tokens)} tokens"
                )

    @classmethod
    def from_dense(
        cls,
        text: str,
        tokens: Sequence[int] | Tensor,
        acts: Mapping[str, Float[Tensor, "T U"]],
        thresholds: Mapping[str, float] | float = 0.0,
        max_per_token: int = 64,
    ) -> "PromptActs":
        """From each family's activations ``[T, U]`` on the prompt: keep, per position, the (at most
        ``max_per_token``) units above the family's threshold, largest first, rounded to 4 digits."""
        tokens = [int(t) for t in (tokens.tolist() if isinstance(tokens, Tensor) else tokens)]
        active: dict[str, list[list[tuple[int, float]]]] = {}
        for family, a in acts.items():
            a = a.detach().float().cpu()
            if a.ndim != 2 or a.shape[0] != len(tokens):
                raise BrowserDataError(
                    f"prompt acts of {family!r} have shape {tuple(a.shape)}, need [{len(tokens)}, U]"
                )
            threshold = thresholds if isinstance(thresholds, (int, float)) else thresholds.get(family, 0.0)
            k = min(max_per_token, a.shape[1])
            values, units = torch.topk(a, k, dim=1)
            per_pos = []
            for vs, us in zip(values.tolist(), units.tolist()):
                per_pos.append([(u, round_sig(v)) for v, u in zip(vs, us) if v > threshold])
            active[family] = per_pos
        return cls(text=text, tokens=tokens, active=active)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "active": {f: [[list(p) for p in pos] for pos in per_pos] for f, per_pos in self.active.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PromptActs":
        return cls(
            text=str(d["text"]),
            tokens=[int(t) for t in d["tokens"]],
            active={str(f): [_pairs(pos) for pos in per_pos] for f, per_pos in d["active"].items()},
        )


@dataclass
class BrowserData:
    """All the browser shows: families of units over one token stream, and prompts.

    ``vocab[i]`` is token ``i``'s text (shown with newlines and tabs as ↵ and ⇥); ``n_tokens``
    positions of ``seq_len`` tokens each were read; ``settings`` records the extraction settings
    (``ExtractConfig`` as a dict) and ``meta`` free-form JSON about the run, shown on the index
    (e.g. ``{"run": "...", "model": "...", "text": "held-out split"}``).
    """

    title: str
    vocab: list[str]
    n_tokens: int
    seq_len: int
    families: list[UnitFamily]
    prompts: list[PromptActs] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [f.name for f in self.families]
        if len(set(names)) != len(names):
            raise BrowserDataError(f"duplicate family names in {names}")
        for prompt in self.prompts:
            self.check_prompt(prompt)

    def family(self, name: str) -> UnitFamily:
        """The family called ``name``."""
        for fam in self.families:
            if fam.name == name:
                return fam
        raise BrowserDataError(f"no family {name!r}; have {[f.name for f in self.families]}")

    def check_prompt(self, prompt: PromptActs) -> None:
        """Raise :class:`BrowserDataError` if ``prompt`` names an unknown family, unit or token."""
        for t in prompt.tokens:
            if not 0 <= t < len(self.vocab):
                raise BrowserDataError(
                    f"prompt {prompt.text[:30]!r}: token id {t} outside the vocabulary of {len(self.vocab)}"
                )
        for name, per_pos in prompt.active.items():
            n_units = len(self.family(name).units)
            for pos in per_pos:
                for unit, _ in pos:
                    if not 0 <= unit < n_units:
                        raise BrowserDataError(f"prompt {prompt.text[:30]!r}: {name} unit {unit} of {n_units}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "title": self.title,
            "vocab": self.vocab,
            "n_tokens": self.n_tokens,
            "seq_len": self.seq_len,
            "settings": self.settings,
            "meta": self.meta,
            "families": [f.to_json() for f in self.families],
            "prompts": [p.to_json() for p in self.prompts],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "BrowserData":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BrowserDataError(f"browser data has format_version {version!r}; this code reads {FORMAT_VERSION}")
        return cls(
            title=str(d["title"]),
            vocab=[str(v) for v in d["vocab"]],
            n_tokens=int(d["n_tokens"]),
            seq_len=int(d["seq_len"]),
            families=[UnitFamily.from_json(f) for f in d["families"]],
            prompts=[PromptActs.from_json(p) for p in d.get("prompts", [])],
            settings=dict(d.get("settings", {})),
            meta=dict(d.get("meta", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write the data file (gzip-compressed when ``path`` ends in ``.gz``); returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        if path.suffix == ".gz":
            with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as fh:  # 2-3x faster than 9, 3% larger
                fh.write(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BrowserData":
        """Read a data file written by :meth:`save`; :class:`BrowserDataError` if missing or corrupt."""
        path = Path(path)
        if not path.is_file():
            raise BrowserDataError(f"{path} not found")
        try:
            if path.suffix == ".gz":
                with gzip.open(path, "rt", encoding="utf-8") as fh:
                    raw = json.load(fh)
            else:
                raw = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_json(raw)
        except BrowserDataError as e:
            raise BrowserDataError(f"{path}: {e}") from e
        except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise BrowserDataError(f"{path} is not a valid browser data file: {e!r}") from e
