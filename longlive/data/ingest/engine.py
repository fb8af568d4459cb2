"""Run ingest: videos -> clips on Ray Data, a per-video cache, the index ``encode`` reads, and the report.

Layout of ``out_dir`` (the format ``synth`` writes, so ``encode`` only needs another folder)::

    index.jsonl          one row per clip: key, video, num_frames, fps, height, width, captions, shots,
                         and where it came from (source, source_sha256, start_seconds) + its sha256
    videos/{key}.npy     uint8 (T, H, W, 3) frames
    stats.json           counts (the same as reports/ingest/metrics.json)
    cache/{ck}.json      one per video: its clips and rejects, keyed by the sha256 of the file bytes, the
                         segment, the manifest's cut times and the settings (captions are not in the key:
                         fixing a caption re-writes the index without decoding anything)

Workers do all the per-video work (hash, probe, detect cuts, decode, filter, write the clip files and then
the cache entry, in that order: a cache entry exists only for a finished video). The driver only lists
the source, collects one small JSON summary per video, removes duplicates, and writes the index (atomic),
so a killed run resumes where it stopped and a finished one re-runs as a no-op.

Engine: Ray Data (``from_items`` + ``flat_map``), one task per file or tar. Without ``RAY_ADDRESS`` (or
``data.ray_address``) it starts Ray on this machine with ``num_cpus`` CPUs; with one it joins that
cluster, whose nodes must have this project installed and see ``out_dir`` (a shared filesystem): the
driver checks that every cache entry a worker reported is visible to it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from longlive.data.ingest import decode
from longlive.data.ingest.clips import IngestSettings, plan_windows
from longlive.data.ingest.filters import REASONS, Reject, Rejected, content_reason
from longlive.data.ingest.sources import (
    VIDEO_EXTS, IngestError, Listing, Task, decode_caption_text, file_stat, list_sources, parse_row,
    webdataset_samples,
)
from longlive.io import atomic_file, write_bytes_atomic
from longlive.secrets import redact, redact_url

log = logging.getLogger("ingest")

# Bump when a code change alters the frames or windows the same settings give: old cache entries then miss.
CODE_VERSION = 1
CACHE, VIDEOS, INDEX = "cache", "videos", "index.jsonl"
RUN_ONLY = ("cached_videos", "decoded_videos", "seconds")  # metrics of the run, kept out of data/ingest/stats.json
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# small atomic writes (a reader sees the old file or the new one, never half of one)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # straight to disk: a real preset's clip is hundreds of MB
        np.save(f, array, allow_pickle=False)


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def clip_sha256(frames: np.ndarray) -> str:
    h = hashlib.sha256(f"{frames.dtype}{frames.shape}".encode())
    h.update(np.ascontiguousarray(frames).data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the worker side: one video -> clips on disk + a cache entry -> a summary


@functools.lru_cache(maxsize=4)
def _fs(url: str, options_json: str):
    from longlive.data.shards import open_fs

    return open_fs(url, json.loads(options_json) or None)[0]


def _cache_key(file_sha: str, task: dict, settings: IngestSettings) -> str:
    spec = {"code": CODE_VERSION, "file": file_sha, "start": task.get("start"), "end": task.get("end"),
            "cuts": [s for s, _ in task["shots"]] if task.get("shots") else None, "settings": settings.fingerprint()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _cached(out: Path, ck: str) -> dict | None:
    path = out / CACHE / f"{ck}.json"
    try:
        entry = json.loads(path.read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if entry.get("cachekey") != ck or not all((out / VIDEOS / f"{c['key']}.npy").is_file() for c in entry["clips"]):
        return None  # clip files removed by hand: decode again
    return entry


def _decode_video(src, reopen, task: dict, settings: IngestSettings, out: Path, ck: str, file_sha: str) -> dict:
    """Probe, plan, decode, filter and write one video's clips; returns the cache entry (also written)."""
    s = settings
    entry = {"cachekey": ck, "file_sha256": file_sha, "clips": [], "rejects": [], "info": None, "cuts": []}
    try:
        with decode.open_container(src) as container:
            info = decode.probe(container)
            entry["info"] = asdict(info)
            need = max(s.width / info.display_width, s.height / info.display_height)
            if need > s.max_upscale + 1e-9:
                raise Rejected("too_small", f"{info.display_width}x{info.display_height} (as displayed) needs a "
                               f"{need:.2f}x upscale to cover {s.width}x{s.height}; data.max_upscale is "
                               f"{s.max_upscale:g}")
            seg0 = float(task.get("start") or 0.0)
            seg1 = min(float(task["end"]) if task.get("end") is not None else float("inf"), info.duration)
            if seg1 - seg0 <= s.span:
                raise Rejected("too_short", f"{max(seg1 - seg0, 0):.2f} s from {seg0:g} s (the video lasts "
                               f"{info.duration:.2f} s); a clip spans {s.span:.3f} s at {s.fps} fps")
            if task.get("shots"):
                starts = [t for t, _ in task["shots"]]
            elif s.scene_detect:
                entry["cuts"] = decode.detect_cuts(reopen(), seg0, seg1, s.scene_threshold)
                starts = [seg0, *[c for c in entry["cuts"] if c > seg0]]
            else:
                starts = [seg0]
            windows = plan_windows(seg0, seg1, starts, s)
            if not windows:
                raise Rejected("too_short", f"no {s.span:.3f} s window fits in {seg0:g}-{seg1:.2f} s")
            for w in windows:
                try:
                    frames = decode.read_clip(container, info, s.frame_times(w.start), s.height, s.width)
                except Rejected as e:
                    entry["rejects"].append({"clip": w.index, "reason": e.reason, "detail": e.detail})
                    continue
                bad = content_reason(frames, s.black_level, s.static_level)
                if bad:
                    entry["rejects"].append({"clip": w.index, "reason": bad[0], "detail": bad[1]})
                    continue
                key = f"{ck[:16]}-{w.index:03d}"
                _atomic_npy(out / VIDEOS / f"{key}.npy", frames)
                entry["clips"].append({"key": key, "sha256": clip_sha256(frames), "start": w.start,
                                       "snapped_cuts": w.snapped_cuts, "shots": [asdict(x) for x in w.shots]})
    except Rejected as e:
        entry["rejects"].append({"clip": None, "reason": e.reason, "detail": e.detail})
    return entry


