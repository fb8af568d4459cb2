"""The encode stage's logic: synth videos -> VAE latents + text embeddings in webdataset shards.

Decoupled from the models: the caller passes ``encode_video`` and ``encode_text`` callables, so this
module (and its tests) need no weights. Resumable: keys already in completed shards are skipped,
and an interrupted run leaves only whole, recorded shards behind (see :mod:`longlive.data.shards`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from longlive.data.shards import ShardWriter
from longlive.data.synth import load_frames, read_index
from longlive.data.video_io import frames_to_tensor

VideoEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], torch.Tensor]


def make_sample(row: dict, latents: np.ndarray, text: np.ndarray) -> dict:
    """One shard sample: latents (C, F, h, w), text (num_shots, L, D) float16, json = index row + shapes."""
    meta = dict(row)
    meta["latent_shape"] = list(latents.shape)
    meta["text_shape"] = list(text.shape)
    meta["shot_start_latent_frames"] = [s["start_latent_frame"] for s in row["shots"]]
    return {"__key__": row["key"], "latents.npy": latents, "text.npy": text, "json": meta}


def encode_dataset(
    videos_dir: str | os.PathLike,
    url: str,
    *,
    encode_video: VideoEncoder,
    encode_text: TextEncoder,
    samples_per_shard: int,
    batch_size: int = 4,
    storage_options: dict | None = None,
    latent_dtype: str = "float16",
    resume: bool = True,
    fingerprint: str | None = None,
) -> dict:
    """Encode every clip of ``videos_dir`` into shards at ``url``; return stats.

    ``encode_video``: float (B, 3, T, H, W) in [-1, 1] -> latents (B, C, F, h, w).
    ``encode_text``: list of N captions -> embeddings (N, L, D); called once per batch with every
    shot caption of the batch, and split back per clip.
    ``fingerprint`` (of the inputs, e.g. clips + encoder weights + settings) is stored with the shards: a
    run given another one removes the previous run's shards (by name, see :class:`ShardWriter`) instead of
    resuming from them.
    Returns ``{"samples", "encoded", "skipped", "shards"}`` (numbers only: DVC metrics): samples in the finished dataset,
    encoded by this run, skipped because an earlier run had stored them, and shard count.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = read_index(videos_dir)
    with ShardWriter(url, samples_per_shard, resume=resume, storage_options=storage_options,
                     fingerprint=fingerprint) as writer:
        done = writer.done_keys
        todo = [r for r in rows if r["key"] not in done]
        skipped = len(rows) - len(todo)
        with tqdm(total=len(rows), initial=skipped, desc="encode", unit="clip", disable=None) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                frames = np.stack([load_frames(videos_dir, r["key"]) for r in batch])
                captions = [c for r in batch for c in r["captions"]]
                with torch.inference_mode():
                    latents = encode_video(frames_to_tensor(frames))
                    text = encode_text(captions)
                _check(latents, len(batch), text, len(captions))
                latents_np = latents.detach().float().cpu().numpy().astype(latent_dtype)
                text_np = text.detach().float().cpu().numpy().astype(np.float16)
                offset = 0
                for row, lat in zip(batch, latents_np):
                    n = len(row["captions"])
                    writer.write(make_sample(row, lat, text_np[offset : offset + n]))
                    offset += n
                bar.update(len(batch))
        manifest = writer.close()
    return {
        "samples": manifest["total_samples"],
        "encoded": len(todo),
        "skipped": skipped,
        "shards": manifest["num_shards"],
    }


def _check(latents: torch.Tensor, b: int, text: torch.Tensor, n: int) -> None:
    # Fail at the batch that broke, naming the contract, rather than writing malformed shards.
    if latents.ndim != 5 or latents.shape[0] != b:
        raise ValueError(f"encode_video must return (B={b}, C, F, h, w), got {tuple(latents.shape)}")
    if text.ndim != 3 or text.shape[0] != n:
        raise ValueError(f"encode_text must return (N={n}, L, D) for {n} captions, got {tuple(text.shape)}")
