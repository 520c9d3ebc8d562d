"""Dead-latent resampling (Bricken et al. 2023, "Towards Monosemanticity", "Neuron Resampling").

An SAE trained with an L1 penalty loses latents: once a latent's pre-activation is negative on
every input it gets no gradient and never comes back. Bricken et al. re-initialise such latents a
few times during training, pointed at the inputs the SAE reconstructs worst. At every step listed
in ``SAETrainConfig.resample_steps`` the trainer calls :func:`resample_dead_latents` for the latents
that have not fired on the last ``resample_window`` training samples:

1. the reconstruction loss ℓ_i = ‖target_i − SAE(x_i)‖² of each of ``resample_sample_size`` fresh
   samples (in the SAE's training mode, as it trains);
2. one sample per dead latent, drawn with probability ∝ ℓ_i² (without replacement while enough
   samples have a non-zero loss);
3. the latent's decoder row := that sample's target minus b_dec, at unit norm (the direction the
   reconstruction must move, from its bias, to fix that sample; for an autoencoder x − b_dec);
4. its encoder column := that sample's encoder input (x − b_dec when ``apply_b_dec_to_input``, else
   x; a transcoder's input), at ``encoder_scale`` (0.2) times the mean norm of the live latents'
   encoder columns, so the new latent fires on inputs like that sample without drowning the others;
   its encoder bias := 0;
5. Adam's first and second moment estimates of exactly those entries := 0 (the step counter is per
   tensor and stays), so stale momentum does not push the fresh weights off at once.

Live latents, b_dec and any other parameter are untouched.
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .base import SAE

__all__ = ["resample_dead_latents", "resampling_probabilities"]


def resampling_probabilities(losses: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """ℓ_i² normalised to sum to 1 (uniform when every loss is zero)."""
    weights = losses.detach().double().pow(2)
    total = weights.sum()
    if not torch.isfinite(total):
        raise ValueError("the per-sample reconstruction losses are not finite; the SAE has diverged, so resampling "
                         "cannot pick inputs by loss (lower the learning rate)")  # fmt: skip
    return torch.full_like(weights, 1.0 / weights.numel()) if total == 0 else weights / total


@torch.no_grad()
def resample_dead_latents(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    dead: Bool[Tensor, " d_sae"],
    inputs: Float[Tensor, "n d_in"],
    targets: Float[Tensor, "n d_out"] | None,
    generator: torch.Generator,
    encoder_scale: float = 0.2,
) -> Int[Tensor, " n_dead"]:
    """Re-initialise the ``dead`` latents of ``sae`` from the samples it reconstructs worst (module
    docstring) and zero their Adam moments in ``optimizer``; returns the indices re-initialised.

    ``targets`` is None for an autoencoder (the target is the input). Draws use ``generator`` (on
    the CPU), so a run stays reproducible.
    """
    idx = dead.nonzero().squeeze(-1).cpu()
    if idx.numel() == 0:
        return idx
    if inputs.shape[0] == 0:
        raise ValueError("resampling needs at least one sample to draw new directions from")
    inputs = inputs.to(device=sae.device, dtype=sae.dtype)
    targets = inputs if targets is None else targets.to(device=sae.device, dtype=sae.dtype)
    losses = (sae(inputs) - targets).pow(2).sum(dim=-1)
    probs = resampling_probabilities(losses).cpu()
    replace = int((probs > 0).sum()) < idx.numel()
    chosen = torch.multinomial(probs, idx.numel(), replacement=replace, generator=generator).to(inputs.device)

    live = ~dead.to(sae.device)
    enc_norms = sae.W_enc.norm(dim=0)
    enc_norm = enc_norms[live].mean() if bool(live.any()) else enc_norms.new_tensor(1.0)
    enc_dirs = sae.process_sae_in(inputs[chosen])  # (n_dead, d_in)
    dec_dirs = targets[chosen] - sae.b_dec  # (n_dead, d_out)
    enc_dirs = enc_dirs / enc_dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dec_dirs = dec_dirs / dec_dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    dev_idx = idx.to(sae.device)
    sae.W_enc[:, dev_idx] = (enc_dirs * (encoder_scale * enc_norm)).T
    sae.W_dec[dev_idx] = dec_dirs
    sae.b_enc[dev_idx] = 0.0
    for param, dim in ((sae.W_enc, 1), (sae.W_dec, 0), (sae.b_enc, 0)):
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            moment = optimizer.state.get(param, {}).get(name)
            if isinstance(moment, Tensor) and moment.shape == param.shape:
                moment.index_fill_(dim, dev_idx, 0.0)
    return idx
