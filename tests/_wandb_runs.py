"""Read back what wandb wrote for an offline run: its ``run-<id>.wandb`` transaction log, the file ``wandb sync``
uploads. wandb 0.31 has no Python reader for it (the old ``wandb.sdk.internal.datastore`` is gone), so this
decodes it here: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB's log format (32 KiB blocks of
records, each with a 7-byte header: crc32, length, type full/first/middle/last) holding serialized
``wandb_internal_pb2.Record`` messages."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")  # masked crc32c, length, record type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<HB", data[4:7]) != (0xBEE1, 0):
        raise ValueError(f"{path} is not a wandb transaction log (header {data[:7]!r})")
    out, pos, parts = [], 7, []
    while pos + HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = HEADER.unpack_from(data, pos)
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + HEADER.size : pos + HEADER.size + n]
        if len(chunk) != n:
            break  # still being written: what is complete so far
        pos += HEADER.size + n
        parts = [chunk] if kind in (FULL, FIRST) else parts + [chunk]
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            out.append(rec)
    return out


def _items(items) -> dict:
    """Items (``key`` or ``nested_key`` + ``value_json``) as a dict; wandb-core writes a logged media value as one
    item per field (``nested_key: [<logged key>, "path"]``), so a nested key rebuilds the nested dict."""
    out: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    dir: Path
    id: str = ""
    name: str = ""
    project: str = ""
    entity: str = ""
    job_type: str = ""
    group: str = ""
    resumed: bool = False
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def media(self, value: dict) -> Path:
        """The file a logged media value (``{"_type": "video-file", "path": ...}``) points to."""
        return self.dir / "files" / value["path"]

    def table(self, key: str) -> tuple[list[str], list[list]]:
        """``(columns, rows)`` of the table logged under ``key``."""
        value = next(row[key] for row in self.history if key in row)
        assert value["_type"] == "table-file", value
        t = json.loads(self.media(value).read_text())
        return t["columns"], t["data"]


def finished_records(run_dir: Path, timeout_s: float = 30.0) -> list[pb.Record]:
    """The records of a finished run. ``run.finish()`` returns before wandb-core has flushed the whole log (a read
    right after it has seen only the first records), so wait for the run's ``exit`` record."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = list(run_dir.glob("run-*.wandb"))
        recs = records(logs[0]) if len(logs) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in recs):
            return recs
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_dir}: no finished run log after {timeout_s} s ({len(recs)} records)")
        time.sleep(0.2)


def read_run(run_dir: str | Path) -> OfflineRun:
    """The run in one ``offline-run-*`` directory (waits for wandb to finish writing it)."""
    run_dir = Path(run_dir)
    run = OfflineRun(run_dir)
    for rec in finished_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.id, run.name, run.project, run.entity = r.run_id, r.display_name, r.project, r.entity
            run.job_type, run.group, run.resumed = r.job_type, r.run_group, r.resumed
            run.config.update(_items(u for u in r.config.update if u.key != "_wandb"))
        elif kind == "config":
            run.config.update(_items(u for u in rec.config.update if u.key != "_wandb"))
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
    return run


def offline_runs(wandb_parent: str | Path) -> list[OfflineRun]:
    """Every offline run under ``<wandb_parent>/wandb``, oldest first."""
    return [read_run(d) for d in sorted(Path(wandb_parent).glob("wandb/offline-run-*"))]
