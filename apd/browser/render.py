"""Render :class:`~apd.browser.data.BrowserData` as a static site: plain HTML files with inline CSS,
JS and SVG, no external references, opened straight from the file system.

``build_site(data, out_dir)`` writes::

    out_dir/index.html               every unit of every family in one table (sortable by any
                                     column, filtered by family and text), per-family density
                                     histograms, links to the prompt pages
    out_dir/units/<family>_<i>.html  one page per unit: statistics, activation histogram, top
                                     tokens, logit effects, aligned units, top contexts, examples
                                     from activation quantile intervals
    out_dir/prompts/prompt_<j>.html  one page per prompt: the text (hover or click a token for the
                                     units active on it), per family the units active on the prompt

The index's state lives in its URL fragment: ``index.html#sort=density&dir=desc&fam=sae&q=e``
opens sorted and filtered (clicking a column header sorts and updates it). A prompt page reads
``#fam=F&unit=U&tok=T`` (colour the text by unit U of family F, pin token T).
"""

import functools
import html
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from apd.browser.data import (
    BrowserData,
    BrowserDataError,
    Context,
    Direction,
    Histogram,
    PromptActs,
    UnitFamily,
    UnitRecord,
)

__all__ = ["build_site", "render_index", "render_unit", "render_prompt", "display_token", "fmt"]

_N_SUMMARY = 3  # top tokens shown per unit in tables


@functools.cache
def _asset(name: str) -> str:
    return resources.files("apd.browser").joinpath("assets", name).read_text(encoding="utf-8")


def fmt(x: float | None, digits: int = 3) -> str:
    """A number as the pages show it: ``%.{digits}g``; an en dash for a missing value."""
    return "\u2013" if x is None else f"{x:.{digits}g}"


def display_token(token: str, chip: bool = False) -> str:
    """A token's visible form: newline ↵, tab ⇥, carriage return ␍, other control characters as
    ``\\xNN``; with ``chip`` (a token shown alone) spaces as ␣ and the empty token as ∅."""
    out = []
    for ch in token:
        if ch == "\n":
            out.append("\u21b5")
        elif ch == "\t":
            out.append("\u21e5")
        elif ch == "\r":
            out.append("\u240d")
        elif ch == " " and chip:
            out.append("\u2423")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    text = "".join(out)
    return "\u2205" if chip and not text else text


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _json_script(element_id: str, obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _page(title: str, crumbs: str, body: str, script: str = "") -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_asset('style.css')}</style></head>\n"
        f'<body><header class="top">{crumbs}</header>\n<main>{body}</main>\n{script}</body></html>\n'
    )


def _chip(vocab: Sequence[str], token: int) -> str:
    return f'<span class="tok">{_e(display_token(vocab[token], chip=True))}</span>'


def _chips(vocab: Sequence[str], top_tokens: Sequence[tuple[int, float]], n: int = _N_SUMMARY) -> str:
    return "".join(f'{_chip(vocab, t)}<span class="pct">{round(share * 100)}%</span>' for t, share in top_tokens[:n])


def _svg_hist(h: Histogram, label: str, signed: bool = False, width: int = 360, height: int = 130) -> str:
    """Bars of ``h`` as inline SVG, with the count scale and the first, middle and last edges."""
    left, right, top, bottom = 36, 8, 8, 30
    pw, ph = width - left - right, height - top - bottom
    n = len(h.counts)
    peak = max(h.counts) if h.counts else 0
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">'
    ]
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#8c959f"/>')
    bw = pw / max(n, 1)
    for i, c in enumerate(h.counts):
        if c == 0:
            continue
        bh = max(1.0, ph * c / peak)
        mid = (h.edges[i] + h.edges[i + 1]) / 2
        colour = ("#cf222e" if mid < 0 else "#0969da") if signed else "#e8590c"
        parts.append(
            f'<rect x="{left + i * bw + 0.5:.1f}" y="{top + ph - bh:.1f}"'
            f' width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}"'
            f' fill="{colour}"><title>{_e(fmt(h.edges[i]))} to {_e(fmt(h.edges[i + 1]))}: {c}</title></rect>'
        )
    parts.append(f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">0</text>')
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        i = round(frac * n)
        parts.append(
            f'<text x="{left + frac * pw:.1f}" y="{top + ph + 12}" text-anchor="{anchor}">{_e(fmt(h.edges[i]))}</text>'
        )
    axis = f"{label} (log scale)" if h.log else label
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 3}" text-anchor="middle">{_e(axis)}</text></svg>')
    return "".join(parts)


