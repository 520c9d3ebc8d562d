"""Print VPD's table of a multi-layer LM run as markdown: `python -m experiments.vpd_table RUN_DIR`.

Reads the run's ``metrics.json`` (the ``vpd/...`` keys that ``MultiLMTargetConfig.evaluate`` writes:
``apd.targets.lm_multi.vpd_table``) and prints CE under each kind of mask, then L0, alive
subcomponents and loss recovered per layer, then L0 and alive subcomponents per matrix.
"""

import argparse
import json
import sys
from pathlib import Path

from apd.targets import vpd_table_markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run dir of experiment=spd_lm_4l (holds metrics.json)")
    args = parser.parse_args(argv)
    path = args.run_dir / "metrics.json"
    if not path.is_file():
        sys.exit(f"error: {path} not found: pass the dir of a finished run (it writes metrics.json at the end)")
    try:
        print(vpd_table_markdown(json.loads(path.read_text())), end="")
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
