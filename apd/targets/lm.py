"""The language-model target as a config: the one-layer Shakespeare character transformer (SPEC §6).

``LMTargetConfig`` is an option of the experiments' ``target`` group (``conf/target/lm_1l.yaml``),
built, trained, shipped and loaded like the toy targets (``apd.targets``). Its batches are
``[B, seq_len]`` int64 token windows of the corpus's training plays; ``heldout_batch`` draws from
the held-out plays. The decomposed matrices are the MLP's ``mlp.up`` and ``mlp.down``.
``target_info`` measures what the shipped JSON records besides the training loss: the held-out loss,
the unigram and MLP-ablated baselines, and a fixed check batch the tests recompute.
"""

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor, nn

from apd.config import OutputLoss
from apd.evaluation import EvalContext
from apd.targets.base import TargetConfig, register_target_kind
from apd.toy_models.lm import LMConfig, TransformerLM, evaluate_lm, lm_loss, train_lm
from apd.toy_models.lm_data import Split, lm_batch, load_corpus, load_tokenizer, unigram_cross_entropy

__all__ = ["LMTargetConfig", "CHECK_BATCH", "lm_decomposition_metrics"]

log = logging.getLogger(__name__)

CHECK_BATCH = {"split": Split.heldout.value, "batch_size": 64, "seed": 0}
"""The held-out windows (seq_len + 1 tokens, drawn by ``windows`` from a generator with this seed)
whose loss ``target_info`` records and the tests recompute from the shipped weights."""


@functools.cache
def _split_tokens(split: Split) -> Tensor:
    """One shared token tensor per split (callers only index it)."""
    return load_corpus(split)


class CharacterWindows:
    """What the character-LM targets (``lm``, ``lm_multi``) share: training on the plays with
    ``train_lm`` (AdamW, warm-up + cosine, the ``train_*`` fields) and windows of ``seq_len`` tokens
    from a split. A target class lists it before ``TargetConfig`` and names its ``model_class``."""

    model_class: ClassVar[type[nn.Module]]
    seq_len: int
    train_steps: int
    train_batch_size: int
    train_lr: float
    train_weight_decay: float
    train_warmup_steps: int
    train_final_lr_fraction: float
    train_grad_clip: float
    train_seed: int

    def train(self, model: nn.Module) -> float:
        """Train in place; returns the mean training loss (nats/token) over the last 250 steps."""
        assert isinstance(model, self.model_class), f"{type(model).__name__} is not a {self.model_class.__name__}"
        result = train_lm(model, _split_tokens(Split.train), _split_tokens(Split.heldout), steps=self.train_steps,  # type: ignore[arg-type]
                          batch_size=self.train_batch_size, lr=self.train_lr, weight_decay=self.train_weight_decay,
                          warmup_steps=self.train_warmup_steps, final_lr_fraction=self.train_final_lr_fraction,
                          grad_clip=self.train_grad_clip, seed=self.train_seed, log_every=250,
                          callback=lambda r: log.info("step %(step)d: train %(train_loss).4f, held-out %(heldout_loss).4f "
                                                      "nats/token, lr %(lr).2e, %(seconds).0f s", r))  # fmt: skip
        return float(result["final_loss"])

    def windows(self, split: Split | str, batch_size: int, generator: torch.Generator | None = None,
                device: str | torch.device = "cpu", length: int | None = None) -> Int[Tensor, "B L"]:  # fmt: skip
        """``batch_size`` windows of ``length`` (default ``seq_len``) tokens from one split; take
        ``length = seq_len + 1`` for inputs ``w[:, :-1]`` and next-token targets ``w[:, 1:]``."""
        return lm_batch(_split_tokens(Split(split)), batch_size, length or self.seq_len, generator, device)

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Int[Tensor, "B seq_len"]:
        """Model inputs: token windows of the training plays."""
        return self.windows(Split.train, batch_size, generator, device)

    def heldout_batch(
        self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu"
    ) -> Int[Tensor, "B seq_len"]:
        """Model inputs: token windows of the held-out plays."""
        return self.windows(Split.heldout, batch_size, generator, device)

    def eval_batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Int[Tensor, "B seq_len"]:
        """A run's metrics read held-out windows (``n_eval`` of them; each ``seq_len`` tokens)."""
        return self.heldout_batch(batch_size, generator, device)


