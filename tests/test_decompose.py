"""End-to-end runs of the public API on toy targets with known ground truth."""

import pickle
import re

import pytest
import torch
from torch import nn

from apd import (APDConfig, CheckpointError, DataError, ModuleSelectionError, NonFiniteLossError, NonFiniteTargetError, decompose,
                 decompose_seeds, load_decomposition)
from apd.methods import method_for
from apd.metrics import tms_recovery
from apd.train import train_step
from apd.toy_models import TMS, TMSConfig, tms_batch, train_tms

# The paper's TMS 5-2 setting (SPEC §1.6), shortened: C = 5, batch top-k 0.211, coeffs 1 / 1 / 0.7.
TMS_CFG = dict(C=5, topk=0.211, batch_topk=True, simplicity_coeff=0.7, schatten_p=1.0, lr=3e-2, warmup_frac=0.05)


@pytest.fixture(scope="module")
def tms() -> TMS:
    torch.manual_seed(0)
    model = TMS(TMSConfig(n_features=5, n_hidden=2))
    assert train_tms(model, steps=5000, batch_size=1024, seed=0) < 0.01
    return model


def _tms_data(seed: int, batch: int = 2048):
    gen = torch.Generator().manual_seed(seed)
    return lambda: tms_batch(5, batch, 0.05, gen)


def test_tms_5_2_short_run_finds_every_direction(tms):
    """The default run's check of the recovery (the 3000-step one below is slow): after 1000 steps at
    batch 1024 every feature's column has a component at cos > 0.9 (not yet 0.99), at the configured L0."""
    dec = decompose(tms, _tms_data(1, 1024), APDConfig(**TMS_CFG, steps=1000, seed=0), modules=["enc", "dec"], progress=False)
    scores = tms_recovery(tms.W, dec.component_weights()["enc"])
    assert scores["n_recovered_0.9"] == 5 and scores["mmcs"] > 0.97 and scores["selectivity"] > 0.9, scores
    assert dec.history[-1]["l0"] == pytest.approx(0.211, abs=0.01)


@pytest.mark.slow  # 3000 steps at batch 2048: 60 s (fast check: test_tms_5_2_short_run_finds_every_direction)
def test_tms_5_2_recovers_every_mechanism_one_to_one(tms):
    dec = decompose(tms, _tms_data(1), APDConfig(**TMS_CFG, steps=3000, seed=0), modules=["enc", "dec"], progress=False)
    W = dec.component_weights()
    assert W["enc"].shape == (5, 2, 5) and W["dec"].shape == (5, 5, 2)
    torch.testing.assert_close(W["enc"].sum(0), tms.enc.weight.detach(), atol=1e-2, rtol=0)
    torch.testing.assert_close(W["dec"], W["enc"].transpose(1, 2))
    scores = tms_recovery(tms.W, W["enc"])
    assert scores["n_recovered_matched_0.99"] == 5 and scores["all_recovered"] == 1, scores
    assert scores["ml2r"] > 0.8 and scores["selectivity"] > 0.95, scores
    # the decomposition is sparse in use: ~0.211 components per input on average
    assert dec.history[-1]["l0"] == pytest.approx(0.211, abs=0.01)


@pytest.mark.slow  # 3000 steps at batch 2048: 50 s
def test_untied_sequential_recovers_the_mechanisms_in_both_layers(tms):
    """TMS's weights copied into a plain nn.Sequential with two independent nn.Linear layers (no tie
    declared): each ground-truth mechanism must come out as one component spanning both layers."""
    seq = nn.Sequential(nn.Linear(5, 2, bias=False), nn.Linear(2, 5), nn.ReLU())
    with torch.no_grad():
        seq[0].weight.copy_(tms.enc.weight)
        seq[1].weight.copy_(tms.enc.weight.T)
        seq[1].bias.copy_(tms.dec.bias)
    cfg = APDConfig(**{**TMS_CFG, "init_scale": 0.1}, steps=3000, seed=0)
    dec = decompose(seq, _tms_data(1), cfg, modules=["0", "1"], progress=False)
    assert dec.tied == {}
    W = dec.component_weights()
    assert W["0"].shape == (5, 2, 5) and W["1"].shape == (5, 5, 2)
    first = tms_recovery(seq[0].weight, W["0"])
    second = tms_recovery(seq[1].weight.T, W["1"].transpose(1, 2))
    assert first["all_recovered"] == 1 and second["all_recovered"] == 1, (first, second)
    # the same component carries feature j in both layers
    owner0 = torch.stack([W["0"][:, :, j].norm(dim=1).argmax() for j in range(5)])
    owner1 = torch.stack([W["1"][:, j, :].norm(dim=1).argmax() for j in range(5)])
    assert torch.equal(owner0, owner1) and len(set(owner0.tolist())) == 5


def _small_cfg(**kw):
    return APDConfig(**{**TMS_CFG, "steps": 40, "log_every": 5, **kw})


