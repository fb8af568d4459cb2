"""The Wan2.2 VAE decoder's convolutions at 704x1280, one latent frame per call: the layout diffusers runs
(NCDHW, causal + spatial padding by ``F.pad`` copies) against channels-last 3D with the spatial padding left
to the convolution, in bf16 (issue 21, item 2: where the decode's time goes before rewriting it).

Each row is one conv class of a steady decoder call (its cached frames included), timed alone; the last rows time
the whole decoder on one 8-latent-frame block as diffusers' modules run it, in both memory formats.

    python benchmarks/vae_conv_layout.py --out-dir benchmarks/results     # CUDA
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longlive.bench.harness import bench_ms, md_table, run_environment, tflops  # noqa: E402

# (name, c_in, c_out, kernel, frames in (cache + new), frames out, h, w, count per latent frame)
CONVS = [
    ("block0 res 3x3x3", 1024, 1024, (3, 3, 3), 3, 1, 44, 80, 6),
    ("block1 res 3x3x3", 1024, 1024, (3, 3, 3), 4, 2, 88, 160, 6),
    ("block2 res 3x3x3 (first)", 1024, 512, (3, 3, 3), 6, 4, 176, 320, 1),
    ("block2 res 3x3x3", 512, 512, (3, 3, 3), 6, 4, 176, 320, 5),
    ("block3 res 3x3x3 (first)", 512, 256, (3, 3, 3), 6, 4, 352, 640, 1),
    ("block3 res 3x3x3", 256, 256, (3, 3, 3), 6, 4, 352, 640, 5),
    ("block1 upsample 3x3", 1024, 1024, (1, 3, 3), 4, 4, 176, 320, 1),
    ("block2 upsample 3x3", 512, 512, (1, 3, 3), 4, 4, 352, 640, 1),
]


def conv_rows(device: torch.device) -> list[dict]:
    rows = []
    for name, ci, co, k, t_in, t_out, h, w, count in CONVS:
        weight = torch.randn(co, ci, *k, device=device, dtype=torch.bfloat16) * 0.02
        bias = torch.zeros(co, device=device, dtype=torch.bfloat16)
        # the unpadded input: cache frames + new frames in time (the time padding is the cache)
        x = torch.randn(1, ci, t_in, h, w, device=device, dtype=torch.bfloat16)
        pad = (k[2] // 2, k[2] // 2, k[1] // 2, k[1] // 2, 0, 0)

        def ncdhw():
            return F.conv3d(F.pad(x, pad), weight, bias)

        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        w_cl = weight.contiguous(memory_format=torch.channels_last_3d)

        def ndhwc():
            return F.conv3d(x_cl, w_cl, bias, padding=(0, k[1] // 2, k[2] // 2))

        ref, got = ncdhw(), ndhwc()
        assert got.shape == ref.shape and got.shape[2] == t_in - k[0] + 1 == t_out, (got.shape, t_out)
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        flop = 2 * ci * co * k[0] * k[1] * k[2] * t_out * h * w
        a, b = bench_ms(ncdhw, device), bench_ms(ndhwc, device)
        rows.append({"conv": name, "count_per_latent_frame": count, "tflop": flop / 1e12, "ncdhw_pad_ms": a,
                     "ndhwc_ms": b, "ncdhw_tflops": tflops(flop, a), "ndhwc_tflops": tflops(flop, b),
                     "speedup": a / b, "rel_l2": err})
        print(json.dumps(rows[-1]), flush=True)
        del x, x_cl, weight, w_cl
        torch.cuda.empty_cache()
    return rows


def decoder_rows(device: torch.device) -> list[dict]:
    from longlive.bench.shapes import bench_shape
    from longlive.bench.vae import build_vae, vae_block_time
    from longlive.config import load_preset

    preset = load_preset("wan22-5b")
    vae, _ = build_vae(preset, device)
    shape = bench_shape(preset, (704, 1280))
    out = []
    for fmt in ("contiguous", "channels_last_3d"):
        mf = torch.contiguous_format if fmt == "contiguous" else torch.channels_last_3d
        for m in vae.model.decoder.modules():  # Module.to(memory_format=) refuses the decoder's 1-D and 4-D tensors
            if isinstance(m, torch.nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=mf)
        for kernels in (False, True):
            r = vae_block_time(vae, shape, device, blocks=2, frames_per_call=1, kernels=kernels)
            out.append({"memory_format": fmt, "kernels": kernels, "block_decode_ms": 1e3 * r["block_decode_s"],
                        "tflops": r["tflops"], "block_tflop": r["block_tflop"]})
    # exactness of the channels-last decoder against diffusers' modules at this size, in bf16 (first + steady block)
    from longlive.bench.vae import set_kernels
    from longlive.inference.fast_vae import FastStreamingDecoder

    set_kernels(vae, False)
    g = torch.Generator(device=device).manual_seed(5)
    z = torch.randn(1, shape.z_dim, 1 + shape.block_frames, shape.lat_h, shape.lat_w, device=device, generator=g)
    with torch.no_grad():
        r_dec, f_dec = vae.streaming_decoder(), FastStreamingDecoder(vae)
        ref = torch.cat([r_dec.decode(z[:, :, :1]), r_dec.decode(z[:, :, 1:])], 2).float()
        got = torch.cat([f_dec.decode(z[:, :, :1]), f_dec.decode(z[:, :, 1:])], 2).float()
    out.append({"memory_format": "fast_vae vs diffusers (exactness, bf16)", "kernels": False, "block_decode_ms": 0.0,
                "tflops": 0.0, "block_tflop": 0.0, "rel_l2": ((got - ref).norm() / ref.norm()).item(),
                "max_abs": (got - ref).abs().max().item(), "frames": got.shape[2]})
    print(json.dumps(out[-1]), flush=True)
    del ref, got, r_dec, f_dec
    for fpc in (1, 4):  # the channels-last decoder (longlive.inference.fast_vae), norms compiled
        r = vae_block_time(vae, shape, device, blocks=3, frames_per_call=fpc, fast=True)
        out.append({"memory_format": f"fast_vae (channels-last, {fpc} latent frame(s) per call)", "kernels": True,
                    "block_decode_ms": 1e3 * r["block_decode_s"], "tflops": r["tflops"], "block_tflop": r["block_tflop"],
                    "peak_mem_gib": r["peak_mem_gib"]})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default=None)
    p.add_argument("--no-decoder", action="store_true", help="the conv rows only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("vae_conv_layout needs CUDA: cuDNN's bf16 convolutions are what it measures")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    res = {"environment": run_environment(device), "convs": conv_rows(device),
           "decoder": [] if args.no_decoder else decoder_rows(device)}
    per_frame = {k: sum(r[k] * r["count_per_latent_frame"] for r in res["convs"]) for k in ("ncdhw_pad_ms", "ndhwc_ms")}
    res["listed_convs_ms_per_latent_frame"] = per_frame
    gpu = "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name().lower())
    name = args.name or f"vae_conv_layout_{gpu}"
    lines = [f"# Wan2.2 VAE decoder convolutions, 704x1280, bf16 ({torch.cuda.get_device_name()})", "",
             f"`python benchmarks/vae_conv_layout.py`; {res['environment']}", "",
             *md_table({"conv": "{conv}", "x per latent frame": lambda r: str(r["count_per_latent_frame"]),
                        "TFLOP": lambda r: f"{r['tflop']:.3f}", "NCDHW + F.pad ms": lambda r: f"{r['ncdhw_pad_ms']:.2f}",
                        "NDHWC ms": lambda r: f"{r['ndhwc_ms']:.2f}", "TFLOP/s NCDHW": lambda r: f"{r['ncdhw_tflops']:.0f}",
                        "TFLOP/s NDHWC": lambda r: f"{r['ndhwc_tflops']:.0f}", "speedup": lambda r: f"{r['speedup']:.2f}x",
                        "rel L2": lambda r: f"{r['rel_l2']:.1e}"}, res["convs"]),
             "", f"Listed convs per latent frame: NCDHW + pad {per_frame['ncdhw_pad_ms']:.1f} ms, "
                 f"NDHWC {per_frame['ndhwc_ms']:.1f} ms (x8 per 32-frame block)."]
    if res["decoder"]:
        lines += ["", *md_table({"decoder memory format": "{memory_format}", "fused norms": lambda r: str(r["kernels"]),
                                 "ms per 8-latent block": lambda r: f"{r['block_decode_ms']:.0f}",
                                 "TFLOP/s": lambda r: f"{r['tflops']:.0f}",
                                 "vs diffusers": lambda r: (f"rel L2 {r['rel_l2']:.1e}, max abs {r['max_abs']:.1e} "
                                                            f"over {r['frames']} frames" if "rel_l2" in r else "")},
                                res["decoder"])]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(res, indent=1))
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
