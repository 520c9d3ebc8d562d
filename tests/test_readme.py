"""The README's code runs as printed and says what it does."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_own_model_snippet_is_fast_and_faithful(tmp_path, monkeypatch, capsys):
    """The 'Your own model' block: its components sum to each weight within 1% (relative Frobenius)."""
    (snippet,) = [b for b in _python_blocks() if "decompose(model, data, config" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102  (the README's own code)
    assert namespace["err"] < 0.01, namespace["err"]
    printed = capsys.readouterr().out
    assert printed.startswith("Decomposition(APD, C=16 over 2 matrices") and "relative error" in printed
    assert (tmp_path / "my_run" / "decomposition.pt").is_file()
    x = torch.randn(8, 20)
    s = torch.ones(8, 16)
    torch.testing.assert_close(namespace["cm"](x, masks=s), namespace["dec"].component_model(x, masks=s))