@pytest.mark.parametrize("iterable", [False, True])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tms, tmp_path, iterable):
    def data():
        if iterable:  # a list of 7 batches, re-iterated: resuming must skip the consumed ones
            gen = torch.Generator().manual_seed(5)
            return [tms_batch(5, 256, 0.05, gen) for _ in range(7)]
        return lambda: tms_batch(5, 256, 0.05)  # draws from the global RNG, restored on resume

    cfg = _small_cfg(checkpoint_every=10)
    full = decompose(tms, data(), cfg, modules=["enc", "dec"], progress=False)

    def crash(step, terms):
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decompose(tms, data(), cfg, ["enc", "dec"], progress=False, checkpoint_dir=tmp_path, callback=crash)
    assert load_decomposition(tmp_path).step == 20  # the last checkpoint stays readable
    resumed = decompose(tms, data(), cfg, ["enc", "dec"], progress=False, checkpoint_dir=tmp_path)
    assert resumed.step == 40
    assert torch.equal(resumed.A["enc"], full.A["enc"]) and torch.equal(resumed.B["enc"], full.B["enc"])
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    # a finished run is not redone; a different config in the same dir is refused
    again = decompose(tms, data(), cfg, ["enc", "dec"], progress=False, checkpoint_dir=tmp_path)
    assert torch.equal(again.A["enc"], full.A["enc"])
    with pytest.raises(CheckpointError, match="different config"):
        decompose(tms, data(), _small_cfg(checkpoint_every=10, lr=1e-3), ["enc", "dec"], progress=False, checkpoint_dir=tmp_path)


def test_non_finite_loss_stops_with_step_and_terms_and_keeps_checkpoint(tms, tmp_path):
    calls = {"n": 0}

    def data():
        calls["n"] += 1
        x = tms_batch(5, 256, 0.05)
        return x * float("nan") if calls["n"] == 18 else x

    with pytest.raises(NonFiniteLossError, match=r"step 17: minimality \(.*minimality=nan.*the input batch of step 17 contains NaN"):
        decompose(tms, data, _small_cfg(checkpoint_every=10), ["enc", "dec"], progress=False, checkpoint_dir=tmp_path)
    dec = load_decomposition(tmp_path)
    assert dec.step == 10 and torch.isfinite(dec.A["enc"]).all()


def test_a_nan_in_the_targets_weights_is_named_before_training(tms):
    # bug (f): a NaN in the model's weights was reported, after a step's loss, as "lower lr, set
    # grad_clip_norm": a broken target is named (the parameter) once, before anything is trained
    broken = pickle.loads(pickle.dumps(tms))
    with torch.no_grad():
        broken.dec.bias[3] = float("nan")  # not even a decomposed matrix: the outputs are NaN anyway
    with pytest.raises(NonFiniteTargetError, match=r"parameter 'dec.bias' holds NaN/inf \(1 of its 5 values\) before training"):
        decompose(broken, _tms_data(0), _small_cfg(), ["enc", "dec"], progress=False)
    with torch.no_grad():
        broken.dec.bias[3] = 0.0
        broken.enc.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteTargetError, match=r"parameter 'enc.weight' holds NaN/inf") as e:
        decompose_seeds(broken, _tms_data(0), _small_cfg(), ["enc", "dec"], seeds=[0, 1], progress=False)
    assert "lower lr" not in str(e.value)


def test_a_loss_that_becomes_non_finite_during_training_names_the_term_and_keeps_the_checkpoint(tms, tmp_path):
    # bug (f): with finite inputs, weights and components the lr / clipping advice is the right one,
    # and the message names the term that went non-finite; the checkpoint before it stays readable
    calls = {"n": 0}

    def data():  # finite, but so large at the 15th batch that the squared errors overflow
        calls["n"] += 1
        x = tms_batch(5, 256, 0.05)
        return x * 1e30 if calls["n"] == 15 else x

    with pytest.raises(NonFiniteLossError) as e:
        decompose(tms, data, _small_cfg(checkpoint_every=10), ["enc", "dec"], progress=False, checkpoint_dir=tmp_path)
    msg = str(e.value)
    assert msg.startswith("non-finite loss at step 14: minimality (total=inf, faithfulness=") and "minimality=inf" in msg
    assert "the loss overflowed during training" in msg and re.search(r"largest \|input\| \d\.\d+e\+(29|30)", msg) and "contains NaN" not in msg
    dec = load_decomposition(tmp_path)
    assert dec.step == 10 and torch.isfinite(dec.A["enc"]).all()
    # lr 1e30: the components stay finite after step 0 but so large that step 1's loss overflows
    with pytest.raises(NonFiniteLossError, match=r"at step 1: .*the loss overflowed during training.*lower lr"):
        decompose(tms, _tms_data(0), _small_cfg(lr=1e30, warmup_frac=0.0), ["enc", "dec"], progress=False)
    # a NaN left in the components (e.g. by a NaN gradient) is named
    cfg = _small_cfg()
    cm = method_for(cfg).build(tms, ["enc", "dec"])
    params = cm.trainable_parameters()
    with torch.no_grad():
        params["model.enc.A"][0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"at step 3: .*training diverged: an earlier update left NaN/inf in \['enc.A'\]"):
        train_step(cm, torch.optim.Adam(params.values()), tms_batch(5, 64, 0.05), cfg, 3)


