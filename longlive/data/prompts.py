"""Prompt corpora: the text prompts DMD draws from (``dmd.prompts``), and their embeddings, computed once.

A corpus is one file, a local path or any fsspec URL (``s3://bucket/prompts.txt``):

* ``.txt``: one prompt per line (blank lines are skipped);
* ``.jsonl``: one object per line, ``{"prompt": "..."}``. A line may also name the training clip whose
  first-shot caption it is (``"clip": KEY``, the key ``encode`` stored the clip under): DMD then takes that
  clip along (an I2V rollout starts from its first frame; the teacher-forcing data term trains on it) and
  the embedding ``encode`` stored with it, instead of embedding the prompt a second time.

``encode`` writes ``data/encoded/prompts.jsonl``: the first-shot caption of every clip it encoded, with the
clip's key, in the shards' order (:func:`training_prompts`) -- the training captions as a corpus.

Embeddings of the other prompts are computed once per (corpus, text encoder) and kept in a cache file
(:func:`embed_prompts`); they are stored in float16, as ``encode`` stores caption embeddings in the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from longlive.io import save_safetensors, write_text_atomic
from longlive.secrets import redact_url

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl")
CORPUS_NAME = "prompts.jsonl"  # what encode writes beside the manifest


class PromptError(ValueError):
    """A prompt corpus cannot be read; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class PromptCorpus:
    source: str  # where it was read from (credentials redacted)
    prompts: tuple[str, ...]
    clips: tuple[str | None, ...]  # per line: the training clip it stands for, or None
    sha256: str  # of the file's bytes

    def __len__(self) -> int:
        return len(self.prompts)


def read_corpus(url: str, storage_options: dict | None = None) -> PromptCorpus:
    """Read a ``.txt`` or ``.jsonl`` corpus (see the module doc); every problem is one :class:`PromptError` line."""
    from longlive.data.shards import ShardError, open_fs

    shown = redact_url(url)
    suffix = os.path.splitext(url.split("?", 1)[0])[1].lower()
    if suffix not in SUFFIXES:
        raise PromptError(f"dmd.prompts {shown!r}: a prompt file is .txt (one prompt per line) or .jsonl "
                          f"(one {{\"prompt\": ...}} per line), not {suffix or 'a file without a suffix'}")
    try:
        fs, path = open_fs(url, storage_options)
        if not fs.isfile(path):
            raise PromptError(f"dmd.prompts {shown!r} is not a file; point it at a .txt or .jsonl prompt list "
                              "(or data/encoded/prompts.jsonl, the training captions encode writes)")
        data = fs.cat_file(path)
    except ShardError as e:
        raise PromptError(f"dmd.prompts: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"dmd.prompts {shown!r} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    prompts: list[str] = []
    clips: list[str | None] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if suffix == ".txt":
            prompts.append(line.strip())
            clips.append(None)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"dmd.prompts {shown!r} line {n} is not JSON ({e.msg}); write one "
                              "{\"prompt\": \"...\"} object per line") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"dmd.prompts {shown!r} line {n} has no \"prompt\" text; write one "
                              "{\"prompt\": \"...\"} object per line")
        clip = row.get("clip")
        if clip is not None and not isinstance(clip, str):
            raise PromptError(f"dmd.prompts {shown!r} line {n}: \"clip\" must be a clip key (a string) or absent")
        prompts.append(prompt)  # as written: a training caption must stay equal to the one encode embedded
        clips.append(clip)
    if not prompts:
        raise PromptError(f"dmd.prompts {shown!r} holds no prompt; add one per line")
    return PromptCorpus(shown, tuple(prompts), tuple(clips), hashlib.sha256(data).hexdigest())


def training_prompts(manifest: dict, rows: list[dict]) -> list[dict]:
    """``{"clip": key, "prompt": its first-shot caption}`` for every clip of a shard ``manifest``, in the
    manifest's order (the order a trainer holds the clips in); ``rows`` are the index rows encode read."""
    first = {r["key"]: r["captions"][0] for r in rows}
    missing = [k for e in manifest["shards"] for k in e["keys"] if k not in first]
    if missing:
        raise PromptError(f"the shards hold clip {missing[0]!r} (and {len(missing) - 1} more) that the clips' "
                          "index.jsonl does not list; re-run encode (dvc repro encode)")
    return [{"clip": k, "prompt": first[k]} for e in manifest["shards"] for k in e["keys"]]


def write_corpus(path: str | os.PathLike, lines: list[dict]) -> Path:
    """A ``.jsonl`` corpus, atomically (a reader never sees half of it)."""
    return write_text_atomic(path, "".join(json.dumps(x, ensure_ascii=False, sort_keys=True) + "\n" for x in lines))


def embed_prompts(prompts: list[str], encode_text: Callable[[list[str]], Tensor], cache_dir: str | os.PathLike,
                  encoder_id: str, batch_size: int = 32) -> dict[str, Tensor]:
    """``{prompt: (L, D) float16}`` for every distinct prompt, read from ``cache_dir`` when an earlier run
    embedded the same prompts with the same encoder (``encoder_id``: anything that changes when its weights
    or settings do), else computed with ``encode_text`` (list of N prompts -> (N, L, D)) and cached."""
    distinct = list(dict.fromkeys(prompts))
    if not distinct:
        return {}
    key = hashlib.sha256(json.dumps([encoder_id, distinct]).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        try:
            emb = load_file(path)["embeddings"]
            if emb.shape[0] == len(distinct):
                log.info("prompt embeddings: %d from the cache %s", len(distinct), path)
                return dict(zip(distinct, emb))
        except Exception as e:  # a damaged cache file is recomputed, not trusted
            log.warning("prompt embedding cache %s unreadable (%s): recomputing", path, e)
    log.info("prompt embeddings: computing %d (cached in %s)", len(distinct), path)
    parts = []
    with torch.no_grad():
        for i in range(0, len(distinct), batch_size):
            batch = distinct[i : i + batch_size]
            out = encode_text(batch)
            if out.ndim != 3 or out.shape[0] != len(batch):
                raise ValueError(f"encode_text must return (N={len(batch)}, L, D), got {tuple(out.shape)}")
            parts.append(out.detach().float().cpu().half())
    emb = torch.cat(parts).contiguous()
    save_safetensors({"embeddings": emb}, path)
    return dict(zip(distinct, emb))


__all__ = ["CORPUS_NAME", "PromptCorpus", "PromptError", "embed_prompts", "read_corpus", "training_prompts",
           "write_corpus"]
