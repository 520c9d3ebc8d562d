"""train_sae: initialisation, schedules, dead-latent tracking, determinism, and recovery on toy data."""

import pytest
import torch

from apd.baselines import (
    BatchTopKSAE,
    BatchTopKSAEConfig,
    DeadLatentTracker,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    SAETrainConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    geometric_median,
    sae_lr_at_step,
    train_sae,
)
from apd.metrics.sae import evaluate_sae

N_FEATURES, D = 6, 8
P_ACTIVE = 0.1


def _truth() -> torch.Tensor:
    """6 orthonormal ground-truth directions in 8 dims (rows)."""
    g = torch.Generator().manual_seed(0)
    return torch.linalg.qr(torch.randn(D, D, generator=g))[0][:, :N_FEATURES].T.contiguous()


def _sparse_data(truth: torch.Tensor):
    def draw(batch_size: int, gen: torch.Generator) -> torch.Tensor:
        mask = torch.rand(batch_size, N_FEATURES, generator=gen) < P_ACTIVE
        return (mask * torch.rand(batch_size, N_FEATURES, generator=gen)) @ truth

    return draw


def test_dead_latent_tracker_counts_a_hand_made_sequence():
    tracker = DeadLatentTracker(d_sae=3, dead_tokens_threshold=4)
    # batch 1 (3 samples): latent 0 fires on sample 0, latent 1 on sample 2, latent 2 never
    tracker.update(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.7, 0.0]]))
    assert tracker.tokens_since_fired.tolist() == [2, 0, 3]
    assert tracker.steps_since_fired.tolist() == [0, 0, 1]
    assert tracker.dead.tolist() == [False, False, False]
    # batch 2 (2 samples): latent 1 fires on sample 0 only
    tracker.update(torch.tensor([[0.0, 0.2, 0.0], [0.0, 0.0, 0.0]]))
    assert tracker.tokens_since_fired.tolist() == [4, 1, 5]
    assert tracker.steps_since_fired.tolist() == [1, 0, 2]
    assert tracker.dead.tolist() == [True, False, True]
    assert tracker.fire_count.tolist() == [1, 2, 0]
    assert torch.allclose(tracker.firing_frequency, torch.tensor([0.2, 0.4, 0.0]))
    # firing again revives a latent
    tracker.update(torch.tensor([[0.0, 0.0, 3.0]]))
    assert tracker.dead.tolist() == [True, False, False]


def test_geometric_median_resists_an_outlier():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    median = geometric_median(points)
    # by symmetry it lies on the diagonal (x, x); zero derivative there gives 6x² − 6x + 1 = 0
    x = 0.5 + 3**0.5 / 6
    assert torch.allclose(median, torch.tensor([x, x]), atol=1e-4)
    assert points.mean(0)[0] > 20  # the mean is dragged away


def test_b_dec_initialised_from_data():
    data = torch.randn(512, 4) + torch.tensor([3.0, -2.0, 0.0, 1.0])
    sae = TopKSAE(TopKSAEConfig(d_in=4, d_sae=6, k=1))
    train_sae(sae, data, steps=1, batch_size=32, lr=1e-12, b_dec_init="mean", init_sample_size=512)
    assert torch.allclose(sae.b_dec, data.mean(0), atol=1e-4)
    train_sae(sae, data, steps=1, batch_size=32, lr=1e-12, b_dec_init="geometric_median", init_sample_size=512)
    assert torch.allclose(sae.b_dec, geometric_median(data), atol=1e-4)


def test_lr_warmup_and_schedules():
    cfg = SAETrainConfig(steps=10, lr=1.0, warmup_steps=4, lr_schedule="constant")
    assert [sae_lr_at_step(cfg, s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = SAETrainConfig(steps=10, lr=1.0, warmup_steps=0, lr_schedule="cosine")
    assert sae_lr_at_step(cos, 0) == pytest.approx(1.0) and sae_lr_at_step(cos, 5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule='step' is not known"):
        SAETrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="batch_size=0"):
        SAETrainConfig(batch_size=0)


def test_training_is_deterministic_given_seed():
    data = _sparse_data(_truth())

    def run(seed: int, init_seed: int) -> torch.Tensor:
        sae = BatchTopKSAE(BatchTopKSAEConfig(d_in=D, d_sae=8, k=1.0), generator=torch.Generator().manual_seed(init_seed))
        result = train_sae(sae, data, steps=20, batch_size=64, lr=1e-2, seed=seed)
        assert set(result.losses) == {"loss", "mse", "aux"} and result.losses["mse"].shape == (20,)
        return torch.cat([p.detach().flatten() for p in sae.parameters()] + [sae.threshold.flatten()])

    assert torch.equal(run(0, init_seed=1), run(0, init_seed=2))  # reinitialised from the seed
    assert not torch.equal(run(0, init_seed=1), run(1, init_seed=1))


def test_tensor_dataset_and_history():
    data = _sparse_data(_truth())(512, torch.Generator().manual_seed(3))
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=8, l1_coeff=0.01))
    result = train_sae(sae, data, SAETrainConfig(steps=30, batch_size=64, lr=1e-2, sparsity_warmup_steps=10))
    assert set(result.losses) == {"loss", "mse", "l1"}
    assert set(result.metrics) == {"l0", "n_dead", "lr", "n_resampled"}
    assert result.metrics["n_resampled"].sum() == 0  # resampling is off by default
    assert torch.allclose(result.losses["loss"], result.losses["mse"] + result.losses["l1"])
    assert result.losses["mse"][-5:].mean() < result.losses["mse"][:5].mean()
    assert result.firing_frequency.shape == (8,) and result.dead_latents.dtype == torch.bool
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train_sae(sae, data[:10], steps=1, batch_size=64)
    with pytest.raises(ValueError, match="d_in=8"):
        train_sae(sae, data[:, :5], steps=1, batch_size=64)


