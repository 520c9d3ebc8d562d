"""The Method interface owns each method's parts: its losses, CI state, units, vectorisation rule
and report lines; nothing outside ``apd/methods`` branches on a method's name."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from apd import APDConfig, ConfigError, SPDConfig, load_decomposition
from apd.attributions import compute_attributions
from apd.config import GradientMode
from apd.losses import LOSSES, losses_for
from apd.methods import METHODS, MLPUnits, Units, method_class, method_for
from apd.methods.spd import CI_FNS, CIFunctions, CompileCI, ci_functions
from apd.topk import topk_mask

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


# ------------------------------------------------------------------------------- CI state and files


def test_a_decomposition_file_written_before_the_ci_functions_moved_still_loads():
    """tests/data/spd_v2_*.pt were written by the code in which ComponentModel held ``ci_fns``
    (commit 7035912): the same tensor names load, and give the causal importances and masked
    outputs that code computed."""
    model = _mlp()
    model.load_state_dict(torch.load(DATA / "spd_v2_target.pt", weights_only=True))
    expected = torch.load(DATA / "spd_v2_expected.pt", weights_only=True)
    dec = load_decomposition(DATA / "spd_v2_decomposition.pt")
    assert dec.method == "spd" and any(n.startswith(f"{CI_FNS}.0.") for n in dec.params)
    ci = dec.causal_importances(expected["x"], model)
    assert set(ci) == {"0", "2"}
    for n, g in ci.items():
        torch.testing.assert_close(g, expected["ci"][n])
    cm = dec.attach(model)
    assert isinstance(ci_functions(cm), CIFunctions)
    torch.testing.assert_close(cm(expected["x"], masks=ci), expected["masked_out"])


def test_a_method_module_is_trained_saved_and_named_by_its_slot():
    cm = method_for(APDConfig(C=2)).build(_mlp(), ["0", "2"])
    assert cm.method_module("extra") is None and list(cm.trainable_parameters()) == [
        "model.0.A", "model.0.B", "model.2.A", "model.2.B"]  # fmt: skip
    extra = nn.Linear(3, 2)
    cm.set_method_module("extra", extra)
    params = cm.trainable_parameters()
    assert list(params)[4:] == ["extra.weight", "extra.bias"] and params["extra.weight"] is extra.weight
    assert cm.method_module("extra") is extra and dict(cm.named_parameters())["extra.bias"] is extra.bias
    for bad in ("model", "layers", "not a name"):
        with pytest.raises(ValueError, match="cannot be called"):
            cm.set_method_module(bad, nn.Linear(1, 1))


def test_spd_keeps_its_ci_functions_in_its_own_slot():
    cm = method_for(SPDConfig(C=3)).build(_mlp(), ["0", "2"])
    fns = ci_functions(cm)
    assert cm.method_module_names == [CI_FNS] and fns.fn("2") is fns[1]
    assert {n for n in cm.trainable_parameters() if not n.startswith("model.")} == {f"{CI_FNS}.{k}" for k, _ in fns.named_parameters()}


# ------------------------------------------------------------------------------- losses


def test_each_method_sums_the_losses_it_declares_and_every_loss_has_a_method():
    for cls in METHODS.values():
        method = cls(cls.config_class())
        on = [n for n in cls.loss_names if method.config.coefficient(n) > 0]
        assert sorted(loss.name for loss in method.losses) == sorted(on)
    assert set(LOSSES) == {n for cls in METHODS.values() for n in cls.loss_names}
    assert [loss.name for loss in losses_for(["minimality", "faithfulness"], APDConfig())] == ["faithfulness", "minimality"]
    with pytest.raises(ValueError, match="no loss is registered under \\['nope'\\]"):
        losses_for(["nope"], APDConfig())
    with pytest.raises(TypeError, match="has no field minimality_coeff"):
        losses_for(["minimality"], SPDConfig())


# ------------------------------------------------------------------------------- vectorisation


def test_the_vectorisation_rule_of_each_method():
    apd = method_for(APDConfig(C=2)).vectorised()
    assert apd.config.gradient_mode is GradientMode.hidden  # None: hidden inside vmap
    jac = method_for(APDConfig(C=2, gradient_mode="jacrev"))
    assert jac.vectorised() is jac
    with pytest.raises(ConfigError, match="per_sample' cannot run inside the seeds' vmap"):
        method_for(APDConfig(C=2, gradient_mode="per_sample")).vectorised()
    spd = method_for(SPDConfig(C=2, compile_ci=True))
    assert spd.vectorised().config.compile_ci is CompileCI.off and spd.config.compile_ci is CompileCI.on  # a copy (True reads as on)
    for cls in (APDConfig, SPDConfig):
        with pytest.raises(ConfigError, match="compile=True applies to single-seed runs"):
            method_for(cls(compile=True)).vectorised()


# ------------------------------------------------------------------------------- units and scores


def test_unit_scores_are_what_the_evaluation_masks_select_from():
    model, x = _mlp(), torch.randn(7, 5)
    apd = method_for(APDConfig(C=4, topk=2, batch_topk=False, attribution="activation"))
    cm = apd.build(model, ["0", "2"])
    scores = apd.unit_scores(cm, x)
    torch.testing.assert_close(scores, compute_attributions(cm, x, "activation"))
    assert torch.equal(apd.eval_masks(cm, x), topk_mask(scores, 2, False))
    spd = method_for(SPDConfig(C=3))
    cm = spd.build(model, ["0", "2"])
    for n, g in spd.unit_scores(cm, x).items():
        torch.testing.assert_close(g, spd.eval_masks(cm, x)[n])


def _hand_weights() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Two one-neuron layers on an identity embedding (NC_c(i) = P_c^out[i] · P_c^in[i]), two units per matrix."""
    w = {"l0.in": torch.tensor([[[1.0, 2.0]], [[0.0, 1.0]]]), "l0.out": torch.tensor([[[3.0], [4.0]], [[1.0], [0.0]]]),
         "l1.in": torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]]), "l1.out": torch.tensor([[[1.0], [5.0]], [[2.0], [2.0]]])}  # fmt: skip
    return torch.eye(2), w, [("l0.in", "l0.out"), ("l1.in", "l1.out")]