def _is_break(token: str) -> bool:
    """A token made of line breaks and tabs only (shown as muted glyphs, ↵ and ⇥)."""
    return token.strip() == "" and token.strip(" ") != ""


@functools.lru_cache(maxsize=1 << 16)
def _token_html(token: str) -> tuple[str, bool]:
    """A token's escaped visible form in running text, and whether it is a line break or tab."""
    return _e(display_token(token)), _is_break(token)


def _context(vocab: Sequence[str], ctx: Context, max_act: float) -> str:
    """A window's tokens, each with a background of intensity act / max_act and its act as tooltip;
    line breaks and tabs (↵, ⇥) are muted so that they read as layout, not text."""
    spans = []
    for i, (t, a) in enumerate(zip(ctx.tokens, ctx.acts)):
        shown, is_break = _token_html(vocab[t])
        alpha = min(1.0, max(0.0, a / max_act)) if max_act > 0 else 0.0
        style = f' style="--a:{alpha:.2f}"' if alpha >= 0.005 else ""
        classes = "c ws" if i == ctx.center and is_break else "c" if i == ctx.center else "ws" if is_break else ""
        cls = f' class="{classes}"' if classes else ""
        title = f' title="{a:.3g}"' if a != 0 else ""  # fmt(a): a number needs no escaping
        spans.append(f"<b{cls}{style}{title}>{shown}</b>")
    return "".join(spans)


def _context_rows(vocab: Sequence[str], contexts: Sequence[Context], max_act: float) -> str:
    """One row per window; windows are indented (in characters of the monospace font) so that
    their centre tokens line up in one column when tokens are single characters."""
    widths = [len(display_token("".join(vocab[t] for t in c.tokens[: c.center]))) for c in contexts]
    widest = max(widths, default=0)
    rows = []
    for c, w in zip(contexts, widths):
        indent = f' style="padding-left:calc(8px + {widest - w}ch)"' if widest > w else ""
        rows.append(f'<tr><td class="num">{_e(fmt(c.act))}</td><td class="ctx"{indent}>{_context(vocab, c, max_act)}</td></tr>')
    return f'<table class="ctxs"><tbody>{"".join(rows)}</tbody></table>'


def _stat(value: str, name: str) -> str:
    return f'<div class="stat"><b>{_e(value)}</b><span>{_e(name)}</span></div>'


def _logit_table(vocab: Sequence[str], pairs: Sequence[tuple[int, float]], cls: str, title: str) -> str:
    rows = "".join(f'<tr><td>{_chip(vocab, t)}</td><td class="num {cls}">{_e(fmt(v))}</td></tr>' for t, v in pairs)
    return f"<div><h3>{_e(title)}</h3><table><tbody>{rows}</tbody></table></div>"


def _bar_rows(rows: Sequence[tuple[str, float]], scale: float, cls: str = "") -> str:
    """Table rows: a label, the value, and a bar of length |value| / scale."""
    out = []
    for label, v in rows:
        width = 0 if scale <= 0 else round(60 * abs(v) / scale)
        colour = "v-neg" if v < 0 else "v-pos"
        out.append(f'<tr><td>{label}</td><td class="num {cls or colour}">{_e(fmt(v))}</td>'
                   f'<td><span class="bar {colour}" style="width:{width}px"></span></td></tr>')  # fmt: skip
    return "".join(out)