@pytest.mark.parametrize(
    ("make", "steps"),
    [
        (lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=8, k=2)), 500),
        (lambda: BatchTopKSAE(BatchTopKSAEConfig(d_in=D, d_sae=8, k=N_FEATURES * P_ACTIVE)), 500),
        # JumpReLU needs thresholds, bandwidth and L0 weight on the data's scale, and more steps
        (
            lambda: JumpReLUSAE(
                JumpReLUSAEConfig(d_in=D, d_sae=8, l0_coeff=0.03, threshold_init=0.1, bandwidth=0.1, decoder_init_norm=1.0)
            ),
            1000,
        ),
    ],
    ids=["topk", "batchtopk", "jumprelu"],
)
def test_short_run_recovers_a_known_sparse_dictionary(make, steps):
    truth = _truth()
    data = _sparse_data(truth)
    sae = make()
    train_sae(sae, data, steps=steps, batch_size=256, lr=1e-2, warmup_steps=20, seed=0, dead_tokens_threshold=2000)
    x = data(4096, torch.Generator().manual_seed(99))
    ev = evaluate_sae(sae, x, truth=truth)  # eval mode: BatchTopK uses its learned threshold
    assert ev.fvu < 0.05
    assert ev.recovery is not None and ev.shrinkage is not None
    assert ev.recovery.matched_cos.min() >= 0.95  # every feature has its own latent
    assert ev.recovery.n_recovered_matched[0.9] == N_FEATURES
    assert ev.l0 <= 2.0 + 1e-6


def _grad_norm(sae) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in sae.parameters() if p.grad is not None])).item()


def test_gradients_are_clipped_together_before_every_optimiser_step():
    huge = torch.randn(256, 4, generator=torch.Generator().manual_seed(0)) * 1e3
    clipped, free = (StandardSAE(StandardSAEConfig(d_in=4, d_sae=6)) for _ in range(2))
    train_sae(clipped, huge, steps=2, batch_size=64)  # default grad_clip_norm = 1.0
    train_sae(free, huge, steps=2, batch_size=64, grad_clip_norm=None)
    # the gradients the last optimiser step used stay on the parameters until the next zero_grad
    assert _grad_norm(clipped) == pytest.approx(1.0, rel=1e-4)
    assert _grad_norm(free) > 1e3
    with pytest.raises(ValueError, match="grad_clip_norm"):
        SAETrainConfig(grad_clip_norm=0.0)


def test_one_huge_gradient_batch_moves_the_weights_by_about_lr_only_with_clipping():
    """Adam divides by the running RMS of the gradients: after t − 1 steps of ordinary gradients, one
    batch whose gradient is ~10⁸ times larger moves a weight by lr·√((1 − β2^t) / (1 − β2)), 13.5 lr at
    t = 201 (β1 = 0: no momentum to soften it). Clipped to norm 1 like the ordinary ones, about 3 lr."""
    n = 200

    def data(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        data.calls += 1
        x = torch.randn(batch_size, 4, generator=generator)
        return x * 1e4 if data.calls > n else x

    def largest_change(clip: float | None) -> float:
        before, after = (StandardSAE(StandardSAEConfig(d_in=4, d_sae=6, l1_coeff=1e-3)) for _ in range(2))
        cfg = SAETrainConfig(batch_size=32, lr=1e-3, adam_beta1=0.0, b_dec_init="zeros", grad_clip_norm=clip)
        for sae, steps in ((before, n), (after, n + 1)):  # the same n ordinary steps; then the huge batch
            data.calls = 0
            train_sae(sae, data, cfg, steps=steps)
        return max((a - b).abs().max().item() for a, b in zip(after.parameters(), before.parameters()))

    assert largest_change(1.0) < 5e-3  # a few lr
    assert largest_change(None) > 1e-2  # over ten lr
