"""The static site (apd.browser.render), the entry point (experiments.browse), and the pages in a
real headless Chromium: no console errors, screenshots that are not blank, a unit page that shows
the run's numbers, and an index that sorts."""

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from apd.browser import (
    BrowserData,
    BrowserDataError,
    ExtractConfig,
    FamilyActs,
    PromptActs,
    build_site,
    correlation_alignment,
    cosine_alignment,
    extract_browser_data,
)
from apd.browser.render import display_token, fmt
from experiments import browse

TEXT = """The river was low that autumn, and the ferry ran only twice a day. Mara kept the ledger \
for the crossing: names, fares & the weight of every cart. "Three carts < four horses," she wrote \
one morning, because the scale had broken again and she had to guess.
Her brother Tomas said the river would rise by winter. He said it every year, and every year he \
was right, so nobody listened to him any more. He mended nets on the east bank and sold fish to \
the travellers who waited for the ferry. When the wind came from the north he closed his stall \
early & walked up the hill to the old mill, where the miller's widow made bread for the village.
In October a stranger arrived with a box of books. He wanted to cross with the books but not with \
the box, which he said was worth more than the ferry itself. Mara weighed the books one by one. \
"Forty-two," she said, "and each one heavier than the last." The stranger laughed and paid double.
On the far bank the road climbed through orchards of apple and pear. Children sold the fallen \
fruit in baskets at the bend, two apples for a penny, three pears for two. The stranger bought a \
basket and ate as he walked, reading a book held open in his other hand, and he did not look up \
once until he reached the top of the hill.
The rains came in November. The river rose a hand's width a day, then a foot, then more. Tomas \
moved his nets to higher ground and said nothing, which everyone agreed was worse than if he had \
said "I told you so." The ferry stopped running when the water reached the third post of the pier.
For nine days the village was cut in two. People shouted news across the water: a birth on the \
east side, a wedding postponed on the west, the price of flour <higher> & the price of fish lower. \
Mara wrote it all in the ledger, because nobody had told her to stop, and because the pages were \
otherwise empty.
When the water fell the stranger came back down the hill. He carried no books now, only the empty \
box, and he asked Mara what he owed for the crossing. "Nothing," she said, "the box is lighter than \
you are." He gave her one book anyway. It was a book of maps, and on the first page someone had \
drawn the river, the ferry, the pier with its posts, and a small figure writing in a ledger.
That winter Tomas taught the children to mend nets, and the widow taught them to bake, and Mara \
taught them to read from the book of maps. By spring there were three new ferrymen and a second \
boat, and the ledger had a new column for the weather, headed in Mara's hand: "river, rising?"
"""
PROMPT = 'Mara wrote "rain & wind" < the ledger\nTomas said: low.'
N_UNITS = 50
SEQ_LEN = 64


def _vocab() -> list[str]:
    return sorted(set(TEXT + PROMPT))


def _unit_acts(ids: torch.Tensor, vocab: list[str]) -> dict[str, torch.Tensor]:
    """Synthetic activations of three families on ``ids`` ([S, T]): each ``[S*T, 50]``.

    sae unit u fires on character ``vocab[u % V]``, more strongly after a space; component u fires
    on one bigram; neuron u is a ReLU of a fixed random function of (previous, current) character.
    """
    v = len(vocab)
    cur = ids.reshape(-1)
    prev = torch.cat([torch.full((ids.shape[0], 1), -1), ids[:, :-1]], 1).reshape(-1)
    space = vocab.index(" ")
    sae = torch.zeros(cur.numel(), N_UNITS)
    for u in range(N_UNITS):
        on = cur == u % v
        sae[on, u] = 1.0 + 2.0 * (prev[on] == space).float() + 0.01 * (torch.arange(cur.numel())[on] % 7)
    g = torch.Generator().manual_seed(3)
    w_cur, w_prev = torch.randn(v, N_UNITS, generator=g), torch.randn(v + 1, N_UNITS, generator=g)
    neurons = torch.relu(w_cur[cur] + w_prev[prev + 1] - 0.5)
    # fmt: off
    pairs = ["th", "he", "e ", " t", "an", "nd", "er", "in", "re", "ed", "on", "s ", "d ", "at", "or", "o ", "to",
             "ar", "te", "es", "ou", "ng", "ve", "ha", "wa", "ri", "oo", "ll", "le", "ow", "wh", "st", "hi", "ro",
             "ee", "ai", "ga", "bo", "pe", "ap", "ch", "Ma", "To", '"T', ", ", ". ", "& ", "< ", "e\n", "ee"]
    # fmt: on
    bigrams = [(vocab.index(a), vocab.index(b)) for a, b in pairs]
    comps = torch.zeros(cur.numel(), N_UNITS)
    for u, (a, b) in enumerate(bigrams):
        on = (prev == a) & (cur == b)
        comps[on, u] = 0.5 + (torch.arange(cur.numel())[on] % 5).float() * 0.25
    comps[:, 49] = 0.0  # a dead component
    return {"sae": sae, "neurons": neurons, "components": comps}


