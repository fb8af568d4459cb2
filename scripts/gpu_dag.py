"""Run the whole DVC DAG item by item in a throw-away copy of the project and record, for every stage item
(``train_ar@t2v``, ``quantize@i2v-2step-qat``, ...): exit code, wall time, whether its process used the GPU,
its peak GPU memory (allocated and reserved, from the stage process itself) and the device's as
``nvidia-smi`` saw it, and the warnings it printed. Written after every item, so a run cut short by a time
limit still leaves its table: ``OUT/dag.json``, ``OUT/dag.md`` and ``OUT/logs/<item>.log``.

The copy is made as tests/_project.py makes one (code + dvc.yaml in a fresh git + DVC repo, data and models
of the developer's tree untouched), with ``params.yaml`` naming the preset. ``--fast`` cuts counts, never
sizes: for ``tiny`` tests/_project.py's fast preset (the CPU self-check, several minutes on 2 cores); for
``small`` a few clips, a few steps per stage and one or two prompts per evaluation, at small's full model,
batch and video sizes. The copy's ``small`` evaluates and publishes what ``tiny`` does, so its DAG (params.yaml's
``dag``, derived from what evaluate and publish read) has tiny's DMD, QAT and quantize items too.

Order: ``dvc dag --dot``, topologically; each item runs as ``dvc repro --single-item ITEM`` once everything it
depends on has; an item whose dependency failed is marked ``blocked`` and not run.

On a GPU machine without DVC (scripts/gpu_wheels.sh fetches the wheels it lacks into .whl/ here, then installs
them there; wandb is not among them, hence WANDB_MODE=disabled):

    eval "$(scripts/gpu_wheels.sh --install .whl /tmp/site)" && export WANDB_MODE=disabled
    python3 scripts/gpu_dag.py --preset small --fast --device cuda --budget-s 540 --deadline-s 570 --out $OUT/dag

``--device cuda`` makes a stage that cannot reach the GPU fail instead of training on the CPU. Here:

    .venv/bin/python scripts/gpu_dag.py --preset tiny --fast --out /tmp/dag
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from longlive.config import load_params, params_document, preset_files  # noqa: E402
from longlive.io import write_text_atomic  # noqa: E402
from longlive.secrets import redact  # noqa: E402
from tests._project import COPIED, fast_tiny  # noqa: E402 - the same copy and fast preset as the DAG tests

DEVICE_LOG_ENV = "LONGLIVE_DEVICE_LOG"  # stages/_common.py appends each stage process's CUDA use there
WARNING = re.compile(r"\b\w*Warning\b|\bWARNING\b")
RICH_TIME = re.compile(r"^\[[\d/: ]+\]\s*")  # rich's log time, which would make every warning line distinct


# ----------------------------------------------------------------------------- the project copy


def fast_small(small: dict, tiny: dict) -> dict:
    """``small`` with tiny's item names and counts cut (sizes kept): a few minutes for the whole DAG on one GPU."""
    p = copy.deepcopy(small)
    p["data"] = {"source": "synth"}                      # the device has no user videos: small's sizes on synth's shapes
    p["synth"]["num_videos"] = 24                        # base holds out 24 // 12 = 2 clips
    p["base"]["vae"].update(steps=12, log_every=1)
    p["base"]["dit"].update(steps=12, log_every=1)
    p["encode"]["samples_per_shard"] = 8
    p["light_decoder"]["distill"]["train"].update(steps=8, log_every=1)
    p["light_decoder"]["distill"].update(ckpt_every=4, eval_clips=2)
    p["ar"]["train"].update(steps=8, log_every=1)
    p["ar"].update(ckpt_every=4)
    # step 0 updates generator and critic, step 1 the critic alone: the step that crashed on CUDA
    p["dmd"]["train"].update(steps=3, log_every=1)
    p["dmd"].update(ckpt_every=2, critic_updates=2, qat_students=list(tiny["dmd"]["qat_students"]), qat_steps=2)
    p["dmd"]["students"], p["dmd"]["variants"] = tiny["dmd"]["students"], tiny["dmd"]["variants"]
    p["ar"]["variants"] = tiny["ar"]["variants"]
    p.setdefault("quant", {})["quality_prompts"] = 1
    p["evaluate"]["variants"] = tiny["evaluate"]["variants"]
    p["evaluate"].update(num_prompts=2, num_multishot=1, num_drift=1, length_factor=2, samples=1)
    p["evaluate"]["speed"].update(runs=2, warmup=1, length_factor=1)
    p["evaluate"]["vbench"].update(num_videos=1)
    p["publish"].update(checkpoints=tiny["publish"]["checkpoints"], metrics=tiny["publish"]["metrics"])
    return p


