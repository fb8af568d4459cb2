"""Atomic writes: a file or directory appears complete or not at all."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that replaces ``path`` when the block succeeds.

    On an exception the temporary directory is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename the finished directory ``src`` over ``dst`` (on the same filesystem). A directory cannot be
    renamed over a non-empty one, so an existing ``dst`` is swapped out first and put back if the swap fails
    half-way: a reader sees the old directory or the new one."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent)) / dst.name
    try:
        os.replace(dst, old)
    except BaseException:  # e.g. EBUSY for a mount point or the cwd: leave no empty .old- folder behind
        old.parent.rmdir()
        raise
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old.parent)


@contextmanager
def atomic_file(path: str | os.PathLike, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, rename it over ``path``. A
    reader sees the old file or the new one, never half of one; on an error nothing is left behind.

    The temporary name starts with a dot; ``keep_suffix`` ends it with ``path``'s suffix too, for writers that
    pick the format by the name (ffmpeg: ``.mp4``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = (path.stem, path.suffix) if keep_suffix else (path.name, "")
    tmp = path.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with the metadata in sorted order: the same tensors give the same bytes.

    safetensors serialises ``__metadata__`` from a Rust hash map, whose order changes from one process to
    the next, so a model written twice had two checksums (DVC reran everything downstream of it and a
    release's manifest changed). The header is rewritten with sorted metadata; its length is unchanged
    (the same keys and values), so the tensor offsets still hold.
    """
    import json
    import struct

    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > n:  # never expected: the same content, reordered
        raise RuntimeError(f"rewritten safetensors header is longer ({len(text)} > {n} bytes)")
    return raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :]


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write :func:`safetensors_bytes` to ``path`` atomically (a temporary file beside it, then rename)."""
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata))


class UnsafeStateError(RuntimeError):
    """A saved state holds Python objects beyond tensors and plain values, so it is not loaded."""


def load_state(path: str | os.PathLike, *, remove: str | os.PathLike | None = None, allowed: tuple = ()):
    """``torch.load`` of resume state with ``weights_only=True``, onto the CPU.

    Resume state sits in a work directory that anything on the machine (or a shared filesystem) may
    write; a full unpickle of a planted file runs arbitrary code at the next ``train_*``. Only tensors,
    containers and plain values load here; anything else raises a one-line :class:`UnsafeStateError`
    naming the file (and ``remove``, what to delete to start over; default the file itself). ``allowed``: classes
    the caller vouches for besides those (an optimizer's quantized-state tensor subclass).
    """
    import pickle
    import re

    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|Unsupported operand|Trying to [^:.\n]+)[^\n]*", str(e))
        detail = found.group(0).strip().rstrip(".") if found else "not plain tensors and containers"
        raise UnsafeStateError(
            f"{path}: refused to load ({detail}): resume state may hold only tensors and plain values; it was "
            f"written by an older version or planted, and nothing in it was run. Delete {remove or path} to start "
            "this stage over"
        ) from None


def file_stamp(path: str | os.PathLike) -> str:
    """Cheap identity of a checkpoint directory (names, sizes, mtimes of its files): training fingerprints
    hold it, so a changed input (base DiT, VAE, text encoder, AR init) restarts training instead of resuming."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