def test_apd_units_of_a_residual_mlp_are_its_components_across_layers():
    W_E, w, pairs = _hand_weights()
    units = method_for(APDConfig(C=2)).mlp_units(W_E, w, pairs)
    assert isinstance(units, MLPUnits) and units.layer is None
    # component 0: layer 0 (3·1, 4·2), layer 1 (1·2, 5·0); component 1: (1·0, 0·1), (2·1, 2·1); [c, feature, neuron]
    expected = torch.tensor([[[3.0, 2.0], [8.0, 0.0]], [[0.0, 2.0], [0.0, 2.0]]])
    torch.testing.assert_close(units.nc, expected)
    assert units.out_maps["l0.in"] is w["l0.out"] and units.out_maps["l1.in"] is w["l1.out"]


def test_spd_units_of_a_residual_mlp_are_the_w_in_subcomponents_through_the_whole_w_out():
    W_E, w, pairs = _hand_weights()
    units = method_for(SPDConfig(C=2)).mlp_units(W_E, w, pairs)
    # W_out summed: layer 0 [4, 4], layer 1 [3, 7]; units (l0, 0), (l0, 1), (l1, 0), (l1, 1)
    expected = torch.tensor([[[4.0, 0.0], [8.0, 0.0]], [[0.0, 0.0], [4.0, 0.0]],
                             [[0.0, 6.0], [0.0, 0.0]], [[0.0, 3.0], [0.0, 7.0]]])  # fmt: skip
    torch.testing.assert_close(units.nc, expected)
    assert units.layer.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(units.out_maps["l1.in"], torch.tensor([[[3.0], [7.0]], [[3.0], [7.0]]]))


def test_units_and_report_lines_come_from_the_method():
    assert method_class("apd").units is Units.shared and method_class("spd").units is Units.per_matrix
    assert method_for(APDConfig()).units_span_matrices and not method_for(SPDConfig()).units_span_matrices
    assert (method_class("apd").unit_noun, method_class("spd").unit_noun) == ("component", "subcomponent")
    assert method_for(APDConfig(C=6, topk=2.0, steps=10)).settings_note({"a": 6}) == (
        "C=6, rank=full, batch top-k=2.0, 10 steps, coefficients faithfulness/minimality/simplicity 1/1/1")
    assert method_for(SPDConfig(steps=7)).settings_note({"a": 3, "b": 2}) == "components per matrix {'a': 3, 'b': 2}, 7 steps"
    assert method_for(SPDConfig(C=5, ci_hidden=[8])).key_settings_text() == (
        "C=5, ci_fn=mlp, ci_hidden=[8], importance_minimality_coeff=0.001, pnorm=1.0, pnorm_final=None, faithfulness_coeff=1000.0, lr=0.001")
    with pytest.raises(ConfigError, match="method 'nmf' is not known"):
        method_class("nmf")


# ------------------------------------------------------------------------------- no name dispatch


def _name_dispatch(path: Path, names: set[str]) -> list[str]:
    """Comparisons (==, !=, in) of anything with a method's name in ``path``."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                consts = [side] if isinstance(side, ast.Constant) else list(getattr(side, "elts", []))
                if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return hits


def test_no_code_outside_the_methods_branches_on_a_method_name():
    files = [p for p in [*(ROOT / "apd").rglob("*.py"), *(ROOT / "experiments").rglob("*.py")]
             if "methods" not in p.relative_to(ROOT).parts and "browser" not in p.parts and p.name != "browse.py"]  # fmt: skip
    assert len(files) > 50
    assert [h for p in files for h in _name_dispatch(p, set(METHODS))] == []
