"""A streaming Wan2.2 VAE decoder that owns its memory layout: channels-last 3D from end to end.

diffusers' decoder (``longlive.models.vae.StreamingDecoder`` drives it) keeps activations in NCDHW and, in every
causal convolution, concatenates the cached frames and then copies the whole input again through ``F.pad`` for
the spatial border. At 704x1280 that copying, the norms and the upsampling are ~40% of the decode's GPU time, and
cuDNN's bf16 3D convolutions are 1.2-1.5x faster in channels-last (``benchmarks/results/vae_decode_notes.md``).
Switching diffusers' modules to channels-last does not help (each ``F.pad`` and ``cat`` goes back to NCDHW), so
this decoder re-runs the same modules' weights through its own forward:

* activations and 3D conv weights in ``torch.channels_last_3d``;
* a causal conv concatenates its cached frames in time (zeros where the cache is short, as diffusers pads) and
  leaves the spatial border to the convolution's own padding: one copy instead of two;
* the norm + SiLU pairs run as one function (compiled into one kernel on CUDA when ``compile_norms``);
* the causal cache is a plain list of tensors owned by this object, the same frames diffusers keeps.

The module tree, parameters and state dict stay diffusers' (real Wan2.2 weights load as before). Only the
Wan2.2 layout (``is_residual``: residual up blocks with ``DupUp3D`` shortcuts) is handled; other VAEs keep the
reference decoder (:func:`supports`). Exactness against it: ``tests/unit/test_fast_vae.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longlive.models.vae import StreamingDecoder

CACHE_T = 2  # frames a causal 3x3x3 conv keeps from its previous input, as diffusers' CACHE_T
CL = torch.channels_last_3d


def supports(vae) -> bool:
    """Whether ``vae`` (a :class:`~longlive.models.vae.WanVAE`) has the Wan2.2 decoder layout this decoder runs."""
    return bool(getattr(vae.model.config, "is_residual", False))


def _norm_silu(x: Tensor, gamma: Tensor, bias, scale: float, silu: bool) -> Tensor:
    """diffusers' ``WanRMS_norm`` (L2 normalisation over channels in float32, times sqrt(C) * gamma + bias),
    then SiLU: the same arithmetic, so the CPU result matches the reference decoder's."""
    y = F.normalize(x.float(), dim=1).to(x.dtype) * scale * gamma + bias
    return F.silu(y) if silu else y


def _with_context(x: Tensor, prev: Tensor | None, frames: int) -> Tensor:
    """``x`` after ``frames`` frames of causal context in time: the cached ``prev``, zeros where it is short (as
    diffusers' ``F.pad``), in channels-last."""
    have = 0 if prev is None else prev.shape[2]
    parts = ([x.new_zeros(*x.shape[:2], frames - have, *x.shape[3:])] if have < frames else []) + (
        [prev] if prev is not None else [])
    return torch.cat([*parts, x], 2).contiguous(memory_format=CL)


