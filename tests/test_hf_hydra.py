"""``target=hf`` from the command line (a tiny GPT-2 and its tokenizer saved to a tmp folder, nothing
fetched), your own target without ``~experiment``, and the console scripts run from another folder."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
MODULE_EXAMPLE = ["target=module", "target.factory=experiments.examples.mlp:trained_mlp",
                  "target.data=experiments.examples.mlp:batch", "target.decompose=[0,2]"]  # fmt: skip


def save_tiny_gpt2(folder: Path, with_tokenizer: bool = True) -> int:
    """A 1-layer GPT-2 and a character-level BPE tokenizer trained on a slice of the shipped corpus."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")
    import tokenizers

    from apd.toy_models.lm_data import Split, load_corpus_text

    text = load_corpus_text(Split.train)[:20_000]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(fast), n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    if with_tokenizer:
        fast.save_pretrained(folder)
    return len(fast)


def _run(args: list[str], cwd: Path, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (exe or [sys.executable, "-m", "experiments.decompose"]) + args
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)


def _hf_run(tmp_path: Path, *extra: str) -> Path:
    model_dir = tmp_path / "tiny_gpt2"
    save_tiny_gpt2(model_dir)
    out = tmp_path / "run"
    proc = _run(["target=hf", f"target.path={model_dir}", "target.modules=[transformer.h.*.mlp.c_fc,transformer.h.*.mlp.c_proj]",
                 "target.seq_len=16", "method=spd", "method.C=8", "method.steps=5", "method.faithfulness_warmup_steps=2",
                 "figures=false", f"hydra.run.dir={out}", *extra], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_hf_target_from_the_command_line(tmp_path):
    from apd.toy_models.lm_data import Split, load_corpus_text

    text = tmp_path / "plays.txt"  # a text file (the shipped corpus takes ~10 s to tokenize: the slow test below)
    text.write_text(load_corpus_text(Split.train)[:30_000], encoding="utf-8")
    out = _hf_run(tmp_path, f"target.data={text}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ci_recon_kl"] >= 0 and 0 <= metrics["l0"] <= 16  # 2 matrices of 8 subcomponents
    run = (out / "config.yaml").read_text()
    assert "batch_size: 16" in run and "n_eval: 64" in run  # token-sized defaults, not the toys' 2048 / 10,000
    from apd import load_decomposition

    dec = load_decomposition(out)
    assert dec.kinds["transformer.h.0.mlp.c_fc"] == "transposed_linear" and dec.step == 5


@pytest.mark.slow
def test_hf_target_on_the_shipped_corpus(tmp_path):
    out = _hf_run(tmp_path)  # target.data=shakespeare: the training plays, tokenized with the model's tokenizer
    assert json.loads((out / "metrics.json").read_text())["ci_recon_kl"] >= 0


def test_hf_target_errors_name_the_problem_and_the_fix(tmp_path):
    from apd.config import ConfigError
    from apd.targets import HFTargetConfig

    save_tiny_gpt2(tmp_path / "no_tok", with_tokenizer=False)
    with pytest.raises(ConfigError, match="no tokenizer"):
        HFTargetConfig(path=str(tmp_path / "no_tok"), modules=["lm_head"]).batch(2, None)
    with pytest.raises(ConfigError, match="not a folder written by save_pretrained"):
        HFTargetConfig(path=str(tmp_path / "nothing"), modules=["lm_head"]).build()
    with pytest.raises(ConfigError, match="target.modules"):
        HFTargetConfig(path=str(tmp_path))


def test_text_file_data_is_tokenized_with_the_models_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")
    from apd.targets import HFTargetConfig

    save_tiny_gpt2(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be that is the question " * 50, encoding="utf-8")
    cfg = HFTargetConfig(path=str(tmp_path / "m"), modules=["lm_head"], data=str(text), seq_len=8)
    x = cfg.batch(4, None)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m", local_files_only=True)
    full = text.read_text(encoding="utf-8")
    ids = tok(full[: int(len(full) * 0.9)], add_special_tokens=False)["input_ids"]  # training: the first 90%
    assert x.shape == (4, 8)
    for row in x.tolist():  # each window is 8 consecutive tokens of the tokenized text
        assert any(ids[i : i + 8] == row for i in range(len(ids) - 7))
    assert cfg.modules() == ["lm_head"]


def test_own_target_with_spd_needs_no_tilde_experiment_and_gets_its_own_run_dir(tmp_path):
    proc = _run([*MODULE_EXAMPLE, "method=spd", "method.C=6", "method.steps=3", "method.faithfulness_warmup_steps=1",
                 "n_eval=64", "batch_size=64", "figures=false"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "decompose").iterdir())
    assert [r.name for r in runs] == ["module"]  # not tms_5_2 (the default preset's name)
    metrics = json.loads((next(runs[0].iterdir()) / "metrics.json").read_text())
    assert "ci_recon_mse" in metrics


def test_console_scripts_are_declared_and_run_from_any_folder(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"apd-decompose": "experiments.decompose:launch", "apd-browse": "experiments.browse:cli"}
    installed = shutil.which("apd-decompose")
    # the installed script when there is one (CI installs the project), else what it runs: the entry point
    exe = [installed] if installed else [sys.executable, "-c", "import sys; from experiments.decompose import launch; sys.exit(launch())"]
    proc = _run([*MODULE_EXAMPLE, "method=spd", "method.C=4", "method.steps=2", "method.faithfulness_warmup_steps=1",
                 "n_eval=32", "batch_size=32", "figures=false", "hydra.run.dir=here"], cwd=tmp_path, exe=exe)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "here" / "metrics.json").is_file()
    browse = shutil.which("apd-browse")
    exe = [browse] if browse else [sys.executable, "-c", "import sys; from experiments.browse import cli; sys.exit(cli())"]
    proc = subprocess.run([*exe, str(tmp_path / "missing")], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 1 and "missing" in proc.stderr  # its one-line error, from another folder