def _finish(task: dict, sub: int, source: str, entry: dict, captions: list[str], cached: bool, t0: float,
            memo: Path | None = None) -> dict:
    """The summary the driver gets: the cache entry with this run's captions and where the video sits."""
    clips = []
    for c in entry["clips"]:
        shots = [{"start_frame": x["start_frame"], "start_latent_frame": x["start_latent_frame"],
                  "caption": captions[x["shot"]] if len(captions) > 1 else captions[0]} for x in c["shots"]]
        clips.append({**c, "shots": shots})
    return {"order": [task["order"], sub], "source": source, "segment": [task.get("start"), task.get("end")],
            "file_sha256": entry.get("file_sha256"), "cachekey": entry.get("cachekey"), "clips": clips,
            "rejects": entry["rejects"], "cached": cached, "seconds": round(time.monotonic() - t0, 3),
            "memo": memo.stem if memo is not None else None}


def _reject_summary(task: dict, sub: int, source: str, reason: str, detail: str, t0: float) -> dict:
    entry = {"clips": [], "rejects": [{"clip": None, "reason": reason, "detail": detail}]}
    return _finish(task, sub, source, entry, [""], False, t0)


def _stat_key(path: str, info: dict) -> str | None:
    """A key for "this file, unchanged": its path, size and change markers (mtime and inode locally, the ETag and
    last-modified time on a bucket); None when the store gives no marker (then the bytes are always hashed)."""
    marker = {k: str(v) for k, v in info.items() if k != "size" and v is not None}
    if not marker:
        return None
    key = json.dumps({"path": path, "size": info.get("size"), **marker}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _captions(task: dict) -> list[str]:
    return [c for _, c in task["shots"]] if task.get("shots") else [task["caption"]]


def _memo_path(out: Path, task: dict) -> Path | None:
    skey = _stat_key(task["path"], task.get("stat") or {}) if (task.get("stat") or {}).get("size") else None
    return out / CACHE / "files" / f"{skey}.json" if skey else None


def cached_summaries(task: dict, settings: IngestSettings, out: Path) -> list[dict] | None:
    """The summaries of a file or tar seen before (same path, size and change markers) whose clips are all on
    disk, without reading a byte of it; None otherwise. The driver calls it before starting Ray, so re-running
    ingest over an unchanged source costs a listing, not a download or a cluster start. (A video whose caption is
    a sidecar .txt is not settled here: the caption could have changed.) An empty file needs no worker either."""
    if task["kind"] == "file" and "size" in (task.get("stat") or {}) and not task["stat"]["size"]:
        return [_reject_summary(task, 0, task["source"], "empty", "the file has 0 bytes", time.monotonic())]
    memo = _memo_path(out, task)
    if task.get("sidecar") or memo is None or not memo.is_file():
        return None
    record = json.loads(memo.read_bytes())
    if task["kind"] == "file":
        entry = _cached(out, _cache_key(record["sha256"], task, settings))
        return None if entry is None else [_finish(task, 0, task["source"], entry, _captions(task), True,
                                                   time.monotonic(), memo)]
    out_summaries = []
    for sample in record.get("samples", []):  # a tar: each sample's caption and sha256, or its rejection
        if "summary" in sample:
            out_summaries.append({**sample["summary"], "cached": True})
            continue
        sub_task = {**task, **sample["task"]}
        entry = _cached(out, _cache_key(sample["sha256"], sub_task, settings))
        if entry is None:
            return None
        out_summaries.append(_finish(sub_task, sample["sub"], sample["source"], entry, _captions(sub_task), True,
                                     time.monotonic(), memo))
    return out_summaries


def _video(task: dict, sub: int, source: str, path: str | None, data: bytes | None, fs, settings: IngestSettings,
           out: Path, t0: float) -> dict:
    """One video from a file (``path`` on ``fs``) or from bytes (a webdataset sample): hashed (and copied, from a
    bucket) in one read, then served from the cache or decoded. See :func:`cached_summaries` for files seen before."""
    captions = _captions(task)
    memo = None
    if data is None:
        info = task.get("stat") or file_stat(fs.info(path))
        if not info.get("size"):
            return _reject_summary(task, sub, source, "empty", "the file has 0 bytes", t0)
        task = {**task, "sidecar": None, "stat": info}  # the caption is known by now
        known = cached_summaries(task, settings, out)
        if known is not None:
            return known[0]
        memo = _memo_path(out, task)
    elif not data:
        return _reject_summary(task, sub, source, "empty", "the sample's video has 0 bytes", t0)
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        if data is not None:
            file_sha = hashlib.sha256(data).hexdigest()
            src, reopen = io.BytesIO(data), (lambda: io.BytesIO(data))
        else:
            local = path if _is_local(fs) else os.path.join(tmp, "video" + os.path.splitext(path)[1])
            h = hashlib.sha256()
            with fs.open(path, "rb") as f, (open(local, "wb") if local != path else contextlib.nullcontext()) as copy:
                while chunk := f.read(_CHUNK):  # hash (and, from a bucket, copy) in one read of the bytes
                    h.update(chunk)
                    if copy is not None:
                        copy.write(chunk)
            file_sha, src, reopen = h.hexdigest(), local, (lambda: local)
            if memo is not None:
                write_bytes_atomic(memo, _json({"sha256": file_sha}))
        ck = _cache_key(file_sha, task, settings)
        entry = _cached(out, ck)
        cached = entry is not None
        if entry is None:
            entry = _decode_video(src, reopen, task, settings, out, ck, file_sha)
            write_bytes_atomic(out / CACHE / f"{ck}.json", _json(entry))  # last: marks the video done
    return _finish(task, sub, source, entry, captions, cached, t0, memo)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _file_task(task: dict, fs, settings: IngestSettings, out: Path) -> Iterator[dict]:
    t0 = time.monotonic()
    source = task["source"]
    if task.get("sidecar") is not None:  # no manifest: the caption is the .txt beside the video
        if not fs.exists(task["sidecar"]):
            yield _reject_summary(task, 0, source, "no_caption", f"no manifest and no sidecar "
                                  f"{os.path.basename(task['sidecar'])} beside it", t0)
            return
        text = decode_caption_text(fs.cat_file(task["sidecar"]), source)
        if isinstance(text, Reject):
            yield _reject_summary(task, 0, source, text.reason, text.detail, t0)
            return
        task = {**task, "caption": text}
    yield _video(task, 0, source, task["path"], None, fs, settings, out, t0)


def _tar_task(task: dict, fs, settings: IngestSettings, out: Path) -> Iterator[dict]:
    """Every sample of a webdataset tar; then a memo of the tar (each sample's caption and sha256, or its
    rejection), so that an unchanged tar is settled by :func:`cached_summaries` without being read."""
    memo = _memo_path(out, {**task, "stat": task.get("stat") or file_stat(fs.info(task["path"]))})
    records = []
    for summary, sample in _tar_samples(task, fs, settings, out):
        summary["memo"] = memo.stem if memo is not None else None
        if sample is None or summary["file_sha256"] is None:
            records.append({"summary": summary})
        else:
            keep = {k: sample.get(k) for k in ("caption", "shots", "start", "end")}
            records.append({"sub": summary["order"][1], "source": summary["source"], "task": keep,
                            "sha256": summary["file_sha256"]})
        yield summary
    if memo is not None:  # only after the whole tar was read
        write_bytes_atomic(memo, _json({"samples": records}))


def _tar_samples(task: dict, fs, settings: IngestSettings, out: Path) -> Iterator[tuple[dict, dict | None]]:
    sub = 0
    with fs.open(task["path"], "rb") as f:
        for key, fields in webdataset_samples(f):
            t0 = time.monotonic()
            source = f"{task['source']}#{key}"
            ext = next((e for e in fields if "." + e in VIDEO_EXTS), None)
            if ext is None:
                continue  # a sample without a video (e.g. only metadata) is not a video to report
            sub += 1
            if "json" in fields:
                try:
                    raw = json.loads(fields["json"].decode("utf-8", errors="surrogateescape"))
                except json.JSONDecodeError as e:
                    detail = f"{key}.json is not JSON: {e.msg}"
                    yield _reject_summary(task, sub, source, "bad_manifest_row", detail, t0), None
                    continue
                row = parse_row(raw if isinstance(raw, dict) else {}, source)
                if isinstance(row, Reject) and "txt" in fields:
                    row = None  # the json is other metadata; the caption is the txt
                if isinstance(row, Reject):
                    yield _reject_summary(task, sub, source, row.reason, row.detail, t0), None
                    continue
            else:
                row = None
            if row is not None:
                sample = {**task, "caption": row.caption, "start": row.start, "end": row.end,
                          "shots": [(float(s.start), s.caption) for s in row.shots] if row.shots else None}
            elif "txt" in fields:
                text = decode_caption_text(fields["txt"], source)
                if isinstance(text, Reject):
                    yield _reject_summary(task, sub, source, text.reason, text.detail, t0), None
                    continue
                sample = {**task, "caption": text}
            else:
                yield _reject_summary(task, sub, source, "no_caption", f"sample {key} has no txt or json", t0), None
                continue
            yield _video(sample, sub, source, None, fields[ext], fs, settings, out, t0), sample


def process_task(row: dict, *, settings: dict, out_dir: str, url: str, storage_options_json: str) -> list[dict]:
    """Ray Data ``flat_map`` function: one task -> one ``{"summary": json}`` row per video it holds.

    Never raises for what a file holds: a reason ends in the summary. An exception here would be a bug;
    it is reported as ``error`` (and not cached, so a fixed version retries the file)."""
    s = IngestSettings(**settings)
    out = Path(out_dir)
    task = json.loads(row["task"])
    task["shots"] = [tuple(x) for x in task["shots"]] if task.get("shots") is not None else None
    results = []
    try:
        fs = _fs(url, storage_options_json)
        work = _tar_task if task["kind"] == "tar" else _file_task
        results.extend(work(task, fs, s, out))
    except Exception as e:  # noqa: BLE001 - one broken file must not stop the dataset
        detail = redact(f"{type(e).__name__}: {e}")
        reason = "undecodable" if task["kind"] == "tar" and "tar" in type(e).__module__ else "error"
        results.append(_reject_summary(task, len(results) + 1, task["source"], reason, detail, time.monotonic()))
    return [{"summary": json.dumps(r)} for r in results]


# ---------------------------------------------------------------------------------------------
# the driver side


def _ray_summaries(tasks: list[Task], kwargs: dict, *, workers: int | None, address: str | None,
                   num_cpus: int) -> Iterator[dict]:
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        common = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            log.info("ingest: joining the Ray cluster at %s", redact_url(address))
            ray.init(address=address, **common)
        else:  # only small summaries travel through the object store: frames go from workers to disk
            ray.init(num_cpus=num_cpus, object_store_memory=256 * 2**20, **common)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = sys.stderr.isatty()
        items = [{"task": json.dumps(t.to_dict())} for t in tasks]  # JSON: Arrow cannot type mixed shot tuples
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 10_000)))
        compute = ray.data.TaskPoolStrategy(size=min(workers, len(items))) if workers else None
        ds = ds.flat_map(process_task, fn_kwargs=kwargs, num_cpus=1, compute=compute)
        for row in ds.iter_rows():
            yield json.loads(row["summary"])
    finally:
        if started:
            ray.shutdown()


