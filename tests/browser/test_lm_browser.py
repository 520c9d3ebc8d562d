"""The language model's browser (apd.browser.lm, experiments.browse on LM run dirs): a tiny real SPD
run of the spd_lm_1l preset, a tiny APD run and tiny SAEs in a comparison layout; the numbers in the
data file recomputed from the model, the prompt encoder, the entry point's errors and staleness,
and the site in headless Chromium."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from apd.attributions import compute_attributions
from apd.baselines import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, load_sae, save_sae
from apd.browser import BrowserData, BrowserDataError
from apd.browser.data import round_sig
from apd.browser.lm import (
    LM_DATA_FILE,
    LMBrowserConfig,
    LMRunError,
    find_lm_run,
    heldout_windows,
    load_lm_units,
    lm_run_kind,
    stale_reason,
    write_lm_browser_data,
)
from apd.browser.render import fmt, render_unit
from apd.experiment import DecomposeRun, load_run, run_decompose
from apd.methods.apd import APDConfig
from apd.targets import LMTargetConfig
from apd.topk import topk_mask
from apd.toy_models.lm_data import Split, load_corpus, load_tokenizer
from experiments import browse, schema  # noqa: F401  (schema registers the config schemas)
from tests.browser.test_browser import CHROMIUM, _assert_not_blank, _text, chromium, needs_chromium  # noqa: F401

CONF = Path(__file__).resolve().parents[2] / "conf"
N_WINDOWS = 8
C = 24
PROMPT = "Ham.\nTo be, or not to be"
SAE = "sae_topk_w64_k4"
TRANSCODER = "transcoder_standard_w32_l1_coeff0.001"
STALE = "sae_topk_w64_k8"  # an SAE folder of an earlier grid: comparison.csv does not list it


def _spd_run(out: Path) -> None:
    """The spd_lm_1l preset, shrunk: C subcomponents per matrix, 3 steps, a tiny evaluation."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="decompose", overrides=["experiment=spd_lm_1l", "steps=3", f"method.C={C}"])
    app = OmegaConf.to_object(cfg)
    run = DecomposeRun(target=app.target, method=app.method, seed=0, batch_size=4, n_eval=2)
    run_decompose(run, out, progress=False)


