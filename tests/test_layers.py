"""Layers import downward only: the order is the one in ../shared/DESIGN.md ("Inside longlive/,
from the bottom up"): io, config -> models, data -> quant, parallel, publish -> diffusion ->
inference -> train -> eval -> bench -> cli.

Every ``import`` statement counts, also those inside functions: a lazy import still makes the
lower module depend on the upper one at run time (and makes DVC rerun its stage when the upper
one changes), so deferring it only hides the cycle.  The root helpers that are not named in the
design (errors, device, secrets, kernels_dispatch, tracking, dag) sit with io/config at the bottom:
they import nothing of longlive above them (``dag`` works on plain dicts, and ``config`` checks params.yaml's
``dag`` with it).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "longlive"

# Layer rank of each top-level part of longlive/ (a subpackage or a root module).
LAYERS = [
    {"io", "config", "errors", "device", "secrets", "kernels_dispatch", "tracking", "dag", "__init__"},
    {"models", "data"},
    {"quant", "parallel", "publish"},
    {"diffusion"},
    {"inference"},
    {"train"},
    {"eval"},
    {"bench"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def longlive_imports(path: Path) -> set[str]:
    """Absolute names of the longlive modules ``path`` imports, anywhere in its body."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from longlive.x import y`` may name the submodule longlive.x.y
            found.update(f"{target}.{a.name}" for a in node.names
                         if (PKG.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).exists()
                         or (PKG.parent / f"{target}.{a.name}".replace(".", "/")).is_dir())
    return {name for name in found if name == "longlive" or name.startswith("longlive.")}


def part(name: str) -> str:
    """The top-level part of longlive a module belongs to (``__init__`` for the package itself)."""
    pieces = name.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mod = module_name(path)
        for target in sorted(longlive_imports(path)):
            if RANK[part(target)] > RANK[part(mod)]:
                bad.append(f"{mod} -> {target}")
    return bad


def test_every_part_of_longlive_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert parts - {"__init__"} <= set(RANK), f"give these a layer in tests/test_layers.py: {sorted(parts - set(RANK))}"


def test_no_module_imports_from_a_layer_above_it():
    bad = upward_imports()
    assert not bad, "upward imports (move the shared piece down):\n" + "\n".join(bad)
