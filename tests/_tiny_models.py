"""Random tiny models saved as a base directory (vae/, text/, dit/): what `longlive generate` loads, untrained."""

from __future__ import annotations

from pathlib import Path

import torch

from longlive.config import Preset
from longlive.models.dit import WanDiT
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE
from longlive.models.wan_adapter import save_dit


def save_tiny_base(preset: Preset, base: Path) -> Path:
    torch.manual_seed(0)
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    with torch.no_grad():  # a non-zero head, so generated latents depend on everything upstream
        torch.nn.init.normal_(dit.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    WanVAE(preset.vae).save_pretrained(base / "vae")
    TinyTextEncoder(preset.text, seed=0).save(base / "text")
    save_dit(dit, base / "dit")
    return base
