"""Write params.yaml as ``dvc exp run`` composes it from conf/ (DVC's Hydra composition), without running the DAG.

    python scripts/compose_params.py                  # after editing conf/preset/NAME.yaml; then dvc status / repro
    python scripts/compose_params.py preset=small     # Hydra overrides, as `dvc exp run -S` takes them

``dvc exp run`` does the same before it runs; this is for a change you want to see in ``dvc status`` first, or
to commit (tests/integration/test_presets_dvc.py checks params.yaml is the composition of conf/).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compose(overrides: list[str], out: Path = ROOT / "params.yaml") -> None:
    from dvc.utils.hydra import compose_and_dump

    conf = str(ROOT / "conf")
    # DVC registers the resolver by importing conf/hydra_plugins in its plugin scan; do what that import does
    runpy.run_path(str(ROOT / "conf/hydra_plugins/longlive_dag.py"))
    compose_and_dump(out, conf, None, "config", conf, overrides)


if __name__ == "__main__":
    try:
        compose(sys.argv[1:])
    except Exception as e:  # a Hydra or dag error: its own message, one line
        sys.exit(f"compose_params: {' '.join(str(e).split())}")
    print(f"wrote {ROOT / 'params.yaml'}")
