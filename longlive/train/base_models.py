"""The ``base`` models: for the tiny/small presets, train the causal VAE and a bidirectional
flow-matching teacher DiT on the training clips (synth's, or ingest's: ``data.source``); for real presets,
convert Wan2.2 weights.

Output layout (``out_dir``): ``vae/`` (diffusers AutoencoderKLWan layout), ``text/`` (tiny text
encoder; absent for UMT5, which is read from its own local path), ``dit/`` (diffusers
WanTransformer3DModel layout), ``metrics.json``. Resume state lives in ``work_dir/<vae|teacher>/checkpoint.pt``
and is removed after success; the models' offline wandb runs (``work_dir/<vae|teacher>/wandb``) stay for
``wandb sync``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longlive.config import Preset
from longlive.data.synth import load_frames, read_index
from longlive.data.video_io import frames_to_tensor
from longlive.device import resolve_device
from longlive.diffusion import flow
from longlive.models.dit import WanDiT
from longlive.models.text import build_text_encoder, load_text_encoder
from longlive.models.vae import WanVAE
from longlive.models.wan_adapter import load_wan_transformer, save_dit
from longlive.train.loop import run_training, write_history
from longlive.tracking import stage_config

# Objects cover a few percent of a frame; without extra weight (and object-centred crops, below) the
# VAE learns the dark background first and blurs the shapes the prompt-following check must recognise.
OBJECT_WEIGHT = 3.0
CFG_DROPOUT = 0.1  # the teacher also learns the unconditional velocity, for guidance later


def load_videos(synth_dir: str | os.PathLike) -> tuple[torch.Tensor, list[dict]]:
    """All clips as uint8 (N, T, H, W, 3) and their index rows."""
    index = read_index(synth_dir)
    if not index:
        raise FileNotFoundError(f"{synth_dir}/index.jsonl lists no clips; run `dvc repro synth` "
                                "(`dvc repro ingest` for data.source) first")
    frames = np.stack([load_frames(synth_dir, row["key"]) for row in index])
    return torch.from_numpy(frames), index


def _to_model_video(frames_u8: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1] on ``device``."""
    return torch.stack([frames_to_tensor(f.numpy()) for f in frames_u8]).to(device)


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_config(preset: Preset, model: str, **extra) -> dict:
    """The wandb config of one of the base stage's two trainings (``vae``, ``teacher``)."""
    return stage_config(preset, "base", ("video", "vae", "text", "dit", "base"), model=model,
                        object_weight=OBJECT_WEIGHT, **extra)


