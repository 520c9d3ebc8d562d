"""The result of a run: any method's trained state, its config and the target weights.

Saved as tensors + JSON only (``torch.load(weights_only=True)``: a file with pickled objects is
refused), atomically, in the format of ``apd.checkpoint``. ``load_decomposition`` reads a
``decomposition.pt``, a training checkpoint, or a run dir holding either; files of the earlier
single-method format (APD A/B only) load too.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from apd.checkpoint import FILE_NAME, CheckpointError, SavedDecomposition, read_decomposition, write_decomposition
from apd.component_model import ComponentModel
from apd.components import TiedLinear
from apd.config import MethodConfig

__all__ = ["Decomposition", "load_decomposition", "CheckpointError"]


def config_from(method: str, d: dict[str, Any]) -> MethodConfig:
    """A method's config from its JSON dict."""
    from apd.methods import config_class

    return config_class(method).from_dict(d)


@dataclass
class Decomposition:
    """The trained state of one run of a decomposition method.

    ``params`` holds every trained tensor by its ``ComponentModel`` name: the factors of each
    decomposed matrix, P_{c,l} = B_{c,l} A_{c,l} with ``A[name]`` [C, m, d_in] and ``B[name]``
    [C, d_out, m] in ``nn.Linear`` layout (SPD: m = 1, B = U, A = Vᵀ), and a method's other state
    (SPD's causal-importance functions). ``modules`` lists every decomposed use in module order,
    ``tied`` maps each second use of a tied matrix to the matrix it shares (stored once).
    """

    method: str
    config: MethodConfig
    modules: list[str]
    tied: dict[str, str]
    params: dict[str, Tensor]
    target_weights: dict[str, Tensor]
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)
    component_model: ComponentModel | None = field(default=None, repr=False, compare=False)
    """the live model the run trained (not saved; ``attach`` rebuilds one after loading)"""

    # ---------------------------------------------------------------- views
    @property
    def matrix_names(self) -> list[str]:
        """The decomposed matrices (tied second uses excluded), in module order."""
        return [n for n in self.modules if n not in self.tied]

    @property
    def A(self) -> dict[str, Float[Tensor, "C m d_in"]]:
        return {n: self.params[ComponentModel.param_name(n, "A")] for n in self.matrix_names}

    @property
    def B(self) -> dict[str, Float[Tensor, "C d_out m"]]:
        return {n: self.params[ComponentModel.param_name(n, "B")] for n in self.matrix_names}

    def C_per_module(self) -> dict[str, int]:
        counts = {n: a.shape[0] for n, a in self.A.items()}
        return counts | {n: counts[src] for n, src in self.tied.items()}

    @property
    def C(self) -> int:
        """The number of components (every matrix has the same for APD; see ``C_per_module``)."""
        counts = set(self.C_per_module().values())
        if len(counts) != 1:
            raise ValueError(f"the matrices have different numbers of components {self.C_per_module()}; use C_per_module()")
        return counts.pop()

    def component_weights(self, include_tied: bool = True) -> dict[str, Float[Tensor, "C d_out d_in"]]:
        """{module name: P_c for every c} in the layout of the module's own ``weight``: nn.Linear's
        [C, d_out, d_in], a transposed-layout linear's (GPT-2's ``Conv1D``) [C, d_in, d_out], an
        embedding's [C, d, vocab] (its table transposed); sums over C to ≈ the module's weight. Tied
        second uses appear under their own name as the transposes (unless ``include_tied=False``)."""
        A, B = self.A, self.B
        out = {n: torch.einsum("com,cmi->coi", B[n], A[n]) for n in A}
        out = {n: w.transpose(1, 2) if self.kinds.get(n) == "transposed_linear" else w for n, w in out.items()}
        if include_tied:
            out |= {n: out[src].transpose(1, 2) for n, src in self.tied.items()}
        return out

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n} {tuple(self.target_weights[n].shape)}" for n in self.matrix_names)
        Cs = self.C_per_module()
        C = str(next(iter(Cs.values()))) if len(set(Cs.values())) == 1 else str({n: Cs[n] for n in self.matrix_names})
        ties = f", tied {self.tied}" if self.tied else ""
        last = self.history[-1] if self.history else {}
        loss = f", final loss {last['total']:.4g}" if "total" in last else ""
        extra = len([n for n in self.params if not n.startswith("model.")])
        state = f", {extra} further trained tensors" if extra else ""
        return (f"Decomposition({self.method.upper()}, C={C} over {len(self.matrix_names)} matrices [{shapes}]{ties}, "
                f"step {self.step}/{self.config.steps}{loss}{state})")  # fmt: skip

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_component_model(
        cls, cm: ComponentModel, method: str, config: MethodConfig, step: int, history: list[dict[str, float]] | None = None,
        params: dict[str, Tensor] | None = None,
    ) -> "Decomposition":  # fmt: skip
        """A snapshot of ``cm``'s trained tensors (or of ``params``, e.g. one vmapped instance's)."""
        params = cm.trainable_parameters() if params is None else params
        return cls(
            method=method, config=config, modules=list(cm.layer_names), tied=dict(cm.tied_names),
            params={n: p.detach().cpu().clone() for n, p in params.items()},
            target_weights={n: w.detach().cpu().clone() for n, w in cm.target_weights().items()},
            step=step, history=list(history or []), kinds=dict(cm.kinds), component_model=cm,
        )  # fmt: skip

    @classmethod
    def from_factors(
        cls, config: MethodConfig, A: dict[str, Tensor], B: dict[str, Tensor], target_weights: dict[str, Tensor],
        tied: dict[str, str] | None = None, step: int = 0,
    ) -> "Decomposition":  # fmt: skip
        """A decomposition from explicit factors (e.g. hand-made components for a test or a baseline)."""
        tied = dict(tied or {})
        params = {ComponentModel.param_name(n, "A"): A[n] for n in A} | {ComponentModel.param_name(n, "B"): B[n] for n in A}
        return cls(method=config.method, config=config, modules=list(A) + list(tied), tied=tied, params=params,
                   target_weights=dict(target_weights), step=step)  # fmt: skip

    def attach(self, model: nn.Module) -> ComponentModel:
        """A ComponentModel of ``model`` carrying this state (to run masked forwards, or SPD's
        causal importances); ``model`` must be the target it was made from."""
        from apd.methods import method_for

        declared = {n: src for n, src in self.tied.items() if not isinstance(model.get_submodule(n), TiedLinear)}
        cm = method_for(self.config).build(model, self.modules, tied=declared)
        missing = set(self.matrix_names) ^ set(cm.matrix_names)
        if missing or cm.tied_names != self.tied:
            raise ValueError(
                f"this decomposition covers {self.matrix_names} (tied {self.tied}) but the model gives "
                f"{cm.matrix_names} (tied {cm.tied_names}); attach it to the model it was made from"
            )
        for n in self.matrix_names:
            w = cm.layers[n].target_weight()
            if w.shape != self.target_weights[n].shape:
                raise ValueError(f"{n}: model weight {tuple(w.shape)} vs decomposed {tuple(self.target_weights[n].shape)}: this "
                                 "decomposition was made from another model; attach it to the model it was made from")  # fmt: skip
            if not torch.allclose(w.detach().cpu(), self.target_weights[n], atol=1e-6):
                raise ValueError(f"{n}: the model's weight differs from the decomposed target's; attach to the same trained model")
        own = cm.trainable_parameters()
        if set(own) != set(self.params):
            raise ValueError(f"this decomposition holds {sorted(self.params)} but its method builds {sorted(own)}")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(self.params[n])
        return cm

    def causal_importances(self, x: Tensor, model: nn.Module | None = None, *, upper_leaky: bool = False) -> dict[str, Tensor]:
        """SPD's causal importances g per layer use on ``x`` ([*lead, C], in [0, 1]; ``upper_leaky``:
        the minimality loss's g⁺), through the run's method and config (its ``leaky_alpha``). A
        loaded decomposition needs its target: ``dec.causal_importances(x, model)``."""
        from apd.methods import method_for

        cm = self.component_model
        if cm is None:
            if model is None:
                raise ValueError("this decomposition was loaded, not trained here: pass its target model, "
                                 "dec.causal_importances(x, model)")  # fmt: skip
            cm = self.attach(model)
        return method_for(self.config).causal_importances(cm, x, upper_leaky=upper_leaky)

    # ---------------------------------------------------------------- files
    def saved(self) -> SavedDecomposition:
        """What ``save`` writes (``apd.checkpoint``'s record of a decomposition)."""
        return SavedDecomposition(method=self.method, config=self.config.to_dict(), modules=self.modules, tied=self.tied,
                                  params=self.params, target_weights=self.target_weights, step=self.step,
                                  history=self.history, kinds=self.kinds)  # fmt: skip

    @classmethod
    def from_saved(cls, saved: SavedDecomposition) -> "Decomposition":
        return cls(method=saved.method, config=config_from(saved.method, saved.config), modules=list(saved.modules),
                   tied=dict(saved.tied), params=saved.params, target_weights=saved.target_weights, step=saved.step,
                   history=saved.history, kinds=dict(saved.kinds))  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Write one file (a ``.pt`` path, or ``decomposition.pt`` inside a folder); returns it."""
        p = Path(path)
        if p.suffix != ".pt":
            p = p / FILE_NAME
        write_decomposition(p, self.saved())
        return p


def load_decomposition(path: str | os.PathLike, seed: int | None = None) -> Decomposition:
    """Load a saved decomposition from its file, or from a folder (e.g. a run dir) holding one.

    A training checkpoint loads too (its state at the step it was written; ``seed`` picks one of a
    multi-seed checkpoint's seeds, default the first).
    """
    return Decomposition.from_saved(read_decomposition(path, seed))
