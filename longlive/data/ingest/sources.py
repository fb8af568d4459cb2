"""What to ingest: the videos of a folder or bucket, their captions, and video webdataset tars.

A source is a local folder or any fsspec URL (``s3://bucket/prefix``); every ``.mp4 .webm .mov .mkv``
under it is a video and every ``.tar`` a webdataset shard (``KEY.mp4`` + ``KEY.txt`` or ``KEY.json``).
Captions of loose videos come from a manifest (``data.captions``) or, without one, from a sidecar
``.txt`` beside each video (``clip.mp4`` -> ``clip.txt``).

Manifest: JSON lines or CSV, one row per video (or per segment of one), paths relative to the source::

    {"path": "a.mp4", "caption": "a dog runs on a beach"}
    {"path": "talks/b.mkv", "caption": "a man speaks", "start": 12.5, "end": 60}
    {"path": "c.webm", "shots": [{"start": 0, "caption": "a red car"}, {"start": 4.2, "caption": "a city at night"}]}

``start``/``end`` (seconds) limit the clips to a segment; ``shots`` give each shot's start time and caption
(the cuts then come from here, not the detector). CSV has the columns ``path,caption,start,end,shots``
(``shots`` a JSON list as above; empty cells mean absent). Bad rows are rejected with a reason, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, model_validator

from longlive.data.ingest.filters import Reject
from longlive.secrets import redact

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv")
# what a listing says about a file that changes when the file does: size, then local mtime and inode, S3's ETag
# and last-modified time (JSON-safe as strings)
_MARKERS = ("size", "mtime", "ino", "ETag", "LastModified", "etag", "last_modified")
TAR_EXTS = (".tar",)


class IngestError(ValueError):
    """The source or manifest as a whole cannot be used (not a per-file problem): the message names the fix."""


class _ShotRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    start: StrictFloat | StrictInt = Field(ge=0)
    caption: str = Field(min_length=1)


class CaptionRow(BaseModel):
    """One manifest row (or a webdataset sample's json, without ``path``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # ignore: manifests often carry other columns
    path: str | None = None
    caption: str | None = None
    start: StrictFloat | StrictInt | None = Field(default=None, ge=0)
    end: StrictFloat | StrictInt | None = Field(default=None, gt=0)
    shots: list[_ShotRow] | None = None

    @model_validator(mode="after")
    def _check(self) -> "CaptionRow":
        if not (self.caption and self.caption.strip()) and not self.shots:
            raise ValueError("needs a non-empty caption or shots")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"end {self.end} must be after start {self.start}")
        if self.shots:
            starts = [s.start for s in self.shots]
            if starts != sorted(starts) or len(set(starts)) != len(starts):
                raise ValueError(f"shot start times {starts} must increase")
            if self.end is not None and starts[-1] >= self.end:
                raise ValueError(f"shot at {starts[-1]} s starts after the segment's end {self.end}")
        return self


