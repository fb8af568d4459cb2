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
from longlive.io import write_text_atomic

DEVICE_LOG_ENV = "LONGLIVE_DEVICE_LOG"  # scripts/gpu_dag.py: where each stage process appends its GPU use
LOG_FORMAT_ENV = "LONGLIVE_LOG_FORMAT"  # "json": one JSON object per record on stderr (what flows/ reads)
OWN_LOGGERS = ("longlive", "stages")  # the project's loggers; a stage's own logger is named after the stage
_configured = False


class JsonLines(logging.Formatter):
    """One line per record, ``{"level", "logger", "message"}``; the message carries its traceback, so a
    reader (flows/) keeps a record's level and its lines together."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname, "logger": record.name, "message": super().format(record)})


def configure_logging(stage: str | None = None) -> None:
    """Root at WARNING (third-party INFO chatter, e.g. great-expectations', is dropped; their warnings stay),
    the project's own loggers at INFO. Safe to call twice (stages/__init__ calls it early under flows/); like
    ``logging.basicConfig`` it leaves a process whose logging is already set up (pytest, an embedding app) alone."""
    global _configured
    if not _configured and logging.getLogger().handlers:
        return
    # Under torchrun every process runs the stage: only rank 0 logs progress, the others warnings and errors.
    own_level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    if not _configured:
        if os.environ.get(LOG_FORMAT_ENV) == "json":
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JsonLines("%(message)s"))
            sys.excepthook = _log_uncaught  # a crash is one ERROR record, traceback included
        else:
            handler = RichHandler(show_path=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.WARNING)
        logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger, at WARNING
        _configured = True
    for name in OWN_LOGGERS + ((stage,) if stage else ()):
        logging.getLogger(name).setLevel(own_level)


def _log_uncaught(kind, exc, tb) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
    else:
        logging.getLogger("stages").error("uncaught exception", exc_info=(kind, exc, tb))


def setup(stage: str) -> Preset:
    """Configure logging and load the preset; a config error exits with its message, not a traceback."""
    configure_logging(stage)
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
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def write_metrics(folder: str | os.PathLike, metrics: dict, headline: tuple[str, ...]) -> None:
    """``folder/metrics.json`` (every figure) and ``folder/headline.json``: the ``headline`` figures ("vae.psnr"
    for a nested one) that it has. dvc.yaml declares headline.json as the stage's DVC metrics, since `dvc exp show`
    has a column per declared figure; metrics.json is a plain output (`dvc metrics show FOLDER/metrics.json`)."""
    top: dict = {}
    for key in headline:
        *parents, leaf = key.split(".")
        source = metrics
        for part in parents:
            source = source.get(part) or {}
        if leaf in source:
            node = top
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = source[leaf]
    write_json(Path(folder) / "metrics.json", metrics)
    write_json(Path(folder) / "headline.json", top)