def run_ingest(source: str, out_dir: str | os.PathLike, settings: IngestSettings, *, captions: str | None = None,
               storage_options: dict | None = None, reports_dir: str | os.PathLike | None = None,
               workers: int | None = None, ray_address: str | None = None, num_cpus: int = 2) -> dict:
    """Ingest every video under ``source`` into ``out_dir``; write the report; return the metrics.

    ``workers``: at most this many videos at once (None: one per CPU Ray has). ``captions``: a manifest path or
    URL (None: sidecar .txt files). Raises :class:`IngestError` only for problems of the whole run (no such
    source, an unreadable manifest, an output folder the workers cannot share).
    """
    from longlive.data.shards import ShardError, open_fs

    t0 = time.monotonic()
    out = Path(out_dir)
    options = storage_options or {}
    try:
        fs, root = open_fs(source, options or None)
        manifest = None
        if captions:
            mfs, mroot = open_fs(captions, options or None)
            if not mfs.isfile(mroot):
                raise IngestError(f"data.captions {redact_url(captions)!r} is not a file; point it at a .jsonl or .csv "
                                  "manifest, or set it to null to read a .txt beside each video")
            manifest = (mroot, mfs.cat_file(mroot))
        listing: Listing = list_sources(fs, root, manifest)
    except ShardError as e:
        raise IngestError(f"data.source: {e}") from None
    log.info("ingest: %d files and tars to read from %s (%d rejected while listing)", len(listing.tasks),
             redact_url(source), len(listing.rejects))

    (out / VIDEOS).mkdir(parents=True, exist_ok=True)
    (out / CACHE).mkdir(parents=True, exist_ok=True)
    kwargs = {"settings": asdict(settings), "out_dir": str(out.resolve()), "url": source,
              "storage_options_json": json.dumps(options, sort_keys=True)}
    summaries: list[dict] = []
    todo = []
    for task in listing.tasks:  # files whose clips are all on disk need no worker (nor Ray, if that is all of them)
        known = cached_summaries(task.to_dict(), settings, out)
        if known is None:
            todo.append(task)
        else:
            summaries.extend(known)
    if summaries:
        log.info("ingest: %d videos unchanged since an earlier run (cached)", sum(x["cached"] for x in summaries))
    done: set[int] = set()
    if todo:
        for s in _ray_summaries(todo, kwargs, workers=workers, address=ray_address, num_cpus=num_cpus):
            summaries.append(s)
            done.add(s["order"][0])  # a tar yields one summary per sample: count files and tars finished
            why = ", ".join(sorted({r["reason"] for r in s["rejects"]}))
            log.info("ingest: [%d/%d] %s: %d clips%s%s", len(done), len(todo), s["source"],
                     len(s["clips"]), " (cached)" if s["cached"] else "", f"; rejected: {why}" if why else "")
    missing = [s["source"] for s in summaries
               if s["cachekey"] and not (out / CACHE / f"{s['cachekey']}.json").is_file()]
    if missing:
        raise IngestError(f"the workers' results for {missing[0]} (and {len(missing) - 1} more) are not in {out}: on a "
                          "Ray cluster the output folder must be on a filesystem every node mounts (NFS, Lustre, EFS)")
    rows, rejects, stats = assemble(summaries, listing.rejects, settings)
    _write_index(out, rows, stats)
    _prune(out, summaries)
    stats["seconds"] = round(time.monotonic() - t0, 2)
    if reports_dir is not None:
        write_report(reports_dir, stats, rejects, source)
    return stats


