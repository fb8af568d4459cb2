"""Prompt schedules and the block plan: which prompt and shot each generated block uses.

A schedule is a list of entries ``{start | frame, prompt, shot}``: ``start`` in seconds or ``frame`` as a
pixel frame (the first entry starts at 0), ``shot: true`` to begin a new shot. Files are JSON or YAML
lists of such mappings (or ``[start_seconds, prompt]`` pairs).

Generation runs in blocks of latent frames, and one block has one prompt, so a switch takes effect at
the first block that starts at or after the requested time (the causal VAE maps latent frame 0 to pixel
frame 0 and latent frame j >= 1 to pixel frames 4(j-1)+1 .. 4j, for a temporal compression of 4).
:meth:`BlockPlan` records say where each prompt actually began, for scoring.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class ScheduleEntry:
    prompt: str
    start_s: float | None = None
    frame: int | None = None  # pixel frame; used when start_s is None
    shot: bool = False

    def start_frame(self, fps: int) -> int:
        return self.frame if self.start_s is None else round(self.start_s * fps)


@dataclass(frozen=True)
class BlockPlan:
    index: int
    start: int  # first latent frame
    frames: int
    prompt: int  # index into PromptSchedule.prompts
    shot: int
    switch: bool  # the prompt differs from the previous block's
    new_shot: bool


class PromptSchedule:
    def __init__(self, entries: list[ScheduleEntry]) -> None:
        if not entries:
            raise ValueError("a prompt schedule needs at least one entry")
        for e in entries:
            if e.start_s is None and e.frame is None:
                raise ValueError(f"schedule entry {e.prompt!r} needs a start (seconds) or a frame")
            if (e.start_s is not None and e.start_s < 0) or (e.frame is not None and e.frame < 0):
                raise ValueError(f"schedule entry {e.prompt!r} starts before 0")
        first = entries[0]
        if (first.start_s or 0) != 0 or (first.start_s is None and first.frame != 0):
            raise ValueError("the first schedule entry must start at 0")
        self.entries = list(entries)

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.entries]

    @classmethod
    def single(cls, prompt: str) -> "PromptSchedule":
        return cls([ScheduleEntry(prompt, start_s=0.0)])

    @classmethod
    def from_list(cls, items: list) -> "PromptSchedule":
        entries = []
        for i, item in enumerate(items):
            if isinstance(item, (list, tuple)) and len(item) == 2:
                item = {"start": item[0], "prompt": item[1]}
            if not isinstance(item, dict) or "prompt" not in item:
                raise ValueError(f"schedule entry {i}: expected {{start | frame, prompt, shot}}, got {item!r}")
            unknown = set(item) - {"start", "frame", "prompt", "shot"}
            if unknown:
                raise ValueError(f"schedule entry {i}: unknown keys {sorted(unknown)}")
            if ("start" in item) == ("frame" in item) and i > 0:
                raise ValueError(f"schedule entry {i}: give exactly one of start (seconds) or frame")
            start = item.get("start", 0.0 if "frame" not in item else None)
            entries.append(ScheduleEntry(
                str(item["prompt"]),
                start_s=None if start is None else float(start),
                frame=None if "frame" not in item else int(item["frame"]),
                shot=bool(item.get("shot", False)),
            ))
        return cls(entries)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptSchedule":
        """A JSON or YAML list of entries (YAML is a superset of JSON, so one parser reads both)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt schedule {path} not found")
        text = path.read_text()
        try:
            items = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"prompt schedule {path}: not valid JSON/YAML: {e}") from None
        if not isinstance(items, list):
            raise ValueError(f"prompt schedule {path}: expected a list of entries")
        return cls.from_list(items)

    def plan(self, block_sizes: list[int], fps: int, temporal_compression: int) -> list[BlockPlan]:
        """One :class:`BlockPlan` per block; ``block_sizes`` are the latent frames of each block."""
        starts = [sum(block_sizes[:i]) for i in range(len(block_sizes))]
        switch_block = []
        for e in self.entries:
            latent = latent_frame_at(e.start_frame(fps), temporal_compression)
            switch_block.append(next((b for b, s in enumerate(starts) if s >= latent), len(starts)))
        plans, entry, shot = [], 0, 0
        for b, (start, n) in enumerate(zip(starts, block_sizes)):
            previous, previous_shot = entry, shot
            while entry + 1 < len(self.entries) and switch_block[entry + 1] <= b:
                entry += 1
                shot += self.entries[entry].shot
            plans.append(BlockPlan(b, start, n, entry, shot, b > 0 and entry != previous, shot != previous_shot))
        return plans


def latent_frame_at(pixel_frame: int, temporal_compression: int) -> int:
    """The first latent frame whose pixel frames start at or after ``pixel_frame``."""
    return 0 if pixel_frame <= 0 else math.ceil((pixel_frame - 1) / temporal_compression) + 1


def pixel_frame_of(latent_frame: int, temporal_compression: int) -> int:
    """First pixel frame decoded from ``latent_frame``."""
    return 0 if latent_frame == 0 else temporal_compression * (latent_frame - 1) + 1


def block_sizes(num_latent_frames: int, block_frames: int, first_alone: bool = False) -> list[int]:
    """Whole blocks covering at least ``num_latent_frames``: [k, k, ...] or [1 | k, k, ...]."""
    if num_latent_frames < 1:
        raise ValueError(f"need at least one latent frame, got {num_latent_frames}")
    head = [1] if first_alone else []
    rest = num_latent_frames - len(head)
    return head + [block_frames] * math.ceil(max(rest, 0) / block_frames)


def eval_schedule(plans: list[BlockPlan], prompts: list[str], temporal_compression: int) -> list[tuple[int, str]]:
    """``[(start pixel frame, prompt)]`` as realised by ``plans``, for :func:`longlive.eval.prompt_following.score_video`."""
    out: list[tuple[int, str]] = []
    for p in plans:
        if not out or p.switch:
            out.append((pixel_frame_of(p.start, temporal_compression), prompts[p.prompt]))
    return out