def write_params(dest: Path, preset: str, fast: bool, device: str | None) -> None:
    presets = {name: load_params(path)["presets"][name] for name, path in preset_files(ROOT / "params.yaml").items()}
    if preset not in presets:
        sys.exit(f"gpu_dag: no preset {preset!r} in conf/preset/; choose one of {sorted(presets)}")
    p = copy.deepcopy(presets[preset])
    if fast:
        if preset == "tiny":
            p = fast_tiny(p)
        elif preset == "small":
            p = fast_small(p, presets["tiny"])
        else:
            sys.exit(f"gpu_dag: --fast knows tiny and small, not {preset!r}; drop --fast or add its cut here")
    if device:
        p["device"] = device
    # what `dvc exp run -S preset=NAME` would compose (params.yaml with that preset and its dag)
    (dest / "params.yaml").write_text(yaml.safe_dump(params_document(preset, p), sort_keys=False))


def make_project(dest: Path, preset: str, fast: bool, device: str | None, env: dict) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = ROOT / name
        (shutil.copytree(src, dest / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dest / name))
    write_params(dest, preset, fast, device)
    if shutil.which("git"):
        check([["git", "init", "-q"], ["git", "config", "user.email", "gpu-dag@localhost"],
               ["git", "config", "user.name", "gpu_dag"]], dest, env)
        check([dvc("init", "-q")], dest, env)
    else:
        check([dvc("init", "-q", "--no-scm")], dest, env)
    check([dvc("config", "core.analytics", "false")], dest, env)


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]  # not the `dvc` script: wheels unpacked with --target have none on PATH


def check(cmds: list[list[str]], cwd: Path, env: dict) -> None:
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True)
        if proc.returncode:
            sys.exit(f"gpu_dag: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def stage_env(shims: Path) -> dict:
    """dvc.yaml's ``python -m stages.X`` must be this interpreter (with its PYTHONPATH), whatever PATH says."""
    shims.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):  # scripts, not symlinks: a venv's python finds its venv by the path it ran as
        shim = shims / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{shims}{os.pathsep}{env.get('PATH', '')}"
    env.pop("LONGLIVE_PRESET", None)  # params.yaml's preset, the one written above
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ----------------------------------------------------------------------------- the DAG


def dag_items(project: Path, env: dict) -> tuple[list[str], dict[str, set[str]]]:
    """Stage items in an order that runs each after its dependencies, and each item's direct dependencies."""
    proc = subprocess.run(dvc("dag", "--dot"), cwd=project, env=env, text=True, capture_output=True)
    if proc.returncode:
        sys.exit(f"gpu_dag: dvc dag failed:\n{proc.stderr[-3000:]}")
    nodes = re.findall(r'^"([^"]+)";$', proc.stdout, re.M)
    deps: dict[str, set[str]] = {n: set() for n in nodes}
    for src, dst in re.findall(r'^"([^"]+)" -> "([^"]+)";$', proc.stdout, re.M):
        deps[dst].add(src)
    order, done = [], set()
    while len(order) < len(nodes):  # Kahn's algorithm, keeping dvc's listing order among ready items
        ready = [n for n in nodes if n not in done and deps[n] <= done]
        if not ready:
            sys.exit(f"gpu_dag: dvc dag has a cycle among {sorted(set(nodes) - done)}")
        order.append(ready[0])
        done.add(ready[0])
    return order, deps


