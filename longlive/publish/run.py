"""Publish from a preset's ``publish:`` section: name the version, build the folder, upload it, and
optionally record it as a wandb artifact. The ``publish`` stage and ``longlive publish`` call this."""

from __future__ import annotations

import logging
import os
import re
import shutil
import string
from datetime import datetime, timezone
from pathlib import Path

from longlive.config import Preset, PublishConfig
from longlive.publish.build import build_release
from longlive.publish.manifest import ReleaseError, check_version, content_id
from longlive.publish.provenance import git_info
from longlive.publish.store import PublishResult, ReleaseStore

log = logging.getLogger(__name__)

VERSION_FIELDS = ("preset", "n", "date", "commit")
# What each field can have filled in, to recognise every release a template has named.
FIELD_PATTERNS = {"n": r"\d+", "date": r"\d{8}", "commit": r"[0-9a-f]{8}|nogit"}


def _family(template: str, preset: str) -> re.Pattern:
    """The versions ``template`` names for ``preset`` on any date, commit or n."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if name is not None:
            out.append(re.escape(preset) if name == "preset" else f"(?:{FIELD_PATTERNS[name]})")
    return re.compile("".join(out))


def resolve_version(template: str, store: ReleaseStore, preset: Preset, repo: str | os.PathLike = ".",
                    content: str | None = None) -> str:
    """Fill ``{preset}``, ``{date}`` (UTC YYYYMMDD), ``{commit}`` (8 hex, ``nogit`` outside git) and ``{n}``
    (1 + the highest n among *visible* releases of this template, so a failed publish's retry reuses it).

    With ``content`` (a :func:`~longlive.publish.manifest.content_id`), a visible release this template
    named (any date, commit or n) that holds the same payload is returned first: an unchanged model
    keeps its version, however often the pipeline reruns (and a publish that died before ``latest.json``
    is finished under its own name, not published again as the next n)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ReleaseError(f"publish.version {template!r} is not a valid template ({e})") from None
    unknown = sorted(set(fields) - set(VERSION_FIELDS))
    if unknown:
        allowed = ", ".join("{" + f + "}" for f in VERSION_FIELDS)
        raise ReleaseError(f"publish.version {template!r} uses {unknown}; allowed: {allowed}")
    if content is not None:
        family = _family(template, preset.name)
        same = store.find_identical(content, [v for v in store.versions() if family.fullmatch(v)])
        if same is not None:
            return same
    values = {"preset": preset.name, "date": datetime.now(timezone.utc).strftime("%Y%m%d")}
    if "commit" in fields:
        values["commit"] = git_info(repo)["short"] or "nogit"
    if "n" in fields:
        head, _, tail = template.partition("{n}")
        if "{n}" in tail:
            raise ReleaseError(f"publish.version {template!r} uses {{n}} twice")
        head, tail = head.format(**values), tail.format(**values)
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")
        taken = [int(m.group(1)) for v in store.versions() if (m := pattern.match(v))]
        return check_version(f"{head}{max(taken, default=0) + 1}{tail}")
    return check_version(template.format(**values))


def log_wandb_artifact(folder: Path, result: PublishResult, preset: Preset, work_dir: Path) -> str | None:
    """Record the release as a wandb ``model`` artifact: its card, release.json and manifest, plus a reference
    to where it lives (no bytes are copied into wandb). Offline unless WANDB_MODE/tracking says online."""
    from longlive.tracking import import_wandb, stage_config, wandb_mode, wandb_target

    mode = wandb_mode(preset.tracking)
    if mode == "disabled":
        return None
    wandb = import_wandb()

    work_dir.mkdir(parents=True, exist_ok=True)
    project, entity = wandb_target(preset.tracking)  # WANDB_PROJECT / WANDB_ENTITY first, as in training
    config = stage_config(preset, "publish", ("publish",), version=result.version, url=result.url)
    run = wandb.init(project=project, entity=entity, job_type="publish", name=f"publish-{result.version}", mode=mode,
                     dir=str(work_dir.resolve()), config=config)  # absolute: see start_tracking
    try:
        art = wandb.Artifact(f"longlive-{preset.name}", type="model", metadata=result.summary())
        for name in ("README.md", "release.json", "manifest.json"):
            art.add_file(str(folder / name), name=name)
        ref = result.url if "://" in result.url else Path(result.url).resolve().as_uri()
        art.add_reference(ref, name="release", checksum=False)  # checksums are in manifest.json
        run.log_artifact(art, aliases=[result.version, "latest"] if result.latest else [result.version])
        return run.id
    finally:
        run.finish()


def publish_from_config(
    preset: Preset,
    cfg: PublishConfig | None = None,
    *,
    version: str | None = None,
    work_dir: str | os.PathLike = ".work/publish",
    repo: str | os.PathLike = ".",
    force: bool | None = None,
    exist_ok: bool = True,
    progress: bool = True,
) -> PublishResult:
    """Build the release ``cfg`` (default ``preset.publish``) describes under ``work_dir`` and publish it to
    ``cfg.url``. ``version`` overrides ``cfg.version``; ``force`` overrides ``cfg.force``.

    Under a version template, content the store already holds under a version of that template is not
    published again: the result names that release (``uploaded`` False). An explicit ``version`` is
    published as asked (a no-op if it already holds this content; ``exist_ok=False`` refuses that)."""
    cfg = cfg or preset.publish
    store = ReleaseStore(cfg.url, cfg.storage_options)  # opened first: a dead endpoint fails before the build
    templated = not version
    version = check_version(version) if version else resolve_version(cfg.version, store, preset, repo)
    folder = Path(work_dir) / version
    manifest = build_release(folder, version=version, preset=preset, cfg=cfg, repo=repo, url=cfg.url)
    # The payload does not depend on the version name, so the folder built under the next free name
    # tells whether an earlier release of this template already holds it.
    same = resolve_version(cfg.version, store, preset, repo, content=content_id(manifest)) if templated else version
    if same != version:
        log.info("%s already holds this content as %s; not publishing it again as %s", store.url, same, version)
        result = store.reuse(same, set_latest=cfg.latest)
    else:
        result = store.publish(folder, force=cfg.force if force is None else force, exist_ok=exist_ok,
                               set_latest=cfg.latest, progress=progress)
    if cfg.wandb and result.uploaded:  # a no-op publish adds no artifact version
        log_wandb_artifact(folder, result, preset, Path(work_dir))
    shutil.rmtree(folder)  # the store holds it now; a failed publish keeps the folder for inspection
    return result
