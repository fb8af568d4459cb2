"""What every stage shares: logging, the preset, and small atomic JSON writes."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path

from rich.logging import RichHandler

from longlive.config import ConfigError, Preset, load_preset

DEVICE_LOG_ENV = "LONGLIVE_DEVICE_LOG"  # scripts/gpu_dag.py: where each stage process appends its GPU use


def setup(stage: str) -> Preset:
    """Configure logging and load the preset; a config error exits with its message, not a traceback."""
    # Under torchrun every process runs the stage: only rank 0 logs progress, the others warnings and errors.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)])
    try:
        preset = load_preset()
    except ConfigError as e:
        sys.exit(f"{stage}: {e}")
    if preset.cpu_threads is not None:
        import torch

        torch.set_num_threads(preset.cpu_threads)  # see Preset.cpu_threads: the same bits on any CPU
    logging.getLogger(stage).info("stage %s, preset %s", stage, preset.name)
    if os.environ.get(DEVICE_LOG_ENV):
        atexit.register(_log_device_use, stage, os.environ[DEVICE_LOG_ENV])
    return preset


def _log_device_use(stage: str, path: str) -> None:
    """One JSON line per process (torchrun: per rank) at exit: did it use CUDA, and its peak memory there."""
    from longlive.device import cuda_usage

    line = json.dumps({"stage": stage, "argv": sys.argv[1:], "rank": int(os.environ.get("RANK", "0")),
                       "pid": os.getpid(), **cuda_usage()})
    with open(path, "a") as f:  # one short append per process: lines of concurrent ranks do not interleave
        f.write(line + "\n")


def write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