def make_data() -> tuple[BrowserData, torch.Tensor, dict[str, torch.Tensor]]:
    """Synthetic browser data: 3 families x 50 units on TEXT, with alignments and one prompt."""
    vocab = _vocab()
    stoi = {c: i for i, c in enumerate(vocab)}
    n = len(TEXT) // SEQ_LEN * SEQ_LEN
    ids = torch.tensor([stoi[c] for c in TEXT[:n]]).reshape(-1, SEQ_LEN)
    acts = _unit_acts(ids, vocab)
    g = torch.Generator().manual_seed(4)
    kinds = {"sae": ("SAE feature", "latent activation"), "neurons": ("neuron", "ReLU output"),
             "components": ("component", "causal importance")}  # fmt: skip
    fams = [
        FamilyActs(
            name=name,
            acts=a,
            kind=kinds[name][0],
            act_label=kinds[name][1],
            description=f"synthetic {name}",
            logit_effects=torch.randn(N_UNITS, len(vocab), generator=g),
        )  # fmt: skip
        for name, a in acts.items()
    ]
    alignments = [
        cosine_alignment(
            "sae",
            "neurons",
            torch.randn(N_UNITS, 16, generator=g),
            torch.randn(N_UNITS, 16, generator=g),
            k=3,
            measure="decoder cosine",
        ),  # fmt: skip
        correlation_alignment("sae", "components", acts["sae"], acts["components"], k=3),
        correlation_alignment("components", "sae", acts["components"], acts["sae"], k=3),
        correlation_alignment("sae", "sae", acts["sae"], acts["sae"], k=3),
    ]
    p_ids = torch.tensor([[stoi[c] for c in PROMPT]])
    prompt = PromptActs.from_dense(PROMPT, p_ids[0], _unit_acts(p_ids, vocab))
    meta = {"run": "tests/browser", "text": "a short story"}
    data = extract_browser_data(ids, vocab, fams, alignments, ExtractConfig(), [prompt], "Synthetic browser", meta)
    return data, ids, acts


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The synthetic data saved in a run dir and built by the entry point."""
    run_dir = tmp_path_factory.mktemp("run")
    data, ids, acts = make_data()
    data.save(run_dir / "browser_data.json")
    index = browse.main([str(run_dir)])
    assert index == run_dir / "browser" / "index.html"
    return data, ids, acts, index.parent


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)


def _tags(page: str) -> list[str]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def test_site_files(site):
    data, _, _, out = site
    units = sorted(p.name for p in (out / "units").glob("*.html"))
    assert len(units) == 150 and "components_49.html" in units and "sae_0.html" in units
    assert [p.name for p in (out / "prompts").glob("*.html")] == ["prompt_0.html"]
    for page in [out / "index.html", *(out / "units").glob("*.html"), out / "prompts" / "prompt_0.html"]:
        assert page.stat().st_size < 300_000, page
    # a dead unit gets a page that says so
    assert "Never active" in (out / "units" / "components_49.html").read_text()


def test_no_network_references(site):
    out = site[3]
    pattern = re.compile(r"https?:|//cdn|<link|src\s*=\s*[\"']?(https?:)?//|@import|url\(|<iframe", re.IGNORECASE)
    for page in out.rglob("*.html"):
        found = pattern.search(page.read_text(encoding="utf-8"))
        assert found is None, f"{page}: {found.group(0)!r}"


def test_escaping_of_tokens():
    vocab = ["<script>alert(1)</script>", "&amp;", '"q"', "\n", "'", "a"]
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    acts = torch.zeros(8, 2)
    acts[[0, 2, 3], 0] = torch.tensor([1.0, 2.0, 3.0])
    fam = FamilyActs(name="f", acts=acts, logit_effects=torch.randn(2, 6))
    prompt = PromptActs.from_dense("<b>&", [0, 1, 3], {"f": torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.0]])})
    data = extract_browser_data(tokens, vocab, [fam], prompts=[prompt], title='<t> & "x"')
    from apd.browser.render import render_index, render_prompt, render_unit

    unit = render_unit(data, data.families[0], data.families[0].units[0])
    assert "script" not in _tags(unit)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in unit and "&amp;amp;" in unit and "&quot;q&quot;" in unit
    index = render_index(data, [prompt.text])
    assert _tags(index).count("script") == 2  # the JSON data and the code
    assert "&lt;t&gt; &amp; &quot;x&quot;" in index
    page = render_prompt(data, prompt)
    assert _tags(page).count("script") == 2 and "<script>alert" not in page
    assert display_token("a\nb\tc\x01") == "a\u21b5b\u21e5c\\x01" and display_token(" ", chip=True) == "\u2423"


def test_build_site_removes_stale_pages(tmp_path):
    data, _, _ = make_data()
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "old_3.html").write_text("stale")
    build_site(data, tmp_path)
    assert not (tmp_path / "units" / "old_3.html").exists()


def test_entry_point_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: run dir .* does not exist"):
        browse.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match=r"has no browser_data.json or browser_data.json.gz"):
        browse.main([str(tmp_path)])
    (tmp_path / "browser_data.json").write_text("[1, 2")
    with pytest.raises(SystemExit, match="is not a valid browser data file"):
        browse.main([str(tmp_path)])


def test_entry_point_prompts(tmp_path):
    data, _, _ = make_data()
    data.prompts.clear()
    data.save(tmp_path / "browser_data.json.gz")
    with pytest.raises(SystemExit, match="--prompt needs the model"):
        browse.main([str(tmp_path), "--prompt", "the river"])
    vocab = data.vocab

    def encoder(text: str) -> PromptActs:
        ids = torch.tensor([[vocab.index(c) for c in text]])
        return PromptActs.from_dense(text, ids[0], _unit_acts(ids, vocab))

    index = browse.build(tmp_path, ["the river", "low water"], encoder=encoder)
    assert sorted(p.name for p in (index.parent / "prompts").iterdir()) == ["prompt_0.html", "prompt_1.html"]
    assert "low water" in index.read_text()
    stored = tmp_path / "prompts.json"
    stored.write_text(json.dumps([encoder("ferry").to_json()]))
    index = browse.main([str(tmp_path), "--prompt-acts", str(stored), "--out", str(tmp_path / "site")])
    assert index == tmp_path / "site" / "index.html" and (tmp_path / "site" / "prompts" / "prompt_0.html").is_file()
    bad = PromptActs(text="x", tokens=[0], active={"sae": [[(99, 1.0)]]})
    with pytest.raises(BrowserDataError, match="sae unit 99 of 50"):
        build_site(data, tmp_path / "bad", [bad])


# --- headless Chromium --------------------------------------------------------------------------

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)"
)
SHOT_DIR = os.environ.get("APD_BROWSER_SCREENSHOTS")  # keep the screenshots there, e.g. for a CI artifact


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """Load a URL in headless Chromium: returns (DOM after the scripts ran, console log lines).

    Chromium, with ``--enable-logging=stderr --v=0``, logs every console message of the page,
    uncaught exceptions included (``"Uncaught TypeError: ..."``), as a ``INFO:CONSOLE(line)]`` line
    on stderr; our pages log nothing, so any such line is an error.
    """
    profile = tmp_path_factory.mktemp("chromium-profile")

    def load(url: str, screenshot: Path | None = None) -> tuple[str, list[str]]:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--window-size=1200,900", "--virtual-time-budget=3000", "--enable-logging=stderr", "--v=0",
               "--dump-dom"]  # fmt: skip
        if screenshot is not None:
            cmd.append(f"--screenshot={screenshot}")
        proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
        if screenshot is not None and SHOT_DIR:
            Path(SHOT_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copy(screenshot, Path(SHOT_DIR) / screenshot.name)
        return proc.stdout, console

    return load


def _assert_not_blank(png: Path) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    assert img.shape[:2] == (900, 1200)
    background = np.median(img.reshape(-1, 3), axis=0)
    differs = np.abs(img - background).max(-1) > 0.1
    assert img.std() > 0.03 and differs.mean() > 0.02, f"{png} looks blank"


@needs_chromium
def test_console_error_detection_works(chromium, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><p>x</p><script>document.body.append('ok'); undefinedFunction();</script>")
    dom, console = chromium(page.as_uri())
    assert "ok" in dom
    assert any("Uncaught ReferenceError: undefinedFunction is not defined" in line for line in console), console


def _rows(dom: str) -> list[str]:
    body = dom.split('id="units-body"', 1)[1].split("</tbody>", 1)[0]
    return re.findall(r'href="units/([A-Za-z0-9_.-]+)\.html"', body)


@needs_chromium
def test_index_page(site, chromium, tmp_path):
    data, _, _, out = site
    shot = tmp_path / "index.png"
    dom, console = chromium((out / "index.html").as_uri(), shot)
    assert console == []
    _assert_not_blank(shot)
    assert _rows(dom) == [u.key for f in data.families for u in f.units]  # all 150 units, in order
    assert "units 1\u2013150 of 150" in dom


@needs_chromium
def test_index_sorts_and_filters(site, chromium):
    data, _, _, out = site
    density = {u.key: u.density for f in data.families for u in f.units}
    dom, console = chromium((out / "index.html").as_uri() + "#sort=density&dir=desc")
    assert console == []
    rows = _rows(dom)
    assert len(rows) == 150 and [density[k] for k in rows] == sorted(density.values(), reverse=True)
    assert 'data-key="density" aria-sort="descending"' in dom
    # the index holds 3 significant digits of the proxy scores
    entropy = {u.key: float(fmt(u.token_entropy)) for u in data.family("neurons").units}
    dom, console = chromium((out / "index.html").as_uri() + "#sort=entropy&dir=asc&fam=neurons&size=20")
    rows = _rows(dom)
    assert console == [] and len(rows) == 20 and all(k.startswith("neurons_") for k in rows)
    assert [entropy[k] for k in rows] == sorted(entropy.values())[:20]
    assert "units 1\u201320 of 50 (150 in all)" in dom


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


@needs_chromium
def test_unit_page_shows_the_run_numbers(site, chromium, tmp_path):
    data, ids, acts, out = site
    u = int((acts["sae"] > 0).sum(0).argmax())  # the busiest SAE feature
    rec = data.family("sae").units[u]
    shot = tmp_path / "unit.png"
    dom, console = chromium((out / "units" / f"sae_{u}.html").as_uri(), shot)
    assert console == []
    _assert_not_blank(shot)
    # density and max from the raw activations, not from the record
    raw = acts["sae"][:, u]
    stats = _text(dom.split('id="stats"', 1)[1].split("</div></div>", 1)[0])
    assert f"{fmt(float((raw > 0).float().mean()))}density" in stats
    assert f"{fmt(float(raw.max()))}max latent activation" in stats
    assert f"{int((raw > 0).sum()):,}active of {ids.numel():,} tokens" in stats
    # the top context: its activation and the text window around the top position
    row = dom.split('<table class="ctxs"><tbody><tr>', 1)[1].split("</tr>", 1)[0]
    value, window = re.findall(r"<td[^>]*>(.*?)</td>", row)
    pos = int(raw.argmax())  # ties: the earliest position comes first, as in the page
    s0 = pos // SEQ_LEN * SEQ_LEN
    text = TEXT[max(s0, pos - 5) : min(s0 + SEQ_LEN, pos + 6)]
    assert _text(value) == fmt(float(raw.max()))
    assert _text(window) == display_token(text)
    assert rec.top_contexts[0].pos == pos


@needs_chromium
def test_prompt_page(site, chromium, tmp_path):
    data, _, _, out = site
    prompt = data.prompts[0]
    t = PROMPT.index("&")
    shot = tmp_path / "prompt.png"
    dom, console = chromium((out / "prompts" / "prompt_0.html").as_uri() + f"#fam=components&unit=46&tok={t}", shot)
    assert console == []
    _assert_not_blank(shot)
    panel = dom.split('id="tokpanel"', 1)[1].split("</section>", 1)[0]
    for fam, per_pos in prompt.active.items():
        here = per_pos[t]
        assert f"{fam}: {len(here)} active" in panel
        for unit, _ in here:
            assert f'href="../units/{fam}_{unit}.html"' in panel
    assert 'class="pin"' in dom and "coloured by" in dom and "components/46" in dom
