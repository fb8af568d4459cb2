"""What ``evaluate`` generates from when the data are real (``data.source`` is not synth).

The built-in prompt-following score reads coloured shapes with a detector: it means something for the synthetic
domain only, so a preset trained on the user's videos is evaluated on

* ``evaluate.prompts``: a prompt set the user gives (a ``.txt`` / ``.jsonl`` file, a path or fsspec URL, read as
  :mod:`longlive.data.prompts` reads a DMD corpus), or
* ``vbench`` (the default): VBench's own prompt suite, ``VBench_full_info.json`` inside the ``vbench`` package
  (found in this environment or in ``evaluate.vbench.python``'s, without importing the package), the prompts
  tagged with the VBench dimensions the evaluation scores, in the file's order.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

VBENCH = "vbench"
SUITE_FILE = "VBench_full_info.json"
_FIND = ("import importlib.util, os; s = importlib.util.find_spec('vbench'); "
         "print(os.path.join(list(s.submodule_search_locations)[0], 'VBench_full_info.json') if s else '')")


class PromptSetError(ValueError):
    """The evaluation prompt set cannot be read; the message names the setting and the fix."""


def vbench_suite(python: str | None = None) -> Path:
    """Where ``VBench_full_info.json`` is: in this environment's ``vbench`` package, or in ``python``'s."""
    path = None
    if python is None:
        spec = importlib.util.find_spec("vbench")  # locates the package without running its __init__
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / SUITE_FILE
    else:
        try:
            proc = subprocess.run([python, "-c", _FIND], capture_output=True, text=True, timeout=120)
            path = Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            path = None
    if path is None or not path.is_file():
        where = f"evaluate.vbench.python ({python})" if python else "this environment (nor evaluate.vbench.python)"
        raise PromptSetError(f"evaluate.prompts is vbench, but {where} has no vbench package with {SUITE_FILE}; "
                             "install vbench there (pip install vbench) or set evaluate.prompts to your .txt/.jsonl "
                             "prompt set")
    return path


def read_vbench_suite(path: str | Path, dimensions: list[str] | None = None) -> list[str]:
    """The suite's ``prompt_en`` values, in file order, without repeats; with ``dimensions``, only those tagged
    with one of them (all, if none is)."""
    try:
        rows = json.loads(Path(path).read_text())
        prompts = [(r["prompt_en"], set(r.get("dimension") or ())) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PromptSetError(f"{path} is not VBench's prompt suite (a JSON list of {{prompt_en, dimension}}): {e}") from None
    wanted = [p for p, dims in prompts if dimensions and dims & set(dimensions)]
    return list(dict.fromkeys(wanted or [p for p, _ in prompts]))


def real_prompts(prompts: str | None, n: int, *, dimensions: list[str], python: str | None = None,
                 storage_options: dict | None = None) -> tuple[str, list[str]]:
    """``(what the prompts are, the first n)`` for real data: ``prompts`` is a file / URL, or vbench (or None)."""
    from longlive.data.prompts import PromptError, read_corpus

    if prompts in (None, VBENCH):
        path = vbench_suite(python)
        listed, what = read_vbench_suite(path, dimensions), f"VBench prompt suite ({path})"
    else:
        try:
            corpus = read_corpus(prompts, storage_options)
        except PromptError as e:
            raise PromptSetError(str(e).replace("dmd.prompts", "evaluate.prompts", 1)) from None
        listed, what = list(dict.fromkeys(corpus.prompts)), corpus.source
    if len(listed) < n:
        raise PromptSetError(f"evaluate.prompts: {what} has {len(listed)} distinct prompts, fewer than the "
                             f"{n} the evaluation generates (evaluate.num_prompts); add prompts or lower it")
    return what, listed[:n]


__all__ = ["PromptSetError", "VBENCH", "read_vbench_suite", "real_prompts", "vbench_suite"]
