"""Wrote the files of tests/data/formats/ with apd at commit 7035912 (before apd/checkpoint.py), so that
tests/test_checkpoint.py proves files of that version still load. Kept as the record of how they were
made: `PYTHONPATH=$PWD python tests/data/formats/make_formats.py tests/data/formats` (at that commit)."""
import json, shutil, sys
from pathlib import Path
import torch
from apd import APDConfig, SPDConfig, decompose, decompose_seeds
from apd.experiment import DecomposeRun, run_decompose
from apd.targets import TMSTargetConfig, get_target

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
run = DecomposeRun(target=TMSTargetConfig(name="tms_5_2"), steps=20, batch_size=64, n_eval=200)
run_decompose(run, out / "run_v2", progress=False)
model, _ = get_target(TMSTargetConfig(name="tms_5_2"))
cfg = TMSTargetConfig(name="tms_5_2")
data = lambda: cfg.batch(64, None)
spd = decompose(model, data, SPDConfig(C=4, steps=10, log_every=5), cfg.modules(), progress=False)
spd.save(out / "spd_decomposition.pt")
decompose_seeds(model, data, APDConfig(C=4, topk=1, steps=10, log_every=5), cfg.modules(), [3, 4],
                checkpoint_dir=out / "seeds", progress=False)
shutil.move(out / "seeds" / "checkpoint.pt", out / "seeds_checkpoint.pt"); (out / "seeds").rmdir()
# the single-method format of apd-decomposition/1 files (APD only: A, B and an APDConfig)
from apd import load_decomposition
dec = load_decomposition(out / "run_v2")
cfgd = dec.config.to_dict()
torch.save({"format": "apd-decomposition/1", "config": json.dumps(cfgd), "A": dec.A, "B": dec.B, "tied": json.dumps(dec.tied),
            "target_weights": dec.target_weights, "step": dec.step, "history": json.dumps(dec.history)}, out / "apd_v1_decomposition.pt")
