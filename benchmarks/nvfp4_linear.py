"""NVFP4 Triton linear (W4A4) against ``emulated`` and against bf16 ``torch.nn.Linear`` at Wan2.2-5B shapes.

The device check of issue 5: on a CUDA GPU,

1. correctness: the Triton activation quantizer is bit-exact with ``longlive.quant.nvfp4.quantize``, and
   the Triton layer's float32 output matches the ``emulated`` layer (same packed weights) within
   ``RTOL`` of the output's scale; also at a few small odd shapes;
2. speed and memory against bf16 ``nn.Linear`` (cuBLAS) for (K in, N out) in {3072x3072 (attention
   projections), 3072x14336 (FFN up), 14336x3072 (FFN down)} and M in {1170, 4680} tokens: median time
   (``triton.testing.do_bench``), TFLOP/s, weight bytes, and peak extra memory of one forward.

    python benchmarks/nvfp4_linear.py --out-dir benchmarks/results      # writes nvfp4_linear_<gpu>.{json,md}

Imports only torch, triton, ``longlive.quant``, ``longlive.bench.harness`` and ``kernels`` (no pydantic), so it runs on a
bare GPU image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longlive.bench.harness import (  # noqa: E402
    bit_exact, do_bench_ms, max_rel, md_table, missing_cuda, peak_extra_mib, provenance, rel_l2, save, slug, tflops,
    write_json,
)
from longlive.quant.linear import NVFP4Linear, check_backend, quantize_activation  # noqa: E402
from longlive.quant.nvfp4 import quantize  # noqa: E402

SHAPES = [(3072, 3072, "attention q/k/v/out"), (3072, 14336, "FFN up"), (14336, 3072, "FFN down")]
TOKENS = [1170, 4680]
RTOL = 1e-5  # max |triton - emulated| / max |emulated|, float32 outputs
MODES = ("packed", "float16")  # how the GEMM gets A: 4-bit tiles it decodes, or the dequantized float16 activation
bench_ms = partial(do_bench_ms, warmup=25, rep=100)


def make_layers(K: int, N: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lin = nn.Linear(K, N, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, device="cuda", generator=g) * K**-0.5)
        lin.bias.copy_(torch.randn(N, device="cuda", generator=g) * 0.1)
    return lin, NVFP4Linear.from_linear(lin, backend="triton"), NVFP4Linear.from_linear(lin, backend="emulated")


def per_mode(tri: NVFP4Linear, fn) -> dict:
    """``{mode: fn()}`` with the Triton layer handing A to its GEMM in each way."""
    out = {}
    for mode in MODES:
        tri.triton_activation = mode
        out[mode] = fn()
    return out


@torch.no_grad()
def check_small_shapes() -> list[dict]:
    out = []
    for M, K, N in [(37, 80, 50), (1, 16, 17), (129, 272, 96), (300, 3072, 200)]:
        lin, tri, emu = make_layers(K, N, seed=M)
        x = torch.randn(M, K, device="cuda")
        out.append({"M": M, "K": K, "N": N, "rel_max_vs_emulated": max(per_mode(tri, lambda: max_rel(tri(x), emu(x))).values())})
    return out


@torch.no_grad()
def run_shape(K: int, N: int, M: int) -> dict:
    from longlive_kernels.nvfp4_gemm import _kernel, nvfp4_gemm
    from longlive_kernels.nvfp4_quant import quantize_rows
    from longlive_kernels.nvfp4_quant_ref import global_scale

    lin, tri, emu = make_layers(K, N, seed=K + N)
    x = torch.randn(M, K, device="cuda", generator=torch.Generator(device="cuda").manual_seed(M), dtype=torch.bfloat16)
    r: dict = {"K": K, "N": N, "M": M}
    # 1. numerics, for both ways of handing A to the GEMM; float32 in -> float32 out, the same quantized values
    kq, ref = quantize_activation(x, use_kernel=True), quantize(x)
    r["act_quant_bit_exact"] = bit_exact((kq.packed, ref.packed), (kq.block_scales, ref.block_scales),
                                         (kq.global_scale, ref.global_scale))
    y_emu32 = emu(x.float())
    for mode, (y32, y) in per_mode(tri, lambda: (tri(x.float()), tri(x))).items():
        r[f"rel_max_vs_emulated_{mode}"], r[f"rel_l2_vs_emulated_{mode}"] = max_rel(y32, y_emu32), rel_l2(y32, y_emu32)
        r[f"bf16_out_rel_max_vs_emulated_{mode}"] = max_rel(y, y_emu32)
    r["rel_max_vs_emulated"] = max(r[f"rel_max_vs_emulated_{m}"] for m in MODES)
    r["w4a4_rel_l2_vs_bf16_linear"] = rel_l2(tri(x), lin(x))  # the quantization error itself, for reference
    del y_emu32, y32, y, kq, ref
    # 2. speed: the layer, its GEMM alone on each A operand, the activation quantizer
    r["bf16_linear_ms"] = bench_ms(lambda: lin(x))
    gv, inv_gv = global_scale(x, per_row=False)
    packed, scales, dq = quantize_rows(x, gv, inv_gv, dequantized=True)
    w = (tri.weight_packed, tri.weight_scales, tri.weight_global, tri.bias)
    for mode in MODES:
        tri.triton_activation = mode
        tri(x)  # autotune outside the timings
        r[f"nvfp4_{mode}_ms"] = bench_ms(lambda: tri(x))
        a_args = (packed, scales, gv) if mode == "packed" else (dq, None, gv)
        r[f"gemm_{mode}_ms"] = bench_ms(lambda: nvfp4_gemm(*a_args, *w, out_dtype=torch.bfloat16))
        r[f"triton_config_{mode}"] = str(getattr(_kernel, "best_config", None))
    r["act_quant_ms"] = bench_ms(lambda: quantize_activation(x, use_kernel=True))
    r["act_quant_dq16_ms"] = bench_ms(lambda: quantize_rows(x, *global_scale(x, per_row=False), dequantized=True))
    del packed, scales, dq
    r["best_activation_operand"] = best = min(MODES, key=lambda m: r[f"nvfp4_{m}_ms"])
    r["nvfp4_triton_ms"] = r[f"nvfp4_{best}_ms"]
    for key in ("bf16_linear", "nvfp4_triton", "gemm_packed", "gemm_float16"):
        r[f"{key}_tflops"] = tflops(2 * M * N * K, r[f"{key}_ms"])
    r["speedup_vs_bf16"] = r["bf16_linear_ms"] / r["nvfp4_triton_ms"]
    # 3. memory
    r["weight_bytes_bf16"], r["weight_bytes_nvfp4"] = lin.weight.numel() * 2 + lin.bias.numel() * 2, tri.weight_nbytes
    r["weight_ratio"] = r["weight_bytes_nvfp4"] / r["weight_bytes_bf16"]
    r["bf16_forward_peak_extra_mib"] = peak_extra_mib(lambda: lin(x))
    for mode, mib in per_mode(tri, lambda: peak_extra_mib(lambda: tri(x))).items():
        r[f"nvfp4_{mode}_forward_peak_extra_mib"] = mib
    return r


COLUMNS = {
    "K x N (layer)": "{K} x {N} ({layer})", "M": "{M}", "bf16": "{bf16_linear_ms:.3f}",
    "nvfp4 packed A": "{nvfp4_packed_ms:.3f}", "nvfp4 fp16 A": "{nvfp4_float16_ms:.3f}",
    "GEMM packed A": "{gemm_packed_ms:.3f}", "GEMM fp16 A": "{gemm_float16_ms:.3f}", "act. quant": "{act_quant_ms:.3f}",
    "bf16 TFLOP/s": "{bf16_linear_tflops:.0f}", "nvfp4 TFLOP/s": "{nvfp4_triton_tflops:.0f}",
    "speed vs bf16": "{speedup_vs_bf16:.2f}x",
    "weight MiB bf16 -> nvfp4": lambda r: f"{r['weight_bytes_bf16'] / 2**20:.1f} -> {r['weight_bytes_nvfp4'] / 2**20:.1f} "
                                          f"({r['weight_ratio']:.3f}x)",
    "fwd peak extra MiB bf16 / packed / fp16": "{bf16_forward_peak_extra_mib:.1f} / "
    "{nvfp4_packed_forward_peak_extra_mib:.1f} / {nvfp4_float16_forward_peak_extra_mib:.1f}",
    "max err vs emulated": "{rel_max_vs_emulated:.1e}",
    "act. quant bit-exact": lambda r: "yes" if r["act_quant_bit_exact"] else "NO",
}


def markdown(result: dict) -> str:
    return "\n".join([
        f"# NVFP4 Triton linear vs bf16 nn.Linear ({result['device']})", "",
        f"torch {result['torch']}, triton {result['triton']}; {result['date']}. Script: `benchmarks/nvfp4_linear.py`.",
        "W4A4 with weights packed (4.5 bits/weight) and activations quantized on every call (one global scale). "
        "Times are medians of `triton.testing.do_bench` in ms. A layer call = activation amax + quantization kernel + "
        "GEMM; `packed A`: the GEMM decodes the 4-bit activation tiles itself, `fp16 A`: the quantization kernel also "
        "writes the dequantized activation (exact in float16) and the GEMM decodes only W. Max error: "
        "max |triton - emulated| / max |emulated| on float32 outputs (both modes).", "",
        *md_table(COLUMNS, result["shapes"]), "",
        "Small odd shapes, max |triton - emulated| / max |emulated|: "
        + ", ".join(f"{s['M']}x{s['K']}x{s['N']}: {s['rel_max_vs_emulated']:.1e}" for s in result["small_shapes"]), "",
        f"native backend on this GPU: {result['native_backend']}", ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file stem; default nvfp4_linear_<gpu>")
    args = ap.parse_args()
    if missing_cuda("benchmarks/nvfp4_linear.py needs a CUDA GPU (the Triton kernels); on the CPU run "
                    "`pytest tests/unit/test_nvfp4_kernels.py` (TRITON_INTERPRET=1) instead"):
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the emulated reference multiplies in true float32
    dev = torch.cuda.get_device_name()
    try:
        check_backend("native", "cuda")
        native = "available"
    except RuntimeError as e:
        native = f"unavailable: {e}"
    result = {"device": dev, "capability": list(torch.cuda.get_device_capability()), **provenance("triton"),
              "rtol": RTOL, "native_backend": native, "shapes": []}
    stem, t0 = args.name or "nvfp4_linear_" + slug(dev), time.time()
    result["small_shapes"] = check_small_shapes()
    print("small shapes:", result["small_shapes"], flush=True)
    for (K, N, layer), M in ((s, M) for s in SHAPES for M in TOKENS):
        result["shapes"].append({**run_shape(K, N, M), "layer": layer})
        print(json.dumps(result["shapes"][-1]), flush=True)
        write_json(Path(args.out_dir) / f"{stem}.json", result)  # partial results survive a timeout
    result["wall_s"] = round(time.time() - t0, 1)
    ok = all(r["rel_max_vs_emulated"] < RTOL and r["act_quant_bit_exact"] for r in result["shapes"])
    result["matches_emulated"] = ok = ok and all(s["rel_max_vs_emulated"] < RTOL for s in result["small_shapes"])
    print(markdown(result))
    save(args.out_dir, stem, result, markdown(result))
    print(f"triton matches emulated: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
