"""Bodies of ``longlive publish`` and ``longlive pull`` (the parsers live in ``longlive/cli.py``, which
imports this module only when one of them runs)."""

from __future__ import annotations

import argparse
import logging
import sys

from longlive.config import ConfigError, PublishCheckpoint, load_preset
from longlive.data.shards import StorageError
from longlive.publish.manifest import ReleaseError


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} {item!r}: expected NAME=PATH")
        out[name] = value
    return out


def _storage_options(args: argparse.Namespace, base: dict | None = None) -> dict:
    opts = dict(base or {})
    if getattr(args, "endpoint_url", None):
        opts["endpoint_url"] = args.endpoint_url
    return opts


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])


def cli_publish(args: argparse.Namespace) -> int:
    """Build from the preset's ``publish:`` section (flags override it) and upload; or upload ``--folder``."""
    from longlive.publish.run import publish_from_config
    from longlive.publish.store import ReleaseStore

    _setup_logging()
    try:
        preset = load_preset(args.preset, args.params)
        cfg = preset.publish
        update: dict = {"storage_options": _storage_options(args, cfg.storage_options)}
        if args.url:
            update["url"] = args.url
        checkpoints = {n: PublishCheckpoint(path=p, dtype=args.dtype or "bf16")
                       for n, p in _pairs(args.checkpoint, "--checkpoint").items()}
        checkpoints |= {n: PublishCheckpoint(path=p, quantization={"format": "nvfp4", "backend": args.nvfp4_backend}
                                             if args.nvfp4_backend else None)
                        for n, p in _pairs(args.nvfp4, "--nvfp4").items()}
        if checkpoints:
            update["checkpoints"] = checkpoints
        elif args.dtype:
            update["checkpoints"] = {n: c.model_copy(update={"dtype": args.dtype}) for n, c in cfg.checkpoints.items()}
        if args.metrics:
            update["metrics"] = _pairs(args.metrics, "--metrics")
        if args.base:
            update["base"] = args.base
        if args.no_latest:
            update["latest"] = False
        cfg = cfg.model_validate({**cfg.model_dump(), **update})
        if args.folder:
            store = ReleaseStore(cfg.url, cfg.storage_options)
            result = store.publish(args.folder, force=args.force, set_latest=cfg.latest, progress=not args.quiet)
        else:
            result = publish_from_config(preset, cfg, version=args.version, work_dir=args.work_dir, force=args.force,
                                         progress=not args.quiet)
    except (ConfigError, ReleaseError, StorageError, ValueError) as e:
        print(f"longlive publish: {e}", file=sys.stderr)
        return 2
    print(f"published {result.url} ({result.num_files} files, {result.total_bytes / 1e6:.1f} MB"
          f"{', latest' if result.latest else ''})")
    return 0


def cli_pull(args: argparse.Namespace) -> int:
    from longlive.publish.store import pull_release

    _setup_logging()
    try:
        result = pull_release(args.url, args.dest, version=args.version, force=args.force,
                              storage_options=_storage_options(args), progress=not args.quiet)
    except (ReleaseError, StorageError) as e:
        print(f"longlive pull: {e}", file=sys.stderr)
        return 2
    state = "verified" if result.downloaded else "already there, verified"
    print(f"pulled {result.url} into {result.dest} ({result.num_files} files, {result.total_bytes / 1e6:.1f} MB, {state})")
    return 0
