"""The multi-layer language-model target: a 4-layer Llama-style character transformer (``lm_4l``).

``MultiLMTargetConfig`` (kind ``lm_multi``) is an option of the ``target`` group
(``conf/target/lm_4l.yaml``), built, trained, shipped and loaded like ``LMTargetConfig``, on the same
Shakespeare character corpus and windows. Its decomposed matrices are every attention and MLP matrix
of every block: ``layers.{i}.attn.{q,k,v,o}`` and ``layers.{i}.mlp.{up,down}`` (24 for 4 layers).
Its ``evaluate`` writes VPD's table (``vpd_table``: CE of the target, unmasked, stochastic masks,
masks rounded at CI > 0 and CI > 0.5; L0 and alive subcomponents per matrix and per layer; per-layer
loss recovered against zero-ablating that layer's matrices); ``vpd_table_markdown`` prints it.
"""

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from apd.config import OutputLoss
from apd.evaluation import EvalContext
from apd.targets.base import TargetConfig, register_target_kind
from apd.targets.lm import CHECK_BATCH, CharacterWindows, _split_tokens
from apd.toy_models.lm import evaluate_lm, lm_loss
from apd.toy_models.lm_data import Split, load_tokenizer, unigram_cross_entropy
from apd.toy_models.lm_multi import MultiLayerLM, MultiLMConfig

__all__ = ["MultiLMTargetConfig", "vpd_table", "vpd_table_markdown"]


@register_target_kind
@dataclass(kw_only=True)
class MultiLMTargetConfig(CharacterWindows, TargetConfig):
    """Llama-style transformer on the Shakespeare characters: 4 pre-RMSNorm blocks, d_model 128,
    4 heads, bias-free q/k/v/o and a ReLU MLP of 256 neurons per block, context 128."""

    name: str = "lm_4l"
    seq_len: int = 128
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 256
    train_steps: int = 3_000
    train_batch_size: int = 32
    train_lr: float = 3e-3
    train_weight_decay: float = 0.1
    train_warmup_steps: int = 100
    train_final_lr_fraction: float = 0.1
    """the cosine schedule decays the learning rate to this fraction of train_lr"""
    train_grad_clip: float = 1.0

    kind: ClassVar[str] = "lm_multi"
    model_class: ClassVar[type[nn.Module]] = MultiLayerLM

    def model_config(self) -> MultiLMConfig:
        return MultiLMConfig(vocab_size=load_tokenizer().vocab_size, seq_len=self.seq_len, n_layers=self.n_layers,
                             d_model=self.d_model, n_heads=self.n_heads, d_mlp=self.d_mlp, init_seed=self.train_seed)  # fmt: skip

    def build(self) -> MultiLayerLM:
        return MultiLayerLM(self.model_config())

    def modules(self) -> list[str]:
        """Every attention and MLP matrix of every block."""
        return ["layers.*.attn.q", "layers.*.attn.k", "layers.*.attn.v", "layers.*.attn.o", "layers.*.mlp.up", "layers.*.mlp.down"]

    def output_loss(self) -> OutputLoss:
        """Decompositions match the target's next-token distribution: KL on the logits."""
        return OutputLoss.kl

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """VPD's table on ``n_eval`` held-out windows (``vpd_table``)."""
        return vpd_table(self, ctx)

    @torch.no_grad()
    def check_batch_loss(self, model: MultiLayerLM) -> float:
        """Loss (nats/token) on the fixed ``CHECK_BATCH`` of held-out windows (as ``lm_1l``'s)."""
        gen = torch.Generator().manual_seed(CHECK_BATCH["seed"])
        w = self.windows(CHECK_BATCH["split"], CHECK_BATCH["batch_size"], gen, length=self.seq_len + 1)
        return float(lm_loss(model(w[:, :-1]), w[:, 1:]))

    @torch.no_grad()
    def target_info(self, model: nn.Module) -> dict[str, Any]:
        """Held-out numbers for the shipped JSON (nats/token, deterministic):

        heldout_loss: every non-overlapping window of the held-out plays;
        train_eval_loss: 4,096 evenly spaced windows of the training plays (the overfitting gap);
        unigram_heldout_loss: a context-free model fit on the training plays (the ceiling);
        layer_zero_ablated_heldout_loss: per block, the held-out loss with that block skipped (its six
        matrices zeroed: the "loss recovered" floor of each layer);
        check_batch_loss: the fixed ``CHECK_BATCH``.
        """
        assert isinstance(model, MultiLayerLM)
        train, heldout = _split_tokens(Split.train), _split_tokens(Split.heldout)
        T = self.seq_len
        heldout_loss = evaluate_lm(model, heldout, T)
        return {
            "heldout_loss": heldout_loss,
            "heldout_bits_per_char": heldout_loss / math.log(2),
            "train_eval_loss": evaluate_lm(model, train, T, max_windows=4096),
            "unigram_heldout_loss": unigram_cross_entropy(train, heldout, model.config.vocab_size),
            "layer_zero_ablated_heldout_loss": [evaluate_lm(model, heldout, T, forward=lambda x, i=i: model(x, skip={i}))
                                                for i in range(model.config.n_layers)],  # fmt: skip
            "check_batch": {**CHECK_BATCH, "loss": self.check_batch_loss(model)},
            "heldout_tokens": int(heldout.numel()),
            "train_tokens": int(train.numel()),
        }


