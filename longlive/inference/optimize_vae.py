"""The fused channel RMS norm (+ SiLU) in the Wan VAE decoder, applied from outside diffusers' modules.

At 704x1280 the decoder spends about half of its GPU time outside its convolutions (torch.profiler on an
H100: ``benchmarks/results/fps_h100.md``), mostly in ``WanRMS_norm`` + SiLU passes over 0.5 GB tensors.
:func:`apply_vae_kernels` turns each decoder norm into a :class:`FusedWanRMSNorm` (a subclass swapped in
place: same parameters, same state-dict keys) that runs ``kernels/channel_rmsnorm.py`` on CUDA tensors
and, where a SiLU follows it (residual blocks, the head), applies that SiLU too while the block's own
activation becomes an identity. Elsewhere -- the CPU, ``LONGLIVE_KERNELS=0`` -- the module computes
exactly diffusers' norm followed by ``F.silu``, so results there are bitwise unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanDecoder3d, WanResidualBlock, WanRMS_norm
from torch import Tensor, nn

from longlive.kernels_dispatch import use_kernel


class FusedWanRMSNorm(WanRMS_norm):
    """diffusers' ``WanRMS_norm``, followed by SiLU when ``silu``, through the fused kernel where it runs."""

    silu = False

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_first and use_kernel(x):
            from longlive_kernels.channel_rmsnorm import rms_norm

            return rms_norm(x, self.gamma, self.bias, silu=self.silu)
        y = super().forward(x)
        return F.silu(y) if self.silu else y


def _fuse(norm: WanRMS_norm, silu: bool) -> None:
    norm.__class__ = FusedWanRMSNorm
    norm.silu = silu


def apply_vae_kernels(vae) -> int:
    """Fuse every norm of ``vae``'s decoder (a :class:`~longlive.models.vae.WanVAE`), in place and idempotent.
    Returns how many norms carry the SiLU that followed them."""
    decoder: WanDecoder3d = vae.model.decoder
    with_silu = 0
    for m in decoder.modules():
        if isinstance(m, WanResidualBlock):  # norm1 -> SiLU -> conv1, norm2 -> SiLU -> dropout -> conv2
            for norm in (m.norm1, m.norm2):
                _fuse(norm, silu=True)
                with_silu += 1
            m.nonlinearity = nn.Identity()
    _fuse(decoder.norm_out, silu=True)  # the head: norm_out -> SiLU -> conv_out
    decoder.nonlinearity = nn.Identity()
    with_silu += 1
    for m in decoder.modules():  # the rest (the mid block's attention norm) have no SiLU after them
        if type(m) is WanRMS_norm:
            _fuse(m, silu=False)
    return with_silu


def remove_vae_kernels(vae) -> None:
    decoder: WanDecoder3d = vae.model.decoder
    for m in decoder.modules():
        if isinstance(m, FusedWanRMSNorm):
            m.__class__ = WanRMS_norm
            m.__dict__.pop("silu", None)
        if isinstance(m, (WanResidualBlock, WanDecoder3d)) and isinstance(m.nonlinearity, nn.Identity):
            m.nonlinearity = nn.SiLU()
