import torch
from jaxtyping import Float
from torch import Tensor

from apd.config import ConfigError
from apd.losses.registry import register_loss
from apd.pgd import AdversarialForm, adversarial_distance, ascend, persistent_sources


def _is_vmapped(x: Tensor) -> bool:
    return bool(torch._C._functorch.is_batchedtensor(x))


@register_loss("adversarial_recon", order=15)
def adversarial_recon_loss(ctx) -> Float[Tensor, ""]:  # noqa: ANN001  (apd.methods.spd.SPDStep)
    """VPD's persistent-PGD reconstruction (apd.pgd): D(f(x | masks m = g + (1 − g)·r), f(x | W)) with
    the sources r ∈ [0, 1] chosen against the decomposition: each step the run's persistent sources
    (``apd.pgd.PersistentSources``, per batch row and position) take ``adversarial_steps``
    projected sign-gradient ascent steps of ``adversarial_step_size`` on D, with g held fixed;
    then D at those sources, held fixed (detached), is the loss, whose gradient reaches the
    components and the CI functions. ``adversarial_form``: every layer use masked at once, or
    each alone (the others at their target weights; the mean over layer uses, each with its own
    ascent)."""
    c, cm = ctx.config, ctx.cm
    if _is_vmapped(ctx.x):
        raise ConfigError("adversarial_recon keeps per-run adversarial sources, which seeds trained at once "
                          "(decompose_seeds / a seeds sweep in one process) cannot share; train each seed on its own")  # fmt: skip
    kind = c.output_loss
    state = persistent_sources(cm)
    sources, deltas = state.get(ctx.ci, c.delta_component)
    if AdversarialForm(c.adversarial_form) is AdversarialForm.all_layers:
        groups = [list(ctx.ci)]
    else:
        groups = [[n] for n in ctx.ci]
    total = None
    for names in groups:
        inner = ctx.inner_acts(names)
        r = {n: sources[n] for n in names}
        rd = None if deltas is None else {n: deltas[n] for n in names}
        r, rd = ascend(cm, ctx.x, ctx.target_out, ctx.ci, r, rd, n_steps=c.adversarial_steps,
                       step_size=c.adversarial_step_size, kind=kind, inner_acts=inner)  # fmt: skip
        state.update(r, rd)
        d = adversarial_distance(cm, ctx.x, ctx.target_out, ctx.ci, r, rd, kind, inner)
        total = d if total is None else total + d
    assert total is not None, "no causal importances"
    return total / len(groups)