def test_bad_inputs_get_clear_errors(tms):
    cfg = _small_cfg()
    with pytest.raises(DataError, match="yielded no batch"):
        decompose(tms, [], cfg, ["enc", "dec"], progress=False)
    with pytest.raises(DataError, match=r"cannot run on a batch of shape \(8, 3\)"):
        decompose(tms, [torch.rand(8, 3)], cfg, ["enc", "dec"], progress=False)
    with pytest.raises(DataError, match="same per-sample shape"):
        decompose(tms, [torch.rand(8, 5), torch.rand(8, 6)], cfg, ["enc", "dec"], progress=False)
    with pytest.raises(DataError, match="not a tensor"):
        decompose(tms, ["abc"], cfg, ["enc", "dec"], progress=False)
    with pytest.raises(ModuleSelectionError, match=r"'encoder'.*\['enc', 'dec'\]"):
        decompose(tms, [torch.rand(8, 5)], cfg, ["encoder"], progress=False)


def test_save_load_round_trip_and_attach(tms, tmp_path):
    dec = decompose(tms, _tms_data(2, 256), _small_cfg(), ["enc", "dec"], progress=False)
    path = dec.save(tmp_path)
    assert path.name == "decomposition.pt"
    loaded = load_decomposition(tmp_path)
    assert loaded.config == dec.config and loaded.tied == {"dec": "enc"} and loaded.step == 40
    assert torch.equal(loaded.A["enc"], dec.A["enc"]) and loaded.history == dec.history
    cm = loaded.attach(tms)
    x, s = tms_batch(5, 64, 0.5), (torch.rand(64, 5) > 0.5).float()
    torch.testing.assert_close(cm(x, masks=s), dec.component_model(x, masks=s))
    other = TMS(TMSConfig())
    with pytest.raises(ValueError, match="differs"):
        loaded.attach(other)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_and_corrupt_files_are_refused(tmp_path):
    evil = tmp_path / "decomposition.pt"
    torch.save({"format": "apd-decomposition/1", "x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_decomposition(evil)
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_decomposition(bad)
    with pytest.raises(CheckpointError, match="no decomposition.pt"):
        load_decomposition(tmp_path / "empty_dir_that_exists" if (tmp_path / "e").mkdir() else tmp_path / "e")
    assert pickle  # (pickle is what torch.save uses for _Evil)


@pytest.mark.parametrize(
    "extra",
    [
        dict(attribution="ablation"),
        dict(attribution="activation"),
        dict(rank=1, unit_norm_A=True, grad_clip_norm=0.1, optimizer="adamw", lr_schedule="cosine"),
        dict(optimizer="radam", lr_schedule="linear"),
        dict(topk=None, lp_sparsity_coeff=0.1, lp_sparsity_p=0.9),
        dict(topk=1, batch_topk=False, act_recon_coeff=1.0, act_recon_modules=["enc"]),
    ],
)
def test_every_option_trains_and_lowers_the_loss(tms, extra):
    logged = []
    cfg = _small_cfg(**{"steps": 60, "lr": 1e-2, **extra})
    dec = decompose(tms, _tms_data(3, 512), cfg, ["enc", "dec"], progress=False, callback=lambda s, t: logged.append(t))
    assert [t["step"] for t in logged] == list(range(0, 60, 5)) + [59]
    assert logged[-1]["total"] < logged[0]["total"]
    if extra.get("unit_norm_A"):
        torch.testing.assert_close(dec.A["enc"].norm(dim=-1), torch.ones(5, 1))
    if extra.get("lp_sparsity_coeff"):
        assert "lp_sparsity" in logged[-1] and logged[-1]["l0"] == 5
    if extra.get("act_recon_coeff"):
        assert "act_recon" in logged[-1] and logged[-1]["l0"] == 1


def test_kl_minimality_for_classifier_outputs():
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))  # logits
    gen = torch.Generator().manual_seed(0)
    cfg = APDConfig(C=4, topk=2, batch_topk=False, output_loss="kl", lr=1e-2, steps=80, log_every=79)
    logged = []
    decompose(model, lambda: torch.randn(64, 6, generator=gen), cfg, ["0", "2"], progress=False, callback=lambda s, t: logged.append(t))
    assert logged[-1]["minimality"] < logged[0]["minimality"] and logged[-1]["faithfulness"] < logged[0]["faithfulness"]


def test_declared_tie_survives_save_load_attach(tmp_path):
    model = nn.Sequential(nn.Linear(5, 2, bias=False), nn.Linear(2, 5))
    with torch.no_grad():
        model[1].weight.copy_(model[0].weight.T)
    gen = torch.Generator().manual_seed(0)
    dec = decompose(model, lambda: torch.rand(64, 5, generator=gen), _small_cfg(steps=5), ["0", "1"], tied={"1": "0"}, progress=False)
    assert dec.tied == {"1": "0"} and list(dec.A) == ["0"]
    cm = load_decomposition(dec.save(tmp_path)).attach(model)
    x, s = torch.rand(8, 5), torch.ones(8, 5)
    torch.testing.assert_close(cm(x, masks=s), dec.component_model(x, masks=s))
