"""Body of the data-parallel encode test in test_encode.py: runs in each spawned gloo process."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from longlive.config import load_preset
from longlive.data.encode import encode_dataset, text_encoder, video_encoder
from longlive.models.text import load_text_encoder
from longlive.models.vae import WanVAE


def spawn_entry(rank: int, world: int, port: int, args: tuple) -> None:
    """torch.multiprocessing.spawn target: torchrun's environment and a gloo group, then :func:`encode_twice`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        encode_twice(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def encoders(base_dir: str):
    preset = load_preset("tiny")
    vae = WanVAE.from_pretrained(Path(base_dir) / "vae").eval()
    text = load_text_encoder(preset.text, Path(base_dir) / "text")
    return video_encoder(vae), text_encoder(text)


def encode_twice(rank: int, world: int, videos_dir: str, base_dir: str, url: str, out: str, batch_size: int,
                 samples_per_shard: int) -> None:
    """Encode at ``url`` as rank ``rank`` of ``world``, then again (a resumed run: nothing left to encode); rank 0
    writes both runs' stats to ``out``."""
    video, text = encoders(base_dir)
    stats = [encode_dataset(videos_dir, url, encode_video=video, encode_text=text, samples_per_shard=samples_per_shard,
                            batch_size=batch_size, rank=rank, world_size=world, fingerprint="inputs")
             for _ in range(2)]
    if rank == 0:
        Path(out).write_text(json.dumps(stats))
