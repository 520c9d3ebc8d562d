"""Computing what the browser shows of a token run: each unit family's activations on token windows,
its write directions (for alignments), its logit effects, and its weights' read and write directions.

The target is seen as a :class:`TokenModel`: its token embedding ``W_E`` [vocab, d_model], its
unembedding ``W_U`` [vocab, d_model], and which decomposed matrices read from and write to the
residual stream. For the shipped one-layer transformer (``TransformerLM``) these are its named
modules (``embed``, ``unembed``; ``attn.q/k/v`` and ``mlp.up`` read the stream through a
LayerNorm, ``attn.o`` and ``mlp.down`` write to it), and its MLP gives two more unit families, the
neurons and SAEs trained on them. For any other token model (``target=module``), ``W_E`` is an
``nn.Embedding`` and ``W_U`` the last ``nn.Linear`` mapping its width back to its vocabulary; a
decomposed matrix is taken to read the stream when its input has the embedding's width and to write
to it when its output has (a shape rule: say so where it misleads, e.g. an attention's q/k/v).

Families, their activations and their logit effects (every logit effect and token projection is the
direct path through ``W_U`` / ``W_E`` and ignores LayerNorms, so only directions and relative sizes
mean much):

- ``neurons`` (TransformerLM): the MLP's ReLU outputs (active > 0); logit effects ``W_U W_down[:, i]``.
- a decomposition whose method has units per matrix (SPD, ``Method.units_span_matrices`` False):
  one family ``<prefix>.<matrix>`` per decomposed matrix. A unit is active where its score (the
  method's ``unit_scores``: SPD's causal importance g_c) exceeds the method's threshold τ; its
  activation there is, by default, the norm of its masked output ‖g_c P_c a‖ (for a rank-one
  subcomponent g_c |V_c·a| ‖U_c‖), so top examples rank by how much it writes, not by g alone,
  which saturates at 1 (``UnitActivation.score`` shows the score itself). Logit effects, with
  σu = the unit's output per unit of input along its read direction (U_c ‖V_c‖): a matrix writing
  to the stream ``W_U σu``; the TransformerLM's ``mlp.up``: ``W_U W_down σu`` (the ReLU ignored).
- a decomposition whose units span the matrices (APD): one family ``<prefix>``; the activation is
  the unit's score (the attribution) where the evaluation masks select it (top-k), 0 elsewhere.
  Logit effects ``W_U w_c``, w_c = Σ over the matrices writing to the stream of P_{c,n} applied to
  the mean of that matrix's input over the tokens where c is active: its mean direct write.
- an SAE on the neurons (TransformerLM, a comparison's ``saes/``): ``sae.encode(neurons)``; logit
  effects ``W_U W_down W_dec[l]``; a transcoder (``d_out`` set) reads the MLP's input and writes its
  output: ``sae.encode(mlp_in)``, logit effects ``W_U W_dec[l]``.

Weights (:class:`WeightDirections`): for a decomposition's unit c and each matrix n it has a part in,
the top singular pair σ u vᵀ of P_{c,n} = B_{c,n} A_{c,n} (exact for a rank-one subcomponent:
u = U_c/‖U_c‖, v = V_c/‖V_c‖, σ = ‖U_c‖‖V_c‖). v is the read direction (what the unit responds
to), u the write direction; signs follow the stored factors (u·B_{c,n}[:, 0] ≥ 0). Where the matrix
reads the stream, ``W_E v`` scores each token's embedding against v; where it writes to it,
``W_U u`` is its direct effect on each token's logit.

Alignments (each unit's best matches in every other family): the cosine of the units' write
directions in a space both write to, the TransformerLM's neurons (neurons: basis vectors; SAEs:
decoder rows; ``mlp.up`` units: u; APD: its mean write to the neurons' pre-activations) if both do,
else the residual stream; and the Pearson correlation of the activations on the tokens read.
"""

