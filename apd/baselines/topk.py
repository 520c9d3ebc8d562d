"""TopK SAE with the AuxK loss for dead latents (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from .activations import TopK
from .base import SAE, SAEConfig, TrainStepInput, TrainStepOutput
from .registry import register_sae

__all__ = ["TopKSAEConfig", "TopKSAE", "topk_aux_loss"]


@dataclass(kw_only=True)
class TopKSAEConfig(SAEConfig):
    k: int = 1
    """active latents per sample"""
    aux_k: int | None = None
    """dead latents used by the AuxK loss; None = d_out // 2 (Gao et al.)"""
    aux_coeff: float = 1.0 / 32.0
    """weight of the AuxK loss (Gao et al.: 1/32)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate_k()
        if self.aux_k is not None and self.aux_k <= 0:
            raise ValueError(f"aux_k={self.aux_k} must be > 0, or None for d_out // 2")
        if self.aux_coeff < 0:
            raise ValueError(f"aux_coeff={self.aux_coeff} must be >= 0 (0 turns AuxK off)")

    def _validate_k(self) -> None:
        if isinstance(self.k, bool) or not float(self.k).is_integer():
            raise ValueError(f"k={self.k} must be a whole number for TopK; use BatchTopK for fractional k")
        self.k = int(self.k)
        if self.k <= 0:
            raise ValueError(f"k={self.k} must be > 0")
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} must be <= d_sae={self.d_sae}; lower k or raise d_sae")

    @property
    def aux_k_value(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_target // 2)


def topk_aux_loss(
    hidden_pre: Float[Tensor, "batch d_sae"],
    W_dec: Float[Tensor, "d_sae d_out"],
    residual: Float[Tensor, "batch d_out"],
    dead_latents: Bool[Tensor, " d_sae"] | None,
    aux_k: int,
) -> Float[Tensor, ""]:
    """AuxK: reconstruct the (detached) residual error with the top-``aux_k`` dead latents.

    ê = TopK_aux(pre-activations of dead latents)·W_dec (no bias); the loss is ‖e − ê‖² summed over
    d_out and averaged over the batch, scaled by min(#dead / aux_k, 1) as in SAELens. Zero when no
    latent is dead.
    """
    if dead_latents is None or not bool(dead_latents.any()):
        return hidden_pre.new_zeros(())
    n_dead = int(dead_latents.sum())
    k = min(aux_k, n_dead)
    masked = hidden_pre.masked_fill(~dead_latents, -math.inf)
    top = masked.topk(k, dim=-1, sorted=False)
    aux_acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    recon = aux_acts @ W_dec
    scale = min(n_dead / aux_k, 1.0)
    return scale * (recon - residual.detach()).pow(2).sum(dim=-1).mean()


class TopKSAE(SAE[TopKSAEConfig]):
    """f = TopK_k(ReLU) of the pre-activations; losses "mse" and "aux".

    Training computes the same losses and gradients as the dense forward pass
    (:meth:`SAE.training_forward_pass`) without the decoder products that only zeros enter: each row's
    k latents are decoded with ``embedding_bag`` (their decoder rows), and AuxK decodes from the dead
    latents' rows only. On the language model's 4,096-latent SAE (512 inputs, 4,096 tokens, k 16, a
    quarter of the latents dead) a forward and backward took 2.3–2.9 s against 5.3–5.9 s dense
    (interleaved, one thread, a shared 2-core machine).
    """

    architecture = "topk"

    def __init__(self, cfg: TopKSAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.topk = TopK(cfg.k)

    def activation(self, hidden_pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        return self.topk(hidden_pre)

    def sparsity_losses(self, step_input: TrainStepInput, step_output: TrainStepOutput) -> dict[str, Tensor]:
        residual = step_output.target - step_output.sae_out
        aux = topk_aux_loss(
            step_output.hidden_pre, self.W_dec, residual, step_input.dead_latents, self.cfg.aux_k_value
        )
        return {"aux": self.cfg.aux_coeff * aux}

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """The dense pass's losses ("mse", "aux") and gradients, with a sparse decoder (class docstring)."""
        sae_in, target = step_input.sae_in, step_input.target
        if target is None:
            if self.cfg.is_transcoder:
                raise ValueError("this SAE is a transcoder (d_out is set): pass TrainStepInput.target")
            target = sae_in
        lead = sae_in.shape[:-1]
        hidden_pre = self.hidden_pre(sae_in).reshape(-1, self.cfg.d_sae)
        idx = hidden_pre.detach().topk(self.cfg.k, dim=-1, sorted=False).indices
        values = hidden_pre.gather(-1, idx).relu()
        sae_out = F.embedding_bag(idx, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
        flat_target = target.reshape(-1, self.cfg.d_target)
        mse = (sae_out - flat_target).pow(2).sum(dim=-1).mean()
        aux = self._aux_loss(hidden_pre, flat_target - sae_out, step_input.dead_latents)
        losses = {"mse": mse, "aux": self.cfg.aux_coeff * aux}
        feature_acts = torch.zeros_like(hidden_pre, requires_grad=False).scatter(-1, idx, values.detach())
        return TrainStepOutput(
            sae_in=sae_in, target=target, sae_out=sae_out.reshape(*lead, -1), feature_acts=feature_acts.reshape(*lead, -1),
            hidden_pre=hidden_pre.reshape(*lead, -1), loss=torch.stack(list(losses.values())).sum(), losses=losses,
        )  # fmt: skip

    def _aux_loss(
        self, hidden_pre: Float[Tensor, "batch d_sae"], residual: Float[Tensor, "batch d_out"],
        dead_latents: Bool[Tensor, " d_sae"] | None,
    ) -> Float[Tensor, ""]:  # fmt: skip
        """:func:`topk_aux_loss` decoded from the dead latents' rows only (the same value and gradients)."""
        if dead_latents is None or not bool(dead_latents.any()):
            return hidden_pre.new_zeros(())
        dead = dead_latents.nonzero().squeeze(-1)
        k = min(self.cfg.aux_k_value, int(dead.numel()))
        pre_dead = hidden_pre[:, dead]
        top = pre_dead.topk(k, dim=-1, sorted=False)
        aux_acts = torch.zeros_like(pre_dead).scatter(-1, top.indices, top.values.relu())
        recon = aux_acts @ self.W_dec[dead]
        scale = min(int(dead.numel()) / self.cfg.aux_k_value, 1.0)
        return scale * (recon - residual.detach()).pow(2).sum(dim=-1).mean()


register_sae(TopKSAE.architecture, TopKSAE, TopKSAEConfig)
