"""Scoring a finished decomposition: the generic numbers every run reports, and the target's own.

``evaluate`` computes, on fresh inputs, the faithfulness loss, the output distance of the model
under the method's evaluation masks (APD: top-k; SPD: causal importances) to the target, the mean
number of active components per input (L0), the method's own numbers, the mechanisms (groups of
co-active units, ``apd.mechanisms``), and then asks the target config for its ground-truth metrics
(``TargetConfig.evaluate``) through an :class:`EvalContext`.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from apd.component_model import ComponentModel, Masks
from apd.config import OutputLoss
from apd.decomposition import Decomposition
from apd.losses import faithfulness_loss
from apd.losses.distance import output_distance
from apd.mechanisms import MAX_PAIRS, Mechanism, MechanismSearchTooLarge, mechanism_summary, mechanisms_from_masks
from apd.methods import Method, method_for
from apd.model_io import masked_mean, valid_rows

__all__ = ["EvalContext", "ScoredTarget", "evaluate"]


class ScoredTarget(Protocol):
    """What ``evaluate`` asks of a target config (``apd.targets.TargetConfig`` has it; the targets
    import this module for ``EvalContext``, so this one names no target class)."""

    def eval_batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor: ...

    def output_loss(self) -> OutputLoss: ...

    def evaluate(self, ctx: "EvalContext") -> dict[str, float]: ...


@dataclass
class EvalContext:
    """What a target's metrics may use: the target, the decomposition and its live component
    model, the method, and where and how much to evaluate."""

    target: nn.Module
    target_config: ScoredTarget
    dec: Decomposition
    cm: ComponentModel
    method: Method
    n_eval: int
    seed: int
    device: torch.device
    mechanisms: list[Mechanism] = field(default_factory=list)
    """the run's mechanisms (``apd.mechanisms``) on the generic evaluation batch, set before the
    target's metrics run"""

    def eval_masks(self, x: Tensor) -> Masks:
        with torch.no_grad():
            return self.method.eval_masks(self.cm, x)

    def eval_forward(self, x: Tensor) -> Tensor:
        """The decomposed model's output under the method's own evaluation masks."""
        with torch.no_grad():
            return self.cm(x, masks=self.eval_masks(x))

    def masked_forward(self, x: Tensor, masks: Masks) -> Tensor:
        with torch.no_grad():
            return self.cm(x, masks=masks)


def evaluate(
    dec: Decomposition, target: nn.Module, target_config: ScoredTarget, *, n_eval: int, seed: int,
    device: str | torch.device = "cpu",
) -> dict[str, float]:  # fmt: skip
    """The metrics.json numbers of a decomposition of ``target`` (SPEC §3): generic, then the target's."""
    cm = dec.component_model if dec.component_model is not None else dec.attach(target)
    method = method_for(dec.config)
    ctx = EvalContext(target, target_config, dec, cm, method, n_eval, seed, torch.device(device))
    gen = torch.Generator().manual_seed(seed + 10_000)
    x = target_config.eval_batch(n_eval, gen, device)
    valid = cm.valid_positions(x)  # a dict batch's attention mask: padded positions count nowhere
    with torch.no_grad():
        masks = ctx.eval_masks(x)
        out, masked = cm(x), cm(x, masks=masks)
        kept = valid_rows(masks, valid)
        generic = {
            "faithfulness_loss": faithfulness_loss(cm.target_weights(), cm.summed_weights()).item(),
            f"{method.eval_mask_name}_recon_mse": masked_mean((masked - out).pow(2), valid).item(),
            **method.mask_l0(kept),
        }
        if target_config.output_loss().value == "kl":
            generic[f"{method.eval_mask_name}_recon_kl"] = output_distance(out, masked, target_config.output_loss(), valid).item()
        generic |= method.eval_metrics(cm, x, masks, out, valid=valid)
        ranks = {n: cm.layers[n].m for n in cm.matrix_names}
        try:
            ctx.mechanisms, summary = mechanisms_from_masks(kept, method.active_threshold(), cm.tied_names, ranks=ranks,
                                                            max_pairs=MAX_PAIRS)  # read here, at call time: tests lower it
        except MechanismSearchTooLarge as e:  # a dense run: its other metrics still count; no mechanisms
            warnings.warn(f"mechanisms skipped: {e}", stacklevel=2)
            ctx.mechanisms, summary = [], {"n_mechanisms": math.nan, "mechanisms_skipped": 1.0}
        generic |= summary | {"mechanisms": mechanism_summary(ctx.mechanisms)}
    return target_config.evaluate(ctx) | generic