import functools
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from apd.baselines import SAE, SAELoadError, load_sae
from apd.browser.config import LMBrowserConfig, LMRunError, UnitActivation
from apd.browser.data import BrowserDataError, PromptActs
from apd.browser.extract import AlignmentTable, correlation_matrix, cosine_alignment, top_matches
from apd.browser.runs import LMRunLayout, family_name, shown
from apd.config import ConfigError
from apd.decomposition import CheckpointError
from apd.experiment import RunArtifacts, load_run
from apd.targets import LMTargetConfig
from apd.targets.lm import CharacterWindows
from apd.methods import Method, method_for
from apd.targets import TargetConfig, get_target
from apd.toy_models.lm import MLPActivations, TransformerLM
from apd.toy_models.lm_data import Split, load_corpus, load_tokenizer

__all__ = ["TokenModel", "token_model", "WeightDirections", "top_singular_pairs", "LMFamily", "LMUnits",
           "load_lm_units", "heldout_windows", "NEURON_SPACE", "RESID_SPACE", "CORRELATION"]  # fmt: skip

NEURON_SPACE = "cosine in neuron space"
RESID_SPACE = "cosine in the residual stream"
CORRELATION = "activation correlation"
_LM_READERS = ("attn.q", "attn.k", "attn.v", "mlp.up")  # TransformerLM: read the stream through ln1 / ln2
_LM_WRITERS = ("attn.o", "mlp.down")


# ---------------------------------------------------------------------------------------------
# The target as a token model
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenModel:
    """A token target's embedding, unembedding and residual-stream readers and writers (module docstring)."""

    model: nn.Module
    vocab_size: int
    W_E: Float[Tensor, "vocab d_model"] | None
    W_U: Float[Tensor, "vocab d_model"] | None
    lm: TransformerLM | None
    """the model, when it is the one-layer transformer (neurons, SAEs, the MLP's logit paths)"""

    @property
    def d_model(self) -> int | None:
        return None if self.W_E is None else self.W_E.shape[1]

    def reads_stream(self, matrix: str, d_in: int) -> bool:
        if self.lm is not None:
            return matrix in _LM_READERS
        return self.W_E is not None and d_in == self.d_model

    def writes_stream(self, matrix: str, d_out: int) -> bool:
        if self.lm is not None:
            return matrix in _LM_WRITERS
        return self.W_U is not None and d_out == self.W_U.shape[1]

    def stream_rule(self) -> str:
        """How readers and writers of the residual stream were decided, in words."""
        if self.lm is not None:
            return "attn.q/k/v and mlp.up read the residual stream (through a LayerNorm), attn.o and mlp.down write to it"
        return (f"a decomposed matrix reads the residual stream when its input has the embedding's width "
                f"({self.d_model}) and writes to it when its output has")  # fmt: skip


def token_model(model: nn.Module) -> TokenModel:
    """``model`` as a :class:`TokenModel`; :class:`LMRunError` when it has no ``nn.Embedding``."""
    if isinstance(model, TransformerLM):
        return TokenModel(model, model.config.vocab_size, model.embed.weight.detach().cpu().float(),
                          model.unembed.weight.detach().cpu().float(), model)  # fmt: skip
    embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeds:
        raise LMRunError(f"the target ({type(model).__name__}) has no nn.Embedding: the browser cannot tell its "
                         "vocabulary or embedding")  # fmt: skip
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for lin in reversed(linears):  # the unembedding: the last linear map from an embedding's width to its vocabulary
        for emb in embeds:
            if (lin.out_features, lin.in_features) == (emb.num_embeddings, emb.embedding_dim):
                return TokenModel(model, emb.num_embeddings, emb.weight.detach().cpu().float(),
                                  lin.weight.detach().cpu().float(), None)  # fmt: skip
    emb = embeds[0]
    return TokenModel(model, emb.num_embeddings, emb.weight.detach().cpu().float(), None, None)


# ---------------------------------------------------------------------------------------------
# Unit families
# ---------------------------------------------------------------------------------------------


