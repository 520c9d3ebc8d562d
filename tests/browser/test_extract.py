"""apd.browser.extract and apd.browser.data on hand-made token streams with hand-worked answers."""

import math

import numpy as np
import pytest
import torch

from apd.browser import (
    AlignmentTable,
    BrowserData,
    BrowserDataError,
    ExtractConfig,
    FamilyActs,
    PromptActs,
    correlation_alignment,
    cosine_alignment,
    extract_browser_data,
    extract_family,
    top_matches,
)

VOCAB = ["a", "b", "c", "d", "e"]
# two sequences of six tokens; flat positions 0..5 and 6..11
TOKENS = torch.tensor([[0, 1, 2, 3, 0, 1], [2, 2, 3, 1, 0, 0]])


def _acts() -> torch.Tensor:
    acts = torch.zeros(12, 3)
    # unit 0: on tokens a (pos 0), c (pos 6), a (pos 11), d (pos 3)
    acts[0, 0], acts[6, 0], acts[11, 0], acts[3, 0] = 5.0, 4.0, 3.0, 1.0
    # unit 1: on token b after a twice (pos 1, 5), after d once (pos 9)
    acts[1, 1], acts[5, 1], acts[9, 1] = 2.0, 1.0, 0.5
    # unit 2: never active (negative values are below the threshold 0)
    acts[:, 2] = -1.0
    return acts


CFG = ExtractConfig(
    n_top=3, ctx_before=2, ctx_after=2, n_proxy=4, n_hist_bins=4, quantiles=(0.0, 0.5, 1.0), n_per_quantile=1
)


@pytest.fixture
def family():
    return extract_family(TOKENS, len(VOCAB), FamilyActs(name="f", acts=_acts(), kind="SAE feature"), CFG)


def test_density_and_activation_statistics(family):
    u0, u1, u2 = family.units
    assert (u0.n_active, u0.density, u0.max_act, u0.mean_act) == (4, round(4 / 12, 6), 5.0, 3.25)
    assert (u1.n_active, u1.density, u1.max_act, u1.mean_act) == (3, 0.25, 2.0, 1.167)  # 4 significant digits
    assert (u2.n_active, u2.density, u2.max_act, u2.mean_act) == (0, 0.0, 0.0, 0.0)


def test_top_contexts_are_clipped_at_sequence_edges(family):
    ctxs = family.units[0].top_contexts
    assert [c.pos for c in ctxs] == [0, 6, 11]  # n_top = 3, largest first
    # pos 0 starts sequence 0: nothing before it
    assert (ctxs[0].tokens, ctxs[0].center, ctxs[0].acts) == ([0, 1, 2], 0, [5.0, 0.0, 0.0])
    # pos 6 starts sequence 1: the window does not reach back into sequence 0 (pos 4, 5)
    assert (ctxs[1].tokens, ctxs[1].center, ctxs[1].acts) == ([2, 2, 3], 0, [4.0, 0.0, 0.0])
    # pos 11 ends the stream: two tokens before, none after
    assert (ctxs[2].tokens, ctxs[2].center, ctxs[2].acts) == ([1, 0, 0], 2, [0.0, 0.0, 3.0])
    assert ctxs[2].act == 3.0
    # a unit active on fewer positions than n_top shows only those; a dead unit none
    assert [c.pos for c in family.units[1].top_contexts] == [1, 5, 9]
    assert family.units[2].top_contexts == []


def test_interior_context_window():
    cfg = ExtractConfig(n_top=1, ctx_before=2, ctx_after=2)
    acts = torch.zeros(12, 1)
    acts[3, 0] = 1.0
    (ctx,) = extract_family(TOKENS, 5, FamilyActs(name="f", acts=acts), cfg).units[0].top_contexts
    assert (ctx.tokens, ctx.center, ctx.acts) == ([1, 2, 3, 0, 1], 2, [0.0, 0.0, 1.0, 0.0, 0.0])
    # an asymmetric window
    cfg = ExtractConfig(n_top=1, ctx_before=3, ctx_after=0)
    (ctx,) = extract_family(TOKENS, 5, FamilyActs(name="f", acts=acts), cfg).units[0].top_contexts
    assert (ctx.tokens, ctx.center) == ([0, 1, 2, 3], 3)