@register_target_kind
@dataclass(kw_only=True)
class LMTargetConfig(CharacterWindows, TargetConfig):
    """One-layer transformer on the Shakespeare characters: d_model 128, a ReLU MLP of 512 neurons."""

    name: str = "lm_1l"
    seq_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    train_steps: int = 6_000
    train_batch_size: int = 32
    train_lr: float = 3e-3
    train_weight_decay: float = 0.1
    train_warmup_steps: int = 200
    train_final_lr_fraction: float = 0.1
    """the cosine schedule decays the learning rate to this fraction of train_lr"""
    train_grad_clip: float = 1.0

    kind: ClassVar[str] = "lm"
    model_class: ClassVar[type[nn.Module]] = TransformerLM

    def model_config(self) -> LMConfig:
        return LMConfig(vocab_size=load_tokenizer().vocab_size, seq_len=self.seq_len, d_model=self.d_model,
                        n_heads=self.n_heads, d_mlp=self.d_mlp, init_seed=self.train_seed)  # fmt: skip

    def build(self) -> TransformerLM:
        return TransformerLM(self.model_config())

    def modules(self) -> list[str]:
        return ["mlp.up", "mlp.down"]

    def output_loss(self) -> OutputLoss:
        """Decompositions match the target's next-token distribution: KL on the logits."""
        return OutputLoss.kl

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """A decomposition of the MLP on held-out windows: next-token loss clean, under the method's
        evaluation masks (per token), and with the MLP zero-ablated; the fraction of the MLP's loss
        contribution recovered, (L_ablated − L_masked) / (L_ablated − L_clean) (Bricken et al.'s
        measure); for SPD also under thresholded masks (g > τ); and per-subcomponent token densities
        (active above the method's threshold): dead (never active on these tokens) and rare (below
        1e-4, the smallest density the 10^4-10^5 evaluation tokens resolve)."""
        return lm_decomposition_metrics(self, ctx)

    @torch.no_grad()
    def check_batch_loss(self, model: TransformerLM) -> float:
        """Loss (nats/token) on the fixed ``CHECK_BATCH`` of held-out windows."""
        gen = torch.Generator().manual_seed(CHECK_BATCH["seed"])
        w = self.windows(CHECK_BATCH["split"], CHECK_BATCH["batch_size"], gen, length=self.seq_len + 1)
        return float(lm_loss(model(w[:, :-1]), w[:, 1:]))

    @torch.no_grad()
    def target_info(self, model: nn.Module) -> dict[str, Any]:
        """Held-out numbers for the shipped JSON (all in nats/token, deterministic):

        heldout_loss: every non-overlapping window of the held-out plays;
        train_eval_loss: 4,096 evenly spaced windows of the training plays (the overfitting gap);
        unigram_heldout_loss: a context-free model fit on the training plays (the ceiling);
        mlp_zero_ablated_heldout_loss: the MLP's output replaced by zeros (the "loss recovered" floor);
        check_batch_loss: the fixed ``CHECK_BATCH``.
        """
        assert isinstance(model, TransformerLM)
        train, heldout = _split_tokens(Split.train), _split_tokens(Split.heldout)
        T = self.seq_len
        heldout_loss = evaluate_lm(model, heldout, T)

        def zero_mlp(x: Tensor) -> Tensor:
            return model(x, mlp_out=torch.zeros(*x.shape, model.config.d_model, device=x.device))

        return {
            "heldout_loss": heldout_loss,
            "heldout_bits_per_char": heldout_loss / math.log(2),
            "train_eval_loss": evaluate_lm(model, train, T, max_windows=4096),
            "unigram_heldout_loss": unigram_cross_entropy(train, heldout, model.config.vocab_size),
            "mlp_zero_ablated_heldout_loss": evaluate_lm(model, heldout, T, forward=zero_mlp),
            "check_batch": {**CHECK_BATCH, "loss": self.check_batch_loss(model)},
            "heldout_tokens": int(heldout.numel()),
            "train_tokens": int(train.numel()),
        }


@torch.no_grad()
def lm_decomposition_metrics(cfg: LMTargetConfig, ctx: EvalContext) -> dict[str, float]:
    """See ``LMTargetConfig.evaluate``."""
    model, cm = ctx.target, ctx.cm
    gen = torch.Generator().manual_seed(ctx.seed + 30_000)
    w = cfg.windows(Split.heldout, ctx.n_eval, gen, ctx.device, length=cfg.seq_len + 1)
    x, y = w[:, :-1], w[:, 1:]
    masks = ctx.eval_masks(x)
    clean = float(lm_loss(model(x), y))
    ablated = float(lm_loss(model(x, mlp_out=torch.zeros(*x.shape, model.config.d_model, device=x.device)), y))
    masked = float(lm_loss(cm(x, masks=masks), y))
    out = {"lm_loss_clean": clean, "lm_loss_mlp_ablated": ablated, "lm_loss_masked": masked,
           "loss_recovered": (ablated - masked) / (ablated - clean)}  # fmt: skip
    tau = ctx.method.active_threshold()
    if isinstance(masks, dict):
        hard = {n: (g > tau).to(g.dtype) for n, g in masks.items()}
        out["loss_recovered_thresholded"] = (ablated - float(lm_loss(cm(x, masks=hard), y))) / (ablated - clean)
    per_module = masks if isinstance(masks, dict) else {"components": masks}
    for n, g in per_module.items():
        density = (g > tau).float().reshape(-1, g.shape[-1]).mean(0)
        out[f"n_dead/{n}"] = float((density == 0).sum())
        out[f"n_rare/{n}"] = float(((density > 0) & (density < 1e-4)).sum())
        out[f"median_density/{n}"] = float(density[density > 0].median()) if (density > 0).any() else 0.0
    out["n_eval_tokens"] = float(x.numel())
    return out
