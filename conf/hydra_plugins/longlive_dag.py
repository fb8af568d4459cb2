"""The ``longlive_dag`` resolver of conf/config.yaml for DVC's Hydra composition (``dvc exp run``).

DVC imports the modules of ``hydra_plugins`` under ``hydra.plugins_path`` (conf/, see .dvc/config) before it
composes params.yaml; importing this one registers the resolver. longlive/dag.py is loaded by its path: DVC's
process does not have this checkout on sys.path, and the module needs nothing else.
"""

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

_spec = importlib.util.spec_from_file_location(
    "longlive_dag_for_hydra", Path(__file__).resolve().parents[2] / "longlive" / "dag.py")
_dag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dag)


def _resolve(name, presets):
    # a config node, not a dict: OmegaConf.resolve (which DVC calls) stores a container result as one
    return OmegaConf.create(_dag.dag_section(OmegaConf.to_container(presets[name], resolve=True), str(name)))


OmegaConf.register_new_resolver("longlive_dag", _resolve, replace=True)