def test_proxy_scores(family):
    u0, u1, u2 = family.units
    # unit 0, top 4 positions 0, 6, 11, 3: current tokens a, c, a, d -> a in 2 of 4;
    # bigrams (start, a), (start, c), (a, a), (c, d) all differ -> 1 of 4
    assert (u0.top_token_frac, u0.top_bigram_frac) == (0.5, 0.25)
    # entropy of {a: 2, c: 1, d: 1} = 0.5 * 1 + 2 * 0.25 * 2 = 1.5 bits
    assert u0.token_entropy == 1.5
    assert u0.top_tokens[0] == (0, 0.5) and sorted(u0.top_tokens[1:]) == [(2, 0.25), (3, 0.25)]
    # unit 1: always b; bigram (a, b) twice, (d, b) once
    assert (u1.top_token_frac, u1.top_bigram_frac, u1.token_entropy) == (1.0, round(2 / 3, 4), 0.0)
    assert u1.top_tokens == [(1, 1.0)]
    assert (u2.top_token_frac, u2.top_bigram_frac, u2.token_entropy, u2.top_tokens) == (None, None, None, [])


def test_proxy_uses_only_the_top_n_proxy_positions():
    acts = torch.zeros(12, 1)
    acts[[0, 4, 11], 0] = torch.tensor([3.0, 2.0, 1.0])  # token a at 0, 4, 11
    acts[[2, 6], 0] = torch.tensor([0.5, 0.4])  # token c twice, weaker
    cfg = ExtractConfig(n_proxy=3)
    unit = extract_family(TOKENS, 5, FamilyActs(name="f", acts=acts), cfg).units[0]
    assert unit.top_token_frac == 1.0  # the top 3 are all a
    assert unit.token_entropy == round(-(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4)), 4)  # all five


def test_threshold():
    fam = extract_family(TOKENS, 5, FamilyActs(name="f", acts=_acts(), threshold=1.5), CFG)
    u0 = fam.units[0]
    assert (u0.n_active, u0.density, u0.mean_act) == (3, 0.25, 4.0)
    assert [c.pos for c in u0.top_contexts] == [0, 6, 11]
    assert fam.units[1].n_active == 1 and fam.threshold == 1.5


def test_activation_histogram():
    acts = torch.zeros(12, 1)
    acts[[0, 1, 2, 3], 0] = torch.tensor([0.5, 1.0, 1.0, 2.0])
    unit = extract_family(TOKENS, 5, FamilyActs(name="f", acts=acts), CFG).units[0]
    # 4 bins from the threshold 0 to the max 2: [0, .5) [.5, 1) [1, 1.5) [1.5, 2]
    assert unit.act_hist.edges == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert unit.act_hist.counts == [0, 1, 2, 1]
    log_unit = extract_family(
        TOKENS, 5, FamilyActs(name="f", acts=acts), ExtractConfig(n_hist_bins=2, log_hist=True)
    ).units[0]
    # log-spaced from 0.5 to 2: edges 0.5, 1, 2; 1.0 falls in the upper bin
    assert log_unit.act_hist.log and log_unit.act_hist.edges == [0.5, 1.0, 2.0]
    assert log_unit.act_hist.counts == [1, 3]


