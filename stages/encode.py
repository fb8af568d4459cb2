"""`encode`: videos -> VAE latents + text embeddings in webdataset shards (local or s3://).

The shards go to ``encode.url``; ``data/encoded/`` (the DVC output) holds the manifest, ``prompts.jsonl`` (every
clip's first-shot caption and key, in the shards' order: a prompt corpus for ``dmd.prompts``) and, for a
local url inside it, the shards themselves. The stage is restartable: DVC keeps the folder
(``persist``) and the shard writer skips what a killed run already finished, unless the inputs
changed: the fingerprint of the inputs is stored with the shards, and a writer given another one
deletes the previous run's shards by the names its records list. Nothing else at the url is ever
deleted, so ``encode.url`` may be a shared folder or a bucket root.
"""

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

from longlive.data.encode import encode_dataset
from longlive.data.prompts import CORPUS_NAME, training_prompts, write_corpus
from longlive.data.shards import ShardError, open_fs
from longlive.data.synth import read_index
from longlive.device import resolve_device
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
    h = hashlib.sha256(preset.encode.model_dump_json().encode())
    for path in [clips_dir(preset) / "index.jsonl", *sorted((BASE / "vae").glob("*")), *sorted((BASE / "text").glob("*"))]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def main() -> None:
    preset = setup("encode")
    url = preset.encode.url
    fingerprint = inputs_fingerprint(preset)

    device = resolve_device(preset.device)  # the VAE moves each CPU batch to its device
    vae = WanVAE.from_pretrained(BASE / "vae", device=device).eval()
    text_path = preset.text.path if preset.text.kind == "umt5" else BASE / "text"
    text = load_text_encoder(preset.text, text_path, device=device).to(device)  # device=: UMT5 loads straight there

    @torch.no_grad()
    def encode_video(video: torch.Tensor) -> torch.Tensor:
        return vae.encode(video)

    @torch.no_grad()
    def encode_text(captions: list[str]) -> torch.Tensor:
        return text.encode(captions)[0]

    try:
        stats = encode_dataset(clips_dir(preset), url, encode_video=encode_video, encode_text=encode_text,
                               samples_per_shard=preset.encode.samples_per_shard, fingerprint=fingerprint)
    except ShardError as e:  # a url holding files encode did not write, or unreachable: one line naming the fix
        sys.exit(f"encode: {e}")
    fs, root = open_fs(url)
    OUT.mkdir(parents=True, exist_ok=True)
    local = OUT / "manifest.json"
    tmp = local.with_name(local.name + ".tmp")
    tmp.write_bytes(fs.cat_file(f"{root.rstrip('/')}/manifest.json"))
    os.replace(tmp, local)
    # the training captions as a prompt corpus (dmd.prompts), in the order a trainer holds the clips
    write_corpus(OUT / CORPUS_NAME, training_prompts(json.loads(local.read_bytes()), read_index(clips_dir(preset))))
    write_json(OUT / "_inputs.json", {"fingerprint": fingerprint, "url": redact_url(url)})
    write_json("reports/encode/metrics.json", stats)


if __name__ == "__main__":
    main()
