"""`encode`: videos -> VAE latents + text embeddings in webdataset shards (local or s3://).

The shards go to ``encode.url``; ``data/encoded/`` (the DVC output) holds the manifest and, for a
local url inside it, the shards themselves. The stage is restartable: DVC keeps the folder
(``persist``) and the shard writer skips what a killed run already finished, unless the inputs
changed, in which case the old shards are dropped first.
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from longlive.data.encode import encode_dataset
from longlive.data.shards import open_fs
from longlive.models.text import load_text_encoder
from longlive.models.vae import WanVAE
from stages._common import setup, write_json

SYNTH, BASE, OUT = Path("data/synth"), Path("models/base"), Path("data/encoded")
log = logging.getLogger("encode")


def inputs_fingerprint(preset) -> str:
    h = hashlib.sha256(preset.encode.model_dump_json().encode())
    for path in [SYNTH / "index.jsonl", *sorted((BASE / "vae").glob("*")), *sorted((BASE / "text").glob("*"))]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def main() -> None:
    preset = setup("encode")
    url = preset.encode.url
    stamp = OUT / "_inputs.json"
    fingerprint = inputs_fingerprint(preset)
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") != fingerprint:
        log.info("inputs changed since the last encode: dropping old shards at %s", url)
        fs, root = open_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        shutil.rmtree(OUT, ignore_errors=True)
    write_json(stamp, {"fingerprint": fingerprint, "url": url})

    vae = WanVAE.from_pretrained(BASE / "vae").eval()
    text_path = preset.text.path if preset.text.kind == "umt5" else BASE / "text"
    text = load_text_encoder(preset.text, text_path)

    @torch.no_grad()
    def encode_video(video: torch.Tensor) -> torch.Tensor:
        return vae.encode(video)

    @torch.no_grad()
    def encode_text(captions: list[str]) -> torch.Tensor:
        return text.encode(captions)[0]

    stats = encode_dataset(SYNTH, url, encode_video=encode_video, encode_text=encode_text,
                           samples_per_shard=preset.encode.samples_per_shard)
    fs, root = open_fs(url)
    (OUT / "manifest.json").write_bytes(fs.cat_file(f"{root.rstrip('/')}/manifest.json"))
    write_json("reports/encode/metrics.json", stats)


if __name__ == "__main__":
    main()
