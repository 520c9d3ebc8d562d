"""Dead-latent resampling (Bricken et al. 2023) by hand: which input a dead latent is pointed at, the
encoder scale, the reset Adam moments, live latents left alone, and the trainer's schedule."""

import pytest
import torch

from apd.baselines import (
    SAETrainConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    resample_dead_latents,
    resampling_probabilities,
    train_sae,
)

D = 4
E = torch.eye(D)


def _sae(b_dec: torch.Tensor | None = None) -> StandardSAE:
    """Latent 0 reads and writes e0 (encoder norm 2), latent 1 e1 (encoder norm 4); latent 2 reads −e0,
    so it never fires on the data below (which has no negative e0 part)."""
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=3, l1_coeff=0.0))
    with torch.no_grad():
        sae.W_enc.copy_(torch.stack([2 * E[0], 4 * E[1], -E[0]], dim=1))
        sae.W_dec.copy_(torch.stack([0.5 * E[0], 0.25 * E[1], E[2]]))
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.zeros(D) if b_dec is None else b_dec)
    return sae


def _data() -> torch.Tensor:
    """Samples the SAE reconstructs exactly (multiples of e0, e1) and one it cannot: 5·e3."""
    return torch.stack([2 * E[0], 3 * E[1], E[0] + E[1], 5 * E[3], 0.5 * E[0]])


def test_probabilities_are_the_squared_losses_normalised():
    torch.testing.assert_close(resampling_probabilities(torch.tensor([1.0, 2.0, 0.0, 1.0])),
                               torch.tensor([1, 4, 0, 1], dtype=torch.float64) / 6)  # fmt: skip
    torch.testing.assert_close(resampling_probabilities(torch.zeros(4)), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="diverged"):
        resampling_probabilities(torch.tensor([1.0, float("nan")]))


def test_a_dead_latent_is_pointed_at_the_only_input_with_a_loss():
    sae, x = _sae(), _data()
    live_before = [t.clone() for t in (sae.W_enc[:, :2], sae.W_dec[:2], sae.b_enc[:2], sae.b_dec)]
    with torch.no_grad():  # all but 5·e3 are reconstructed exactly; the dead latent never fires
        loss = (sae(x) - x).pow(2).sum(-1)
    assert loss.tolist() == [0, 0, 0, 25, 0] and (sae.encode(x)[:, 2] == 0).all()
    opt = torch.optim.Adam(sae.parameters())
    idx = resample_dead_latents(sae, opt, torch.tensor([False, False, True]), x, None, torch.Generator().manual_seed(0))
    assert idx.tolist() == [2]
    torch.testing.assert_close(sae.W_dec[2], E[3])  # the input, unit norm
    torch.testing.assert_close(sae.W_enc[:, 2], 0.2 * (2 + 4) / 2 * E[3])  # 0.2 x the live encoders' mean norm 3
    assert sae.b_enc[2] == 0
    for before, after in zip(live_before, (sae.W_enc[:, :2], sae.W_dec[:2], sae.b_enc[:2], sae.b_dec)):
        torch.testing.assert_close(after, before)  # live latents and b_dec untouched
    assert sae.encode(5 * E[3])[2] > 0  # the new latent fires on the input it was made from