def train_vae(
    preset: Preset, frames: torch.Tensor, centers: torch.Tensor | None, run_dir: Path
) -> tuple[WanVAE, list[dict]]:
    """``frames`` uint8 (N, T, H, W, 3); ``centers`` (N, T, 2) object centres (x, y) from synth, or None (the
    user's videos: no objects to centre crops on, nor to weight). Trains on ``preset.device``; the batches are
    drawn on the CPU (the step generator's), so every device sees the same ones."""
    cfg = preset.base.vae
    device = resolve_device(preset.device)
    torch.manual_seed(preset.seed)
    vae = WanVAE(preset.vae).to(device)  # initialised on the CPU: the same weights on every device
    tc, sc = preset.vae.temporal_compression, preset.vae.spatial_compression
    # First frame + two groups: trains both the first-frame path and the steady state of the causal
    # cache. The VAE is fully convolutional, so half-size spatial crops train the same weights at a
    # quarter of the cost, and crops around the object (jittered) make every sample informative --
    # together what makes a usable VAE fit in the tiny preset's CPU minutes.
    n, t, h, w = frames.shape[:4]
    t_crop = min(t, 1 + 2 * tc)
    s_crop = max(4 * sc, (min(h, w) // 2) // sc * sc)

    def loss_fn(step: int, g: torch.Generator):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        t0 = int(torch.randint(0, t - t_crop + 1, (1,), generator=g))
        if centers is None:
            return _plain_crop_loss(idx, t0, g)
        jitter = torch.randint(-s_crop // 4, s_crop // 4 + 1, (cfg.batch_size, 2), generator=g)
        mid = centers[idx, t0 + t_crop // 2].round().long() + jitter
        anywhere = torch.rand(cfg.batch_size, generator=g) < 0.5  # half the crops also teach plain background
        mid[anywhere] = torch.stack([torch.randint(0, w, (int(anywhere.sum()),), generator=g),
                                     torch.randint(0, h, (int(anywhere.sum()),), generator=g)], dim=1)
        x0 = (mid[:, 0] - s_crop // 2).clamp(0, w - s_crop)
        y0 = (mid[:, 1] - s_crop // 2).clamp(0, h - s_crop)
        video = _to_model_video(torch.stack([
            frames[i, t0 : t0 + t_crop, y : y + s_crop, x : x + s_crop] for i, x, y in zip(idx, x0, y0)
        ]), device)
        posterior = vae.encode_dist(video)
        # Deterministic autoencoder (posterior mean) with a weak KL pull: sampling with the untrained
        # posterior's unit variance drowns the latents in noise and stalls learning for hundreds of
        # steps; latents are normalised to N(0, 1) per channel afterwards (fit_latent_stats).
        recon = vae.decode_raw(posterior.mean, clamp=False)  # a clamp would stop gradients where recon overshoots
        weight = 1.0 + (OBJECT_WEIGHT - 1.0) * (video.amax(dim=1, keepdim=True) > -0.6).float()
        rec = (weight * (recon - video).abs()).mean() + (weight * (recon - video) ** 2).mean()
        kl = posterior.kl().mean() / video[0].numel()
        return rec + preset.base.kl_weight * kl, {"kl": kl.item()}

    def _plain_crop_loss(idx: torch.Tensor, t0: int, g: torch.Generator):
        # the same objective on crops anywhere in the frame, every pixel weighted alike
        x0 = torch.randint(0, w - s_crop + 1, (cfg.batch_size,), generator=g)
        y0 = torch.randint(0, h - s_crop + 1, (cfg.batch_size,), generator=g)
        video = _to_model_video(torch.stack([
            frames[i, t0 : t0 + t_crop, y : y + s_crop, x : x + s_crop] for i, x, y in zip(idx, x0, y0)
        ]), device)
        posterior = vae.encode_dist(video)
        recon = vae.decode_raw(posterior.mean, clamp=False)
        rec = (recon - video).abs().mean() + ((recon - video) ** 2).mean()
        kl = posterior.kl().mean() / video[0].numel()
        return rec + preset.base.kl_weight * kl, {"kl": kl.item()}

    data = tensor_fingerprint(frames) if centers is None else tensor_fingerprint(frames, centers)
    history = run_training("vae", vae, loss_fn, cfg, run_dir / "vae", seed=preset.seed,
                           data_fingerprint=f"{data}:{preset.vae.model_dump_json()}",
                           tracking=preset.tracking, run_name="base-vae",
                           run_config=_run_config(preset, "vae", clips=n, crop={"frames": t_crop, "pixels": s_crop}))
    return vae, history


@torch.no_grad()
def fit_latent_stats(vae: WanVAE, frames: torch.Tensor, batch: int = 8) -> dict:
    """Per-channel mean/std of the posterior means, stored in the VAE so latents are ~N(0, 1)."""
    zs = [vae.encode_dist(_to_model_video(frames[i : i + batch], vae.device)).mean for i in range(0, len(frames), batch)]
    z = torch.cat(zs)
    mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.set_latent_stats(mean, std)
    return {"latent_mean": mean.tolist(), "latent_std": std.tolist()}


@torch.no_grad()
def vae_psnr(vae: WanVAE, frames: torch.Tensor) -> float:
    video = _to_model_video(frames, vae.device)
    recon = vae.decode(vae.encode(video))
    mse = ((recon - video) / 2).pow(2).mean().item()
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def train_teacher(
    preset: Preset, latents: torch.Tensor, context: torch.Tensor, null_context: torch.Tensor, run_dir: Path
) -> tuple[WanDiT, list[dict]]:
    """Bidirectional flow-matching teacher on clean latents (N, C, F, h, w) and text (N, L, D), trained on
    ``preset.device``; data, noise and noise levels are drawn on the CPU, as in :func:`train_vae`."""
    cfg = preset.base.dit
    device = resolve_device(preset.device)
    latents, context, null_context = latents.cpu(), context.cpu(), null_context.cpu()
    torch.manual_seed(preset.seed)
    dit = WanDiT(preset.dit, in_channels=preset.vae.z_dim, text_dim=preset.text.dim)
    dit.init_weights(preset.seed)  # Wan's from-scratch init: zero output head, small embedders
    dit = dit.to(device)

    def loss_fn(step: int, g: torch.Generator):
        idx = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=g)
        x0, ctx = latents[idx], context[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=g) < CFG_DROPOUT
        ctx[drop] = null_context
        noise = torch.randn(x0.shape, generator=g)
        sigma = flow.sample_sigmas((cfg.batch_size,), preset.base.timestep_shift, g)
        x0, noise, sigma, ctx = (t.to(device) for t in (x0, noise, sigma, ctx))
        pred = dit(flow.add_noise(x0, noise, sigma), flow.timestep(sigma), ctx)
        return F.mse_loss(pred, flow.velocity_target(x0, noise)), {}

    history = run_training(
        "teacher", dit, loss_fn, cfg, run_dir / "teacher", seed=preset.seed,
        data_fingerprint=f"{tensor_fingerprint(latents, context)}:{preset.dit.model_dump_json()}:{preset.base.timestep_shift}",
        tracking=preset.tracking, run_name="base-teacher",
        run_config=_run_config(preset, "teacher", clips=latents.shape[0], cfg_dropout=CFG_DROPOUT),
    )
    return dit, history


def build_tiny_base(preset: Preset, synth_dir: Path, out_dir: Path, work_dir: Path, plots_dir: Path) -> dict:
    frames, index = load_videos(synth_dir)
    # synth's object centres; ingest's clips (the user's videos) have none
    centers = torch.tensor([row["centers"] for row in index], dtype=torch.float32) if "centers" in index[0] else None
    n_eval = max(1, len(frames) // 12)
    train_frames, eval_frames = frames[n_eval:], frames[:n_eval]

    vae, vae_hist = train_vae(preset, train_frames, None if centers is None else centers[n_eval:], work_dir)
    stats = fit_latent_stats(vae, train_frames)
    psnr = vae_psnr(vae, eval_frames)

    text = build_text_encoder(preset.text, seed=preset.seed).to(vae.device)
    single = [i for i, row in enumerate(index) if len(row["shots"]) == 1 and i >= n_eval]
    if not single:
        raise ValueError(f"{synth_dir}/index.jsonl: no single-shot clip beyond the {n_eval} held out, and the teacher "
                         "trains on single-shot clips; add videos (or longer shots) to data.source")
    with torch.no_grad():
        latents = torch.cat([vae.encode(_to_model_video(frames[single[i : i + 8]], vae.device))
                             for i in range(0, len(single), 8)])
        context, _ = text.encode([index[i]["shots"][0]["caption"] for i in single])
        null_context = text.encode([""])[0][0]
    dit, dit_hist = train_teacher(preset, latents, context, null_context, work_dir)

    vae.save_pretrained(out_dir / "vae")
    text.save(out_dir / "text")
    save_dit(dit, out_dir / "dit")
    write_history(vae_hist, plots_dir / "vae_loss.json")
    write_history(dit_hist, plots_dir / "teacher_loss.json")
    tail = lambda h: float(np.mean([r["loss"] for r in h[-max(1, len(h) // 10):]]))  # noqa: E731
    head = lambda h: float(np.mean([r["loss"] for r in h[: max(1, len(h) // 10)]]))  # noqa: E731
    return {
        "vae": {"loss_first": head(vae_hist), "loss_last": tail(vae_hist), "eval_psnr_db": psnr},
        "teacher": {"loss_first": head(dit_hist), "loss_last": tail(dit_hist), "train_clips": len(single),
                    "params": sum(p.numel() for p in dit.parameters())},
        "latent_std_mean": float(np.mean(stats["latent_std"])),
    }


def convert_wan_base(preset: Preset, out_dir: Path) -> dict:
    """Real presets: take Wan2.2 weights from the local diffusers directory in ``base.weights``."""
    src = preset.base.weights
    if not src:
        raise FileNotFoundError(
            f"presets.{preset.name}.base.weights is not set: point it at a local Wan2.2-TI2V-5B-Diffusers "
            "directory (with transformer/ and vae/); nothing is downloaded"
        )
    src = Path(src)
    vae = WanVAE.from_pretrained(src / "vae", expect=preset.vae)
    dit = load_wan_transformer(src / "transformer", expect=preset.dit)
    if preset.text.kind == "umt5":
        load_text_encoder(preset.text, preset.text.path)  # fail now, not three stages later
    vae.save_pretrained(out_dir / "vae")
    save_dit(dit, out_dir / "dit")
    return {"converted_from": str(src), "teacher": {"params": sum(p.numel() for p in dit.parameters())}}


def build_base(preset: Preset, synth_dir: Path, out_dir: Path, work_dir: Path, plots_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if preset.base.weights:
        metrics = convert_wan_base(preset, out_dir)
    else:
        metrics = build_tiny_base(preset, synth_dir, out_dir, work_dir, plots_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # The resume state served its purpose (see run_training); offline wandb runs (<model>/wandb) stay for `wandb sync`
    for model in ("vae", "teacher"):
        for name in ("checkpoint.pt", "checkpoint.pt.stale"):
            (work_dir / model / name).unlink(missing_ok=True)
    return metrics