def _apd_run(out: Path) -> None:
    method = APDConfig(C=8, rank=2, topk=2, steps=2, attribution="activation", output_loss="kl")
    run_decompose(DecomposeRun(target=LMTargetConfig(), method=method, batch_size=2, n_eval=2), out, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A decompose run dir (SPD) and a comparison run dir holding a copy of it, an APD run, two seeds
    of an SAE on the neurons and a transcoder."""
    root = tmp_path_factory.mktemp("lm")
    spd = root / "spd_run"
    _spd_run(spd)
    cmp = root / "compare"
    shutil.copytree(spd, cmp / "spd" / "seed0")
    _apd_run(cmp / "apd" / "C8_topk2" / "seed0")
    g = torch.Generator().manual_seed(0)
    for seed in (0, 1):
        save_sae(TopKSAE(TopKSAEConfig(d_in=512, d_sae=64, k=4), g), cmp / "saes" / f"{SAE}_seed{seed}")
    tc = StandardSAEConfig(d_in=128, d_out=128, d_sae=32, apply_b_dec_to_input=False, l1_coeff=1e-3)
    save_sae(StandardSAE(tc, g), cmp / "saes" / f"{TRANSCODER}_seed0")
    save_sae(TopKSAE(TopKSAEConfig(d_in=512, d_sae=64, k=8), g), cmp / "saes" / f"{STALE}_seed0")  # not in the csv
    (cmp / "comparison.csv").write_text("method,architecture,seed,width,sparsity_knob,sparsity,l0\n"
                                        "sae_topk,topk,0,64,k,4.0,4\nsae_topk,topk,1,64,k,4.0,4\n"
                                        "transcoder_standard,standard,0,32,l1_coeff,0.001,3.5\n")  # fmt: skip
    return spd, cmp


@pytest.fixture(scope="module")
def built(runs):
    """Both run dirs through the entry point (data built on N_WINDOWS windows, then the site)."""
    spd, cmp = runs
    for d in (spd, cmp):
        assert not (d / LM_DATA_FILE).exists()
        browse.main([str(d), "--windows", str(N_WINDOWS), "--prompt", PROMPT])
    return {d: BrowserData.load(d / LM_DATA_FILE) for d in (spd, cmp)}


def _windows() -> torch.Tensor:
    """The held-out windows the data should be built on, recomputed here: evenly spaced, non-overlapping."""
    stream = load_corpus(Split.heldout)
    n_avail = stream.numel() // 128
    starts = [round(i * (n_avail - 1) / (N_WINDOWS - 1)) * 128 for i in range(N_WINDOWS)]
    return torch.stack([stream[s : s + 128] for s in starts])


def test_families_and_unit_counts(runs, built):
    spd, cmp = runs
    data = built[spd]
    assert [(f.name, len(f.units)) for f in data.families] == [("neurons", 512), ("spd.mlp.up", C), ("spd.mlp.down", C)]
    assert data.n_tokens == N_WINDOWS * 128 and data.seq_len == 128
    assert data.vocab == list(load_tokenizer().tokens)
    assert len(data.prompts) == 3  # the default prompts, stored with the data
    data = built[cmp]
    assert [(f.name, f.kind, len(f.units)) for f in data.families] == [
        ("neurons", "neuron", 512),  # then the decompositions in the method registry's order
        ("apd.C8_topk2.seed0", "APD component", 8),
        ("spd.seed0.mlp.up", "SPD subcomponent", C),
        ("spd.seed0.mlp.down", "SPD subcomponent", C),
        (f"{SAE}_seed0", "SAE feature", 64),
        (f"{TRANSCODER}_seed0", "transcoder feature", 32),
    ]
    assert f"saes/{SAE}_seed1 (all_seeds=False)" in data.meta["left out"]
    assert f"saes/{STALE}_seed0 (not in comparison.csv: left from an earlier grid)" in data.meta["left out"]
    every = find_lm_run(cmp, LMBrowserConfig(all_seeds=True))
    assert [n for n, _ in every.saes] == [f"{SAE}_seed0", f"{SAE}_seed1", f"{TRANSCODER}_seed0"]
    assert [n for n, _ in find_lm_run(cmp, LMBrowserConfig(sae_patterns=("transcoder_*",))).saes] == [f"{TRANSCODER}_seed0"]
    # every unit is aligned with the other families, by cosine and by correlation
    rec = data.family(f"{SAE}_seed0").units[0]
    measures = {(a.family, a.measure) for a in rec.aligned}
    assert ("neurons", "cosine in neuron space") in measures and ("neurons", "activation correlation") in measures
    assert (f"{TRANSCODER}_seed0", "cosine in the residual stream") in measures


def test_densities_match_the_model(runs, built):
    """Each family's densities recomputed from the model on the same held-out windows."""
    _, cmp = runs
    data = built[cmp]
    x = _windows()
    first = data.family("neurons").units[0].top_contexts[0]  # the data read these tokens
    assert first.tokens[first.center] == int(x.reshape(-1)[first.pos])
    art = load_run(cmp / "spd" / "seed0")
    model, cm, tau = art.target.eval(), art.component_model(), art.decomposition.config.ci_threshold
    sae, tc = load_sae(cmp / "saes" / f"{SAE}_seed0"), load_sae(cmp / "saes" / f"{TRANSCODER}_seed0")
    with torch.no_grad():
        mlp_in, acts, _ = model.mlp_io(x)
        g = art.decomposition.causal_importances(x, model)
        V_down = art.decomposition.A["mlp.down"][:, 0]  # mlp.down's input directions
        expected = {
            "neurons": acts > 0,
            "spd.seed0.mlp.up": g["mlp.up"] > tau,  # V_c·x is never exactly 0 here
            "spd.seed0.mlp.down": (g["mlp.down"] > tau) & ((acts @ V_down.T) != 0),
            f"{SAE}_seed0": sae.encode(acts) > 0,
            f"{TRANSCODER}_seed0": tc.encode(mlp_in) > 0,
        }
    for name, active in expected.items():
        n_active = active.reshape(-1, active.shape[-1]).sum(0)
        fam = data.family(name)
        assert [u.n_active for u in fam.units] == n_active.tolist(), name
        assert [u.density for u in fam.units] == [round_sig(n / x.numel(), 6) for n in n_active.tolist()], name
    # an SPD subcomponent's activation: the norm of its masked output where g > τ
    u = int(expected["spd.seed0.mlp.down"].reshape(-1, C).sum(0).argmax())
    U = art.decomposition.B["mlp.down"][u, :, 0]
    norm = g["mlp.down"][..., u] * (acts @ V_down[u]).abs() * U.norm()
    rec = data.family("spd.seed0.mlp.down").units[u]
    assert rec.max_act == pytest.approx(float(norm.max()), rel=1e-3)
    assert rec.top_contexts[0].pos == int(norm.reshape(-1).argmax())


def test_logit_effects_by_hand(runs, built):
    _, cmp = runs
    data = built[cmp]
    art = load_run(cmp / "spd" / "seed0")
    W_U, W_down = art.target.unembed.weight.detach(), art.target.mlp.down.weight.detach()
    sae, tc = load_sae(cmp / "saes" / f"{SAE}_seed0"), load_sae(cmp / "saes" / f"{TRANSCODER}_seed0")
    A, B = art.decomposition.A["mlp.down"][:, 0], art.decomposition.B["mlp.down"][:, :, 0]

    def top(effects: torch.Tensor, k: int = 10) -> list[tuple[int, float]]:
        v, t = effects.topk(k)
        return [(int(i), float(e)) for e, i in zip(v, t)]

    def same(got: list[tuple[int, float]] | None, want: list[tuple[int, float]]) -> bool:
        """The same tokens, and effects equal to the 4 significant digits stored (up to float rounding)."""
        assert got is not None
        return [t for t, _ in got] == [t for t, _ in want] and all(
            abs(a - b) <= 1e-3 * abs(b) + 1e-7 for (_, a), (_, b) in zip(got, want)
        )

    for i in (0, 7, 300):
        rec = data.family("neurons").units[i]
        effects = W_U @ W_down[:, i]
        assert same(rec.logits_pos, top(effects))
        assert same(rec.logits_neg, [(t, -v) for t, v in top(-effects)])
    assert same(data.family(f"{SAE}_seed0").units[5].logits_pos, top(W_U @ W_down @ sae.W_dec[5].detach()))
    assert same(data.family(f"{TRANSCODER}_seed0").units[3].logits_pos, top(W_U @ tc.W_dec[3].detach()))
    assert same(data.family("spd.seed0.mlp.down").units[2].logits_pos, top(W_U @ B[2] * A[2].norm()))
    assert same(data.family("spd.seed0.mlp.up").units[4].logits_pos,
                top(W_U @ W_down @ art.decomposition.B["mlp.up"][4, :, 0] * art.decomposition.A["mlp.up"][4].norm()))
    # APD: the component's mlp.down part applied to the mean neurons where it is selected
    apd = load_run(cmp / "apd" / "C8_topk2" / "seed0")
    x = _windows()  # one batch of windows, as the data was built (batch_windows >= N_WINDOWS)
    with torch.no_grad():
        attr = compute_attributions(apd.component_model(), x, apd.decomposition.config.attribution)
        active = (topk_mask(attr, apd.decomposition.config.topk, True) * attr > 0).reshape(-1, 8).double()
        acts = apd.target.eval().mlp_io(x).acts.reshape(-1, 512).double()
    mean = active.T @ acts / active.sum(0)[:, None]
    P = apd.decomposition.component_weights()["mlp.down"].double()  # [C, 128, 512]
    for c in range(8):
        rec = data.family("apd.C8_topk2.seed0").units[c]
        assert rec.n_active == int(active[:, c].sum())
        assert same(rec.logits_pos, top((W_U.double() @ (P[c] @ mean[c])).float()))
    # the SAE latent's best-aligned neurons are its decoder row's largest entries
    rec = data.family(f"{SAE}_seed0").units[5]
    by_cos = [a.index for a in rec.aligned if a.family == "neurons" and a.measure == "cosine in neuron space"]
    assert by_cos == sae.W_dec[5].detach().topk(3).indices.tolist()


def test_prompt_encoder_matches_a_direct_computation(runs):
    _, cmp = runs
    units = load_lm_units(find_lm_run(cmp), LMBrowserConfig(n_windows=N_WINDOWS))
    text = "To be, or not to be"
    prompt = units.prompt_acts(text)
    ids = load_tokenizer().encode(text)
    assert prompt.tokens == ids.tolist()
    art = load_run(cmp / "spd" / "seed0")
    sae = load_sae(cmp / "saes" / f"{SAE}_seed0")
    with torch.no_grad():
        _, acts, _ = art.target.eval().mlp_io(ids[None])
        g = art.decomposition.causal_importances(ids[None], art.target)
        direct = {"neurons": acts[0], f"{SAE}_seed0": sae.encode(acts)[0]}
    tau = art.decomposition.config.ci_threshold
    for t in range(len(ids)):
        for name in ("neurons", f"{SAE}_seed0"):
            a = direct[name][t]
            order = [int(i) for i in a.argsort(descending=True, stable=True) if a[i] > 0][:64]
            assert [u for u, _ in prompt.active[name][t]] == order, (name, t)
            assert [v for _, v in prompt.active[name][t]] == [round_sig(float(a[i])) for i in order]
        on = set(torch.nonzero(g["mlp.up"][0, t] > tau).flatten().tolist())
        listed = {u for u, _ in prompt.active["spd.seed0.mlp.up"][t]}
        assert listed == on if len(on) <= 64 else listed <= on


def test_prompt_errors(runs, built, capsys):
    spd, _ = runs
    message = "error: prompt 'Caf\u00e9 ? \u2014 ok': characters ['\u00e9', '\u2014'] are not in the model's vocabulary of 83"
    with pytest.raises(SystemExit, match="^" + re.escape(message)):
        browse.main([str(spd), "--windows", str(N_WINDOWS), "--prompt", "Caf\u00e9 ? \u2014 ok"])
    with pytest.raises(SystemExit, match="has 129 characters; the model reads at most 128"):
        browse.main([str(spd), "--windows", str(N_WINDOWS), "--prompt", "a" * 129])
    with pytest.raises(SystemExit, match="the prompt is empty"):
        browse.main([str(spd), "--windows", str(N_WINDOWS), "--prompt", ""])
    assert "building" not in capsys.readouterr().err  # the data file is current: only the model was loaded


def test_entry_point_errors(runs, tmp_path):
    spd, _ = runs
    with pytest.raises(SystemExit, match="error: run dir .* does not exist"):
        browse.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="is not a run dir of a token model: it has no run.json"):
        browse.main([str(tmp_path), "--rebuild"])
    toy = tmp_path / "toy"
    toy.mkdir()
    (toy / "run.json").write_text(json.dumps({"target": {"kind": "tms", "name": "tms_5_2"}, "method": "apd"}))
    with pytest.raises(SystemExit, match=r"is a decompose run of 'tms_5_2' \(target kind 'tms'\), whose inputs are not token ids"):
        browse.main([str(toy)])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(spd / "run.json", unfinished / "run.json")
    assert lm_run_kind(unfinished) == "decompose" and lm_run_kind(toy) is None
    with pytest.raises(SystemExit, match="holds no finished decomposition"):
        browse.main([str(unfinished)])
    with pytest.raises(SystemExit, match="n_windows=100000: the held-out plays hold 1 to 4219 windows"):
        browse.main([str(spd), "--windows", "100000", "--rebuild"])
    with pytest.raises(BrowserDataError, match="n_windows=0"):
        heldout_windows(128, 0)
    with pytest.raises(LMRunError, match="no finished decomposition under apd/ or spd/ and no SAE"):
        (tmp_path / "saes").mkdir()
        find_lm_run(tmp_path)


