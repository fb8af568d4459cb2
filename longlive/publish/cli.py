"""Bodies of ``longlive publish`` and ``longlive pull`` (the parsers live in ``longlive/cli.py``, which
imports this module only when one of them runs)."""

from __future__ import annotations

import argparse
import logging
import sys

from longlive.config import ConfigError, PublishCheckpoint, load_preset
from longlive.data.shards import StorageError
from longlive.publish.manifest import ReleaseError
from longlive.secrets import find_secret_keys, redact


def _secrets(args: argparse.Namespace, opts: dict | None) -> list[str]:
    """Literal credentials an error message might echo: the user:password of --endpoint-url / --url, and the
    values of secret-looking storage options (botocore may print the endpoint without its scheme)."""
    from urllib.parse import urlsplit

    found = []
    for url in (getattr(args, "endpoint_url", None), getattr(args, "url", None), (opts or {}).get("endpoint_url")):
        if isinstance(url, str) and "://" in url:
            try:
                parts = urlsplit(url)
                found += [parts.username or "", parts.password or ""]
            except ValueError:
                pass
    for path in find_secret_keys(opts or {}):
        value = opts
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str):
            found.append(value)
    return [s for s in found if s]


def _fail(command: str, e: Exception, args: argparse.Namespace, opts: dict | None) -> int:
    """One line on stderr, credentials removed; exit status 2."""
    if callable(getattr(e, "errors", None)) and hasattr(e, "title"):  # pydantic: one line per field otherwise
        text = "; ".join(f"{e.title}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    else:
        text = str(e)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    print(f"longlive {command}: {redact(text, _secrets(args, opts))}", file=sys.stderr)
    return 2


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
    opts = _storage_options(args)
    try:
        preset = load_preset(args.preset, args.params)
        cfg = preset.publish
        opts = _storage_options(args, cfg.storage_options)
        update: dict = {"storage_options": opts}
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
        if getattr(args, "hub", None):  # repo id and login checked before anything is published
            from longlive.publish.hf import hub_token

            hub_token(args.hub)
        if args.folder:
            store = ReleaseStore(cfg.url, cfg.storage_options)
            result = store.publish(args.folder, force=args.force, set_latest=cfg.latest, progress=not args.quiet)
        else:
            result = publish_from_config(preset, cfg, version=args.version, work_dir=args.work_dir, force=args.force,
                                         progress=not args.quiet)
    except (ConfigError, ReleaseError, StorageError, ValueError) as e:
        return _fail("publish", e, args, opts)
    if result.uploaded:
        print(f"published {result.url} ({result.num_files} files, {result.total_bytes / 1e6:.1f} MB"
              f"{', latest' if result.latest else ''})")
    else:
        print(f"already published as {result.url} (identical content, nothing uploaded"
              f"{', latest' if result.latest else ''})")
    if getattr(args, "hub", None):  # only after the publish succeeded: the Hub gets what the store verified
        from longlive.publish.hf import push_release
        try:
            hub = push_release(result.url, args.hub, storage_options=opts, private=not args.hub_public,
                               force=args.force, progress=not args.quiet)
        except (ReleaseError, StorageError) as e:  # the store keeps the release: the same command pushes it again
            return _fail("publish --hub", ReleaseError(f"{e} (the release is published at {result.url}; run the same "
                                                       "command again to push it)"), args, opts)
        print(f"pushed {hub.version} to the Hugging Face Hub: {hub.url} (tag {hub.version}, commit {hub.commit[:12]})")
    return 0


def cli_pull(args: argparse.Namespace) -> int:
    from longlive.publish.store import pull_release

    _setup_logging()
    opts = _storage_options(args)
    try:
        result = pull_release(args.url, args.dest, version=args.version, force=args.force,
                              storage_options=opts, progress=not args.quiet)
    except (ReleaseError, StorageError, ValueError) as e:
        return _fail("pull", e, args, opts)
    state = "verified" if result.downloaded else "already there, verified"
    print(f"pulled {result.url} into {result.dest} ({result.num_files} files, {result.total_bytes / 1e6:.1f} MB, {state})")
    return 0
