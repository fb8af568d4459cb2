"""Prompt schedules and the block plan: which prompt and shot each generated block uses.

A schedule is a list of entries ``{start | frame, prompt, shot}``: ``start`` in seconds or ``frame`` as a
pixel frame, ``shot: true`` to begin a new shot. Files are JSON or YAML lists of such mappings (or
``[start_seconds, prompt]`` pairs). Rules, each refused with the entry's index named
(:class:`ScheduleError`):

* the first entry starts at 0 (it gives the first frame its prompt; it may leave start/frame out);
* starts strictly increase, compared as pixel frames at the video's fps (so ``start`` and ``frame``
  entries may be mixed): an entry at or before its predecessor would silently never be shown;
* every prompt is a non-empty string (the empty prompt is the unconditional one of CFG).

Generation runs in blocks of latent frames, and one block has one prompt, so a switch takes effect at
the first block that starts at or after the requested time (the causal VAE maps latent frame 0 to pixel
frame 0 and latent frame j >= 1 to pixel frames 4(j-1)+1 .. 4j, for a temporal compression of 4).
:meth:`BlockPlan` records say where each prompt actually began, for scoring. An entry that no block
reaches -- it starts after the video's end, or the next entry starts in the same block -- is not an
error (one schedule serves videos of any length): :meth:`PromptSchedule.unused` lists them and
``longlive generate`` warns about each, one line apiece.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import yaml

from longlive.errors import UsageError


class ScheduleError(UsageError):
    """A prompt schedule that breaks one of the module's rules; the message names the entry."""