def top_singular_pairs(
    A: Float[Tensor, "C m d_in"], B: Float[Tensor, "C d_out m"]
) -> tuple[Float[Tensor, "C"], Float[Tensor, "C d_out"], Float[Tensor, "C d_in"]]:
    """(σ, u, v): the top singular value and vectors of each P_c = B_c A_c, without forming P_c
    (QR of the factors, then the SVD of the m x m core); signs such that u_c · B_c[:, 0] >= 0."""
    A, B = A.detach().cpu().double(), B.detach().cpu().double()
    Q_B, R_B = torch.linalg.qr(B)  # (C, d_out, m), (C, m, m)
    Q_A, R_A = torch.linalg.qr(A.transpose(1, 2))  # (C, d_in, m), (C, m, m)
    W, S, Zh = torch.linalg.svd(R_B @ R_A.transpose(1, 2))  # core = R_B R_Aᵀ
    u = (Q_B @ W[:, :, :1])[:, :, 0]
    v = (Q_A @ Zh.transpose(1, 2)[:, :, :1])[:, :, 0]
    sign = torch.where((u * B[:, :, 0]).sum(1) < 0, -1.0, 1.0).double()[:, None]
    return S[:, 0].float(), (u * sign).float(), (v * sign).float()


@dataclass
class WeightDirections:
    """Every unit's read and write direction in one decomposed matrix (module docstring): ``sigma``
    [U], ``read`` v [U, d_in] and ``write`` u [U, d_out] (unit vectors); their projections on the
    embedding ``read_tokens`` = W_E v and the unembedding ``write_tokens`` = W_U u [U, vocab] where
    the matrix reads / writes the residual stream; ``*_dims_family``: the family whose unit i is
    input / output dimension i (the neurons), for links."""

    matrix: str
    sigma: Float[Tensor, "U"]
    read: Float[Tensor, "U d_in"]
    write: Float[Tensor, "U d_out"]
    read_tokens: Float[Tensor, "U vocab"] | None = None
    write_tokens: Float[Tensor, "U vocab"] | None = None
    read_dims_family: str | None = None
    write_dims_family: str | None = None


@dataclass
class LMFamily:
    """One family of units and what the browser shows about it beyond activations.

    ``neuron_dirs`` [U, d_mlp] and ``resid_dirs`` [U, d_model]: each unit's write direction into
    the neurons (pre-activations) and into the residual stream, where it has one (the alignments'
    spaces); ``logit_effects`` [U, vocab]: the direct path to the logits; ``weights``: the read and
    write directions of a decomposition's units, per matrix.
    """

    name: str
    kind: str
    act_label: str
    description: str
    n_units: int
    threshold: float = 0.0
    logit_effects: Float[Tensor, "U V"] | None = None
    neuron_dirs: Float[Tensor, "U d_mlp"] | None = None
    resid_dirs: Float[Tensor, "U d_model"] | None = None
    weights: list[WeightDirections] = field(default_factory=list)


class _Batch:
    """A batch of token windows and what several sources read from it (computed once, when asked)."""

    def __init__(self, tokens: Int[Tensor, "B T"], tm: TokenModel):
        self.tokens, self.tm = tokens, tm

    @functools.cached_property
    def mlp_io(self) -> MLPActivations:
        assert self.tm.lm is not None
        return self.tm.lm.mlp_io(self.tokens)


class _Source(ABC):
    """Something that gives one or more families their activations from a batch of windows."""

    families: list[LMFamily]

    @abstractmethod
    def activations(self, batch: _Batch) -> dict[str, Float[Tensor, "B T U"]]:
        """{family name: activations} on ``batch.tokens``."""

    def reset(self) -> None:
        """Forget the statistics of the text read (default: none kept)."""

    def observe(self, acts: dict[str, Tensor], batch: _Batch) -> None:
        """Accumulate statistics on the text read (default: none)."""

    def finish(self) -> None:
        """Set what depends on those statistics (default: nothing)."""


def _mlp_weights(lm: TransformerLM) -> tuple[Tensor, Tensor]:
    """(unembed.weight [vocab, d_model], mlp.down.weight [d_model, d_mlp]) on the CPU."""
    return lm.unembed.weight.detach().cpu(), lm.mlp.down.weight.detach().cpu()


