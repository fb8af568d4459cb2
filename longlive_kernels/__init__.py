"""``longlive_kernels``: the import name of the top-level ``kernels/`` folder (``from longlive_kernels.rope import ...``).

Not ``kernels``: that is the import name of Hugging Face's ``kernels`` distribution, which transformers >= 5.25
imports; a regular package of ours by that name on sys.path (the repo root comes first whenever a command runs
from it) would shadow it and break transformers and diffusers. ``kernels/`` has no ``__init__.py``, so on
sys.path it is at most a namespace portion, which an installed ``kernels`` package wins over.

Installs map the name in pyproject.toml (``[tool.setuptools] package-dir``). This file serves a checkout used
without an install (the repo root as the working directory or on PYTHONPATH, as the GPU runs do): it points the
package's search path at ``kernels/``.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent / "kernels")]