def test_quantile_groups_cover_their_intervals_and_are_deterministic():
    n = 1000
    tokens = torch.arange(n) % 5
    acts = torch.zeros(n, 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    acts[perm, 0] = torch.arange(1, n + 1, dtype=torch.float32) / n  # 0.001 ... 1.0, scattered
    cfg = ExtractConfig(quantiles=(0.0, 0.5, 0.9, 1.0), n_per_quantile=3, seed=7)
    unit = extract_family(tokens, 5, FamilyActs(name="f", acts=acts), cfg).units[0]
    groups = unit.quantile_groups
    assert [(g.q_lo, g.q_hi, g.n) for g in groups] == [(0.0, 0.5, 500), (0.5, 0.9, 400), (0.9, 1.0, 100)]
    assert [(g.act_lo, g.act_hi) for g in groups] == [(0.001, 0.5), (0.501, 0.9), (0.901, 1.0)]
    for g in groups:
        ex = [e.act for e in g.examples]
        assert len(ex) == 3 and len({e.pos for e in g.examples}) == 3
        assert all(g.act_lo <= a <= g.act_hi for a in ex) and ex == sorted(ex, reverse=True)
        for e in g.examples:
            assert e.act == round(float(acts[e.pos, 0]), 4)
    again = extract_family(tokens, 5, FamilyActs(name="f", acts=acts), cfg).units[0].quantile_groups
    assert again == groups
    other = extract_family(
        tokens, 5, FamilyActs(name="f", acts=acts), ExtractConfig(quantiles=cfg.quantiles, n_per_quantile=3, seed=8)
    )
    assert [e.pos for g in other.units[0].quantile_groups for e in g.examples] != [
        e.pos for g in groups for e in g.examples
    ]


def test_quantile_groups_of_a_rare_unit(family):
    # unit 1 has 3 active positions; intervals [0, .5) -> rank 0 (act .5), [.5, 1] -> ranks 1, 2
    g0, g1 = family.units[1].quantile_groups
    assert (g0.n, g0.act_lo, g0.act_hi, [e.pos for e in g0.examples]) == (1, 0.5, 0.5, [9])
    assert (g1.n, g1.act_lo, g1.act_hi, len(g1.examples)) == (2, 1.0, 2.0, 1)
    assert family.units[2].quantile_groups == []


def test_blocking_does_not_change_the_result():
    acts = torch.relu(torch.randn(12, 7))
    fam = FamilyActs(name="f", acts=acts, logit_effects=torch.randn(7, 5))
    whole = extract_family(TOKENS, 5, fam, ExtractConfig())
    blocked = extract_family(TOKENS, 5, fam, ExtractConfig(block_elems=24))  # two units per block
    assert whole == blocked
    # [S, T, U] activations are the same as [S * T, U]
    shaped = extract_family(
        TOKENS, 5, FamilyActs(name="f", acts=acts.reshape(2, 6, 7), logit_effects=fam.logit_effects)
    )
    assert shaped == whole


def test_logit_effects_ordering():
    effects = torch.tensor([[0.1, -2.0, 3.0, 0.5, -0.7], [0.0, 0.0, 0.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    cfg = ExtractConfig(n_logits=2, n_logit_bins=5)
    fam = extract_family(TOKENS, 5, FamilyActs(name="f", acts=_acts(), logit_effects=effects), cfg)
    u0 = fam.units[0]
    assert u0.logits_pos == [(2, 3.0), (3, 0.5)]
    assert u0.logits_neg == [(1, -2.0), (4, -0.7)]
    assert fam.units[2].logits_pos == [(4, 5.0), (3, 4.0)] and fam.units[2].logits_neg == [(0, 1.0), (1, 2.0)]
    # histogram over all 5 tokens, 5 bins from -2 to 3 (width 1)
    assert u0.logit_hist.edges == [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
    assert u0.logit_hist.counts == [1, 1, 2, 0, 1]
    assert extract_family(TOKENS, 5, FamilyActs(name="f", acts=_acts()), cfg).units[0].logits_pos is None


def test_alignment_helpers():
    idx, scores = top_matches(torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8], [0.7, 0.6, 1.0]]), 2, exclude_self=True)
    assert idx.tolist() == [[1, 2], [2, 0], [0, 1]]
    assert torch.allclose(scores, torch.tensor([[0.9, 0.5], [0.8, 0.3], [0.7, 0.6]]))

    table = cosine_alignment(
        "a", "b", torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, -1.0], [2.0, 0.0]]), k=2
    )
    assert table.indices.tolist() == [[2, 0], [0, 2]]
    assert torch.allclose(table.scores, torch.tensor([[1.0, 0.5**0.5], [0.5**0.5, 0.0]]))

    x = torch.randn(100, 1)
    src = torch.cat([x, torch.randn(100, 1)], 1)
    tgt = torch.cat([-x, torch.ones(100, 1), 2 * x + 1], 1)  # anti-correlated, constant, correlated
    table = correlation_alignment("s", "t", src, tgt, k=3, chunk=30)
    assert table.indices[0].tolist()[0] == 2 and table.indices[0].tolist()[2] == 0
    assert torch.allclose(table.scores[0], torch.tensor([1.0, 0.0, -1.0]), atol=1e-5)