@dataclass(frozen=True)
class ScheduleEntry:
    prompt: str
    start_s: float | None = None
    frame: int | None = None  # pixel frame; used when start_s is None
    shot: bool = False

    def start_frame(self, fps: int) -> int:
        return self.frame if self.start_s is None else round(self.start_s * fps)

    def describe(self, fps: int | None = None) -> str:
        """``frame 8``, ``start 2 s`` or (given ``fps``) ``start 2 s = pixel frame 16``."""
        if self.start_s is None:
            return f"frame {self.frame}"
        return f"start {self.start_s:g} s" + ("" if fps is None else f" = pixel frame {self.start_frame(fps)}")


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
            raise ScheduleError("a prompt schedule needs at least one entry; give --prompt TEXT or a non-empty list")
        for i, e in enumerate(entries):
            if not isinstance(e.prompt, str) or not e.prompt.strip():
                raise ScheduleError(f"schedule entry {i}: empty prompt; give every entry a non-empty prompt (the empty "
                                    "prompt is the unconditional one of classifier-free guidance)")
            if e.start_s is None and e.frame is None:
                raise ScheduleError(f"schedule entry {i} ({e.prompt!r}) needs a start (seconds) or a frame")
            if e.start_s is not None and not (math.isfinite(e.start_s) and e.start_s >= 0):
                raise ScheduleError(f"schedule entry {i}: start {e.start_s} s; a start is a finite number of seconds >= 0")
            if e.start_s is None and e.frame < 0:
                raise ScheduleError(f"schedule entry {i}: frame {e.frame}; a frame is a pixel frame index >= 0")
        first = entries[0]
        if (first.start_s if first.start_s is not None else first.frame) != 0:
            raise ScheduleError(f"schedule entry 0 has {first.describe()}: the first entry must start at 0 (it gives "
                                "the video's first frame its prompt); add an entry at start 0 or move this one there")
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
                raise ScheduleError(f"schedule entry {i}: expected {{start | frame, prompt, shot}}, got {item!r}")
            unknown = set(item) - {"start", "frame", "prompt", "shot"}
            if unknown:
                raise ScheduleError(f"schedule entry {i}: unknown keys {sorted(unknown)}; "
                                    "an entry has start (seconds) or frame, prompt and optionally shot")
            if ("start" in item) == ("frame" in item) and (i > 0 or "start" in item):
                raise ScheduleError(f"schedule entry {i}: give exactly one of start (seconds) or frame")
            prompt = item["prompt"]
            if not isinstance(prompt, str):
                raise ScheduleError(f"schedule entry {i}: prompt {prompt!r} is not text; quote it")
            start = item.get("start", 0.0 if "frame" not in item else None)
            if start is not None and (isinstance(start, bool) or not isinstance(start, Real)):
                raise ScheduleError(f"schedule entry {i}: start {start!r} is not a number of seconds")
            frame = item.get("frame")
            if frame is not None and (isinstance(frame, bool) or not isinstance(frame, Integral)):
                raise ScheduleError(f"schedule entry {i}: frame {frame!r} is not a whole pixel frame index")
            shot = item.get("shot", False)
            if not isinstance(shot, bool):
                raise ScheduleError(f"schedule entry {i}: shot {shot!r}; use true or false")
            entries.append(ScheduleEntry(
                prompt, start_s=None if start is None else float(start), frame=None if frame is None else int(frame),
                shot=shot,
            ))
        return cls(entries)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptSchedule":
        """A JSON or YAML list of entries (YAML is a superset of JSON, so one parser reads both)."""
        path = Path(path)
        if not path.is_file():
            raise ScheduleError(f"prompt schedule {path} not found (or not a file); give the path of a JSON/YAML list "
                                "of {start | frame, prompt, shot} entries")
        text = path.read_text()
        try:
            items = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            detail = " ".join(str(e).split())
            raise ScheduleError(f"prompt schedule {path}: not valid JSON/YAML: {detail}") from None
        if not isinstance(items, list):
            raise ScheduleError(f"prompt schedule {path}: expected a list of {{start | frame, prompt, shot}} entries, "
                                f"got {type(items).__name__}")
        try:
            return cls.from_list(items)
        except ScheduleError as e:
            raise ScheduleError(f"prompt schedule {path}: {e}") from None

    def start_frames(self, fps: int) -> list[int]:
        """Each entry's first pixel frame at ``fps``; refuses starts that do not strictly increase."""
        frames = [e.start_frame(fps) for e in self.entries]
        for i in range(1, len(frames)):
            if frames[i] <= frames[i - 1]:
                e, prev = self.entries[i], self.entries[i - 1]
                raise ScheduleError(
                    f"schedule entry {i} ({e.describe(fps)}) does not start after entry {i - 1} ({prev.describe(fps)}): "
                    f"starts must strictly increase (compared as pixel frames at {fps} fps); sort the entries by "
                    "start and drop duplicates")
        return frames

    def _switch_blocks(self, starts: list[int], fps: int, temporal_compression: int) -> list[int]:
        """Per entry, the first block (index into ``starts``) that starts at or after it; len(starts): none."""
        out = []
        for frame in self.start_frames(fps):
            latent = latent_frame_at(frame, temporal_compression)
            out.append(bisect.bisect_left(starts, latent))  # starts increase: the first start >= latent
        return out

    def plan(self, block_sizes: list[int], fps: int, temporal_compression: int) -> list[BlockPlan]:
        """One :class:`BlockPlan` per block; ``block_sizes`` are the latent frames of each block."""
        starts = list(itertools.accumulate(block_sizes, initial=0))[:-1]
        switch_block = self._switch_blocks(starts, fps, temporal_compression)
        plans, entry, shot = [], 0, 0
        for b, (start, n) in enumerate(zip(starts, block_sizes)):
            previous, previous_shot = entry, shot
            while entry + 1 < len(self.entries) and switch_block[entry + 1] <= b:
                entry += 1
                shot += self.entries[entry].shot
            plans.append(BlockPlan(b, start, n, entry, shot, b > 0 and entry != previous, shot != previous_shot))
        return plans

    def unused(self, plans: list[BlockPlan], fps: int, temporal_compression: int) -> list[str]:
        """One line per entry that no block of ``plans`` (from :meth:`plan`) uses: why, and what to change."""
        if not plans:
            return []
        used = {p.prompt for p in plans}
        starts = [p.start for p in plans]
        switch_block = self._switch_blocks(starts, fps, temporal_compression)
        frames = self.start_frames(fps)
        last = temporal_compression * (plans[-1].start + plans[-1].frames - 1)  # L latent frames: 1 + tc (L - 1) pixels
        lines = []
        for i, (e, frame, b) in enumerate(zip(self.entries, frames, switch_block)):
            if i in used:
                continue
            where = f"schedule entry {i} ({e.describe(fps)})"
            if frame > last:
                lines.append(f"{where} starts after the video's last frame ({last}) and is never shown; lengthen the "
                             "video or drop the entry")
            elif b == len(plans):
                lines.append(f"{where} is never shown: it falls inside the last block and a prompt switches only where "
                             "a block starts; lengthen the video or start the entry earlier")
            else:
                later = max(j for j in range(i + 1, len(self.entries)) if switch_block[j] == b)
                lines.append(f"{where} is never shown: entry {later} takes over at the same block (block {b}, from "
                             f"latent frame {plans[b].start}; a prompt holds for whole blocks); space the starts at "
                             "least a block apart")
        return lines


def latent_frame_at(pixel_frame: int, temporal_compression: int) -> int:
    """The first latent frame whose pixel frames start at or after ``pixel_frame``."""
    return 0 if pixel_frame <= 0 else math.ceil((pixel_frame - 1) / temporal_compression) + 1


def pixel_frame_of(latent_frame: int, temporal_compression: int) -> int:
    """First pixel frame decoded from ``latent_frame``."""
    return 0 if latent_frame == 0 else temporal_compression * (latent_frame - 1) + 1


def stream_block_sizes(num_latent_frames: int, block_frames: int, first_alone: bool = False) -> list[int]:
    """The blocks a stream generates: whole blocks covering at least ``num_latent_frames`` (the last one may run
    past the video's end), [k, k, ...] or [1 | k, k, ...]. A training clip's partition is
    :func:`longlive.train.ar.clip_block_sizes`."""
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
