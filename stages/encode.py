"""`encode`: videos -> VAE latents + text embeddings in webdataset shards (local or s3://).

The shards go to ``encode.url``; ``data/encoded/`` (the DVC output) holds the manifest, ``prompts.jsonl`` (every
clip's first-shot caption and key, in the shards' order: a prompt corpus for ``dmd.prompts``) and, for a
local url inside it, the shards themselves. The stage is restartable: DVC keeps the folder
(``persist``) and the shard writer skips what a killed run already finished, unless the inputs
changed: the fingerprint of the inputs is stored with the shards, and a writer given another one
deletes the previous run's shards by the names its records list. Nothing else at the url is ever
deleted, so ``encode.url`` may be a shared folder or a bucket root.

With ``encode.nproc`` > 1 (``auto``: one per GPU) the stage runs itself under torchrun, as does
``torchrun --nproc-per-node N -m stages.encode`` (any N, several nodes too): each process encodes its block of the
clips on its own GPU into a part of the shards, and rank 0 writes the one manifest and the outputs beside it
(docs/ingest.md, "Encoding on GPUs").
"""

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from longlive.data.encode import EncodeTimings, encode_dataset, encode_dtype, text_encoder, video_encoder
from longlive.data.prompts import CORPUS_NAME, training_prompts, write_corpus
from longlive.data.shards import ShardError, open_fs
from longlive.data.synth import read_index
from longlive.device import resolve_device
from longlive.io import write_bytes_atomic
from longlive.models.text import load_text_encoder
from longlive.models.vae import WanVAE
from longlive.secrets import redact_url
from stages import _data
from stages._common import setup, write_json

BASE, OUT = Path("models/base"), Path("data/encoded")
log = logging.getLogger("encode")


def clips_dir(preset) -> Path:
    """synth's clips, or ingest's when data.source names the user's videos (the same format)."""
    return _data.clips_dir(preset, "encode")


def inputs_fingerprint(preset) -> str:
    # What changes the shards' bytes, the dtype auto resolves to included. The readers and the process count do
    # not (parts are per process count), so changing them resumes.
    h = hashlib.sha256(preset.encode.model_dump_json(exclude={"workers", "prefetch", "nproc"}).encode())
    h.update(str(encode_dtype(preset.encode.dtype, resolve_device(preset.device))).encode())
    for path in [clips_dir(preset) / "index.jsonl", *sorted((BASE / "vae").glob("*")), *sorted((BASE / "text").glob("*"))]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def nproc(preset) -> int:
    """Processes to encode with: ``encode.nproc``, ``auto`` being one per CUDA device of this machine."""
    n = preset.encode.nproc
    if n != "auto":
        return n
    return torch.cuda.device_count() if resolve_device(preset.device).type == "cuda" else 1


def start_processes(preset) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)`` of this process. Under torchrun (``WORLD_SIZE``) it joins the default group
    (NCCL on CUDA, gloo on CPU) on GPU ``LOCAL_RANK``; otherwise, with ``nproc(preset)`` > 1, it becomes that torchrun.

    Not ``longlive.parallel``: its package brings the DiT and FSDP along, which would make every DiT change
    rerun this stage (dvc.yaml's deps are the import closure); encoding needs only a process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(preset.device)
    if "WORLD_SIZE" not in os.environ and nproc(preset) > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc(preset)}",
               "-m", "stages.encode"]
        print("encode:", " ".join(cmd), file=sys.stderr, flush=True)
        os.execv(cmd[0], cmd)  # torchrun's exit status becomes the stage's
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = resolve_device(f"cuda:{local_rank}") if device.index is None else device
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return rank, world, device


def main() -> None:
    preset = setup("encode")
    cfg, url = preset.encode, preset.encode.url
    fingerprint = inputs_fingerprint(preset)
    rank, world, device = start_processes(preset)
    try:
        dtype = encode_dtype(cfg.dtype, device)
        vae = WanVAE.from_pretrained(BASE / "vae", device=device, dtype=dtype).eval()
        text_path = preset.text.path if preset.text.kind == "umt5" else BASE / "text"
        text = load_text_encoder(preset.text, text_path, device=device, dtype=dtype).to(device)  # UMT5 loads there
        timings = EncodeTimings()
        try:
            stats = encode_dataset(clips_dir(preset), url, encode_video=video_encoder(vae), encode_text=text_encoder(text),
                                   samples_per_shard=cfg.samples_per_shard, batch_size=cfg.batch_size,
                                   workers=cfg.workers, prefetch=cfg.prefetch, device=device, rank=rank,
                                   world_size=world, fingerprint=fingerprint, timings=timings)
        except ShardError as e:  # a url holding files encode did not write, or unreachable: one line naming the fix
            sys.exit(f"encode: {e}")
        t = timings
        log.info("rank %d: %d clips in %.1f s (%.2f clips/s) on %s, %s; VAE %.0f%% of the time, loader waits %.1f s, "
                 "captions embedded %d of %d", rank, t.clips, t.wall_s, t.clips / max(t.wall_s, 1e-9), device,
                 str(dtype).removeprefix("torch."), 100 * t.vae_share, t.load_wait_s, t.captions_computed,
                 t.captions_used)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return
    fs, root = open_fs(url)
    local = write_bytes_atomic(OUT / "manifest.json", fs.cat_file(f"{root.rstrip('/')}/manifest.json"))
    # the training captions as a prompt corpus (dmd.prompts), in the order a trainer holds the clips
    write_corpus(OUT / CORPUS_NAME, training_prompts(json.loads(local.read_bytes()), read_index(clips_dir(preset))))
    write_json(OUT / "_inputs.json", {"fingerprint": fingerprint, "url": redact_url(url)})
    write_json("reports/encode/metrics.json", stats)


if __name__ == "__main__":
    main()
