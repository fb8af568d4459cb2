"""Self-attention over the NVFP4 KV cache: the fused Triton kernel against the paths it replaces.

At Wan2.2-5B's streaming shape (B=1, 24 heads x 128, a block of 8 latent frames x 880 tokens = 7040 queries
and new keys, 24 cached frames = 21120 cached keys), one layer's attention read of a denoising step:

i.   dense bf16 cache (``DenseKVStorage``: new K/V copied behind the held rows, views) + RoPE of all keys +
     SDPA -- the bf16 fast path;
ii.  NVFP4 cache, dequantize (PyTorch) + cat + RoPE of all keys + SDPA -- the NVFP4 path before the kernel;
iii. the fused kernel ``kernels/nvfp4_attention.py`` on the packed cache views.

RoPE is the fast path's one-pass kernel (``kernels/rope.py``) in i and ii; the queries' own RoPE (the same in
all three) is not timed. Times: CUDA events around each call, after warm-up (and the kernel's autotuning),
median of ``--reps``. Bytes: the least K/V traffic each path moves through memory (every tensor it reads
or writes once; SDPA's re-reads of K/V tiles from L2 not counted). Errors of iii against ii (both bf16) and of
both against a float32 evaluation of the same quantized attention.

    python benchmarks/nvfp4_kv_attention.py                         # CUDA; writes results/nvfp4_kv_attention_<gpu>.{json,md}
    python benchmarks/nvfp4_kv_attention.py --device cpu --small    # smoke test in Triton's interpreter

Imports only torch, triton, ``kernels``, ``longlive.quant`` and ``longlive.bench.harness`` (no pydantic), so it runs on a
bare GPU image.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longlive.bench.harness import (  # noqa: E402
    gbps, gpu_short, max_abs, max_rel, md_table, missing_cuda, peak_extra_mib, provenance, save, tflops, times_ms,
)
from longlive.quant.kv_cache import NVFP4KVStorage  # noqa: E402

WAN = {"B": 1, "H": 24, "D": 128, "frame": 880, "frames_new": 8, "frames_cached": 24}
SMALL = {"B": 1, "H": 2, "D": 32, "frame": 6, "frames_new": 2, "frames_cached": 5}
PATHS = {"dense": "i. dense cache + RoPE + SDPA", "nvfp4_dequant": "ii. NVFP4 dequantize + cat + RoPE + SDPA",
         "fused": "iii. fused NVFP4 attention kernel"}


def rope_freqs_1d(D: int, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, 1, D/2) cos/sin of plain 1D RoPE angles: the kernels do not care which angles they rotate by."""
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(tokens, dtype=torch.float64)[:, None] * inv
    return ang.cos().float().to(device)[:, None], ang.sin().float().to(device)[:, None]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def traffic_bytes(n: int, S: int, C: int, elt: int) -> dict[str, int]:
    """Least K/V bytes each path moves (see the module docstring); C = heads * head_dim, elt = bytes per element."""
    packed = n * (C // 2 + C // 16 + 4)  # one of K or V in the NVFP4 cache
    dense_new, dense_all = S * C * elt, (n + S) * C * elt
    return {
        "cache_bytes_dense": 2 * n * C * elt,
        "cache_bytes_nvfp4": 2 * packed,
        # copy new K/V in; RoPE reads K, writes rotated K; SDPA reads rotated K and V
        "dense": 2 * 2 * dense_new + 2 * dense_all + 2 * dense_all,
        # dequantize reads packed, writes dense; cat reads held + new, writes all; RoPE; SDPA
        "nvfp4_dequant": 2 * (packed + n * C * elt) + 2 * (dense_all + dense_all) + 2 * dense_all + 2 * dense_all,
        # the kernel reads packed K/V and the new dense K/V once
        "fused": 2 * packed + 2 * dense_new,
    }


@torch.no_grad()
def run(sizes: dict, device: str, reps: int, warmup: int) -> dict:
    from longlive_kernels.nvfp4_attention import _kernel, nvfp4_attention
    from longlive_kernels.nvfp4_attention_ref import dequantize_tokens
    from longlive_kernels.nvfp4_attention_ref import nvfp4_attention as nvfp4_attention_ref

    cuda = device == "cuda"
    if cuda:
        from longlive_kernels.rope import apply_rope
    else:
        from longlive_kernels.rope_ref import apply_rope
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter mis-computes bf16 dots
    B, H, D, frame = sizes["B"], sizes["H"], sizes["D"], sizes["frame"]
    S, n = sizes["frames_new"] * frame, sizes["frames_cached"] * frame
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape, scale=1.0: (torch.randn(shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    q, k, v = rnd(B, S, H, D), rnd(B, S, H, D), rnd(B, S, H, D)
    k_cached, v_cached = rnd(B, n, H, D, scale=2.0), rnd(B, n, H, D)
    cos, sin = rope_freqs_1d(D, n + S, device)
    # i. dense in-place cache: buffers of sink + window + block rows, the held tokens then this step's
    k_buf, v_buf = (torch.empty(B, n + S, H, D, dtype=dtype, device=device) for _ in range(2))
    k_buf[:, :n], v_buf[:, :n] = k_cached, v_cached
    # ii. / iii. the NVFP4 cache's packed views of the held tokens (quantized from float32)
    store = NVFP4KVStorage(1)
    store.update_packed(0, k_cached.float(), v_cached.float(), write=True)
    k_held, v_held = store.update_packed(0, k, v, write=False)

    def dense():
        k_buf[:, n:], v_buf[:, n:] = k, v
        return sdpa(q, apply_rope(k_buf, cos, sin), v_buf)

    def nvfp4_dequant():
        kk = torch.cat((dequantize_tokens(k_held, H, dtype), k), dim=1)
        vv = torch.cat((dequantize_tokens(v_held, H, dtype), v), dim=1)
        return sdpa(q, apply_rope(kk, cos, sin), vv)

    def fused():
        return nvfp4_attention(q, k_held, v_held, k, v, cos, sin)

    out_ii, out_iii = nvfp4_dequant(), fused()  # fused() autotunes here, outside the timings
    exact = nvfp4_attention_ref(q.float(), k_held, v_held, k.float(), v.float(), cos, sin)
    unquantized = sdpa(q.float(), apply_rope(torch.cat((k_cached, k), 1).float(), cos, sin), torch.cat((v_cached, v), 1).float())
    r = {**sizes, "Sq": S, "S_new": S, "n_cached": n, "dtype": str(dtype).removeprefix("torch."),
         "max_abs_fused_vs_dequant": max_abs(out_iii, out_ii), "max_rel_fused_vs_dequant": max_rel(out_iii, out_ii),
         "max_abs_fused_vs_fp32": max_abs(out_iii, exact), "max_abs_dequant_vs_fp32": max_abs(out_ii, exact),
         "max_abs_dense_vs_fp32_of_unquantized": max_abs(dense(), unquantized),
         "output_scale": float(exact.abs().max()), "triton_config": str(getattr(_kernel, "best_config", None)),
         "triton_config_ms": {str(c): float(t[0] if isinstance(t, (list, tuple)) else t)
                              for c, t in (getattr(_kernel, "configs_timings", None) or {}).items()},
         "bytes": traffic_bytes(n, S, H * D, torch.finfo(dtype).bits // 8)}
    del out_ii, out_iii, exact, unquantized
    for name, fn in (("dense", dense), ("nvfp4_dequant", nvfp4_dequant), ("fused", fused)):
        times = times_ms(fn, reps, warmup, torch.device(device))
        r[f"{name}_ms"], r[f"{name}_ms_min"] = statistics.median(times), min(times)
        r[f"{name}_tflops"] = tflops(4 * B * H * S * (n + S) * D, r[f"{name}_ms"])
        r[f"{name}_gbps"] = gbps(r["bytes"][name], r[f"{name}_ms"])
        r[f"{name}_peak_extra_mib"] = peak_extra_mib(fn) if cuda else None
        print(f"{name}: {r[f'{name}_ms']:.3f} ms", flush=True)
    r["speedup_fused_vs_dequant"] = r["nvfp4_dequant_ms"] / r["fused_ms"]
    r["speedup_fused_vs_dense"] = r["dense_ms"] / r["fused_ms"]
    return r


def markdown(result: dict) -> str:
    r, b = result["run"], result["run"]["bytes"]
    mib = lambda x: f"{x / 2**20:.4g}"  # noqa: E731
    rows = [(label, f"{r[f'{key}_ms']:.3f}", f"{r[f'{key}_ms_min']:.3f}", f"{r[f'{key}_tflops']:.0f}",
             mib(b["cache_bytes_dense" if key == "dense" else "cache_bytes_nvfp4"]), mib(b[key]), f"{r[f'{key}_gbps']:.0f}",
             "-" if r[f"{key}_peak_extra_mib"] is None else f"{r[f'{key}_peak_extra_mib']:.0f}",
             f"{r['nvfp4_dequant_ms'] / r[f'{key}_ms']:.2f}x") for key, label in PATHS.items()]
    lines = [
        f"# Attention over the NVFP4 KV cache ({result['device']})", "",
        f"torch {result['torch']}, triton {result['triton']}; {result['date']}. Script: `benchmarks/nvfp4_kv_attention.py`.",
        f"B={r['B']}, heads={r['H']}, head_dim={r['D']}, {r['Sq']} queries and new keys ({r['frames_new']} frames x "
        f"{r['frame']}), {r['n_cached']} cached keys ({r['frames_cached']} frames), {r['dtype']}, no mask. One layer's "
        f"attention read of a denoising step; the queries' RoPE (common to all) not timed. Median of {result['reps']} "
        f"({'CUDA events' if 'CPU' not in result['device'] else 'host clock'}, after warm-up and autotuning). Bytes moved: the least K/V traffic of each path (each tensor it "
        "reads or writes once).", "",
        *md_table(("path", "median ms", "min ms", "TFLOP/s", "cache MiB (K+V)", "K/V MiB moved", "GB/s of that",
                   "peak extra MiB", "speed vs ii"), rows), "",
        f"Errors (output scale {r['output_scale']:.3g}): fused vs ii max abs {r['max_abs_fused_vs_dequant']:.3g} "
        f"(rel to max |ii| {r['max_rel_fused_vs_dequant']:.3g}); against a float32 evaluation of the same quantized "
        f"attention: fused {r['max_abs_fused_vs_fp32']:.3g}, ii {r['max_abs_dequant_vs_fp32']:.3g}. (i vs float32 of the "
        f"unquantized cache: {r['max_abs_dense_vs_fp32_of_unquantized']:.3g}.)", "",
        f"Kernel config (autotuned): `{r['triton_config']}`", ""]
    if r["triton_config_ms"]:
        configs = sorted(r["triton_config_ms"].items(), key=lambda kv: kv[1])
        lines += [*md_table(("config (autotuning)", "ms"), ((f"`{c}`", f"{t:.3f}") for c, t in configs)), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (with --device cpu: Triton's interpreter)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per path (default 20 on CUDA, 3 on the CPU)")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results on CUDA; the CPU smoke test writes "
                                                    "nothing unless given")
    ap.add_argument("--name", default=None, help="file stem; default nvfp4_kv_attention_<gpu>")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and missing_cuda("no CUDA GPU: run with --device cpu --small for the interpreter smoke test"):
        return 2
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton.language
    reps = args.reps or (20 if cuda else 3)
    dev = torch.cuda.get_device_name() if cuda else f"CPU, Triton interpreter ({platform.processor() or platform.machine()})"
    result = {"device": dev, **provenance("triton"), "reps": reps}
    t0 = time.time()
    result["run"] = run(SMALL if args.small else WAN, args.device, reps, warmup=3 if cuda else 1)
    result["wall_s"] = round(time.time() - t0, 1)
    print(markdown(result))
    if args.out_dir or cuda:
        stem = args.name or f"nvfp4_kv_attention_{gpu_short(dev) if cuda else 'cpu'}" + ("_small" if args.small else "")
        save(args.out_dir or "benchmarks/results", stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
