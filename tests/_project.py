"""A throw-away copy of the project (code, dvc.yaml, a faster tiny preset) in its own git+DVC repo,
so pipeline tests never touch the developer's data/ and models/."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from longlive.config import params_document

ROOT = Path(__file__).resolve().parent.parent
COPIED = ["longlive", "longlive_kernels", "stages", "flows", "kernels", "conf", "dvc.yaml"]


def fast_tiny(preset: dict) -> dict:
    """The tiny preset with fewer clips and steps: same code paths, seconds instead of minutes."""
    p = copy.deepcopy(preset)
    p["synth"]["num_videos"] = 12
    p["base"]["vae"].update(steps=3, batch_size=2, log_every=1)
    p["base"]["dit"].update(steps=3, batch_size=4, log_every=1)
    p["encode"]["samples_per_shard"] = 4
    p["ar"]["train"].update(steps=4, batch_size=2, log_every=1)
    p["ar"].update(ckpt_every=2)
    p["dmd"]["train"].update(steps=2, batch_size=2, log_every=1)
    p["dmd"].update(ckpt_every=1, qat_steps=1)
    p["light_decoder"]["distill"]["train"].update(steps=3, batch_size=2, log_every=1)
    p["light_decoder"]["distill"].update(ckpt_every=1, eval_clips=2)
    p["quant"]["quality_prompts"] = 2
    p["evaluate"].update(num_prompts=2, num_multishot=1, num_drift=1, length_factor=2, samples=1)
    p["evaluate"]["speed"].update(runs=1, warmup=0, length_factor=1)
    p["evaluate"]["vbench"].update(num_videos=1)
    return p


def make_project(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tiny = fast_tiny(params["presets"]["tiny"])
    # the fast preset in both places: params.yaml for `dvc repro`, conf/ for `dvc exp run`, which composes it
    (dest / "params.yaml").write_text(yaml.safe_dump(params_document("tiny", tiny), sort_keys=False))
    (dest / "conf/preset/tiny.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump({"preset": "tiny", "presets": {"tiny": tiny}}, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["dvc", "init", "-q"], dest)
    # what `dvc config core.analytics false`, `hydra.enabled true` and `hydra.plugins_path conf` (as the repository's
    # .dvc/config) write, without three more dvc processes per project
    (dest / ".dvc/config").write_text("[core]\n    analytics = false\n[hydra]\n    enabled = true\n    plugins_path = conf\n")
    return dest


class SharedBuild:
    """One fast project a session builds once and its tests copy: the pipeline tests assert on the same DAG's
    outputs, and each building its own cost minutes of identical training (issue 18). ``copy(dest, *targets)``
    runs ``dvc repro TARGETS`` (every stage when none) in the shared project unless an earlier call built it,
    then copies the project to ``dest``: a test that reruns stages or edits params changes its copy alone,
    and the shared one stays as `dvc repro` left it."""

    def __init__(self, path: Path):
        self.path = path
        self._built: set[tuple[str, ...]] = set()

    def copy(self, dest: Path, *targets: str) -> Path:
        if not self.path.exists():
            make_project(self.path)
        if () not in self._built and targets not in self._built:  # `dvc repro` alone builds every target
            run(["dvc", "repro", *targets], self.path)
            self._built.add(targets)
        # copy2 keeps mtimes; DVC re-hashes the copy (its state is keyed by path) and finds the recorded bytes
        shutil.copytree(self.path, dest, symlinks=True)
        return dest


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run with this interpreter's bin/ first on PATH, so `dvc`, `prefect` and the `python` of dvc.yaml's
    commands are the test environment's even when it is not activated."""
    env = dict(env or os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, env=env)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