class SmiSampler:
    """Peak of ``nvidia-smi``'s memory.used (MiB, summed over GPUs) and utilization.gpu (%, max) while it runs."""

    def __init__(self, period_ms: int = 200) -> None:
        self.peak_mib = self.peak_util = None
        self.proc = None
        if shutil.which("nvidia-smi"):
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
            self.gpus = max(1, len(listed.strip().splitlines()))
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        gpus: dict[int, float] = {}
        for i, line in enumerate(self.proc.stdout):  # one line per GPU per sample
            try:
                mem, util = (float(x) for x in line.split(","))
            except ValueError:
                continue
            gpus[i % self.gpus] = mem
            total = sum(gpus.values())
            self.peak_mib = max(self.peak_mib or 0.0, total)
            self.peak_util = max(self.peak_util or 0.0, util)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=5)


def run_item(item: str, project: Path, env: dict, logs: Path, timeout_s: float | None) -> dict:
    safe = item.replace("@", "_")  # file names of letters, digits, ".", "_" and "-" travel everywhere
    device_log = logs / f"{safe}.device.jsonl"
    device_log.unlink(missing_ok=True)
    log_path = logs / f"{safe}.log"
    sampler = SmiSampler()
    t0 = time.perf_counter()
    # A session of its own: on a timeout the stage process under dvc goes too (it would hold the GPU on).
    proc = subprocess.Popen(dvc("repro", "--single-item", item), cwd=project, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**env, DEVICE_LOG_ENV: str(device_log)})
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc = None
    wall = time.perf_counter() - t0
    sampler.stop()
    output = redact(output)
    log_path.write_text(output)
    procs = [json.loads(line) for line in device_log.read_text().splitlines()] if device_log.exists() else []
    gpus = [d for p in procs for d in p.get("devices", {}).values()]
    warnings = [RICH_TIME.sub("", line.strip()) for line in output.splitlines() if WARNING.search(line)]
    error = [line for line in output.splitlines() if line.strip()][-12:] if rc else []
    return {
        "item": item, "status": "ok" if rc == 0 else ("timeout" if rc is None else "failed"), "exit_code": rc,
        "wall_s": round(wall, 1),
        "stage_processes": len(procs),
        "used_gpu": any(p.get("cuda") and p.get("devices") for p in procs),
        "peak_allocated_mib": round(max((d["max_allocated_mib"] for d in gpus), default=0.0), 1) if gpus else None,
        "peak_reserved_mib": round(max((d["max_reserved_mib"] for d in gpus), default=0.0), 1) if gpus else None,
        "gpu_names": sorted({d["name"] for d in gpus}),
        "smi_peak_used_mib": sampler.peak_mib, "smi_peak_util_pct": sampler.peak_util,
        "warnings": len(warnings), "warning_kinds": sorted({w[:160] for w in warnings})[:8],
        "error_tail": error, "log": str(log_path),
    }


# ----------------------------------------------------------------------------- the report


