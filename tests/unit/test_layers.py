"""Layers import downward only, and each DVC stage depends on exactly the code it imports.

The layer order: the order is the one in ../shared/DESIGN.md ("Inside longlive/,
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
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
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


def longlive_imports(path: Path, roots: tuple[str, ...] = ("longlive",)) -> set[str]:
    """Absolute names of the modules under ``roots`` that ``path`` imports, anywhere in its body."""
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
    return {name for name in found if name.split(".")[0] in roots}


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
    assert parts - {"__init__"} <= set(RANK), f"give these a layer in tests/unit/test_layers.py: {sorted(parts - set(RANK))}"


def test_no_module_imports_from_a_layer_above_it():
    bad = upward_imports()
    assert not bad, "upward imports (move the shared piece down):\n" + "\n".join(bad)


# --- dvc.yaml deps follow the imports -------------------------------------------------------------------
# A stage's code deps are the files its ``cmd`` runs: the modules it names (``stages.X``, a ``longlive``
# launcher) and everything they import under stages/ and longlive/, transitively, lazy imports included
# (a lazy import runs as surely as a top-level one), with the __init__.py of every package on the way
# (Python runs it first).  An __init__.py that imports nothing (a docstring, a version) is no code a stage
# depends on, so it counts on neither side.  A folder stands for all the .py files under it.

CODE = ("longlive", "stages")


def _file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else (
        base / "__init__.py" if (base / "__init__.py").is_file() else None)


def _counts(path: Path) -> bool:
    return path.name != "__init__.py" or any(
        isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.parse(path.read_text())))


def import_closure(modules: list[str]) -> set[str]:
    """Repo-relative paths of the .py files that running ``modules`` imports under stages/ and longlive/."""
    todo, seen = list(modules), set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):   # the packages on the way, then the module itself
            path = _file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(longlive_imports(path, CODE))
    return {str(p.relative_to(ROOT)) for p in seen if _counts(p)}


def stage_modules(cmd: str) -> list[str]:
    """The modules a stage's ``cmd`` runs: ``-m MODULE`` and the ``stages.X`` a launcher is handed."""
    cmd = cmd.split("#")[0]
    return re.findall(r"(?<![\w.])((?:stages|longlive)(?:\.\w+)+)", cmd)


def stages_code() -> dict[str, tuple[list[str], set[str]]]:
    """Per dvc.yaml stage: (its code deps as written, the .py files they cover)."""
    out = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]
        code = [d for d in deps if d.split("/")[0] in CODE]
        covered = set()
        for d in code:
            p = ROOT / d
            files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
            covered |= {str(f.relative_to(ROOT)) for f in files if f.is_file() and _counts(f)}
        out[name] = (code, covered)
    return out


def compact(files: set[str]) -> list[str]:
    """The shortest deps list covering ``files``: a folder wherever every counted file under it is needed."""
    def whole(folder: Path) -> bool:
        return all(str(f.relative_to(ROOT)) in files for f in folder.rglob("*.py") if _counts(f))
    out = set()
    for f in files:
        path, top = Path(f), Path(f)
        for parent in list(Path(f).parents)[:-1]:   # longest folder first would be last: walk up
            if parent == Path(".") or str(parent) in CODE:
                break
            if whole(ROOT / parent):
                top = parent
        out.add(str(top))
    return sorted(out)


def expected_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: compact(import_closure(stage_modules(stage.get("do", stage)["cmd"]))) for name, stage in stages.items()}


def test_dvc_code_deps_are_the_import_closure_of_each_stage():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    wrong = []
    for name, (code, covered) in stages_code().items():
        closure = import_closure(stage_modules(stages[name].get("do", stages[name])["cmd"]))
        assert closure, f"dvc.yaml stage {name}: its cmd names no stages/ or longlive module"
        missing, extra = sorted(closure - covered), sorted(covered - closure)
        if missing or extra:
            wrong.append(f"{name}: missing {missing}, not imported {extra}")
    assert not wrong, ("dvc.yaml deps differ from what the stages import (python tests/unit/test_layers.py prints "
                       "the deps to write):\n" + "\n".join(wrong))


if __name__ == "__main__":
    for stage, deps in expected_deps().items():
        print(stage)
        for d in deps:
            print("  -", d)
