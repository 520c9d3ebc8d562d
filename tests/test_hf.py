"""Hugging Face causal LMs as they come (no wrapper): GPT-2 (Conv1D, fused c_attn, tied wte/lm_head),
Llama (grouped-query attention, gated MLP) and GPT-NeoX, built from tiny configs (nothing fetched),
with dict batches whose attention_mask keeps padded positions out of every loss and metric."""

import math

import pytest
import torch

from apd import DataError, Decomposition, ModuleSelectionError, SPDConfig, decompose, decompose_seeds
from apd.losses.distance import output_distance
from apd.losses.importance_minimality import importance_minimality_loss
from apd.methods import method_for
from apd.model_io import ModelIO, as_output_tensor, masked_mean
from apd.train import loss_terms

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")

V = 64


def gpt2(n_layer: int = 1) -> torch.nn.Module:
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=V, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(n_layer: int = 1) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(num_hidden_layers=n_layer, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def neox(n_layer: int = 1) -> torch.nn.Module:
    cfg = transformers.GPTNeoXConfig(num_hidden_layers=n_layer, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                     vocab_size=V, max_position_embeddings=32)  # fmt: skip
    return transformers.GPTNeoXForCausalLM(cfg).eval()


GPT2_ALL = ["transformer.wte", "transformer.h.*.attn.c_attn", "transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_*", "lm_head"]
ARCHS = {
    "gpt2": (gpt2, GPT2_ALL),
    "llama": (llama, ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"]),
    "neox": (neox, ["gpt_neox.layers.*.attention.query_key_value", "gpt_neox.layers.*.attention.dense",
                    "gpt_neox.layers.*.mlp.dense_*"]),
}  # fmt: skip


def padded_batch(B: int = 4, T: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding, as a tokenizer pads a short text
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def exact_factors(cm) -> None:  # noqa: ANN001
    """Set every decomposed matrix's rank-one subcomponents to its SVD (needs C >= its rank)."""
    with torch.no_grad():
        for n in cm.matrix_names:
            layer = cm.layers[n]
            U, S, Vh = torch.linalg.svd(layer.target_weight(), full_matrices=False)
            k = S.numel()
            layer.A.zero_(), layer.B.zero_()
            layer.A[:k, 0] = Vh
            layer.B[:k, :, 0] = (U * S).T


# ---------------------------------------------------------------- outputs and batches, by hand
def test_output_tensor_is_read_from_logits_dicts_tuples_or_output_fn():
    t = torch.arange(6.0).reshape(1, 2, 3)
    assert as_output_tensor(t) is t
    assert as_output_tensor(transformers.modeling_outputs.CausalLMOutput(logits=t)) is t
    assert as_output_tensor({"logits": t, "loss": None}) is t
    assert as_output_tensor((t, "past")) is t
    assert as_output_tensor((t, "past"), lambda o: o[0] * 2).equal(2 * t)


def test_masked_distances_and_minimality_count_only_valid_positions_hand_worked():
    valid = torch.tensor([[1, 0]])
    target, out = torch.zeros(1, 2, 1), torch.tensor([[[1.0], [3.0]]])
    assert output_distance(target, out, "mse", valid).item() == 1.0  # (1²)/1, not (1² + 3²)/2 = 5
    assert output_distance(target, out, "mse").item() == 5.0
    # KL(p ‖ q) at the valid position only: p = softmax(0, 0) = (½, ½), q = softmax(0, log 3) = (¼, ¾)
    tl = torch.zeros(1, 2, 2)
    ol = torch.tensor([[[0.0, math.log(3)], [5.0, -5.0]]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert output_distance(tl, ol, "kl", valid).item() == pytest.approx(want, rel=1e-6)
    # importance minimality: mean over valid rows of g^p, summed over subcomponents: (0.5 + 0.25) at row 0
    g = {"a": torch.tensor([[[0.5, 0.25], [1.0, 1.0]]])}
    assert importance_minimality_loss(g, p=1.0, eps=0.0, valid=valid).item() == pytest.approx(0.75)
    assert importance_minimality_loss(g, p=1.0, eps=0.0).item() == pytest.approx((1.5 + 1.25) / 2)
    assert masked_mean(torch.tensor([[2.0, 7.0]]), valid).item() == 2.0


def test_padding_changes_no_loss_or_metric():
    """A right-padded sequence gives exactly the numbers of the same sequence cut to its real tokens
    (a causal LM's real positions never see the padding): reconstruction KL, minimality, L0."""
    model = gpt2()
    config = SPDConfig(C=6, output_loss="kl", stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None,
                       ci_masked_recon_coeff=1.0, importance_minimality_coeff=1.0, ci_threshold=0.0)  # fmt: skip
    cm = method_for(config).build(model, ["transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_proj"])
    ids = torch.randint(0, V, (1, 8))
    packed = torch.stack([ids, torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])], dim=1)
    cm.io = ModelIO(("input_ids", "attention_mask"))
    padded = {k: v.item() for k, v in loss_terms(cm, packed, config).items()}
    cm.io = ModelIO()
    cut = {k: v.item() for k, v in loss_terms(cm, ids[:, :5], config).items()}
    for k in ("ci_masked_recon", "importance_minimality", "l0"):
        assert padded[k] == pytest.approx(cut[k], rel=1e-5, abs=1e-7), k
    cm.io = ModelIO(("input_ids", "attention_mask"))
    unmasked = torch.stack([ids, torch.ones_like(ids)], dim=1)
    full = {k: v.item() for k, v in loss_terms(cm, unmasked, config).items()}
    assert full["importance_minimality"] != pytest.approx(padded["importance_minimality"], rel=1e-3)  # the mask matters


def test_dict_batches_must_be_token_tensors():
    with pytest.raises(DataError, match="labels"):
        decompose(gpt2(), lambda: {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": [1, 2]},
                  SPDConfig(C=2, steps=1), modules=["lm_head"], progress=False)  # fmt: skip


# ---------------------------------------------------------------- each architecture end to end
@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_model_decomposes_as_it_comes(arch):
    make, modules = ARCHS[arch]
    model = make(2)
    batch = padded_batch()
    config = SPDConfig(C=16, steps=4, output_loss="kl", faithfulness_warmup_steps=20, log_every=1)
    dec = decompose(model, lambda: batch, config, modules=modules, progress=False)
    assert len(dec.history) == 4 and all(math.isfinite(h["total"]) for h in dec.history)
    # with exact subcomponents (each matrix's SVD), Σ components is every module's own weight, in its
    # own layout, and with every mask 1 the masked model is the target, padding and all
    cm = dec.component_model
    exact_factors(cm)
    exact = Decomposition.from_component_model(cm, "spd", config, 4)
    named = dict(model.named_modules())
    for name, P in exact.component_weights().items():
        w = named[name].weight
        w = w.T if isinstance(named[name], torch.nn.Embedding) else w
        assert P.shape[1:] == w.shape, name
        assert torch.allclose(P.sum(0), w, atol=1e-5), name
    packed = torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)
    with torch.no_grad():
        want = model(**batch).logits
        ones = {n: torch.ones(*s, cm.layers[n].C) for n, s in cm.lead_shapes(packed).items()}
        got = cm(packed, masks=ones)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_gpt2_tied_embedding_is_one_matrix():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    dec = decompose(model, lambda: padded_batch(), SPDConfig(C=4, steps=2, output_loss="kl", faithfulness_warmup_steps=1),
                    modules=["transformer.wte", "lm_head"], progress=False)  # fmt: skip
    assert dec.tied == {"lm_head": "transformer.wte"} and dec.matrix_names == ["transformer.wte"]
    P = dec.component_weights()
    assert torch.equal(P["lm_head"], P["transformer.wte"].transpose(1, 2))  # one set of subcomponents, used twice
    cm = dec.attach(model)  # the identity tie is found again on loading
    assert cm.tied_names == dec.tied


def test_two_linears_sharing_one_weight_are_refused_with_the_tie_named():
    model = llama()
    model.lm_head.weight = model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.randn(32, 16))
    with pytest.raises(ModuleSelectionError, match=r"'model.layers.0.mlp.up_proj' and 'lm_head' share one weight"):
        decompose(model, lambda: padded_batch(), SPDConfig(C=2, steps=1), modules=["model.layers.0.mlp.up_proj", "lm_head"],
                  progress=False)  # fmt: skip


def test_conv1d_component_weights_in_conv1d_layout():
    model = gpt2()
    dec = decompose(model, lambda: padded_batch(), SPDConfig(C=16, steps=1, output_loss="kl", faithfulness_warmup_steps=1),
                    modules=["transformer.h.0.attn.c_attn"], progress=False)  # fmt: skip
    cm = dec.component_model
    exact_factors(cm)
    P = cm.component_weights()["transformer.h.0.attn.c_attn"]
    w = model.transformer.h[0].attn.c_attn.weight  # [in 16, out 48]: q, k, v fused
    assert w.shape == (16, 48) and P.shape == (16, 16, 48)
    assert torch.allclose(P.sum(0), w, atol=1e-5)
    # the stored factors stay in nn.Linear layout (B [C, out, 1], A [C, 1, in]): P_c = (B_c A_c)ᵀ
    A, B = dec.A["transformer.h.0.attn.c_attn"], dec.B["transformer.h.0.attn.c_attn"]
    assert A.shape == (16, 1, 16) and B.shape == (16, 48, 1)


def test_module_name_matching_nothing_lists_close_names():
    with pytest.raises(ModuleSelectionError, match=r"close names: \['model.layers.0.self_attn.q_proj'"):
        decompose(llama(), lambda: padded_batch(), SPDConfig(C=2, steps=1), modules=["model.layers.0.self_attn.q_prj"],
                  progress=False)  # fmt: skip


def test_output_fn_picks_the_compared_tensor():
    model = llama()
    seen = []

    def first_ten(out):  # noqa: ANN001, ANN202
        seen.append(type(out).__name__)
        return out.logits[..., :10]

    dec = decompose(model, lambda: padded_batch()["input_ids"], SPDConfig(C=2, steps=1, faithfulness_warmup_steps=1),
                    modules=["model.layers.0.mlp.down_proj"], output_fn=first_ten, progress=False)  # fmt: skip
    assert seen and set(seen) == {"CausalLMOutputWithPast"}
    x = padded_batch()["input_ids"]
    assert dec.component_model(x).shape == (4, 8, 10)


def test_seeds_at_once_on_token_windows_and_a_clear_error_for_padded_dict_batches():
    config = SPDConfig(C=4, steps=2, output_loss="kl", faithfulness_warmup_steps=1)
    decs = decompose_seeds(gpt2(), lambda: padded_batch()["input_ids"], config, modules=GPT2_ALL, seeds=[0, 1], progress=False)
    assert [d.tied for d in decs] == [{"lm_head": "transformer.wte"}] * 2
    with pytest.raises(DataError, match="call decompose once per seed"):
        decompose_seeds(gpt2(), padded_batch, config, modules=["lm_head"], seeds=[0, 1], progress=False)


def test_evaluation_counts_only_valid_positions():
    """``apd.evaluation.evaluate`` on a right-padded dict batch gives the numbers of the same sequence
    cut to its real tokens: reconstruction MSE and KL, L0, thresholded reconstruction, alive counts."""
    from apd.config import OutputLoss
    from apd.evaluation import evaluate

    model = gpt2()
    config = SPDConfig(C=6, steps=2, output_loss="kl", faithfulness_warmup_steps=1, ci_threshold=0.0)
    dec = decompose(model, lambda: padded_batch(), config, modules=["transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_proj"],
                    progress=False)  # fmt: skip
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(3))

    class Target:  # the protocol evaluate() reads (apd.evaluation.ScoredTarget)
        def __init__(self, batch):  # noqa: ANN001
            self.b = batch

        def eval_batch(self, batch_size, generator, device="cpu"):  # noqa: ANN001, ANN202
            return self.b

        def output_loss(self) -> OutputLoss:
            return OutputLoss.kl

        def evaluate(self, ctx) -> dict:  # noqa: ANN001
            return {}

    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
              "attention_mask": torch.tensor([[1] * 8 + [0] * 3])}  # fmt: skip
    got = evaluate(dec, model, Target(padded), n_eval=1, seed=0)
    want = evaluate(dec, model, Target({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), n_eval=1, seed=0)
    keys = [k for k, v in want.items() if isinstance(v, float) and (k.startswith(("ci_", "l0", "n_alive")))]
    assert {"ci_recon_mse", "ci_recon_kl", "l0", "ci_thresholded_recon_mse"} <= set(keys)
    for k in keys:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-7), k