def test_extract_browser_data_attaches_alignments_and_prompts():
    fams = [FamilyActs(name="sae", acts=_acts()), FamilyActs(name="neurons", acts=torch.relu(torch.randn(12, 2)))]
    table = AlignmentTable(
        "sae", "neurons", "decoder cosine", torch.tensor([[1], [0], [1]]), torch.tensor([[0.9], [0.5], [0.1]])
    )
    prompt = PromptActs.from_dense(
        "abca",
        [0, 1, 2, 0],
        {"sae": torch.tensor([[0.0, 2.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.2]])},
    )
    data = extract_browser_data(TOKENS, VOCAB, fams, [table], CFG, prompts=[prompt], title="t", meta={"run": "x"})
    assert (data.n_tokens, data.seq_len, data.settings["n_top"]) == (12, 6, 3)
    a = data.family("sae").units[0].aligned
    assert [(x.family, x.index, x.score, x.measure) for x in a] == [("neurons", 1, 0.9, "decoder cosine")]
    assert prompt.active["sae"] == [[(1, 2.0)], [(0, 3.0), (1, 1.0)], [], [(0, 0.5), (2, 0.2)]]
    assert data.prompts == [prompt]
    bad = AlignmentTable("sae", "neurons", "cos", torch.tensor([[5], [0], [1]]), torch.ones(3, 1))
    with pytest.raises(BrowserDataError, match="outside"):
        extract_browser_data(TOKENS, VOCAB, fams, [bad], CFG)
    with pytest.raises(BrowserDataError, match="no family 'x'"):
        extract_browser_data(TOKENS, VOCAB, fams, [AlignmentTable("x", "sae", "c", table.indices, table.scores)], CFG)


def test_json_round_trip(tmp_path):
    fams = [FamilyActs(name="sae", acts=_acts(), logit_effects=torch.randn(3, 5), kind="SAE feature", description="d")]
    prompt = PromptActs.from_dense("ab", [0, 1], {"sae": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])})
    table = cosine_alignment("sae", "sae", torch.randn(3, 4), torch.randn(3, 4), k=2)
    assert table.indices.shape == (3, 2)  # the unit itself excluded
    data = extract_browser_data(TOKENS, VOCAB, fams, [table], CFG, prompts=[prompt], meta={"run": "r", "n": 3})
    assert BrowserData.from_json(data.to_json()) == data
    for name in ("browser_data.json", "browser_data.json.gz"):
        assert BrowserData.load(data.save(tmp_path / name)) == data
    raw = data.to_json()
    raw["format_version"] = 99
    with pytest.raises(BrowserDataError, match="format_version 99"):
        BrowserData.from_json(raw)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BrowserDataError, match="not a valid browser data file"):
        BrowserData.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"acts": torch.zeros(11, 2)}, r"need \[12, U\]"),
        ({"acts": torch.full((12, 2), float("nan"))}, "not all finite"),
        ({"name": "bad name"}, "family name"),
        ({"logit_effects": torch.zeros(2, 4)}, r"need \[2, 5\]"),
    ],
)
def test_input_errors(kwargs, match):
    fam = FamilyActs(**{"name": "f", "acts": torch.zeros(12, 2), **kwargs})
    with pytest.raises(BrowserDataError, match=match):
        extract_family(TOKENS, 5, fam)


def test_token_and_config_errors():
    with pytest.raises(BrowserDataError, match="outside the vocabulary"):
        extract_family(TOKENS, 3, FamilyActs(name="f", acts=torch.zeros(12, 1)))
    with pytest.raises(BrowserDataError, match="duplicate family"):
        extract_browser_data(TOKENS, VOCAB, [FamilyActs(name="f", acts=torch.zeros(12, 1))] * 2)
    with pytest.raises(ValueError, match="quantiles"):
        ExtractConfig(quantiles=(0.0, 0.5, 0.5, 1.0))
    with pytest.raises(BrowserDataError, match="3 positions for 2 tokens"):
        PromptActs(text="ab", tokens=[0, 1], active={"f": [[], [], []]})


def test_many_units_are_fast():
    """4,096 units over 8,192 tokens (SAE-like sparsity) in seconds: no Python loop over tokens
    (4,096 x 102,400 took 10 s on one core of the dev machine)."""
    import time

    n, u = 8192, 4096
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 85, (n // 128, 128), generator=g)
    acts = torch.relu(torch.randn(n, u, generator=g) - 2.3)  # density ~1%
    t0 = time.perf_counter()
    fam = extract_family(tokens, 85, FamilyActs(name="sae", acts=acts, logit_effects=torch.randn(u, 85, generator=g)),
                         ExtractConfig(n_top=10, n_per_quantile=2))  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert len(fam.units) == u
    d = fam.units[123]
    assert d.density == round(float((acts[:, 123] > 0).float().mean()), 6)
    assert elapsed < 60, f"extract took {elapsed:.1f} s"
    np.testing.assert_allclose(d.max_act, float(acts[:, 123].max()), rtol=1e-3)