def _layer_matrices(ctx: EvalContext, n_layers: int) -> list[list[str]]:
    """The decomposed matrices of each block, in the component model's order."""
    return [[n for n in ctx.cm.matrix_names if n.startswith(f"layers.{i}.")] for i in range(n_layers)]


VPD_CHUNK = 64
"""windows per forward pass of ``vpd_table`` (memory: each pass holds every matrix's causal
importances and masked activations for its windows)"""


@torch.no_grad()
def vpd_table(cfg: MultiLMTargetConfig, ctx: EvalContext, chunk: int = VPD_CHUNK) -> dict[str, float]:
    """VPD's table of a decomposition on ``n_eval`` held-out windows (``seq_len`` tokens each), keys ``vpd/...``.

    Cross-entropy of the next token (nats/token): ``ce_target`` (the target), ``ce_unmasked`` (every
    subcomponent at mask 1: Σ_c U_c V_cᵀ in place of each weight, no Δ-component), ``ce_ci_masked``
    (masks = the causal importances g), ``ce_stochastic`` (one draw of m = g + (1 − g)·r, r ~ U[0, 1),
    no Δ-component), ``ce_rounded_gt0`` / ``ce_rounded_gt0.5`` (masks 1 where g > 0 / g > 0.5, else 0),
    ``ce_all_ablated`` (every decomposed matrix zero: no block writes to the residual stream).
    Per matrix ``l0/{name}`` (mean number of subcomponents with g > τ per token; τ the method's
    ``ci_threshold``) and ``alive/{name}`` (subcomponents with g > τ on at least one of these tokens);
    per block ``l0_layer/{i}`` and ``alive_layer/{i}`` (summed over its matrices), ``ce_layer_ablated/{i}``
    (that block's matrices zero, the others the target's), ``ce_layer_masked/{i}`` (that block's matrices
    under the CI masks, the others the target's) and ``loss_recovered_layer/{i}`` =
    (ablated − masked) / (ablated − target); ``loss_recovered_all`` likewise with every block at once.

    The windows are run ``chunk`` at a time (means over all tokens; r drawn chunk by chunk from the
    same generator, so up to ``chunk`` windows the draw is one batch's).
    """
    model, cm = ctx.target, ctx.cm
    gen = torch.Generator().manual_seed(ctx.seed + 40_000)
    w = cfg.windows(Split.heldout, ctx.n_eval, gen, ctx.device, length=cfg.seq_len + 1)
    tau = ctx.method.active_threshold()
    layers = _layer_matrices(ctx, cfg.n_layers)
    sums: dict[str, float] = {}
    alive: dict[str, Tensor] = {}

    def add(key: str, value: float, weight: int) -> None:
        sums[key] = sums.get(key, 0.0) + value * weight

    for part in w.split(chunk):
        x, y = part[:, :-1], part[:, 1:]
        n = y.numel()
        g = ctx.eval_masks(x)
        assert isinstance(g, dict), "VPD's table needs one causal-importance tensor per matrix (a method with per-matrix masks)"
        r = {k: torch.rand(v.shape, generator=gen).to(v.device) for k, v in g.items()}

        def ce(masks: dict[str, Tensor] | None) -> float:
            return float(lm_loss(model(x) if masks is None else cm(x, masks=masks), y))

        add("ce_target", ce(None), n)
        add("ce_unmasked", ce({k: torch.ones_like(v) for k, v in g.items()}), n)
        add("ce_ci_masked", ce(g), n)
        add("ce_stochastic", ce({k: v + (1 - v) * r[k] for k, v in g.items()}), n)
        add("ce_rounded_gt0", ce({k: (v > 0).to(v.dtype) for k, v in g.items()}), n)
        add("ce_rounded_gt0.5", ce({k: (v > 0.5).to(v.dtype) for k, v in g.items()}), n)
        add("ce_all_ablated", ce({k: torch.zeros_like(v) for k, v in g.items()}), n)
        for k, v in g.items():
            on = (v > tau).reshape(-1, v.shape[-1])
            add(f"l0/{k}", float(on.sum(-1).float().mean()), n)
            alive[k] = on.any(0) | alive[k] if k in alive else on.any(0)
        for i, names in enumerate(layers):
            if names:
                add(f"ce_layer_ablated/{i}", ce({k: torch.zeros_like(g[k]) for k in names}), n)
                add(f"ce_layer_masked/{i}", ce({k: g[k] for k in names}), n)
    total = int(w[:, 1:].numel())
    out = {k: v / total for k, v in sums.items()}
    out["loss_recovered_all"] = (out["ce_all_ablated"] - out["ce_ci_masked"]) / (out["ce_all_ablated"] - out["ce_target"])
    for k, on in alive.items():
        out[f"alive/{k}"] = float(on.sum())
    for i, names in enumerate(layers):
        if not names:
            continue
        out[f"l0_layer/{i}"] = sum(out[f"l0/{k}"] for k in names)
        out[f"alive_layer/{i}"] = sum(out[f"alive/{k}"] for k in names)
        ablated, masked = out[f"ce_layer_ablated/{i}"], out[f"ce_layer_masked/{i}"]
        out[f"loss_recovered_layer/{i}"] = (ablated - masked) / (ablated - out["ce_target"])
    out["n_eval_tokens"] = float(total)
    return {f"vpd/{k}": v for k, v in out.items()}


