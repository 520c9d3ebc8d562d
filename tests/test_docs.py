"""The documentation: tutorials run as printed, the site (API reference included) builds offline and
strictly, every link and repo path in README.md and docs/ names a file the repo holds."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NO_RUN = "<!-- no-run -->"  # put on the line before a ```python block that is shown but not run
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", flags=re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The page's ```python blocks in order, leaving out those marked with NO_RUN on the line before."""
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if m.group(1) == "python" and before.strip() != NO_RUN:
            blocks.append(m.group(2))
    return blocks


def run_page(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run a page's python blocks in order in one namespace, in a fresh working directory."""
    blocks = python_blocks(path)
    assert blocks, f"{path} has no runnable python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{path.relative_to(ROOT)} block {i + 1}", "exec"), namespace)  # noqa: S102  (our own docs)
    return namespace


def test_python_blocks_parser_skips_marked_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("x\n```python\na = 1\n```\n<!-- no-run -->\n```python\nraise SystemExit\n```\n```bash\nls\n```\n")
    assert python_blocks(page) == ["a = 1\n"]


# ------------------------------------------------------------------------------------------ tutorials
def test_own_model_tutorial_runs_and_reads_a_real_decomposition(tmp_path, monkeypatch, capsys):
    ns = run_page(DOCS / "tutorials" / "own_model.md", tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert "['0', '2']" in out and "module pattern 'fc*' matches no module" in out
    assert out.count("Decomposition(APD") == 1 and out.count("Decomposition(SPD") >= 2
    # SPD's components sum to the weights; the CI-masked model reproduces the target; L0 is near the
    # one feature an input uses on average (hand-built model: 4 features, each on a quarter of inputs)
    for name, P in ns["W"].items():
        weight = ns["model"].get_submodule(name).weight
        assert (P.sum(0) - weight).norm() / weight.norm() < 0.05, name
    assert ns["recon_mse"] < 0.01, ns["recon_mse"]
    assert all(0.5 < v < 2.0 for v in ns["l0"].values()), ns["l0"]
    assert all(4 <= len(v) <= 8 for v in ns["alive"].values()), ns["alive"]
    assert sorted({int(ns["V"][c].abs().argmax()) for c in ns["alive"]["0"]}) == [0, 1, 2, 3]
    assert ns["mechanisms"] and sum(m.frequency for m in ns["mechanisms"]) > 0.5
    assert ns["apd_mse"] < 0.05, ns["apd_mse"]
    assert ns["same"] is True and (tmp_path / "runs" / "my_spd" / "decomposition.pt").is_file()
    assert {"total", "l0"} <= set(ns["log"][-1][1]), ns["log"][-1][1]


def test_huggingface_tutorial_runs_with_a_tiny_gpt2(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")
    ns = run_page(DOCS / "tutorials" / "huggingface.md", tmp_path, monkeypatch)
    out = capsys.readouterr().out
    dec, model = ns["dec"], ns["model"]
    assert dec.tied == {"lm_head": "transformer.wte"} and "lm_head" not in dec.matrix_names  # one matrix, used twice
    assert dec.kinds["transformer.h.0.mlp.c_fc"] == "transposed_linear"
    W = dec.component_weights()
    assert W["transformer.h.0.mlp.c_fc"].shape == (16, *model.transformer.h[0].mlp.c_fc.weight.shape)  # Conv1D's [d_in, d_out]
    assert torch.equal(W["lm_head"], W["transformer.wte"].transpose(1, 2))
    assert ns["g"]["transformer.h.0.mlp.c_fc"].shape == (8, 6, 16)  # [batch, positions, C]: per token
    assert "close names: ['transformer.h.0.mlp.c_fc'" in out
    assert tuple(ns["dec10"].component_model(ns["batch"]).shape) == (8, 6, 10)


def test_spd_coefficient_tutorial_shows_the_tradeoff(tmp_path, monkeypatch, capsys):
    ns = run_page(DOCS / "tutorials" / "spd_coefficient.md", tmp_path, monkeypatch)
    rows = ns["rows"]
    coeffs = sorted(rows)
    assert len(coeffs) >= 3
    l0s = [rows[c]["l0"] for c in coeffs]
    mses = [rows[c]["mse"] for c in coeffs]
    assert l0s[0] > l0s[-1] and mses[-1] > mses[0], rows  # stronger pressure: fewer active, worse reconstruction
    assert l0s[0] > 1.0 > l0s[-1], rows  # brackets the one feature an input uses on average
    assert "L0" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ the site
def test_site_builds_offline_and_strictly_with_the_api_reference(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site), "--config-file", str(ROOT / "mkdocs.yml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    text = re.sub(r"<[^>]+>", "", api)
    # docstrings of the public API, rendered from the source
    assert "Decompose the weights of" in text  # apd.decompose
    assert "Hyperparameters of one SPD run" in text  # apd.SPDConfig
    assert "The trained state of one run of a decomposition method" in text  # apd.Decomposition
    for name in ("decompose", "SPDConfig", "APDConfig", "ComponentModel", "load_decomposition", "topk_mask"):
        assert f'id="apd.{name}"' in api, name
    for page in ("tutorials/own_model", "tutorials/huggingface", "tutorials/spd_coefficient", "results/lm", "method"):
        assert (site / page / "index.html").is_file(), page
    assert "http://" not in (site / "index.html").read_text().split("<body")[0].replace("http://www.w3.org", "")


def test_api_page_covers_the_public_api():
    import apd

    api = (DOCS / "api.md").read_text()
    sections = set(re.findall(r"^::: ([\w.]+)", api, flags=re.M))
    assert "apd" in sections
    for module in ("apd.methods", "apd.losses", "apd.baselines", "apd.metrics"):
        assert any(s == module or s.startswith(module + ".") for s in sections), module
    assert any(s == "apd.targets" or s.startswith("apd.targets.") for s in sections)
    assert apd.__all__, "apd.__all__ is the public API the reference documents"


# ------------------------------------------------------------------------------------------ links
def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} | {".ci"}


def _repo_paths(text: str) -> list[str]:
    """Backticked tokens that name a file or folder of the repo (first part a top-level entry)."""
    out = []
    for token in CODE.findall(text):
        token = token.strip()
        if " " in token or "/" not in token or any(ch in token for ch in "<>*{}$=:"):
            continue
        if token.split("/")[0] in TOP:
            out.append(token)
    return out


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_repo_path_exists(page):
    text = FENCE.sub("", page.read_text())
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            missing.append(target)
    for token in _repo_paths(text):
        if not (ROOT / token).exists():
            missing.append(f"`{token}`")
    assert not missing, f"{page.relative_to(ROOT)} refers to files the repo does not hold: {missing}"


def test_no_reference_to_the_spec_file():
    """The specification is not in the repo: the docs do not cite it, and docs/method.md maps every
    "SPEC §n" that a docstring or comment of the code cites to a section of its own."""
    method = DOCS / "method.md"
    for page in _pages():
        if page != method:
            assert not re.search(r"\bSPEC\b", page.read_text()), f"{page.relative_to(ROOT)} cites SPEC, which the repo does not hold"
    mapped = {int(n) for n in re.findall(r"^\| SPEC §(\d+)", method.read_text(), flags=re.M)}
    cited = {int(n) for f in [*ROOT.glob("apd/**/*.py"), *ROOT.glob("experiments/**/*.py"), *ROOT.glob("conf/**/*.yaml")]
             for n in re.findall(r"SPEC §(\d+)", f.read_text())}  # fmt: skip
    assert cited <= mapped, f"the code cites SPEC sections {sorted(cited - mapped)} that docs/method.md does not map"


# ------------------------------------------------------------------------------------------ README shape
def test_readme_is_short_with_the_two_commands_and_every_preset():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first_block = FENCE.search(readme)
    assert first_block and first_block.group(1) == "bash"
    commands = [line for line in first_block.group(2).splitlines() if not line.startswith("#")]
    assert len(commands) == 2 and commands[0].endswith("python -m experiments.decompose")
    ci_test_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert commands[1].endswith(ci_test_command), (commands[1], ci_test_command)
    presets = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    table = {m for m in re.findall(r"^\| `(\w+)`", readme, flags=re.M)}
    assert not set(presets) - table, f"presets missing from the README's table: {set(presets) - table}"
    assert not table - set(presets), f"the README's table names presets that do not exist: {table - set(presets)}"


def test_link_checker_catches_a_missing_file(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[ok](p.md) [gone](nothere.md#x) `apd/nothere.py` `apd/__init__.py` `outputs/<t>/x.pt`\n")
    text = page.read_text()
    assert [t for t in LINK.findall(text) if not (page.parent / t.split("#")[0]).exists()] == ["nothere.md#x"]
    assert [t for t in _repo_paths(text) if not (ROOT / t).exists()] == ["apd/nothere.py"]