class _Neurons(_Source):
    def __init__(self, lm: TransformerLM):
        W_U, W_down = _mlp_weights(lm)
        d_mlp = W_down.shape[1]
        self.families = [LMFamily(
            name="neurons", kind="neuron", act_label="ReLU output", n_units=d_mlp,
            description=f"The MLP's {d_mlp} ReLU neurons, active where > 0. Logit effects: unembed \u00b7 mlp.down[:, i], "
                        "the direct path to the logits (ln_f's scale ignored).",
            logit_effects=(W_U @ W_down).T, neuron_dirs=torch.eye(d_mlp), resid_dirs=W_down.T.clone(),
        )]  # fmt: skip

    def activations(self, batch: _Batch) -> dict[str, Tensor]:
        return {"neurons": batch.mlp_io.acts}


class _SAE(_Source):
    def __init__(self, name: str, sae: SAE, lm: TransformerLM, where: str):
        W_U, W_down = _mlp_weights(lm)
        d_model, d_mlp = W_down.shape
        cfg = sae.cfg
        self.sae, self.name = sae, name
        W_dec = sae.W_dec.detach().cpu()
        if not cfg.is_transcoder and cfg.d_in == d_mlp:
            self.transcoder = False
            desc = (f"{sae.architecture} SAE on the {d_mlp} MLP neurons, {cfg.d_sae:,} latents ({where}). Activation: "
                    "sae.encode(neurons). Logit effects: unembed \u00b7 mlp.down \u00b7 W_dec[l] (direct path; ln_f's "
                    "scale ignored).")  # fmt: skip
            fam = LMFamily(name=name, kind="SAE feature", act_label="latent activation", n_units=cfg.d_sae,
                           description=desc, logit_effects=(W_U @ W_down @ W_dec.T).T, neuron_dirs=W_dec,
                           resid_dirs=(W_down @ W_dec.T).T)  # fmt: skip
        elif cfg.is_transcoder and cfg.d_in == d_model and cfg.d_target == d_model:
            self.transcoder = True
            desc = (f"{sae.architecture} transcoder from the MLP's input to its output, {cfg.d_sae:,} latents ({where}). "
                    "Activation: sae.encode(mlp_in). Logit effects: unembed \u00b7 W_dec[l] (direct path; ln_f's scale "
                    "ignored).")  # fmt: skip
            fam = LMFamily(name=name, kind="transcoder feature", act_label="latent activation", n_units=cfg.d_sae,
                           description=desc, logit_effects=(W_U @ W_dec.T).T, resid_dirs=W_dec)  # fmt: skip
        else:
            raise LMRunError(f"{where}: an SAE with d_in={cfg.d_in}, d_out={cfg.d_out} fits neither the model's {d_mlp} "
                             f"neurons nor its {d_model}-d MLP input and output")  # fmt: skip
        self.families = [fam]

    def activations(self, batch: _Batch) -> dict[str, Tensor]:
        io = batch.mlp_io
        return {self.name: self.sae.encode(io.mlp_in if self.transcoder else io.acts)}


class _Decomposition(_Source):
    """A decomposition's units: what is common to both layouts (the method, its component model,
    the weights' read and write directions)."""

    def __init__(self, prefix: str, art: RunArtifacts, tm: TokenModel, cfg: LMBrowserConfig, where: str):
        self.dec, self.tm, self.cfg, self.where = art.decomposition, tm, cfg, where
        self.method: Method = method_for(self.dec.config)
        self.cm = art.component_model().to(cfg.device).eval()
        self.prefix = prefix
        self.kind = f"{self.method.name.upper()} {self.method.unit_noun}"
        self.pairs = {n: top_singular_pairs(self.dec.A[n], self.dec.B[n]) for n in self.dec.matrix_names}

    def weight_directions(self, n: str) -> WeightDirections:
        sigma, u, v = self.pairs[n]
        tm = self.tm
        lm_neurons = tm.lm is not None
        return WeightDirections(
            matrix=n, sigma=sigma, read=v, write=u,
            read_tokens=(v @ tm.W_E.T) if tm.W_E is not None and tm.reads_stream(n, v.shape[1]) else None,
            write_tokens=(u @ tm.W_U.T) if tm.W_U is not None and tm.writes_stream(n, u.shape[1]) else None,
            read_dims_family="neurons" if lm_neurons and n == "mlp.down" else None,
            write_dims_family="neurons" if lm_neurons and n == "mlp.up" else None,
        )  # fmt: skip

    def _header(self) -> str:
        return f"{self.kind}s of {', '.join(self.dec.matrix_names)} ({self.where}, step {self.dec.step})"


