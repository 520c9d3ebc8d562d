"""TopKSAE's sparse training pass computes the dense pass's losses and gradients (autoencoder and
transcoder, with and without dead latents for AuxK); BatchTopK keeps the dense pass."""

import pytest
import torch

from apd.baselines import SAE, BatchTopKSAE, BatchTopKSAEConfig, TopKSAE, TopKSAEConfig, TrainStepInput


@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("with_dead", [False, True])
def test_the_sparse_pass_equals_the_dense_one(transcoder, with_dead):
    g = torch.Generator().manual_seed(1)
    extra = {"d_out": 7, "apply_b_dec_to_input": False} if transcoder else {}
    sae = TopKSAE(TopKSAEConfig(d_in=12, d_sae=50, k=3, aux_k=4, **extra), generator=g)
    with torch.no_grad():
        sae.b_dec.normal_(generator=g)
        sae.b_enc.normal_(generator=g)
    x = torch.randn(3, 5, 12, generator=g)  # leading dims are flattened into the batch
    target = torch.randn(3, 5, 7, generator=g) if transcoder else None
    dead = torch.rand(50, generator=g) < 0.4 if with_dead else None
    step = TrainStepInput(sae_in=x, target=target, dead_latents=dead)
    passes = []
    for forward in (SAE.training_forward_pass, TopKSAE.training_forward_pass):
        sae.zero_grad()
        out = forward(sae, step)
        out.loss.backward()
        passes.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (dense, dense_grads), (sparse, sparse_grads) = passes
    assert set(sparse.losses) == {"mse", "aux"} and (float(dense.losses["aux"].detach()) > 0) == with_dead
    for name in dense.losses:
        torch.testing.assert_close(sparse.losses[name], dense.losses[name], rtol=1e-5, atol=1e-5)
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.feature_acts, dense.feature_acts.detach())
    torch.testing.assert_close(sparse.sae_out, dense.sae_out.detach())
    assert sparse.sae_out.shape == (3, 5, 7 if transcoder else 12)


def test_batchtopk_keeps_the_dense_pass():
    assert BatchTopKSAE.training_forward_pass is SAE.training_forward_pass
    sae = BatchTopKSAE(BatchTopKSAEConfig(d_in=6, d_sae=20, k=2))
    out = sae.training_forward_pass(TrainStepInput(sae_in=torch.randn(10, 6)))
    assert int((out.feature_acts != 0).sum()) <= 20  # ⌊k·B⌋ over the batch, not k per row
