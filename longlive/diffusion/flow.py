"""Rectified-flow (flow matching) schedule as in Wan: x_t = (1 - s) x_0 + s * noise, target = noise - x_0.

``s`` (sigma) runs from 1 (pure noise) to 0 (clean); the model is conditioned on ``t = 1000 s``.
Wan shifts sigmas towards the noisy end with ``shift * s / (1 + (shift - 1) s)``.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(shape: tuple[int, ...], shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training sigmas: uniform in (0, 1), then shifted as at sampling time."""
    u = torch.rand(shape, generator=generator)
    return shift_sigma(u, shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``sigma`` broadcasts from the left: (B,) per sample or (B, F) per latent frame of (B, C, F, H, W)."""
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def timestep(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS


def step_list_sigmas(denoising_steps: list[int], shift: float) -> torch.Tensor:
    """Sigmas of a few-step list such as ``[1000, 750, 500, 250]``: ``t / 1000`` through the shift
    (Self-Forcing's warped steps). Training (``train_ar``) draws block noise levels from exactly
    these and inference denoises through them, so both live here, once."""
    t = torch.tensor(denoising_steps, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return shift_sigma(t, shift).float()


def _expand(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if sigma.dim() == 1:
        return sigma.view(-1, *([1] * (x.dim() - 1))).to(x)
    if sigma.dim() == 2:  # (B, F) per latent frame of (B, C, F, H, W)
        return sigma[:, None, :, None, None].to(x)
    raise ValueError(f"sigma must be (B,) or (B, F), got shape {tuple(sigma.shape)}")