def _direction(vocab: Sequence[str], d: Direction) -> str:
    """One read or write direction: its largest entries (linked to the unit it names, if any) and its
    tokens of largest and most negative projection."""
    what = "read direction v (input)" if d.side == "read" else "write direction u (output)"
    dims = []
    for i, v in d.top_dims:
        label = f'<a href="{_e(d.dims_family)}_{i}.html">{_e(d.dims_family)}/{i}</a>' if d.dims_family else f"dim {i}"
        dims.append((label, v))
    scale = max((abs(v) for _, v in d.top_dims), default=0.0)
    parts = [f'<div class="dir"><h3>{_e(what)}</h3><p class="small muted">largest |entries| of the unit vector'
             f'{" (dimensions are " + _e(d.dims_family) + ")" if d.dims_family else ""}</p>'
             f'<table class="bars"><tbody>{_bar_rows(dims, scale)}</tbody></table>']  # fmt: skip
    if d.tokens_pos is not None and d.tokens_neg is not None:
        how = "W_E v: each token's embedding read along v" if d.side == "read" else "W_U u: direct effect on each logit"
        tscale = max([abs(v) for _, v in d.tokens_pos + d.tokens_neg], default=0.0)
        pos = _bar_rows([(_chip(vocab, t), v) for t, v in d.tokens_pos], tscale)
        neg = _bar_rows([(_chip(vocab, t), v) for t, v in d.tokens_neg], tscale)
        parts.append(f'<p class="small muted">tokens through the {_e(d.token_space)} ({_e(how)})</p>'
                     f'<div class="pn"><div><h4>largest</h4><table class="bars"><tbody>{pos}</tbody></table></div>'
                     f'<div><h4>most negative</h4><table class="bars"><tbody>{neg}</tbody></table></div></div>')  # fmt: skip
    parts.append("</div>")
    return "".join(parts)


def _weights(vocab: Sequence[str], rec: UnitRecord) -> str:
    """The unit's read and write directions, one row per matrix."""
    if not rec.directions:
        return ""
    by_matrix: dict[str, list[Direction]] = {}
    for d in rec.directions:
        by_matrix.setdefault(d.matrix, []).append(d)
    rows = []
    for matrix, dirs in by_matrix.items():
        sigma = dirs[0].sigma
        cells = "".join(_direction(vocab, d) for d in sorted(dirs, key=lambda d: d.side))
        rows.append(f'<div class="weights-row"><h3 class="matrix">{_e(matrix)} '
                    f'<span class="muted small">weight ≈ σ u vᵀ, σ = {_e(fmt(sigma))}</span></h3>'
                    f'<div class="dirs">{cells}</div></div>')  # fmt: skip
    return (
        '<h2 id="weights">Weights: read and write directions</h2><p class="small muted">The top singular pair of the '
        "unit's weight in each matrix it has a part in (exact for a rank-one subcomponent U Vᵀ: u = U/‖U‖, "
        "v = V/‖V‖). Token lists: the direct path through the embedding or unembedding, LayerNorms ignored.</p>"
        + "".join(rows)
    )


