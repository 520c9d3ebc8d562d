"""The browser on token runs other than the shipped lm_1l: ``target=module`` runs of a tiny
TransformerLM and of a model of another architecture, decomposed by SPD and APD, through the entry
point; each unit's read and write directions and their top tokens checked against brute force."""

import re

import pytest
import torch

from apd.browser import BrowserData
from apd.browser.lm import LM_DATA_FILE
from apd.browser.units import top_singular_pairs
from apd.experiment import DecomposeRun, load_run, run_decompose
from apd.methods import APDConfig, SPDConfig, method_for
from apd.targets import ModuleTargetConfig
from experiments import browse
from tests.browser.test_browser import _assert_not_blank, _text, chromium, needs_chromium  # noqa: F401
from tests.browser.tiny_token_model import VOCAB

N_WINDOWS, K = 6, 8


def _target(factory: str, modules: list[str]) -> ModuleTargetConfig:
    return ModuleTargetConfig(name=factory, factory=f"tests.browser.tiny_token_model:{factory}",
                              data="tests.browser.tiny_token_model:tokens", decompose=modules, loss="kl")  # fmt: skip


RUNS = {
    "lm_spd": (_target("tiny_lm", ["mlp.up", "mlp.down"]), SPDConfig(C=6, steps=3, log_every=1)),
    "mlp_spd": (_target("embed_mlp", ["fc_in", "fc_out"]), SPDConfig(C=5, steps=3, log_every=1)),
    "mlp_apd": (_target("embed_mlp", ["fc_in", "fc_out"]), APDConfig(C=4, rank=2, topk=2, steps=3, attribution="activation")),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run decomposed for 3 steps, then browsed by the entry point: {name: (run dir, data)}."""
    out = {}
    for name, (target, method) in RUNS.items():
        d = tmp_path_factory.mktemp(name)
        run_decompose(DecomposeRun(target=target, method=method, batch_size=8, n_eval=8), d, progress=False)
        index = browse.main([str(d), "--windows", str(N_WINDOWS)])
        assert index == d / "browser" / "index.html"
        out[name] = (d, BrowserData.load(d / LM_DATA_FILE))
    return out


def test_families_vocab_and_text(runs):
    fams = {name: [(f.name, f.kind, len(f.units)) for f in data.families] for name, (_, data) in runs.items()}
    assert fams == {
        "lm_spd": [("neurons", "neuron", 32), ("spd.mlp.up", "SPD subcomponent", 6), ("spd.mlp.down", "SPD subcomponent", 6)],
        "mlp_spd": [("spd.fc_in", "SPD subcomponent", 5), ("spd.fc_out", "SPD subcomponent", 5)],
        "mlp_apd": [("apd", "APD component", 4)],
    }
    # the index title names what the run holds (no SAEs here, no neurons without a transformer MLP)
    assert runs["lm_spd"][1].title.endswith(": neurons and SPD subcomponents of tiny_lm")
    assert runs["mlp_spd"][1].title.endswith(": SPD subcomponents of embed_mlp")
    assert runs["mlp_apd"][1].title.endswith(": APD components of embed_mlp")
    d, data = runs["mlp_spd"]
    assert data.vocab == [f"\u27e8{i}\u27e9" for i in range(VOCAB)] and data.prompts == []
    assert data.n_tokens == N_WINDOWS * 12 and data.seq_len == 12
    # the text read: the target's eval_batch with seed 0, recomputed
    x = RUNS["mlp_spd"][0].eval_batch(N_WINDOWS, torch.Generator().manual_seed(0))
    top = data.family("spd.fc_in").units[0].top_contexts
    assert all(c.tokens[c.center] == int(x.reshape(-1)[c.pos]) for c in top)


def test_activity_matches_the_decomposition(runs):
    """SPD: a subcomponent is active where its causal importance exceeds τ (and its output is not 0)."""
    d, data = runs["mlp_spd"]
    art = load_run(d)
    x = art.run.target.eval_batch(N_WINDOWS, torch.Generator().manual_seed(0))
    cm, method = art.component_model(), method_for(art.decomposition.config)
    g = method.eval_masks(cm, x)
    for n in ("fc_in", "fc_out"):
        n_active = (g[n] > art.decomposition.config.ci_threshold).reshape(-1, 5).sum(0)
        assert [u.n_active for u in data.family(f"spd.{n}").units] == n_active.tolist()


def _brute_top(values: torch.Tensor, k: int) -> list[int]:
    """The k indices of the largest values, by sorting every one (ties: the lower index first)."""
    return sorted(range(values.numel()), key=lambda i: (-float(values[i]), i))[:k]


def test_spd_directions_are_the_factors_and_their_tokens_the_largest_projections(runs):
    d, data = runs["mlp_spd"]
    art = load_run(d)
    W_E, W_U = art.target.embed.weight.detach(), art.target.unembed.weight.detach()
    for n, side in (("fc_in", "read"), ("fc_out", "write")):
        A, B = art.decomposition.A[n][:, 0], art.decomposition.B[n][:, :, 0]
        for c, rec in enumerate(data.family(f"spd.{n}").units):
            dirs = {x.side: x for x in rec.directions}
            assert set(dirs) == {"read", "write"} and all(x.matrix == n for x in dirs.values())
            v, u = A[c] / A[c].norm(), B[c] / B[c].norm()  # rank one: the factors, normalised
            assert dirs["read"].sigma == pytest.approx(float(A[c].norm() * B[c].norm()), rel=1e-3)
            for vec, x in ((v, dirs["read"]), (u, dirs["write"])):
                assert [i for i, _ in x.top_dims] == _brute_top(vec.abs(), K)
                assert [w for _, w in x.top_dims] == pytest.approx([float(vec[i]) for i, _ in x.top_dims], rel=1e-3, abs=1e-6)
            # fc_in reads the residual stream (its input has the embedding's width): tokens through W_E;
            # fc_out writes to it: tokens through W_U; the other side of each has no token space
            proj = W_E @ v if side == "read" else W_U @ u
            x = dirs[side]
            assert x.token_space == ("embedding" if side == "read" else "unembedding")
            assert [t for t, _ in x.tokens_pos] == _brute_top(proj, K)
            assert [t for t, _ in x.tokens_neg] == _brute_top(-proj, VOCAB - K)  # 11 tokens: 8 largest, the other 3
            assert not {t for t, _ in x.tokens_pos} & {t for t, _ in x.tokens_neg}
            assert [p for _, p in x.tokens_pos] == pytest.approx([float(proj[t]) for t, _ in x.tokens_pos], rel=1e-3, abs=1e-6)
            other = dirs["write" if side == "read" else "read"]
            assert other.tokens_pos is None and other.token_space == ""


def test_transformer_lm_directions_link_neurons_and_project_on_tokens(runs):
    d, data = runs["lm_spd"]
    art = load_run(d)
    W_E, W_U = art.target.embed.weight.detach(), art.target.unembed.weight.detach()
    up = {x.side: x for x in data.family("spd.mlp.up").units[2].directions}
    down = {x.side: x for x in data.family("spd.mlp.down").units[3].directions}
    v_up = art.decomposition.A["mlp.up"][2, 0] / art.decomposition.A["mlp.up"][2, 0].norm()
    u_down = art.decomposition.B["mlp.down"][3, :, 0] / art.decomposition.B["mlp.down"][3, :, 0].norm()
    assert [t for t, _ in up["read"].tokens_pos] == _brute_top(W_E @ v_up, K)
    assert [t for t, _ in down["write"].tokens_neg] == _brute_top(-(W_U @ u_down), VOCAB - K)
    assert up["write"].dims_family == "neurons" and down["read"].dims_family == "neurons"
    assert up["write"].tokens_pos is None and down["read"].tokens_pos is None  # the neurons are not a token space
    page = (d / "browser" / "units" / "spd.mlp.up_2.html").read_text()
    top_neuron = up["write"].top_dims[0][0]
    assert f'href="neurons_{top_neuron}.html">neurons/{top_neuron}</a>' in page


def test_apd_directions_are_each_matrix_parts_top_singular_pair(runs):
    d, data = runs["mlp_apd"]
    art = load_run(d)
    W_E, W_U = art.target.embed.weight.detach(), art.target.unembed.weight.detach()
    P = art.decomposition.component_weights()
    for c, rec in enumerate(data.family("apd").units):
        assert [x.matrix for x in rec.directions] == ["fc_in", "fc_in", "fc_out", "fc_out"]
        for n in ("fc_in", "fc_out"):
            U, S, Vh = torch.linalg.svd(P[n][c].double())
            u, v = U[:, 0], Vh[0]
            if u @ art.decomposition.B[n][c, :, 0].double() < 0:  # the documented sign: u · B[:, 0] >= 0
                u, v = -u, -v
            read, write = (x for x in rec.directions if x.matrix == n)
            assert read.sigma == pytest.approx(float(S[0]), rel=1e-3)
            assert [i for i, _ in read.top_dims] == _brute_top(v.abs(), K)
            assert [w for _, w in write.top_dims] == pytest.approx([float(u[i]) for i, _ in write.top_dims], rel=1e-3, abs=1e-6)
            if n == "fc_in":  # fc_in reads the residual stream: its read direction's tokens through W_E
                assert [t for t, _ in read.tokens_pos] == _brute_top(W_E.double() @ v, K)
            else:  # fc_out writes to it: its write direction's tokens through W_U
                assert [t for t, _ in write.tokens_neg] == _brute_top(-(W_U.double() @ u), VOCAB - K)
    # rank 2: the pair is the best rank-one part of each weight, off by the second singular value (Eckart-Young)
    sigma, u, v = top_singular_pairs(art.decomposition.A["fc_out"], art.decomposition.B["fc_out"])
    rest = (P["fc_out"] - (u[:, :, None] * sigma[:, None, None]) @ v[:, None, :]).flatten(1).norm(dim=1)
    torch.testing.assert_close(rest, torch.linalg.svdvals(P["fc_out"].double())[:, 1].float(), atol=1e-4, rtol=1e-3)


def test_a_prompt_needs_a_tokenizer(runs):
    d, _ = runs["mlp_spd"]
    with pytest.raises(SystemExit, match="the browser has no tokenizer for 'embed_mlp': compute the prompts' activations"):
        browse.main([str(d), "--windows", str(N_WINDOWS), "--prompt", "abc"])


@needs_chromium
def test_unit_page_in_chromium(runs, chromium, tmp_path):
    d, data = runs["mlp_spd"]
    rec = max(data.family("spd.fc_in").units, key=lambda u: u.n_active)
    shot = tmp_path / "token_unit.png"
    dom, console = chromium((d / "browser" / "units" / f"{rec.key}.html").as_uri(), shot)
    assert console == []
    _assert_not_blank(shot)
    weights = _text(dom.split('id="weights"', 1)[1].split("Top activations", 1)[0])
    read = next(x for x in rec.directions if x.side == "read")
    assert "read direction v (input)" in weights and "tokens through the embedding" in weights
    assert re.search("".join(re.escape(f"\u27e8{t}\u27e9") + r"\S*\s*" for t, _ in read.tokens_pos[:2]), weights)
    dom, console = chromium((d / "browser" / "index.html").as_uri(), tmp_path / "token_index.png")
    assert console == [] and "units 1\u201310 of 10" in dom


def test_the_browser_names_no_method():
    """Families are chosen by asking the method (apd.methods.METHODS), never by its name."""
    from pathlib import Path

    import apd.browser
    from apd.methods import METHODS

    for path in Path(apd.browser.__file__).parent.glob("*.py"):
        text = path.read_text()
        for name in METHODS:
            for quoted in (f'"{name}"', f"'{name}'"):
                assert quoted not in text, f"{path.name} names the method {quoted}"


def test_score_activation_is_the_causal_importance(runs):
    from apd.browser.lm import LMBrowserConfig, find_lm_run, load_lm_units

    d, _ = runs["mlp_spd"]
    units = load_lm_units(find_lm_run(d), LMBrowserConfig(unit_activation="score", n_windows=2))
    art = load_run(d)
    x = art.run.target.eval_batch(2, torch.Generator().manual_seed(0))
    g = method_for(art.decomposition.config).eval_masks(art.component_model(), x)
    acts = units.activations(x)
    torch.testing.assert_close(acts["spd.fc_in"], g["fc_in"])
    fam = units.families[0]
    assert fam.act_label == "causal importance" and fam.threshold == art.decomposition.config.ci_threshold