class FastStreamingDecoder(StreamingDecoder):
    """Decodes normalised latents chunk by chunk like :class:`~longlive.models.vae.StreamingDecoder` (the same
    interface and chunking, the same frames), through channels-last activations: only the per-chunk decoder call
    and its cache differ. ``compile_norms``: ``torch.compile`` the norm + SiLU function (CUDA; one fused kernel per
    activation shape)."""

    def __init__(self, vae, clamp: bool = True, frames_per_call: int = 1, compile_norms: bool | None = None):
        if not supports(vae):
            raise ValueError("FastStreamingDecoder runs the Wan2.2 decoder layout (is_residual); use "
                             "vae.streaming_decoder() for this VAE")
        # channels-last copies of the 3D conv weights, kept here: the modules' own stay contiguous, as
        # safetensors saves them (a copy of the decoder's conv weights: ~0.6 GB in bf16 for Wan2.2)
        self.weights = {id(m): m.weight.detach().contiguous(memory_format=CL)
                        for m in vae.model.decoder.modules() if isinstance(m, nn.Conv3d)}
        cuda = vae.device.type == "cuda"
        self.norm_silu = (torch.compile(_norm_silu)
                          if (cuda if compile_norms is None else compile_norms) else _norm_silu)
        super().__init__(vae, clamp=clamp, frames_per_call=frames_per_call)

    def reset(self) -> None:
        self.cache: dict[int, Tensor | str | None] = {}
        self.first = True

    # ------------------------------------------------------------------ pieces

    def _norm(self, norm, x: Tensor, silu: bool) -> Tensor:
        return self.norm_silu(x, norm.gamma, norm.bias, norm.scale, silu)

    def _causal_conv(self, conv: nn.Conv3d, x: Tensor, key: int) -> Tensor:
        """``conv`` (a ``WanCausalConv3d``) over ``x`` after its cached frames; updates the cache like diffusers."""
        kt, kh, kw = conv.kernel_size
        if kt == 1:  # 1x1x1 shortcut: no time context, no cache
            return F.conv3d(x, self.weights[id(conv)], conv.bias, conv.stride, (0, kh // 2, kw // 2))
        prev = self.cache.get(key)
        new_cache = x[:, :, -CACHE_T:]
        if new_cache.shape[2] < CACHE_T and prev is not None:
            new_cache = torch.cat([prev[:, :, -1:], new_cache], 2)
        self.cache[key] = new_cache.contiguous(memory_format=CL)  # its own memory: x is freed after the call
        inp = _with_context(x, prev, 2 * (kt // 2))
        pad = (0, kh // 2, kw // 2)  # the spatial border in the convolution itself, not in a copy
        return F.conv3d(inp, self.weights[id(conv)], conv.bias, conv.stride, pad)

    def _resblock(self, block, x: Tensor, key: list[int]) -> Tensor:
        h = block.conv_shortcut(x) if isinstance(block.conv_shortcut, nn.Identity) else self._causal_conv(
            block.conv_shortcut, x, -1)
        y = self._causal_conv(block.conv1, self._norm(block.norm1, x, True), key[0])
        key[0] += 1
        y = self._causal_conv(block.conv2, self._norm(block.norm2, y, True), key[0])
        key[0] += 1
        return y + h

    def _resample(self, up, x: Tensor, key: list[int]) -> Tensor:
        b, c, t, h, w = x.shape
        if up.mode == "upsample3d":
            k = key[0]
            key[0] += 1
            prev = self.cache.get(k)
            if prev is None:  # the video's first chunk: no temporal upsampling, as diffusers' "Rep" marker
                self.cache[k] = "Rep"
            else:
                new_cache = x[:, :, -CACHE_T:]
                if new_cache.shape[2] < CACHE_T:
                    head = torch.zeros_like(new_cache[:, :, -1:]) if isinstance(prev, str) else prev[:, :, -1:]
                    new_cache = torch.cat([head, new_cache], 2)
                conv = up.time_conv  # (3, 1, 1): two frames of context, zeros after "Rep"
                y = F.conv3d(_with_context(x, None if isinstance(prev, str) else prev, 2),
                             self.weights[id(conv)], conv.bias)
                self.cache[k] = new_cache.contiguous(memory_format=CL)
                # channels (2, C) -> frames interleaved: (b, 2C, t) -> (b, C, 2t), as diffusers' stack
                x = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
                t = 2 * t
        # 2x nearest upsampling + 3x3 conv per frame, frames folded into the batch, channels-last 2D
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).contiguous(memory_format=torch.channels_last)
        frames = F.interpolate(frames, scale_factor=2.0, mode="nearest-exact")
        conv = up.resample[1]
        y = F.conv2d(frames, conv.weight, conv.bias, padding=conv.padding)
        return y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4).contiguous(memory_format=CL)

    def _decoder(self, x: Tensor, first: bool) -> Tensor:
        dec = self.vae.model.decoder
        key = [0]
        x = self._causal_conv(dec.conv_in, x, key[0])
        key[0] += 1
        mid = dec.mid_block
        x = self._resblock(mid.resnets[0], x, key)
        for attn, res in zip(mid.attentions, mid.resnets[1:]):
            x = attn(x.contiguous()).contiguous(memory_format=CL)  # one frame's 2D attention: small, diffusers'
            x = self._resblock(res, x, key)
        for block in dec.up_blocks:
            skip = x
            for res in block.resnets:
                x = self._resblock(res, x, key)
            if block.upsampler is not None:
                x = self._resample(block.upsampler, x, key)
            if block.avg_shortcut is not None:
                x = x + block.avg_shortcut(skip.contiguous(), first_chunk=first).contiguous(memory_format=CL)
        x = self._causal_conv(dec.conv_out, self._norm(dec.norm_out, x, True), key[0])
        return x

    @torch.no_grad()  # an inference decoder: its weight copies are detached
    def decode_raw(self, z: Tensor) -> Tensor:
        return super().decode_raw(z)

    def decode_chunk(self, x: Tensor, first: bool) -> Tensor:
        return self._decoder(x.contiguous(memory_format=CL), first).contiguous()
