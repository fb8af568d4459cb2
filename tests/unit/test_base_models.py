"""The `base` stage's training: VAE and teacher losses go down on synthetic clips, and the saved
models load back through the same loaders later stages use."""

import json

import numpy as np
import pytest
import torch

from longlive.config import TrainConfig, load_preset
from longlive.data.synth import write_dataset
from longlive.models.vae import WanVAE
from longlive.models.wan_adapter import load_dit
from longlive.train.base_models import build_base, fit_latent_stats, load_videos, vae_psnr

pytestmark = pytest.mark.slow


def small_tiny():
    p = load_preset("tiny")
    return p.model_copy(update={
        "synth": p.synth.model_copy(update={"num_videos": 12}),
        "base": p.base.model_copy(update={
            "vae": TrainConfig(steps=80, batch_size=2, lr=2e-3, log_every=1),
            "dit": TrainConfig(steps=60, batch_size=8, lr=1e-3, log_every=1),
        }),
    })


def test_base_losses_go_down_and_models_reload(tmp_path):
    preset = small_tiny()
    write_dataset(preset, tmp_path / "synth")
    metrics = build_base(preset, tmp_path / "synth", tmp_path / "base", tmp_path / "work", tmp_path / "plots")

    for name in ("vae", "teacher"):
        rows = json.loads((tmp_path / "plots" / f"{name}_loss.json").read_text())
        losses = np.array([r["loss"] for r in rows])
        first, last = losses[:10].mean(), losses[-10:].mean()  # 10-step means: crops make single steps noisy
        print(f"{name}: first-10 mean {first:.4f} -> last-10 mean {last:.4f}")
        assert last < 0.8 * first, f"{name} loss did not go down: {first:.4f} -> {last:.4f}"
    assert metrics["teacher"]["loss_last"] < metrics["teacher"]["loss_first"]

    frames, _ = load_videos(tmp_path / "synth")
    untrained = WanVAE(preset.vae)
    fit_latent_stats(untrained, frames)
    untrained_psnr = vae_psnr(untrained, frames[:1])
    print(f"held-out PSNR: untrained {untrained_psnr:.1f} dB -> trained {metrics['vae']['eval_psnr_db']:.1f} dB")
    assert metrics["vae"]["eval_psnr_db"] > untrained_psnr + 3.0

    vae = WanVAE.from_pretrained(tmp_path / "base" / "vae", expect=preset.vae)
    mean, std = vae.latent_stats()
    assert not torch.allclose(std, torch.ones_like(std)), "latent statistics were fitted and saved"
    dit = load_dit(tmp_path / "base" / "dit", expect=preset.dit)
    assert dit.num_params() == metrics["teacher"]["params"]
    assert not list((tmp_path / "work").rglob("checkpoint.pt*")), "the resume state is removed after success"


def test_real_preset_without_weights_says_what_to_set(tmp_path):
    preset = load_preset("wan22-5b")
    preset = preset.model_copy(update={"base": preset.base.model_copy(update={"weights": str(tmp_path / "nowhere")})})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_base(preset, tmp_path, tmp_path / "base", tmp_path / "work", tmp_path / "plots")