def test_the_directions_are_taken_relative_to_b_dec():
    b_dec = torch.tensor([0.0, 0.0, 1.0, 1.0])
    sae = _sae(b_dec)
    x = torch.stack([b_dec, b_dec + torch.tensor([0.0, 0.0, 3.0, -4.0])])  # the first is reconstructed exactly
    resample_dead_latents(sae, torch.optim.Adam(sae.parameters()), torch.tensor([False, False, True]), x, None,
                          torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(sae.W_dec[2], torch.tensor([0.0, 0.0, 0.6, -0.8]))  # (x − b_dec) / ‖x − b_dec‖
    torch.testing.assert_close(sae.W_enc[:, 2], 0.6 * torch.tensor([0.0, 0.0, 0.6, -0.8]))  # the encoder reads x − b_dec


def test_a_transcoder_writes_the_targets_direction_and_reads_the_inputs():
    sae = StandardSAE(StandardSAEConfig(d_in=2, d_sae=2, d_out=3, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))  # latent 1 reads −e0: dead on the input below
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x, y = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 0.0, 7.0]])
    resample_dead_latents(sae, torch.optim.Adam(sae.parameters()), torch.tensor([False, True]), x, y,
                          torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(sae.W_dec[1], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(sae.W_enc[:, 1], torch.tensor([0.0, 0.2]))  # 0.2 x live norm 1, along the input


def test_adam_moments_of_the_resampled_entries_are_reset_and_no_others():
    sae, x = _sae(), _data()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    with torch.no_grad():
        for p in sae.parameters():
            p.grad = torch.ones_like(p)
    opt.step()  # every moment is now non-zero
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in sae.parameters()}
    resample_dead_latents(sae, opt, torch.tensor([False, False, True]), x, None, torch.Generator().manual_seed(0))
    for name in ("exp_avg", "exp_avg_sq"):
        assert (opt.state[sae.W_enc][name][:, 2] == 0).all() and (opt.state[sae.W_enc][name][:, :2] != 0).all()
        assert (opt.state[sae.W_dec][name][2] == 0).all() and (opt.state[sae.W_dec][name][:2] != 0).all()
        assert opt.state[sae.b_enc][name][2] == 0 and (opt.state[sae.b_enc][name][:2] != 0).all()
        torch.testing.assert_close(opt.state[sae.b_dec][name], before[id(sae.b_dec)][name])
    assert opt.state[sae.W_enc]["step"] == before[id(sae.W_enc)]["step"]


def test_nothing_dead_changes_nothing():
    sae, x = _sae(), _data()
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    idx = resample_dead_latents(sae, torch.optim.Adam(sae.parameters()), torch.zeros(3, dtype=torch.bool), x, None,
                                torch.Generator().manual_seed(0))  # fmt: skip
    assert idx.numel() == 0
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(v, state[k])


def _three_features(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """One of e0, e1, e3 per sample, magnitude U(0.5, 1.5)."""
    which = torch.randint(0, 3, (batch_size,), generator=generator)
    mags = 0.5 + torch.rand(batch_size, 1, generator=generator)
    return mags * E[[0, 1, 3]][which]


def test_training_resamples_a_dead_latent_at_the_given_step_and_it_learns_the_missing_feature():
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=3, l1_coeff=1e-3))
    with torch.no_grad():  # latents 0 and 1 are e0 and e1 already; latent 2 is dead for good: only resampling revives it
        sae.W_enc.copy_(torch.stack([E[0], E[1], E[2]], dim=1))
        sae.W_dec.copy_(torch.stack([E[0], E[1], E[2]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -100.0]))
        sae.b_dec.zero_()
    cfg = SAETrainConfig(steps=60, batch_size=64, lr=3e-3, reinitialize=False, resample_steps=[20], resample_window=640,
                         resample_sample_size=512)  # fmt: skip
    result = train_sae(sae, _three_features, cfg)
    resampled = result.metrics["n_resampled"]
    assert resampled[20] == 1 and resampled.sum() == 1  # latent 2, silent for 20 x 64 >= 640 samples
    assert float(sae.W_dec[2].detach() @ E[3]) > 0.9  # pointed at the feature nothing reconstructed
    assert result.firing_frequency[2] > 0 and result.losses["mse"][-10:].mean() < result.losses["mse"][10:20].mean()


def test_a_latent_that_fires_within_the_window_is_not_resampled():
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=3, k=3))  # every latent with a positive pre-activation fires
    cfg = SAETrainConfig(steps=10, batch_size=32, resample_steps=[5], resample_window=10_000)
    assert train_sae(sae, _three_features, cfg).metrics["n_resampled"].sum() == 0


def test_bad_resampling_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match="resample_steps"):
        SAETrainConfig(steps=10, resample_steps=[0])
    with pytest.raises(ValueError, match="resample_steps"):
        SAETrainConfig(steps=10, resample_steps=[10])
    with pytest.raises(ValueError, match="resample_window"):
        SAETrainConfig(resample_window=0)
    with pytest.raises(ValueError, match="resample_encoder_scale"):
        SAETrainConfig(resample_encoder_scale=0.0)
    assert SAETrainConfig(steps=100, resample_steps=[50, 25, 50]).resample_steps == [25, 50]