@dataclass
class Task:
    """One unit of work for a worker: a video file, or a webdataset tar (all its samples)."""

    order: int  # position in the listing: the index keeps this order, and the first of two duplicates wins
    kind: str  # "file" or "tar"
    path: str  # filesystem path (no protocol) inside the source's filesystem
    source: str  # what reports show: the path relative to the source root
    caption: str | None = None
    shots: list[tuple[float, str]] | None = None
    start: float | None = None
    end: float | None = None
    sidecar: str | None = None  # path of the .txt to read the caption from (no manifest)
    line: int | None = None  # manifest line
    stat: dict | None = None  # size and change markers from the listing (see engine._stat_key)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Listing:
    tasks: list[Task] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def _has_surrogates(value) -> bool:
    """True when text decoded with ``surrogateescape`` held bytes that are not UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_surrogates(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc + ': ' if loc else ''}{e['msg']}")
    return "; ".join(parts)


def file_stat(info: dict) -> dict:
    """The size and change markers of an fsspec ``info`` dict, JSON-safe (markers as strings)."""
    return {k: (v if k == "size" else str(v)) for k, v in info.items() if k in _MARKERS and v is not None}


def parse_row(raw: dict, source: str, where: str | None = None) -> CaptionRow | Reject:
    """A manifest row (or sample json) -> :class:`CaptionRow`, or the :class:`Reject` naming what is wrong.
    ``source`` is what the report lists (the row's file), ``where`` the manifest line it names in the detail."""
    at = f"{where}: " if where else ""
    if _has_surrogates(raw):
        bad = next((k for k, v in raw.items() if _has_surrogates(v)), "?")
        return Reject(source, "caption_not_utf8",
                      f"{at}field {bad!r} holds bytes that are not UTF-8; re-save it as UTF-8")
    try:
        return CaptionRow.model_validate(raw)
    except ValidationError as e:
        return Reject(source, "bad_manifest_row", at + _short(e))


def decode_caption_text(data: bytes, where: str) -> str | Reject:
    """A sidecar / webdataset ``.txt`` caption: strict UTF-8 (a BOM is dropped), stripped, non-empty."""
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        return Reject(where, "caption_not_utf8", f"byte {data[e.start:e.start + 1]!r} at offset {e.start} is not "
                      "UTF-8; re-save the caption file as UTF-8")
    if not text:
        return Reject(where, "no_caption", "the caption file is empty")
    return text


def _manifest_rows(data: bytes, name: str) -> list[tuple[int, dict | None, str]]:
    """(line, row or None, error) for every row of a JSONL or CSV manifest."""
    text = data.decode("utf-8", errors="surrogateescape")  # bad bytes survive to be reported per row
    rows: list[tuple[int, dict | None, str]] = []
    if name.endswith(".csv"):
        for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            row = {k.strip(): v for k, v in row.items() if k is not None and v not in (None, "")}
            for key in ("start", "end"):
                if key in row:
                    try:
                        row[key] = float(row[key])
                    except ValueError:
                        pass  # the row model names the bad value
            if "shots" in row:
                try:
                    row["shots"] = json.loads(row["shots"])
                except json.JSONDecodeError as e:
                    rows.append((n, None, f"shots is not a JSON list: {e.msg}"))
                    continue
            rows.append((n, row, ""))
    elif name.endswith((".jsonl", ".json")):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((n, None, f"not JSON: {e.msg}"))
                continue
            rows.append((n, row, "") if isinstance(row, dict) else (n, None, "not a JSON object"))
    else:
        raise IngestError(f"data.captions {name!r}: use a .jsonl or .csv manifest (see README, 'Your own videos')")
    return rows


def list_sources(fs, root: str, manifest: tuple[str, bytes] | None = None) -> Listing:
    """Every task under ``root`` of ``fs``, and the rejects found while listing (manifest rows, missing files,
    videos without a caption). ``manifest`` is ``(name, bytes)`` when captions come from a manifest."""
    if not fs.exists(root):
        raise IngestError(f"data.source {redact(root)!r} does not exist; point data.source at a folder or bucket "
                          "prefix of videos")
    found = fs.find(root, detail=True)
    stat = {p: file_stat(info) for p, info in found.items()}
    names = [p for p in found if not any(part.startswith(".") for part in _rel(p, root).split("/"))]
    videos = sorted(p for p in names if p.lower().endswith(VIDEO_EXTS))
    tars = sorted(p for p in names if p.lower().endswith(TAR_EXTS))
    out = Listing()
    if manifest is None:
        for p in videos:
            sidecar = posixpath.splitext(p)[0] + ".txt"
            out.tasks.append(Task(len(out.tasks), "file", p, _rel(p, root), sidecar=sidecar, stat=stat[p]))
    else:
        name, data = manifest
        by_rel = {_rel(p, root): p for p in videos}
        named: set[str] = set()
        for line, row, err in _manifest_rows(data, name):
            where = f"{posixpath.basename(name)}:{line}"
            if row is None:
                out.rejects.append(Reject(where, "bad_manifest_row", err))
                continue
            path = row.get("path")
            source = where
            if isinstance(path, str) and path:
                source = posixpath.normpath(path)
                named.add(source)  # a file named by a bad row is reported there, not again as no_caption
                if _has_surrogates(path):
                    source = where
            parsed = parse_row(row, source, where)
            if isinstance(parsed, Reject):
                out.rejects.append(parsed)
                continue
            if not parsed.path:
                out.rejects.append(Reject(where, "bad_manifest_row", "path: missing"))
                continue
            rel = posixpath.normpath(parsed.path)
            if rel not in by_rel:
                detail = f"{where}: named here, but it is not a video under the source"
                out.rejects.append(Reject(rel, "missing", detail))
                continue
            out.tasks.append(Task(len(out.tasks), "file", by_rel[rel], rel, caption=parsed.caption,
                                  shots=[(float(s.start), s.caption) for s in parsed.shots] if parsed.shots else None,
                                  start=_f(parsed.start), end=_f(parsed.end), line=line, stat=stat[by_rel[rel]]))
        for rel in sorted(set(by_rel) - named):
            out.rejects.append(Reject(rel, "no_caption", f"not in the manifest {posixpath.basename(name)}"))
    for p in tars:
        out.tasks.append(Task(len(out.tasks), "tar", p, _rel(p, root), stat=stat[p]))
    return out


def _f(x) -> float | None:
    return None if x is None else float(x)


def _rel(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path)


def webdataset_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a webdataset tar, in order: ``key`` is a member's path up to the first dot of its file
    name (webdataset's rule), the rest names the field. Streams the tar (any fsspec file), one sample in memory."""
    import tarfile

    key, fields = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            d, base = posixpath.split(member.name)
            if not member.isfile() or "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            k = posixpath.join(d, stem)
            if k != key and fields:
                yield key, fields
                fields = {}
            key = k
            fields[ext.lower()] = tar.extractfile(member).read()
    if fields:
        yield key, fields
