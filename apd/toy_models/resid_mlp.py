"""Residual MLP "compressed computation" toy model (SPEC §2.2).

n sparse features are embedded in a residual stream by a fixed random W_E with unit-norm columns;
each layer adds W_out ReLU(W_in r) (no biases) and the output is read back with W_U = W_Eᵀ. The
model is trained to output y_i = x_i + ReLU(x_i) with fewer neurons than features.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

__all__ = [
    "ResidMLPConfig",
    "ResidMLPBlock",
    "ResidMLP",
    "decomposed_module_names",
    "mlp_pairs",
    "resid_mlp_batch",
    "resid_mlp_labels",
    "TrainResult",
    "train_resid_mlp",
    "monosemantic_baseline",
]


@dataclass(kw_only=True)
class ResidMLPConfig:
    """Shape of a residual MLP toy model.

    n_features: sparse input features (= outputs).
    d_embed: residual stream width.
    d_mlp: MLP neurons in total, split evenly over the layers.
    n_layers: number of residual MLP blocks (1 to 3).
    feature_probability: probability that a feature is nonzero in the training data.
    embed_seed: seed of the fixed random embedding W_E.
    init_seed: seed of the MLP weights' initialisation.
    """

    n_features: int = 100
    d_embed: int = 1000
    d_mlp: int = 50
    n_layers: int = 1
    feature_probability: float = 0.01
    embed_seed: int = 0
    init_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_features", "d_embed", "d_mlp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if not 1 <= self.n_layers <= 3:
            raise ValueError(f"n_layers={self.n_layers} must be 1, 2 or 3")
        if self.d_mlp % self.n_layers != 0:
            raise ValueError(
                f"d_mlp={self.d_mlp} is split evenly over n_layers={self.n_layers}; "
                "choose d_mlp divisible by n_layers"
            )
        if not 0.0 < self.feature_probability <= 1.0:
            raise ValueError(
                f"feature_probability={self.feature_probability} must lie in (0, 1]"
            )

    @property
    def d_mlp_per_layer(self) -> int:
        return self.d_mlp // self.n_layers


def mlp_pairs(n_layers: int) -> list[tuple[str, str]]:
    """The names of each layer's (W_in, W_out) modules, in layer order: the model's own naming,
    declared here once for every metric and comparison that needs it."""
    return [(f"layers.{i}.mlp_in", f"layers.{i}.mlp_out") for i in range(n_layers)]


def decomposed_module_names(n_layers: int) -> list[str]:
    """The matrices a decomposition takes, in layer order: each layer's W_in, then its W_out."""
    return [name for pair in mlp_pairs(n_layers) for name in pair]


class ResidMLPBlock(nn.Module):
    """One residual MLP block; returns the update W_out ReLU(W_in r) (the caller adds it)."""

    def __init__(self, d_embed: int, d_mlp: int):
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.act = nn.ReLU()
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)

    def forward(self, r: Float[Tensor, "B d_embed"]) -> Float[Tensor, "B d_embed"]:
        return self.mlp_out(self.act(self.mlp_in(r)))


def _embedding(config: ResidMLPConfig) -> Float[Tensor, "d_embed n_features"]:
    g = torch.Generator().manual_seed(config.embed_seed)
    W_E = torch.randn(config.d_embed, config.n_features, generator=g)
    return W_E / W_E.norm(dim=0, keepdim=True)


class _Embed(nn.Module):
    """r = x W_Eᵀ as a module of its own, without state (W_E stays the model's buffer): a decomposition's
    masked passes then take its output from the target pass instead of recomputing it."""

    def forward(self, x: Float[Tensor, "B n_features"], W_E: Float[Tensor, "d_embed n_features"]) -> Float[Tensor, "B d_embed"]:
        return x @ W_E.T


class ResidMLP(nn.Module):
    """Residual MLP target: r = W_E x; r += W_out ReLU(W_in r) per layer; ŷ = W_U r.

    W_E is a fixed buffer; only the blocks' ``mlp_in``/``mlp_out`` weights are parameters.
    """

    W_E: Tensor

    def __init__(self, config: ResidMLPConfig):
        super().__init__()
        self.config = config
        self.register_buffer("W_E", _embedding(config))
        self.embed = _Embed()
        self.layers = nn.ModuleList(
            ResidMLPBlock(config.d_embed, config.d_mlp_per_layer) for _ in range(config.n_layers)
        )
        self._init_weights(torch.Generator().manual_seed(config.init_seed))

    @torch.no_grad()
    def _init_weights(self, g: torch.Generator) -> None:
        # nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), but from our own generator.
        for p in self.parameters():
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)

    @property
    def W_U(self) -> Float[Tensor, "n_features d_embed"]:
        return self.W_E.T

    def mlp_pairs(self) -> list[tuple[str, str]]:
        """Each layer's (W_in, W_out) module names, in layer order (see ``mlp_pairs``)."""
        return mlp_pairs(self.config.n_layers)

    def forward(self, x: Float[Tensor, "B n_features"]) -> Float[Tensor, "B n_features"]:
        r = self.embed(x, self.W_E)
        for layer in self.layers:
            r = r + layer(r)
        return r @ self.W_E  # = (W_U r)ᵀ per sample