class _PerMatrixUnits(_Decomposition):
    """A method with units per matrix (SPD): one family per decomposed matrix."""

    def __init__(self, prefix: str, art: RunArtifacts, tm: TokenModel, cfg: LMBrowserConfig, where: str):
        super().__init__(prefix, art, tm, cfg, where)
        self.tau = self.method.active_threshold()
        self.names = {n: family_name(f"{prefix}.{n}") for n in self.dec.matrix_names}
        selection = self.method.unit_selection()
        self.families = []
        for n in self.dec.matrix_names:
            sigma, u, _ = self.pairs[n]
            out = u * sigma[:, None]  # the output per unit of input along v (U_c ‖V_c‖ for rank one)
            dirs: dict[str, Tensor] = {}
            if tm.lm is not None and n == "mlp.up":
                W_U, W_down = _mlp_weights(tm.lm)
                dirs = {"neuron_dirs": u, "resid_dirs": (W_down @ u.T).T, "logit_effects": (W_U @ W_down @ out.T).T}
                logit_text = "unembed \u00b7 mlp.down \u00b7 \u03c3u (linear path: the ReLU ignored; ln_f's scale ignored)"
            elif tm.W_U is not None and tm.writes_stream(n, u.shape[1]):
                dirs = {"resid_dirs": u, "logit_effects": (tm.W_U @ out.T).T}
                logit_text = "unembed \u00b7 \u03c3u (direct path; LayerNorms ignored)"
            else:
                logit_text = "none (it writes neither the residual stream nor the MLP)"
            if cfg.unit_activation is UnitActivation.output_norm:
                label = "masked output norm"
                act_text = f"active where its {selection}; activation there \u2016g_c P_c a\u2016, the norm of its masked output (0 elsewhere)"
            else:
                label = self.method.unit_score_noun
                act_text = f"activation: its {label}, active where its {selection}"
            self.families.append(LMFamily(
                name=self.names[n], kind=self.kind, act_label=label, n_units=self.dec.A[n].shape[0],
                threshold=0.0 if cfg.unit_activation is UnitActivation.output_norm else self.tau,
                description=f"{self.method.name.upper()} {self.method.unit_noun}s (rank {self.dec.A[n].shape[1]}) of {n} "
                            f"({where}, step {self.dec.step}); {act_text}. Logit effects: {logit_text}. Weights: "
                            "\u03c3 u v\u1d40, the top singular pair of the unit's weight.",
                weights=[self.weight_directions(n)], **dirs,
            ))  # fmt: skip

    def activations(self, batch: _Batch) -> dict[str, Tensor]:
        cm, x = self.cm, batch.tokens
        with torch.no_grad():
            scores = self.method.unit_scores(cm, x)
        assert isinstance(scores, dict), f"{self.method.name}: per-matrix units need a score per matrix"
        out = {}
        if self.cfg.unit_activation is UnitActivation.score:
            return {name: scores[n] for n, name in self.names.items()}
        with torch.no_grad(), cm.capture(list(self.names), inputs=True) as a_in:
            cm(x)
        for n, name in self.names.items():
            layer = cm.layers[n]
            norm = layer.per_component_sq_norm(layer.component_acts(a_in[n])).clamp_min(0).sqrt()
            out[name] = torch.where(scores[n] > self.tau, scores[n] * norm, 0.0)
        return out