def render_unit(data: BrowserData, family: UnitFamily, rec: UnitRecord) -> str:
    """The HTML page of one unit (it lives in ``units/``; links are relative to that folder)."""
    vocab = data.vocab
    n = len(family.units)
    nav = ['<a href="../index.html">index</a>', f'<span class="crumb">{_e(family.name)} / {rec.index}</span>']
    if rec.index > 0:
        nav.append(f'<a href="{_e(family.name)}_{rec.index - 1}.html">&larr; {rec.index - 1}</a>')
    if rec.index < n - 1:
        nav.append(f'<a href="{_e(family.name)}_{rec.index + 1}.html">{rec.index + 1} &rarr;</a>')
    log_density = f"{math.log10(rec.density):.2f}" if rec.density > 0 else "\u2013"
    stats = "".join(
        [
            _stat(fmt(rec.density), "density"),
            _stat(log_density, "log\u2081\u2080 density"),
            _stat(f"{rec.n_active:,}", f"active of {data.n_tokens:,} tokens"),
            _stat(fmt(rec.max_act), f"max {family.act_label}"),
            _stat(fmt(rec.mean_act), "mean when active"),
            _stat(fmt(rec.top_token_frac, 2), "top-token share"),
            _stat(fmt(rec.top_bigram_frac, 2), "top-bigram share"),
            _stat(fmt(rec.token_entropy), "token entropy (bits)"),
        ]
    )
    side = []
    if rec.act_hist is not None:
        side.append(f"<h2>Activation histogram</h2>{_svg_hist(rec.act_hist, family.act_label + ' when active')}")
    if rec.top_tokens:
        rows = "".join(
            f'<tr><td>{_chip(vocab, t)}</td><td class="num">{share * 100:.1f}%</td></tr>' for t, share in rec.top_tokens
        )
        side.append(
            f'<h2>Fires on</h2><p class="small muted">current token, share of active positions</p>'
            f"<table><tbody>{rows}</tbody></table>"
        )
    if rec.logits_pos is not None and rec.logits_neg is not None:
        side.append(
            "<h2>Logit effects</h2>"
            f'<div class="pn">{_logit_table(vocab, rec.logits_pos, "v-pos", "positive")}'
            f"{_logit_table(vocab, rec.logits_neg, 'v-neg', 'negative')}</div>"
        )
        if rec.logit_hist is not None:
            side.append(_svg_hist(rec.logit_hist, "direct logit effect, all tokens", signed=True))
    if rec.aligned:
        groups: dict[tuple[str, str], list[str]] = {}  # (family, measure) -> rows, best first
        for a in rec.aligned:
            other = data.family(a.family).units[a.index]
            groups.setdefault((a.family, a.measure), []).append(
                f'<tr><td><a href="{_e(a.family)}_{a.index}.html">{_e(a.family)}/{a.index}</a></td>'
                f'<td class="num">{_e(fmt(a.score))}</td><td class="chips">{_chips(vocab, other.top_tokens)}</td></tr>'
            )
        side.append("<h2>Aligned units</h2>")
        for (fam_name, measure), rows in groups.items():
            side.append(
                f'<h3>{_e(fam_name)} <span class="muted small">by {_e(measure)}</span></h3>'
                f"<table><tbody>{''.join(rows)}</tbody></table>"
            )
    main = []
    before, after = data.settings.get("ctx_before"), data.settings.get("ctx_after")
    window = (
        f"window {_e(before)} tokens before, {_e(after)} after; " if before is not None and after is not None else ""
    )
    if rec.top_contexts:
        main.append(
            f'<h2>Top activations</h2><p class="small muted">{len(rec.top_contexts)} largest; {window}'
            f"background = {_e(family.act_label)} / max</p>"
            f"{_context_rows(vocab, rec.top_contexts, rec.max_act)}"
        )
    else:
        main.append(f"<h2>Top activations</h2><p>Never active on the {data.n_tokens:,} tokens read.</p>")
    if rec.quantile_groups:
        main.append("<h2>Examples across activation quantiles</h2>")
        for g in reversed(rec.quantile_groups):
            main.append(
                f'<div class="group-head"><b>quantiles {g.q_lo:g}\u2013{g.q_hi:g}</b> '
                f'<span class="muted">{_e(family.act_label)} {_e(fmt(g.act_lo))} to {_e(fmt(g.act_hi))}; '
                f"{g.n:,} tokens, {len(g.examples)} shown</span></div>"
                f"{_context_rows(vocab, g.examples, rec.max_act)}"
            )
    desc = f'<p class="muted">{_e(family.description)}</p>' if family.description else ""
    body = (
        f"<h1>{_e(family.kind)} {_e(family.name)}/{rec.index}</h1>{desc}"
        f'<div class="stats" id="stats">{stats}</div>{_weights(vocab, rec)}'
        f'<div class="grid"><section>{"".join(side)}</section><section>{"".join(main)}</section></div>'
    )
    return _page(f"{family.name}/{rec.index} \u2013 {data.title}", " ".join(nav), body)


def _density_hist(fam: UnitFamily, n_tokens: int) -> str:
    live = [u.density for u in fam.units if u.density > 0]
    if not live:
        return '<p class="small muted">no live units</p>'
    lo = min(-1, math.floor(math.log10(1 / max(n_tokens, 1))))  # log10 of the smallest possible density
    n_bins = 2 * -lo
    counts = [0] * n_bins
    for d in live:
        counts[min(n_bins - 1, int((math.log10(d) - lo) / -lo * n_bins))] += 1
    edges = [lo + (-lo) * i / n_bins for i in range(n_bins + 1)]
    return _svg_hist(
        Histogram(edges=edges, counts=counts), "log\u2081\u2080 density of live units", width=300, height=110
    )


def _r3(x: float | None) -> float | None:
    """3 significant digits, as shown (keeps the index small)."""
    return None if x is None else float(fmt(x))


