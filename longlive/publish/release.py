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
        return self.root / "base"

    def checkpoint(self, variant: str | None = None) -> Path:
        """``checkpoints/<variant>``; without ``variant`` the release must hold exactly one checkpoint."""
        names = list(self.info["checkpoints"])
        if variant is None:
            if len(names) != 1:
                raise ReleaseError(f"release {self.version} holds checkpoints {names}; name one "
                                   f"(variant=..., or --checkpoint {self.root}/checkpoints/NAME)")
            variant = names[0]
        if variant not in names:
            raise ReleaseError(f"release {self.version} has no checkpoint {variant!r}; it holds {names}")
        return self.root / "checkpoints" / variant

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
    """``(release, variant)`` when ``path`` is a release folder (variant None) or one of its
    ``checkpoints/<variant>`` folders; None for anything else (a plain checkpoint directory)."""
    p = Path(path)
    if (p / RELEASE_JSON).is_file():
        return Release.open(p), None
    if p.parent.name == "checkpoints" and (p.parent.parent / RELEASE_JSON).is_file():
        return Release.open(p.parent.parent), p.name
    return None