def _cell(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(report: dict) -> str:
    rows = report["items"]
    lines = [f"# DVC DAG, preset {report['preset']}{' (fast)' if report['fast'] else ''}", "",
             f"Command: `{report.get('command', '-')}`", "",
             f"{report['host']}; torch {report['torch']}, CUDA device: {report['cuda_device'] or 'none'}; "
             f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} items exited 0, "
             f"{sum(bool(r.get('used_gpu')) for r in rows)} used the GPU; total {report['wall_s']:.0f} s.", "",
             "Peak allocated / reserved: torch.cuda.max_memory_allocated / max_memory_reserved of the stage's own "
             "process(es); nvidia-smi: the device's memory.used while the item ran (CUDA context included).", "",
             "| item | status | exit | wall (s) | GPU used | peak allocated (MiB) | peak reserved (MiB) | "
             "nvidia-smi peak (MiB) | GPU util max (%) | warnings | first error line |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = next((line for line in r.get("error_tail", []) if "rror" in line), (r.get("error_tail") or [""])[-1])
        lines.append(f"| {r['item']} | {r['status']} | {_cell(r.get('exit_code'))} | {_cell(r.get('wall_s'), 1)} | "
                     f"{_cell(r.get('used_gpu'))} | {_cell(r.get('peak_allocated_mib'))} | "
                     f"{_cell(r.get('peak_reserved_mib'))} | {_cell(r.get('smi_peak_used_mib'))} | "
                     f"{_cell(r.get('smi_peak_util_pct'))} | {_cell(r.get('warnings'))} | "
                     f"{err.replace('|', '/')[:140]} |")
    kinds = sorted({k for r in rows for k in r.get("warning_kinds", [])})
    if kinds:
        lines += ["", "## Warnings seen (distinct, first 160 characters)", ""] + [f"* `{k}`" for k in kinds[:40]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    for name, text in (("dag.json", json.dumps(report, indent=1)), ("dag.md", markdown(report))):
        write_text_atomic(out / name, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small", help="a preset of params.yaml (default small)")
    ap.add_argument("--fast", action="store_true", help="cut counts (clips, steps, prompts), keep sizes")
    ap.add_argument("--device", help="the preset's device in the copy (e.g. cuda: fail rather than fall back to CPU)")
    ap.add_argument("--out", type=Path, required=True, help="where dag.json, dag.md and logs/ go")
    ap.add_argument("--workdir", type=Path, help="the project copy (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the project copy (data, models, reports)")
    ap.add_argument("--items", nargs="+", metavar="PATTERN",
                    help="run only the items matching these fnmatch patterns; what they depend on must already be "
                         "in --workdir (an earlier run with --keep)")
    ap.add_argument("--item-timeout-s", type=float, help="stop an item after this long (status timeout)")
    ap.add_argument("--budget-s", type=float,
                    help="start no item after this many seconds (status not_run): ends inside a caller's time limit")
    ap.add_argument("--deadline-s", type=float,
                    help="stop a running item (status timeout) this many seconds after the start")
    args = ap.parse_args(argv)

    import torch  # the stages' own; only for the report's header

    t_start = time.perf_counter()
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="gpu_dag-"))).resolve()
    env = stage_env(Path(tempfile.mkdtemp(prefix="gpu_dag-bin-")))
    fresh = not (work / ".dvc").is_dir()
    if fresh:
        make_project(work, args.preset, args.fast, args.device, env)
    order, deps = dag_items(work, env)
    selected = [i for i in order if not args.items or any(fnmatch.fnmatch(i, p) for p in args.items)]
    command = "python3 scripts/gpu_dag.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "preset": args.preset, "fast": args.fast, "device": args.device, "project": str(work),
              "host": os.uname().nodename, "torch": torch.__version__,
              "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "order": selected, "items": [], "wall_s": 0.0}
    print(f"gpu_dag: {len(selected)} items in {work} ({args.preset}{', fast' if args.fast else ''})", flush=True)
    failed: set[str] = set()
    for item in selected:
        blocked = sorted(d for d in deps[item] if d in failed)
        if blocked:
            row = {"item": item, "status": "blocked", "exit_code": None, "error_tail": [f"blocked by {blocked}"]}
            failed.add(item)
        elif args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            row = {"item": item, "status": "not_run", "exit_code": None, "error_tail": ["--budget-s spent"]}
            failed.add(item)
        else:
            timeout = args.item_timeout_s
            if args.deadline_s is not None:  # a running item is stopped there, so the caller's limit is kept
                left = max(1.0, args.deadline_s - (time.perf_counter() - t_start))
                timeout = left if timeout is None else min(timeout, left)
            row = run_item(item, work, env, out / "logs", timeout)
            if row["status"] != "ok":
                failed.add(item)
        report["items"].append(row)
        report["wall_s"] = time.perf_counter() - t_start
        write_report(report, out)
        print(f"  {item}: {row['status']} {_cell(row.get('wall_s'), 1)} s, GPU {_cell(row.get('used_gpu'))}, "
              f"peak {_cell(row.get('peak_allocated_mib'))}/{_cell(row.get('peak_reserved_mib'))} MiB", flush=True)
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_dag: wrote {out / 'dag.md'} and {out / 'dag.json'}", flush=True)
    print((out / "dag.md").read_text())
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