def vpd_table_markdown(metrics: dict[str, Any]) -> str:
    """VPD's table as markdown from a run's ``metrics.json`` dict (the ``vpd/...`` keys of ``vpd_table``)."""
    v = {k.removeprefix("vpd/"): val for k, val in metrics.items() if k.startswith("vpd/")}
    if "ce_target" not in v:
        raise ValueError("these metrics hold no VPD table (no 'vpd/ce_target'): they are not of a run of a multi-layer LM "
                         "target (target=lm_4l) made by this version of apd")  # fmt: skip
    lines = [f"Cross-entropy on {v['n_eval_tokens']:.0f} held-out tokens (nats/token):", "",
             "| target | unmasked | CI masks | stochastic masks | rounded CI > 0 | rounded CI > 0.5 | all matrices zero |",
             "|---|---|---|---|---|---|---|",
             f"| {v['ce_target']:.4f} | {v['ce_unmasked']:.4f} | {v['ce_ci_masked']:.4f} | {v['ce_stochastic']:.4f} | "
             f"{v['ce_rounded_gt0']:.4f} | {v['ce_rounded_gt0.5']:.4f} | {v['ce_all_ablated']:.4f} |", ""]  # fmt: skip
    layers = sorted(int(k.split("/")[1]) for k in v if k.startswith("l0_layer/"))
    lines += ["Per layer (L0: subcomponents with CI > τ per token, summed over the layer's matrices; loss recovered: "
              "that layer's matrices under the CI masks against zeroing them, the other layers the target's):", "",
              "| layer | L0 | alive | CE layer zero | CE layer masked | loss recovered |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {i} | {v[f'l0_layer/{i}']:.1f} | {v[f'alive_layer/{i}']:.0f} | {v[f'ce_layer_ablated/{i}']:.4f} | "
              f"{v[f'ce_layer_masked/{i}']:.4f} | {v[f'loss_recovered_layer/{i}']:.4f} |" for i in layers]  # fmt: skip
    lines += [f"| all | {sum(v[f'l0_layer/{i}'] for i in layers):.1f} | {sum(v[f'alive_layer/{i}'] for i in layers):.0f} | "
              f"{v['ce_all_ablated']:.4f} | {v['ce_ci_masked']:.4f} | {v['loss_recovered_all']:.4f} |", ""]  # fmt: skip
    matrices = [k.removeprefix("l0/") for k in v if k.startswith("l0/")]
    lines += ["Per matrix:", "", "| matrix | L0 | alive |", "|---|---|---|"]
    lines += [f"| {n} | {v[f'l0/{n}']:.2f} | {v[f'alive/{n}']:.0f} |" for n in matrices]
    return "\n".join(lines) + "\n"