def assemble(summaries: list[dict], listing_rejects: list[Reject],
             settings: IngestSettings) -> tuple[list[dict], list[dict], dict]:
    """Index rows (in listing order, duplicates out), every rejection, and the counts."""
    s = settings
    rejects = [r.to_dict() for r in listing_rejects]
    rows: list[dict] = []
    seen_files: dict[tuple, str] = {}
    seen_clips: dict[str, str] = {}
    cached = decoded = snapped = 0
    for summ in sorted(summaries, key=lambda x: x["order"]):
        src = summ["source"]
        rejects.extend({"source": src, **r} for r in summ["rejects"])
        if summ["file_sha256"] is None:
            continue
        cached += summ["cached"]
        decoded += not summ["cached"]
        ident = (summ["file_sha256"], *summ["segment"])
        if ident in seen_files:
            rejects.append({"source": src, "clip": None, "reason": "duplicate",
                            "detail": f"the same bytes (and segment) as {seen_files[ident]}"})
            continue
        seen_files[ident] = src
        for c in summ["clips"]:
            clip_no = int(c["key"].rsplit("-", 1)[1])
            if c["sha256"] in seen_clips:
                rejects.append({"source": src, "clip": clip_no, "reason": "duplicate",
                                "detail": f"the same frames as clip {seen_clips[c['sha256']]}"})
                continue
            seen_clips[c["sha256"]] = c["key"]
            snapped += c["snapped_cuts"]
            rows.append({
                "key": c["key"], "video": f"{VIDEOS}/{c['key']}.npy", "num_frames": s.num_frames, "fps": s.fps,
                "height": s.height, "width": s.width, "captions": [x["caption"] for x in c["shots"]],
                "shots": c["shots"], "source": src, "source_sha256": summ["file_sha256"],
                "start_seconds": c["start"], "sha256": c["sha256"],
            })
    reasons = Counter(r["reason"] for r in rejects)
    stats = {
        "videos": len(summaries) + sum(1 for r in listing_rejects if r.reason != "bad_manifest_row"),
        "videos_with_clips": len({r["source"] for r in rows}),
        "clips": len(rows),
        "multishot_clips": sum(len(r["shots"]) > 1 for r in rows),
        "snapped_cuts": snapped,
        "rejected_files": sum(r["clip"] is None for r in rejects),
        "rejected_clips": sum(r["clip"] is not None for r in rejects),
        "reasons": {k: reasons.get(k, 0) for k in REASONS},
        "cached_videos": cached,
        "decoded_videos": decoded,
    }
    return rows, rejects, stats


