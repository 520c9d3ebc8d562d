"""apd.checkpoint: the files written before it existed still load, and a damaged or foreign file
is refused with the file and the fix named.

tests/data/formats/ holds files written by apd at commit 7035912, before the formats moved into
apd/checkpoint.py (tests/data/formats/make_formats.py is how): a finished TMS 5-2 run dir (APD, 20
steps), an SPD decomposition, a two-seed training checkpoint, and the earlier single-method APD
format.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from apd import APDConfig, CheckpointError, SPDConfig, decompose, load_decomposition
from apd.checkpoint import (
    CHECKPOINT_NAME,
    FILE_NAME,
    TrainingCheckpoint,
    read_checkpoint,
    read_decomposition,
    safe_load,
    state_sha256,
    write_checkpoint,
)
from apd.methods import method_for
from apd.targets import TMSTargetConfig, get_target

FORMATS = Path(__file__).parent / "data" / "formats"


@pytest.fixture(scope="module")
def tms_5_2() -> torch.nn.Module:
    model, info = get_target(TMSTargetConfig(name="tms_5_2"))
    assert info["source"].endswith("tms_5_2.pt")
    return model


def test_a_decomposition_and_checkpoint_of_the_earlier_version_load_and_agree(tms_5_2):
    dec = load_decomposition(FORMATS / "run_v2")  # the run dir: its decomposition.pt
    assert isinstance(dec.config, APDConfig) and dec.config.C == 8 and dec.step == 20 and dec.tied == {"dec": "enc"}
    assert dec.kinds and dec.modules == ["enc", "dec"] and [h["step"] for h in dec.history] == [0, 19]
    ckpt = load_decomposition(FORMATS / "run_v2" / CHECKPOINT_NAME)  # the checkpoint at the same (last) step
    assert ckpt.config == dec.config and ckpt.step == 20 and ckpt.history == dec.history
    assert set(ckpt.params) == set(dec.params) and all(torch.equal(ckpt.params[n], dec.params[n]) for n in dec.params)
    # it decomposed the shipped tms_5_2: attaching it checks the weights and the model runs on it
    cm = dec.attach(tms_5_2)
    x = torch.rand(16, 5)
    ones = torch.ones(16, 8)
    torch.testing.assert_close(cm(x, masks=ones), cm(x, masks={"enc": ones, "dec": ones}))


def test_the_earlier_single_method_format_loads_as_apd():
    old = load_decomposition(FORMATS / "apd_v1_decomposition.pt")
    new = load_decomposition(FORMATS / "run_v2")  # the same decomposition, in today's format
    assert old.method == "apd" and old.config == new.config and old.step == 20 and old.history == new.history
    assert old.modules == ["enc", "dec"] and old.tied == {"dec": "enc"}
    assert torch.equal(old.A["enc"], new.A["enc"]) and torch.equal(old.B["enc"], new.B["enc"])


def test_an_spd_decomposition_of_the_earlier_version_loads_with_its_ci_functions(tms_5_2):
    dec = load_decomposition(FORMATS / "spd_decomposition.pt")
    assert isinstance(dec.config, SPDConfig) and dec.C == 4 and dec.step == 10
    assert any(not n.startswith("model.") for n in dec.params)  # the causal-importance functions' tensors
    cm = dec.attach(tms_5_2)
    x = torch.rand(7, 5)
    with torch.no_grad():
        ci = method_for(dec.config).eval_masks(cm, x)  # the causal importances, from the loaded CI functions
    assert set(ci) == {"enc", "dec"} and all(g.shape == (7, 4) and 0 <= g.min() and g.max() <= 1 for g in ci.values())
    assert cm(x, masks=ci).shape == (7, 5)


def test_a_two_seed_checkpoint_of_the_earlier_version_gives_each_seed(tms_5_2):
    path = FORMATS / "seeds_checkpoint.pt"
    ckpt = read_checkpoint(path)
    assert ckpt.seeds == [3, 4] and ckpt.stacked and ckpt.step == 10 and len(ckpt.rng) == 1 and ckpt.data_consumed == 20  # 10 steps x 2 seeds
    assert all(p.shape[0] == 2 for p in ckpt.params.values()) and "state" in ckpt.optimizer
    a, b = load_decomposition(path, seed=3), load_decomposition(path, seed=4)
    assert a.config.seed == 3 and b.config.seed == 4 and not torch.equal(a.A["enc"], b.A["enc"])
    assert torch.equal(a.A["enc"], ckpt.params["model.enc.A"][0]) and torch.equal(b.A["enc"], ckpt.params["model.enc.A"][1])
    a.attach(tms_5_2)
    with pytest.raises(CheckpointError, match=r"holds seeds \[3, 4\], not 5"):
        load_decomposition(path, seed=5)


def test_a_written_checkpoint_reads_back_field_for_field(tmp_path):
    ckpt = read_checkpoint(FORMATS / "seeds_checkpoint.pt")
    write_checkpoint(tmp_path / CHECKPOINT_NAME, ckpt)
    again = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert isinstance(again, TrainingCheckpoint)
    for f in ("method", "config", "modules", "tied", "kinds", "seeds", "stacked", "step", "data_consumed", "histories"):
        assert getattr(again, f) == getattr(ckpt, f), f
    assert all(torch.equal(again.params[n], ckpt.params[n]) for n in ckpt.params)
    assert torch.equal(again.rng[0]["torch"], ckpt.rng[0]["torch"])


def test_damaged_and_foreign_files_are_refused_naming_the_file(tmp_path):
    obj = safe_load(FORMATS / "seeds_checkpoint.pt")
    del obj["optimizer"]
    torch.save(obj, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is an apd-checkpoint/2 without \['optimizer'\]: the file is damaged"):
        read_checkpoint(tmp_path / CHECKPOINT_NAME)
    # a decomposition.pt is no training checkpoint: the error says what still works
    shutil.copy(FORMATS / "run_v2" / FILE_NAME, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=r"d\.pt is not a training checkpoint.*still loads with apd\.load_decomposition"):
        read_checkpoint(tmp_path / "d.pt")
    torch.save({"format": "something/3"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt is not an apd decomposition \(format 'something/3'"):
        read_decomposition(tmp_path / "x.pt")


def test_resuming_on_another_target_is_refused(tmp_path, tms_5_2):
    cfg = TMSTargetConfig(name="tms_5_2")
    config = APDConfig(C=4, topk=1, steps=6, checkpoint_every=3, log_every=1)

    def stop(step, terms):
        if step == 4:
            raise KeyboardInterrupt

    data = lambda: cfg.batch(32, None)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        decompose(tms_5_2, data, config, cfg.modules(), checkpoint_dir=tmp_path, callback=stop, progress=False)
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME).step == 3
    other, _ = get_target(TMSTargetConfig(name="tms_5_2", train_steps=20))  # trained afresh: other weights
    with pytest.raises(CheckpointError, match=r"written for another target: the model's \['enc'\] differ"):
        decompose(other, data, config, cfg.modules(), checkpoint_dir=tmp_path, progress=False)
    assert decompose(tms_5_2, data, config, cfg.modules(), checkpoint_dir=tmp_path, progress=False).step == 6


def test_state_sha256_is_the_hash_of_names_dtypes_shapes_and_bytes():
    w = torch.tensor([[1.0, -2.0]])
    by_hand = hashlib.sha256(b"w|torch.float32|(1, 2)|" + w.numpy().tobytes()).hexdigest()
    assert state_sha256({"w": w}) == by_hand
    assert state_sha256({"w": w.clone()}) == by_hand and state_sha256({"w": w.T.contiguous().T}) == by_hand
    assert state_sha256({"w": w.double()}) != by_hand and state_sha256({"v": w}) != by_hand
    assert state_sha256({"w": w.reshape(2, 1)}) != by_hand and state_sha256({"w": w + 1e-7}) != by_hand
    # the order of the dict does not matter, a second entry does
    v = torch.zeros(3, dtype=torch.int64)
    assert state_sha256({"w": w, "v": v}) == state_sha256({"v": v, "w": w}) != by_hand