def resid_mlp_batch(
    n_features: int,
    batch_size: int,
    feature_probability: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Float[Tensor, "B n_features"]:
    """Sparse inputs: each feature nonzero independently with probability p, value U[-1, 1].

    A generator must live on ``device``.
    """
    shape = (batch_size, n_features)
    active = torch.rand(shape, generator=generator, device=device) < feature_probability
    values = torch.rand(shape, generator=generator, device=device) * 2 - 1
    return torch.where(active, values, torch.zeros((), device=values.device))


def resid_mlp_labels(x: Float[Tensor, "B n_features"]) -> Float[Tensor, "B n_features"]:
    """Labels y = x + ReLU(x)."""
    return x + F.relu(x)


class TrainResult(TypedDict):
    final_loss: float
    loss_history: list[tuple[int, float]]
    seconds: float


def train_resid_mlp(
    model: ResidMLP,
    steps: int = 10_000,
    batch_size: int = 2048,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    log_every: int = 500,
    callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the MLP weights in place: AdamW, cosine decay to 0 (no warm-up), MSE to labels.

    Fresh data every step from a generator seeded with ``seed``; ``callback(step, loss)`` runs every
    ``log_every`` steps and after the last one. ``final_loss`` is the last batch's loss.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    device = model.W_E.device
    g = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps))
    )
    cfg = model.config
    history: list[tuple[int, float]] = []
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x = resid_mlp_batch(cfg.n_features, batch_size, cfg.feature_probability, g, device)
        loss = F.mse_loss(model(x), resid_mlp_labels(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append((step + 1, loss.item()))
            if callback is not None:
                callback(step + 1, history[-1][1])
    return TrainResult(
        final_loss=loss.item(), loss_history=history, seconds=time.perf_counter() - start
    )


@torch.no_grad()
def monosemantic_baseline(config: ResidMLPConfig) -> ResidMLP:
    """The hand-built model that computes features 0..d_mlp-1 exactly, one neuron each.

    Same W_E as a ``ResidMLP(config)``. Neuron k (layer k // d_mlp_per_layer) reads exactly x_k and
    writes ReLU(x_k) to output k only, so ŷ = W_Eᵀ W_E x + [ReLU(x_0..x_{d_mlp-1}), 0, ...]:
    features ≥ d_mlp pass through the residual only, and every output keeps the residual's own
    interference Σ_{j≠i} (W_Eᵀ W_E)_ij x_j, which no weights of the MLPs can remove in general.

    With G = W_Eᵀ W_E the write vector is w_k = W_E G⁻¹ e_k (so W_U w_k = e_k) and the read
    vector is the pseudo-inverse row e_kᵀ G⁻¹ W_Eᵀ (so it reads x_k from W_E x). In multi-layer
    models each write also gets a unit vector o_k orthogonal to span(W_E) (invisible to W_U), and
    later reads add -G⁻¹_jk o_k so that they see none of the earlier layers' writes.
    Needs d_embed ≥ n_features (+ the neurons of all but the last layer when n_layers > 1).
    """
    n, d, L, per = config.n_features, config.d_embed, config.n_layers, config.d_mlp_per_layer
    n_early = per * (L - 1)
    if d < n + n_early:
        raise ValueError(
            f"the exact monosemantic baseline needs d_embed ≥ n_features + d_mlp_per_layer * "
            f"(n_layers - 1) = {n + n_early}, got d_embed={d}; increase d_embed"
        )
    model = ResidMLP(config)
    W_E = model.W_E.double()
    G_inv = torch.linalg.inv(W_E.T @ W_E)
    n_computed = min(config.d_mlp, n)
    reads = (W_E @ G_inv).T[:n_computed]  # [n_computed, d_embed]
    writes = (W_E @ G_inv).T[:n_computed].clone()
    if n_early > 0:
        Q, _ = torch.linalg.qr(W_E, mode="complete")
        ortho = Q[:, n : n + n_early].T  # [n_early, d_embed], orthogonal to span(W_E)
        n_o = min(n_early, n_computed)
        writes[:n_o] += ortho[:n_o]
        for k in range(n_computed):
            earlier = min((k // per) * per, n_o)
            reads[k] -= G_inv[k, :earlier] @ ortho[:earlier]
    for p in model.parameters():
        p.zero_()
    for k in range(n_computed):
        layer = model.layers[k // per]
        layer.mlp_in.weight[k % per] = reads[k].float()
        layer.mlp_out.weight[:, k % per] = writes[k].float()
    return model