def test_stale_data_is_rebuilt(runs, built):
    """The entry point rebuilds the data when stale_reason says so (and built it when missing: ``built``)."""
    spd, _ = runs
    cfg = LMBrowserConfig(n_windows=N_WINDOWS)
    assert stale_reason(spd, cfg) is None
    assert stale_reason(spd, LMBrowserConfig(n_windows=N_WINDOWS + 1)) == "it was built with other settings"
    dec = spd / "decomposition.pt"
    st = dec.stat()
    os.utime(dec, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stale_reason(spd, cfg) == "its inputs changed (decomposition.pt)"
    assert write_lm_browser_data(spd, cfg) == spd / LM_DATA_FILE  # what a comparison calls at its end
    assert stale_reason(spd, cfg) is None


@needs_chromium
def test_site_in_chromium(runs, built, chromium, tmp_path):
    _, cmp = runs
    data = built[cmp]
    out = cmp / "browser"
    prompts = sorted(p.name for p in (out / "prompts").glob("*.html"))
    assert prompts == [f"prompt_{j}.html" for j in range(4)]  # 3 stored + --prompt
    shot = tmp_path / "lm_index.png"
    dom, console = chromium((out / "index.html").as_uri() + "#sort=density&dir=desc", shot)
    assert console == []
    _assert_not_blank(shot)
    assert "units 1\u2013200 of 664" in dom
    shot = tmp_path / "lm_prompt.png"
    dom, console = chromium((out / "prompts" / "prompt_3.html").as_uri(), shot)
    assert console == []
    _assert_not_blank(shot)
    assert "Prompt: Ham.\u21b5To be, or not to be" in dom and "coloured by" in dom
    # an SAE page shows the data's numbers and its logit effects
    rec = max(data.family(f"{SAE}_seed0").units, key=lambda u: u.n_active)
    shot = tmp_path / "lm_sae.png"
    dom, console = chromium((out / "units" / f"{rec.key}.html").as_uri(), shot)
    assert console == []
    _assert_not_blank(shot)
    stats = _text(dom.split('id="stats"', 1)[1].split("</div></div>", 1)[0])
    assert f"{fmt(rec.density)}density" in stats and f"{rec.n_active:,}active of {N_WINDOWS * 128:,} tokens" in stats
    assert "Logit effects" in dom and "unembed \u00b7 mlp.down \u00b7 W_dec[l]" in dom
    assert re.search(r'href="neurons_\d+\.html">neurons/\d+</a>', dom)


def test_contexts_line_up_on_their_centre_token(runs, built):
    """Character tokens: each window is indented so that the activating characters form a column."""
    _, cmp = runs
    data = built[cmp]
    fam = data.family("neurons")
    rec = max(fam.units, key=lambda u: u.n_active)
    page = render_unit(data, fam, rec)
    table = page.split('<table class="ctxs"><tbody>', 1)[1].split("</tbody>", 1)[0]
    columns = []
    for row in re.findall(r'<td class="ctx"(?: style="padding-left:calc\(8px \+ (\d+)ch\)")?>(.*?)</td>', table):
        indent, cells = int(row[0] or 0), row[1]
        columns.append(indent + cells.split('<b class="c')[0].count("<b"))
    assert len(columns) == len(rec.top_contexts) and len(set(columns)) == 1
    # a line break inside a window is a muted ↵
    newline = data.vocab.index("\n")
    unit = next(u for u in fam.units if any(newline in c.tokens[: c.center] for c in u.top_contexts))
    assert re.search('<b class="ws"[^>]*>\u21b5</b>', render_unit(data, fam, unit))


def test_a_comparison_that_scored_runs_from_elsewhere_browses_them(runs, tmp_path):
    """`compare ... 'spd.runs=[...]'` leaves the SPD runs where they were: the layout reads them from the
    comparison's config.yaml (absolute paths, or relative to the comparison's parent)."""
    spd, cmp = runs
    other = tmp_path / "compare2"
    shutil.copytree(cmp / "apd", other / "apd")
    shutil.copytree(spd, tmp_path / "spd_elsewhere")
    (other / "config.yaml").write_text(OmegaConf.to_yaml({"spd": {"runs": [str(spd), "spd_elsewhere", "missing"]},
                                                           "apd": {"runs": []}}))  # fmt: skip
    layout = find_lm_run(other)
    names = [name for name, _ in layout.decompositions]
    assert names[0].startswith("apd.") and names[1:] == ["spd.seed0"]  # one family per method: the lowest seed
    assert [p.resolve() for _, p in layout.decompositions[1:]] == [spd.resolve()]
    assert any("spd_elsewhere" in line for line in layout.skipped)  # its second seed-0 copy: all_seeds=False
    assert str(spd / "run.json") in layout.inputs()  # the staleness check covers the files read from elsewhere
    everything = find_lm_run(other, LMBrowserConfig(all_seeds=True))
    assert sorted(p.resolve() for n, p in everything.decompositions if n.startswith("spd")) == sorted(
        [spd.resolve(), (tmp_path / "spd_elsewhere").resolve()])
    units = load_lm_units(layout, LMBrowserConfig(n_windows=2))  # the units of a run from elsewhere load
    assert any(f.name.startswith("spd.seed0") for f in units.families)


def test_the_comparison_csv_names_only_its_sae_rows(tmp_path):
    """The SAE folders a comparison scored come from its csv rows with SAE numbers; the neurons' and
    decompositions' rows (empty width) and a short row are not SAEs."""
    from apd.browser.runs import _saes_of_comparison

    assert _saes_of_comparison(tmp_path) is None  # no csv: every SAE folder is taken
    (tmp_path / "comparison.csv").write_text("method,width,sparsity_knob,sparsity,seed\n"
                                             "sae_topk,64,k,4.0,0\nneurons,,,,0\nspd,,,,1\nsae_topk,64,k\n"
                                             "relu_l1,4096,l1_coeff,1.2,1\n")  # fmt: skip
    assert _saes_of_comparison(tmp_path) == {"sae_topk_w64_k4_seed0", "relu_l1_w4096_l1_coeff1.2_seed1"}
    (tmp_path / "comparison.csv").write_text("method,l0\nneurons,44\n")  # not a comparison's csv
    assert _saes_of_comparison(tmp_path) is None