def _write_index(out: Path, rows: list[dict], stats: dict) -> None:
    write_bytes_atomic(out / INDEX, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    # what the dataset is, not how this run got it (cached or decoded): an unchanged source rewrites the folder
    # byte for byte, so DVC sees the same output and reruns nothing downstream
    write_bytes_atomic(out / "stats.json", _json({k: v for k, v in stats.items() if k not in RUN_ONLY}))


def _prune(out: Path, summaries: Iterable[dict]) -> None:
    """Remove clip files and cache entries this run did not use (old settings, videos gone from the source),
    and temporaries of killed runs, so the folder (a DVC output) holds this dataset only."""
    summaries = list(summaries)
    keep = {
        VIDEOS: {f"{c['key']}.npy" for s in summaries for c in s["clips"]},
        CACHE: {f"{s['cachekey']}.json" for s in summaries if s["cachekey"]} | {"files"},
        f"{CACHE}/files": {f"{s['memo']}.json" for s in summaries if s.get("memo")},
    }
    for folder, names in keep.items():
        if (out / folder).is_dir():
            for p in (out / folder).iterdir():
                if p.name in names:
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def write_report(reports_dir: str | os.PathLike, stats: dict, rejects: list[dict], source: str) -> None:
    """``metrics.json`` (numbers, for DVC and Prefect), ``rejects.jsonl`` and ``report.md`` (every rejection)."""
    d = Path(reports_dir)
    write_bytes_atomic(d / "metrics.json", _json(stats))
    write_bytes_atomic(d / "rejects.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects).encode())
    lines = [
        f"# Ingest of {redact_url(source)}", "",
        f"{stats['clips']} clips ({stats['multishot_clips']} multi-shot) from {stats['videos_with_clips']} of "
        f"{stats['videos']} videos; {stats['rejected_files']} files and {stats['rejected_clips']} clips rejected. "
        f"{stats['decoded_videos']} videos decoded, {stats['cached_videos']} from the cache.", "",
        "| reason | count | meaning |", "|---|---:|---|",
        *(f"| {k} | {n} | {REASONS[k]} |" for k, n in stats["reasons"].items() if n),
        "", "## Rejections", "", "| source | clip | reason | detail |", "|---|---:|---|---|",
        *(f"| {_md(r['source'])} | {'' if r['clip'] is None else r['clip']} | {r['reason']} | {_md(r['detail'])} |"
          for r in rejects),
    ]
    write_bytes_atomic(d / "report.md", ("\n".join(lines) + "\n").encode())


def _md(text: str) -> str:
    return redact(str(text)).replace("|", "\\|").replace("\n", " ")

