"""The preset's decoder, random weights, bf16, decoding blocks alone: the causal VAE (diffusers
``AutoencoderKLWan``) or, with ``--decoder light``, the distilled light decoder (``longlive.models.light_decoder``)."""

from __future__ import annotations

import contextlib
import json

import torch

from longlive.bench.harness import now, sync
from longlive.bench.shapes import BenchShape
from longlive.config import Preset


def is_light(decoder) -> bool:
    from longlive.models.light_decoder import LightDecoder

    return isinstance(decoder, LightDecoder)


def set_kernels(decoder, on: bool) -> None:
    """The VAE's fused norm + SiLU kernels on or off (the light decoder has no norms: nothing to do)."""
    if is_light(decoder):
        return
    from longlive.inference.optimize_vae import apply_vae_kernels, remove_vae_kernels

    apply_vae_kernels(decoder) if on else remove_vae_kernels(decoder)


def streaming(decoder, frames_per_call: int, fast: bool = False):
    """A streaming decoder; the light decoder takes each block in one call (no ``frames_per_call``). ``fast``: the
    channels-last decoder (``longlive.inference.fast_vae``) instead of diffusers' modules."""
    if is_light(decoder):
        return decoder.streaming_decoder()
    if fast:
        from longlive.inference.fast_vae import FastStreamingDecoder

        return FastStreamingDecoder(decoder, frames_per_call=frames_per_call)
    return decoder.streaming_decoder(frames_per_call=frames_per_call)


def build_decoder(preset: Preset, device: torch.device, kind: str = "vae"):
    """(decoder or None, a line for the report): ``kind`` vae (None when diffusers does not import here) or light."""
    if kind == "light":
        from longlive.models.light_decoder import LightDecoder

        if preset.light_decoder is None:
            raise ValueError(f"--decoder light: preset {preset.name} has no light_decoder section in params.yaml")
        with torch.device(device):
            dec = LightDecoder(preset.light_decoder, preset.vae.z_dim)
        c = preset.light_decoder
        return dec.to(torch.bfloat16).eval(), (
            f"light causal decoder (TAEHV design, longlive.models.light_decoder), the {preset.name} preset's sizes "
            f"(channels {c.channels}, MemBlocks {c.blocks}), {dec.num_params() / 1e6:.1f}M parameters, random weights, bf16")
    return build_vae(preset, device)


def build_vae(preset: Preset, device: torch.device):
    """(vae or None, a line for the report): None when diffusers does not import here."""
    try:
        import diffusers  # noqa: F401 - a bare GPU image may lack it: the rows then time the DiT alone
    except ImportError as e:
        return None, f"excluded: diffusers is not importable here ({e})"
    from longlive.models.vae import WanVAE

    with torch.device(device):
        vae = WanVAE(preset.vae)
    c = preset.vae
    return vae.to(torch.bfloat16).eval(), (
        f"diffusers AutoencoderKLWan, the {preset.name} preset's config (z_dim {c.z_dim}, compression "
        f"{'x'.join(map(str, c.compression))}), random weights, bf16")


def decode_tflop(decoder, shape: BenchShape) -> float:
    """FLOPs (in TFLOP) of one steady block's streaming decode, counted by torch's FlopCounterMode on a meta-device
    copy of ``decoder`` (no memory, no kernels): the convolutions' work, which bounds the decode from below at the
    GPU's matmul rate. At 704x1280 the Wan2.2 VAE needs ~531 TFLOP per 32-frame block."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    # a copy whose tensors live on the meta device (the memo hands deepcopy them instead of copying the real ones)
    memo = {id(t): (torch.nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                    if isinstance(t, torch.nn.Parameter) else torch.empty_like(t, device="meta"))
            for t in [*decoder.parameters(), *decoder.buffers()]}
    meta = copy.deepcopy(decoder, memo)
    dec = streaming(meta, 1)
    z = torch.zeros(1, shape.z_dim, 1 + shape.block_frames, shape.lat_h, shape.lat_w, device="meta",
                    dtype=torch.bfloat16)
    with torch.no_grad():
        dec.decode(z[:, :, :1])  # the video's first frame (its own path), then one steady block
        with FlopCounterMode(display=False) as counter:
            dec.decode(z[:, :, 1:])
    return counter.get_total_flops() / 1e12


def vae_block_time(vae, shape: BenchShape, device: torch.device, blocks: int = 3, frames_per_call: int = 1,
                   kernels: bool = False, profile: bool = False, fast: bool = False) -> dict:
    """Streaming decode of ``blocks`` blocks of ``block_frames`` latent frames; the first block (with the
    video's first frame) is the warm-up, the others are steady blocks. ``profile`` (CUDA): GPU kernel time
    of the last block by family (convolutions, other), against its wall time."""
    from longlive.data.video_io import frames_uint8

    set_kernels(vae, kernels and not fast)
    dec = streaming(vae, frames_per_call, fast)
    g = torch.Generator(device=device).manual_seed(2)
    times = []
    prof = None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for i in range(blocks):
            z = torch.randn(1, shape.z_dim, shape.block_frames, shape.lat_h, shape.lat_w, device=device, generator=g)
            sync(device)
            with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                  if profile and i == blocks - 1 and cuda else contextlib.nullcontext()) as prof:
                t0 = now()
                frames = frames_uint8(dec.decode(z)[0])
                sync(device)
                times.append(now() - t0)
            n_frames = frames.shape[0]
    steady = times[1:] or times
    tflop = decode_tflop(vae, shape)
    r = {"resolution": shape.resolution, "frames_per_call": frames_per_call, "kernels": kernels, "fast": fast,
         "block_decode_s": sum(steady) / len(steady), "first_block_decode_s": times[0],
         "block_tflop": tflop, "tflops": tflop / (sum(steady) / len(steady)),
         "latent_frames_per_block": shape.block_frames, "pixel_frames_per_block": n_frames,
         "frame_shape": list(frames.shape[1:]),
         "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    if prof is not None:
        fam, per_kernel = {"convolution": 0.0, "other": 0.0}, {}
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", 0.0) or 0.0
            if t:
                k = e.key.lower()
                conv = any(x in k for x in ("conv", "implicit", "wgrad", "dgrad", "xmma", "cudnn", "gemm", "nvjet"))
                fam["convolution" if conv else "other"] += t / 1e6
                per_kernel[e.key[:90]] = per_kernel.get(e.key[:90], 0.0) + t / 1e3
        r["gpu_kernel_s_by_family"] = fam
        r["top_kernels_ms"] = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
        r["gpu_busy_fraction"] = sum(fam.values()) / times[-1]
    print(json.dumps(r), flush=True)
    return r