class _SpanningUnits(_Decomposition):
    """A method whose units span the matrices (APD): one family, a unit's part in every matrix."""

    def __init__(self, prefix: str, art: RunArtifacts, tm: TokenModel, cfg: LMBrowserConfig, where: str):
        super().__init__(prefix, art, tm, cfg, where)
        self.name = family_name(prefix)
        self.writers = [n for n in self.dec.matrix_names if tm.W_U is not None and tm.writes_stream(n, self.dec.B[n].shape[1])]
        logit_text = ("none (no matrix writes the residual stream)" if not self.writers else
                      f"unembed \u00b7 (its part in {', '.join(self.writers)} applied to the mean of that matrix's input "
                      "over its active tokens): its mean direct write (LayerNorms ignored)")  # fmt: skip
        self.families = [LMFamily(
            name=self.name, kind=self.kind, act_label=f"{self.method.unit_score_noun} when selected", n_units=self.dec.C,
            description=f"{self._header()}; activation: {self.method.unit_selection()}, else 0. Logit effects: "
                        f"{logit_text}. Weights: \u03c3 u v\u1d40, the top singular pair of its part in each matrix.",
            weights=[self.weight_directions(n) for n in self.dec.matrix_names],
        )]  # fmt: skip
        self.reset()

    def activations(self, batch: _Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            scores, masks = self.method.unit_scores(self.cm, batch.tokens), self.method.eval_masks(self.cm, batch.tokens)
        assert isinstance(scores, Tensor) and isinstance(masks, Tensor)
        return {self.name: torch.where(masks > self.method.active_threshold(), scores, 0.0)}

    def reset(self) -> None:
        self.sum_in = {n: torch.zeros(self.dec.C, a.shape[-1], dtype=torch.float64) for n, a in self.dec.A.items()}
        self.count = torch.zeros(self.dec.C, dtype=torch.float64)

    def observe(self, acts: dict[str, Tensor], batch: _Batch) -> None:
        a = acts[self.name]
        active = (a > 0).reshape(-1, a.shape[-1]).double().cpu()
        with torch.no_grad(), self.cm.capture(self.dec.matrix_names, inputs=True) as a_in:
            self.cm(batch.tokens)
        for n in self.dec.matrix_names:
            self.sum_in[n] += active.T @ a_in[n].reshape(active.shape[0], -1).double().cpu()
        self.count += active.sum(0)

    def finish(self) -> None:
        fam, dec = self.families[0], self.dec
        n_active = self.count.clamp(min=1)[:, None]
        write = {n: torch.einsum("com,cmi,ci->co", dec.B[n].double(), dec.A[n].double(), self.sum_in[n] / n_active).float()
                 for n in dec.matrix_names}  # fmt: skip
        if self.writers:
            assert self.tm.W_U is not None
            fam.resid_dirs = sum(write[n] for n in self.writers)  # type: ignore[assignment]
            fam.logit_effects = (self.tm.W_U @ fam.resid_dirs.T).T
        if self.tm.lm is not None and "mlp.up" in write:
            fam.neuron_dirs = write["mlp.up"]


def _decomposition_source(prefix: str, art: RunArtifacts, tm: TokenModel, cfg: LMBrowserConfig, where: str) -> _Source:
    """The families of a decomposition, laid out as its method's units are (asked of the method)."""
    layout = _SpanningUnits if method_for(art.decomposition.config).units_span_matrices else _PerMatrixUnits
    return layout(prefix, art, tm, cfg, where)


# ---------------------------------------------------------------------------------------------
# Loading a run dir's units, and running them
# ---------------------------------------------------------------------------------------------


def heldout_windows(seq_len: int, n_windows: int) -> Int[Tensor, "n_windows seq_len"]:
    """``n_windows`` evenly spaced, non-overlapping windows of ``seq_len`` tokens of the held-out plays."""
    stream = load_corpus(Split.heldout)
    n_avail = stream.numel() // seq_len
    if not 1 <= n_windows <= n_avail:
        raise BrowserDataError(f"n_windows={n_windows}: the held-out plays hold 1 to {n_avail} windows of {seq_len} tokens")
    starts = torch.linspace(0, n_avail - 1, n_windows).round().long() * seq_len
    return stream[starts[:, None] + torch.arange(seq_len)]


class LMUnits:
    """A token model and every unit family of a run dir, ready to run on text.

    ``activations(tokens)`` gives every family's activations on ``[B, T]`` windows; ``windows()`` the
    text the data is built on; ``prompt_acts(text)`` (also callable as ``units(text)``) is the prompt
    encoder (for a model with the Shakespeare tokenizer).
    """

    def __init__(self, layout: LMRunLayout, tm: TokenModel, target: TargetConfig, sources: list[_Source],
                 config: LMBrowserConfig, notes: list[str]):  # fmt: skip
        self.layout, self.tm, self.target, self.sources, self.config = layout, tm, target, sources, config
        self.model = tm.model
        self.notes = notes
        self.tokenizer = load_tokenizer() if isinstance(target, CharacterWindows) else None  # lm_1l, lm_4l: the characters
        self.vocab = list(self.tokenizer.tokens) if self.tokenizer is not None else [f"\u27e8{i}\u27e9" for i in range(tm.vocab_size)]

    @property
    def families(self) -> list[LMFamily]:
        return [f for s in self.sources for f in s.families]

    @property
    def thresholds(self) -> dict[str, float]:
        return {f.name: f.threshold for f in self.families}

    def windows(self) -> Int[Tensor, "S T"]:
        """The text the data is built on (``LMBrowserConfig.n_windows``)."""
        cfg = self.config
        if isinstance(self.target, CharacterWindows):
            return heldout_windows(self.target.seq_len, cfg.n_windows)
        x = self.target.eval_batch(cfg.n_windows, torch.Generator().manual_seed(cfg.text_seed))
        if x.ndim != 2 or x.is_floating_point():
            raise LMRunError(f"{self.target.name}: eval_batch gave {x.dtype} of shape {tuple(x.shape)}, not [B, T] token ids")
        return x.long().cpu()

    def text_description(self) -> str:
        if isinstance(self.target, CharacterWindows):
            return "evenly spaced windows of the held-out plays"
        return f"windows from the target's eval_batch (seed {self.config.text_seed})"

    @torch.no_grad()
    def activations(self, tokens: Int[Tensor, "B T"]) -> dict[str, Float[Tensor, "B T U"]]:
        """Every family's activations on ``tokens`` (on the CPU)."""
        batch = _Batch(tokens.to(self.config.device), self.tm)
        return {name: a.cpu() for src in self.sources for name, a in src.activations(batch).items()}

    def heldout_activations(self, tokens: Int[Tensor, "S T"]) -> dict[str, Float[Tensor, "N U"]]:
        """Every family's activations on the windows ``tokens``, ``[S*T, U]`` each, in ``batch_windows``
        batches; the sources' statistics of the text read (APD's write directions) are set."""
        S, T = tokens.shape
        out = {f.name: torch.empty(S * T, f.n_units) for f in self.families}
        bw = self.config.batch_windows
        for src in self.sources:
            src.reset()
        for s0 in range(0, S, bw):
            batch = _Batch(tokens[s0 : s0 + bw].to(self.config.device), self.tm)
            for src in self.sources:
                with torch.no_grad():
                    acts = src.activations(batch)
                src.observe(acts, batch)
                for name, a in acts.items():
                    out[name][s0 * T : (s0 + batch.tokens.shape[0]) * T] = a.reshape(-1, a.shape[-1]).float().cpu()
        for src in self.sources:
            src.finish()
        return out

    def encode(self, text: str) -> Int[Tensor, "T"]:
        """``text`` as token ids; :class:`BrowserDataError` naming unknown characters or a text too long."""
        if self.tokenizer is None:
            raise BrowserDataError(f"the browser has no tokenizer for {self.target.name!r}: compute the prompts' "
                                   "activations yourself and pass them with --prompt-acts FILE")  # fmt: skip
        if not text:
            raise BrowserDataError("the prompt is empty")
        missing = sorted(set(text) - set(self.tokenizer.tokens))
        if missing:
            raise BrowserDataError(f"prompt {text[:40]!r}: characters {missing} are not in the model's vocabulary of "
                                   f"{self.tokenizer.vocab_size} characters (the Shakespeare corpus's)")  # fmt: skip
        ids = self.tokenizer.encode(text)
        seq_len = getattr(self.target, "seq_len", None)
        if seq_len is not None and ids.numel() > seq_len:
            raise BrowserDataError(f"prompt {text[:40]!r} has {ids.numel()} characters; the model reads at most {seq_len}")
        return ids

    def prompt_acts(self, text: str) -> PromptActs:
        """Every unit active on ``text`` (per position, above its family's threshold, largest first)."""
        ids = self.encode(text)
        acts = self.activations(ids[None])
        return PromptActs.from_dense(text, ids, {n: a[0] for n, a in acts.items()}, self.thresholds)

    __call__ = prompt_acts

    def alignments(self, acts: dict[str, Float[Tensor, "N U"]] | None) -> list[AlignmentTable]:
        """Each family's best matches in every other family: by write-direction cosine in a shared
        space, and (with ``acts`` and ``config.correlation``) by activation correlation."""
        k = self.config.n_align
        tables = []
        fams = self.families
        for a in fams:
            for b in fams:
                if a is b:
                    continue
                if a.neuron_dirs is not None and b.neuron_dirs is not None:
                    tables.append(cosine_alignment(a.name, b.name, a.neuron_dirs, b.neuron_dirs, k, NEURON_SPACE))
                elif a.resid_dirs is not None and b.resid_dirs is not None:
                    tables.append(cosine_alignment(a.name, b.name, a.resid_dirs, b.resid_dirs, k, RESID_SPACE))
        if acts is not None and self.config.correlation:
            for i, a in enumerate(fams):
                for b in fams[i + 1 :]:
                    corr = correlation_matrix(acts[a.name], acts[b.name])
                    for src, tgt, m in ((a, b, corr), (b, a, corr.T)):
                        idx, scores = top_matches(m, k)
                        tables.append(AlignmentTable(src.name, tgt.name, CORRELATION, idx, scores))
        return tables


def load_lm_units(layout: LMRunLayout, config: LMBrowserConfig | None = None) -> LMUnits:
    """Load the target, decompositions and SAEs that ``layout`` lists."""
    cfg = config or LMBrowserConfig()
    runs: list[tuple[str, RunArtifacts]] = []
    for prefix, d in layout.decompositions:
        try:
            runs.append((prefix, load_run(d)))
        except (ConfigError, CheckpointError, OSError, KeyError, ValueError) as e:
            raise LMRunError(f"cannot load the decomposition in {d}: {e}") from e
    targets = {json.dumps(a.run.target.to_dict(), sort_keys=True) for _, a in runs}
    if len(targets) > 1:
        raise LMRunError(f"{layout.run_dir}: the decompositions decompose different targets; browse one at a time")
    notes = []
    target_cfg: TargetConfig
    if runs:
        target_cfg, model = runs[0][1].run.target, runs[0][1].target
    else:
        target_cfg = LMTargetConfig()
        model, _ = get_target(target_cfg)
        notes.append(f"target: the shipped {target_cfg.name} (no decomposition in the run dir names one)")
    tm = token_model(model.to(cfg.device).eval())
    sources: list[_Source] = [_Neurons(tm.lm)] if tm.lm is not None else []
    for prefix, art in runs:
        where = shown(art.run_dir, layout.run_dir) if art.run_dir != layout.run_dir else layout.run_dir.name
        sources.append(_decomposition_source(prefix, art, tm, cfg, where))
    for name, d in layout.saes:
        if tm.lm is None:
            raise LMRunError(f"{d}: SAEs are browsed on the one-layer transformer's MLP; the target is a {type(model).__name__}")
        try:
            sae = load_sae(d, cfg.device)
        except SAELoadError as e:
            raise LMRunError(str(e)) from e
        sources.append(_SAE(name, sae, tm.lm, str(d.relative_to(layout.run_dir))))
    names = [f.name for s in sources for f in s.families]
    if len(set(names)) != len(names):
        raise LMRunError(f"{layout.run_dir}: two unit families would share a name: {names}")
    return LMUnits(layout, tm, target_cfg, sources, cfg, notes)
