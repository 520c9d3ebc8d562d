"""A Hugging Face causal LM saved in a local folder as a target (``target=hf``).

``python -m experiments.decompose target=hf target.path=DIR 'target.modules=[transformer.h.*.mlp.c_fc]' method=spd``
loads ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` with
``local_files_only=True`` (nothing is fetched from a hub; ``transformers`` is the optional extra
``pip install -e ".[hf]"``). Its data are windows of ``seq_len`` consecutive tokens of a text,
tokenized once with the model's own tokenizer: the shipped Shakespeare corpus's training plays
(``target.data=shakespeare``, the default; its held-out plays for the metrics) or a UTF-8 text file
(``target.data=PATH``; the metrics draw their windows from its last tenth, training from the rest).
The model is called as it comes (its output's ``.logits``; ``apd.model_io``), outputs compared by KL.
"""

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from apd.config import ConfigError, OutputLoss
from apd.targets.base import TargetConfig, register_target_kind

__all__ = ["HFTargetConfig", "load_hf"]

SHIPPED = "shakespeare"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("target=hf needs the transformers package: pip install -e '.[hf]'") from None
    return transformers


def load_hf(path: str | Path) -> tuple[nn.Module, Any]:
    """The causal LM and tokenizer saved in the local folder ``path`` (``save_pretrained``), in eval mode."""
    tf = _transformers()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"target.path={str(path)!r} is not a folder written by save_pretrained (no config.json there); "
                          "give the local folder of a Hugging Face model (nothing is downloaded)")  # fmt: skip
    model = tf.AutoModelForCausalLM.from_pretrained(p, local_files_only=True).eval()
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"target.path={str(path)!r} holds no tokenizer ({type(e).__name__}); save the model's tokenizer "
                          "beside it: tokenizer.save_pretrained(DIR)") from None  # fmt: skip
    if isinstance(tokenizer, bool) or not callable(getattr(tokenizer, "encode", None)):
        raise ConfigError(f"target.path={str(path)!r} holds no tokenizer; save the model's tokenizer beside it: "
                          "tokenizer.save_pretrained(DIR)")  # fmt: skip
    return model, tokenizer


@functools.cache
def _tokens(path: str, data: str, heldout: bool) -> Tensor:
    """The token ids (int64) of the data text, tokenized once per (model folder, text, split)."""
    _, tokenizer = load_hf(path)
    if data == SHIPPED:
        from apd.toy_models.lm_data import Split, load_corpus_text

        text = load_corpus_text(Split.heldout if heldout else Split.train)
    else:
        f = Path(data).expanduser()
        if not f.is_file():
            raise ConfigError(f"target.data={data!r} is neither {SHIPPED!r} (the shipped corpus) nor a text file")
        full = f.read_text(encoding="utf-8")
        cut = int(len(full) * 0.9)
        text = full[cut:] if heldout else full[:cut]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


class _Patterns(list):
    """``target.modules``: a list of patterns that is also the ``TargetConfig.modules()`` the generic
    code calls (the field has the name the command line uses)."""

    def __call__(self) -> list[str]:
        return list(self)


@register_target_kind
@dataclass(kw_only=True)
class HFTargetConfig(TargetConfig):
    """A Hugging Face causal LM from ``path`` (a local ``save_pretrained`` folder with its tokenizer),
    decomposed at ``modules`` on windows of ``seq_len`` tokens of ``data``."""

    name: str = "hf"
    path: str = ""
    """the local folder of the model and its tokenizer (``save_pretrained``)"""
    data: str = SHIPPED
    """'shakespeare' (the shipped corpus) or the path of a UTF-8 text file"""
    seq_len: int = 64
    modules: list[str] = field(default_factory=list)  # type: ignore[assignment]
    """module-name patterns to decompose (fnmatch over the model's ``named_modules``)"""

    kind: ClassVar[str] = "hf"

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("target=hf needs target.path: the local folder of a model saved with save_pretrained")
        if not self.modules:
            raise ConfigError("target=hf needs target.modules: the module names to decompose, e.g. "
                              "'target.modules=[transformer.h.*.mlp.c_fc,transformer.h.*.mlp.c_proj]'")  # fmt: skip
        self.modules = _Patterns(self.modules)
        if self.seq_len < 1:
            raise ConfigError(f"target.seq_len={self.seq_len} must be >= 1")

    def build(self) -> nn.Module:
        return load_hf(self.path)[0]

    def train(self, model: nn.Module) -> float:
        raise ConfigError("target=hf decomposes the trained model in target.path; train it with transformers")

    def _windows(self, heldout: bool, batch_size: int, generator: torch.Generator | None, device: str | torch.device) -> Tensor:
        from apd.toy_models.lm_data import lm_batch

        tokens = _tokens(str(Path(self.path).expanduser().resolve()), self.data, heldout)
        if tokens.numel() < self.seq_len:
            raise ConfigError(f"target.data={self.data!r} gives {tokens.numel()} tokens ({'held-out' if heldout else 'training'} "
                              f"part), fewer than target.seq_len={self.seq_len}; give a longer text or a shorter seq_len")  # fmt: skip
        return lm_batch(tokens, batch_size, self.seq_len, generator, device)

    def batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        return self._windows(False, batch_size, generator, device)

    def eval_batch(self, batch_size: int, generator: torch.Generator | None, device: str | torch.device = "cpu") -> Tensor:
        return self._windows(True, batch_size, generator, device)

    def output_loss(self) -> OutputLoss:
        return OutputLoss.kl

    def ready_made(self) -> tuple[nn.Module, dict[str, Any]]:
        """The model from ``path``: no shipped file, no training."""
        return self.build(), {"source": str(self.path), "train_loss": float("nan")}

