"""A release folder on local disk (built, or pulled with ``longlive pull``), as inference sees it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from longlive.config import ConfigError, Preset
from longlive.publish.build import RELEASE_JSON
from longlive.publish.manifest import ReleaseError, verify_folder


@dataclass
class Release:
    root: Path
    info: dict  # release.json

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Release":
        root = Path(root)
        if not (root / RELEASE_JSON).is_file():
            raise ReleaseError(f"{root} is not a release folder (no {RELEASE_JSON}); pull one with `longlive pull URL`")
        return cls(root, json.loads((root / RELEASE_JSON).read_text()))

    @property
    def version(self) -> str:
        return self.info["version"]

    @property
    def base(self) -> Path:
        """Where ``vae/`` and ``text/`` are: the top level (diffusers' layout), ``base/`` in older releases."""
        return self.root / self.info["base"].get("dir", "base")

    def variant(self, variant: str | None = None) -> str:
        """The checkpoint's name; without ``variant`` the release must hold exactly one checkpoint."""
        names = list(self.info["checkpoints"])
        if variant is None:
            if len(names) != 1:
                raise ReleaseError(f"release {self.version} holds checkpoints {names}; name one "
                                   f"(variant=..., or --checkpoint {self.root}/checkpoints/NAME)")
            variant = names[0]
        if variant not in names:
            raise ReleaseError(f"release {self.version} has no checkpoint {variant!r}; it holds {names}")
        return variant

    def checkpoint(self, variant: str | None = None) -> Path:
        """The folder build_models takes for ``variant``: ``transformer/`` for the diffusers pipeline's checkpoint,
        ``checkpoints/<variant>`` for the others (release.json's ``path``; older releases have no such key)."""
        name = self.variant(variant)
        return self.root / self.info["checkpoints"][name].get("path", f"checkpoints/{name}")

    def preset(self) -> Preset:
        """The resolved preset the release was built with (``config/preset.json``)."""
        path = self.root / self.info.get("config", "config/preset.json")
        try:
            return Preset.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"{path}: not a preset this version of longlive can read ({e}); pass --preset to use "
                              "one from params.yaml instead") from None

    def verify(self) -> dict:
        """Check every file against ``manifest.json`` (a pulled release was verified on download already)."""
        return verify_folder(self.root)


def find_release(path: str | os.PathLike) -> tuple[Release, str | None] | None:
    """``(release, variant)`` when ``path`` is a release folder (variant None), one of its checkpoint folders
    (``transformer``, ``checkpoints/<variant>``) or ``checkpoints/<variant>`` of the checkpoint that
    ``transformer/`` holds; None for anything else (a plain checkpoint directory)."""
    p = Path(path)
    if (p / RELEASE_JSON).is_file():
        return Release.open(p), None
    for root in (p.parent, p.parent.parent):
        if (root / RELEASE_JSON).is_file():
            rel, sub = Release.open(root), p.relative_to(root).as_posix()
            for name, info in rel.info["checkpoints"].items():
                if sub in (f"checkpoints/{name}", info.get("path")):
                    return rel, name
            if p.parent.name == "checkpoints":
                return rel, p.name  # Release.checkpoint says which checkpoints there are
    return None