def render_index(data: BrowserData, prompt_titles: Sequence[str] = ()) -> str:
    """The index page: run information, per-family cards, prompt links and the table of all units."""
    meta_rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
        for k, v in data.meta.items()
    )
    meta_rows += f"<tr><th>tokens read</th><td>{data.n_tokens:,} ({data.seq_len} per sequence)</td></tr>"
    cards = []
    for fam in data.families:
        dead = sum(1 for u in fam.units if u.n_active == 0)
        live = sorted(u.density for u in fam.units if u.n_active > 0)
        median = fmt(live[len(live) // 2]) if live else "\u2013"
        desc = f'<div class="small muted">{_e(fam.description)}</div>' if fam.description else ""
        cards.append(
            f'<div class="card"><h3>{_e(fam.name)} <span class="muted small">{_e(fam.kind)}</span></h3>{desc}'
            f'<div class="small">{len(fam.units):,} units, {dead:,} never active, median density {median}</div>'
            f"{_density_hist(fam, data.n_tokens)}</div>"
        )
    prompts = ""
    if prompt_titles:
        items = "".join(
            f'<li><a href="prompts/prompt_{j}.html">{_e(display_token(t[:80]))}</a></li>'
            for j, t in enumerate(prompt_titles)
        )
        prompts = f"<h2>Prompts</h2><ul>{items}</ul>"
    fam_options = "".join(
        f'<option value="{_e(f.name)}">{_e(f.name)} ({len(f.units):,})</option>' for f in data.families
    )
    rows = []
    for fi, fam in enumerate(data.families):
        for u in fam.units:
            summary = [
                [display_token(data.vocab[t], chip=True), round(share, 2)] for t, share in u.top_tokens[:_N_SUMMARY]
            ]
            rows.append([fi, u.index, u.density, u.n_active, _r3(u.max_act), _r3(u.top_token_frac),
                         _r3(u.top_bigram_frac), _r3(u.token_entropy), summary])  # fmt: skip
    payload = {"fams": [{"name": f.name, "kind": f.kind} for f in data.families], "rows": rows}
    heads = [("family", "family"), ("unit", "unit"), ("density", "density"), ("active", "active tokens"),
             ("max", "max act"), ("token", "top-token share"), ("bigram", "top-bigram share"),
             ("entropy", "token entropy")]  # fmt: skip
    thead = "".join(f'<th data-key="{k}" aria-sort="none">{_e(label)}</th>' for k, label in heads) + "<th>fires on</th>"
    body = (
        f'<h1>{_e(data.title)}</h1><table class="small"><tbody>{meta_rows}</tbody></table>'
        f'<h2>Families</h2><div class="cards">{"".join(cards)}</div>{prompts}'
        "<h2>Units</h2>"
        '<p class="small muted">Click a column header to sort. Proxy scores (no LM judge): top-token share and '
        "top-bigram share = fraction of the unit's top activating positions whose current token (bigram) is the "
        "most common one there; token entropy = entropy in bits of the current token over all active positions.</p>"
        '<div class="controls"><label>family <select id="fam"><option value="">all</option>'
        f"{fam_options}</select></label>"
        '<input id="q" type="search" placeholder="filter: token or family/unit">'
        '<label>rows per page <select id="size"><option value="100">100</option><option value="200">200</option>'
        '<option value="1000">1000</option><option value="0">all</option></select></label>'
        '<button id="prev" type="button">&larr; prev</button><button id="next" type="button">next &rarr;</button>'
        '<span id="count" class="muted"></span></div>'
        f'<table id="units"><thead><tr>{thead}</tr></thead><tbody id="units-body"></tbody></table>'
        "<noscript><p>The unit table needs JavaScript.</p></noscript>"
    )
    script = _json_script("index-data", payload) + f"<script>{_asset('index.js')}</script>"
    return _page(data.title, f'<span class="crumb">{_e(data.title)}</span>', body, script)


def render_prompt(data: BrowserData, prompt: PromptActs) -> str:
    """The page of one prompt (it lives in ``prompts/``)."""
    vocab = data.vocab
    spans = []
    for i, t in enumerate(prompt.tokens):
        ws = ' class="ws"' if _is_break(vocab[t]) else ""
        spans.append(f'<b data-i="{i}"{ws}>{_e(display_token(vocab[t]))}</b>')
        if vocab[t].endswith("\n"):
            spans.append("<br>")
    sections = []
    units_info: dict[str, dict[str, Any]] = {}
    first = None
    for fam in data.families:
        per_pos = prompt.active.get(fam.name)
        if per_pos is None:
            continue
        best: dict[int, tuple[float, int, int]] = {}  # unit -> (max act, at position, positions active)
        for pos, here in enumerate(per_pos):
            for u, a in here:
                m, at, k = best.get(u, (-math.inf, -1, 0))
                best[u] = (a, pos, k + 1) if a > m else (m, at, k + 1)
        order = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
        if first is None and order:
            first = [fam.name, order[0][0], order[0][1][1]]
        info = units_info.setdefault(fam.name, {})
        rows = []
        for u, (m, at, k) in order:
            rec = fam.units[u]
            info[str(u)] = [
                rec.max_act,
                [[display_token(vocab[t], chip=True), s] for t, s in rec.top_tokens[:_N_SUMMARY]],
            ]
            rows.append(
                f'<tr class="pick" data-fam="{_e(fam.name)}" data-unit="{u}">'
                f'<td><a href="../units/{_e(fam.name)}_{u}.html">{_e(fam.name)}/{u}</a></td>'
                f'<td class="num">{_e(fmt(m))}</td>'
                f'<td>{_chip(vocab, prompt.tokens[at])} <span class="small muted">@{at}</span></td>'
                f'<td class="num">{k}</td><td class="num">{_e(fmt(rec.max_act))}</td>'
                f'<td class="chips">{_chips(vocab, rec.top_tokens)}</td></tr>'
            )
        table = (
            '<div class="scroll"><table><thead><tr><th>unit</th><th>max here</th><th>at</th><th>tokens</th>'
            f"<th>max overall</th><th>fires on</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            if rows
            else '<p class="small muted">no unit active</p>'
        )
        sections.append(
            f'<h2>{_e(fam.name)} <span class="muted small">{_e(fam.kind)}: {len(order):,} of {len(fam.units):,} '
            f"active on this prompt (click a row to colour the text by it)</span></h2>{table}"
        )
    payload = {
        "fams": [f.name for f in data.families if f.name in prompt.active],
        "tokens": [display_token(vocab[t], chip=True) for t in prompt.tokens],
        "active": prompt.to_json()["active"],
        "units": units_info,
        "first": first,
    }
    title = prompt.text if len(prompt.text) <= 80 else prompt.text[:79] + "\u2026"
    body = (
        f"<h1>Prompt: {_e(display_token(title))}</h1>"
        f'<p class="small muted">{len(prompt.tokens)} tokens. Hover a token to list the units active on it; click to '
        'pin it. <span id="colour-label"></span></p>'
        f'<div id="text" class="ctx prompt">{"".join(spans)}</div>'
        '<div class="grid wide"><section><div id="tokpanel" class="panel">'
        '<p class="small muted">Hover or click a token.</p></div></section>'
        f"<section>{''.join(sections)}</section></div>"
    )
    script = _json_script("prompt-data", payload) + f"<script>{_asset('prompt.js')}</script>"
    crumbs = '<a href="../index.html">index</a> <span class="crumb">prompt</span>'
    return _page(f"Prompt \u2013 {data.title}", crumbs, body, script)


def build_site(data: BrowserData, out_dir: str | Path, prompts: Sequence[PromptActs] = ()) -> Path:
    """Write the site for ``data`` (and its prompts, then ``prompts``) into ``out_dir``; returns the
    index path. HTML pages left in ``units/`` and ``prompts/`` by an earlier build are removed."""
    out_dir = Path(out_dir)
    all_prompts = [*data.prompts, *prompts]
    for prompt in prompts:
        data.check_prompt(prompt)
    for fam in data.families:
        for u in fam.units:
            for a in u.aligned:
                if not 0 <= a.index < len(data.family(a.family).units):
                    raise BrowserDataError(f"{u.key} is aligned with {a.family}/{a.index}, which does not exist")
    units_dir, prompts_dir = out_dir / "units", out_dir / "prompts"
    for folder in (units_dir, prompts_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.html"):
            stale.unlink()
    for fam in data.families:
        for rec in fam.units:
            (units_dir / f"{rec.key}.html").write_text(render_unit(data, fam, rec), encoding="utf-8")
    for j, prompt in enumerate(all_prompts):
        (prompts_dir / f"prompt_{j}.html").write_text(render_prompt(data, prompt), encoding="utf-8")
    index = out_dir / "index.html"
    index.write_text(render_index(data, [p.text for p in all_prompts]), encoding="utf-8")
    return index
