"""8-bit self-attention (``kernels/fp8_attention.py``, ``kernels/fp8_sdpa.py``) against bf16 SDPA at LongLive 2.0's
shapes (issue 6).

One steady streaming block's self-attention of the Wan2.2-5B DiT: 24 heads of 128, 8 new latent frames
attending to a window of 24 cached + 8 (704x1280: 7040 queries over 28160 keys; 480x832: 3120 over
12480). Times, on one GPU (``triton.testing.do_bench``, median):

* bf16 SDPA in both layouts -- contiguous (B, H, S, D) as the ceiling measures it, and the (B, S, H, D)
  views the pipeline hands it (q transposed, K/V views of the cache's buffers) -- with PyTorch's default
  choice and each backend forced (flash, cuDNN, memory-efficient);
* ours: the three quantizers and the attention launch for a sweep of tile configurations, then the whole
  call with the best one (``--no-sweep``: the library's tiles only);
* cuDNN's FP8 flash attention (``kernels/fp8_sdpa.py``, needs nvidia-cudnn-frontend): the per-tensor quantizer,
  the launch on codes alone, and the whole call;
* errors on the first 1024 queries against float32 attention: bf16 SDPA's, ours, and ours against its
  reference.

    python benchmarks/fp8_attention.py --out-dir benchmarks/results      # writes fp8_attention_<gpu>.{json,md}
    python benchmarks/fp8_attention.py --impls sdpa cudnn --no-sweep    # a quicker subset
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longlive.bench.harness import do_bench_ms, gpu_short, md_table, missing_cuda, provenance, rel_l2, save, tflops  # noqa: E402
from longlive_kernels import fp8_attention as kern  # noqa: E402
from longlive_kernels import fp8_attention_ref as ref  # noqa: E402

SHAPES = {"704x1280": (7040, 28160), "480x832": (3120, 12480)}
HEADS, HEAD_DIM = 24, 128
CONFIGS = [(64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3),
           (128, 64, 4, 3)]
bench = partial(do_bench_ms, warmup=10, rep=50)


def e4m3_codes(x: torch.Tensor, per_token: bool):
    """(B, S, H, D) -> E4M3 codes (B, H, S, D) with a scale per token or per (sample, head): the speed
    comparison's other number formats for q.k (not the library's)."""
    x = x.transpose(1, 2).float()
    amax = x.abs().amax(dim=-1, keepdim=True) if per_token else x.abs().amax(dim=(2, 3), keepdim=True)
    amax = amax.clamp(min=1e-12)
    codes = (x * (448.0 / amax)).clamp(-448, 448).to(torch.float8_e4m3fn).contiguous()
    return codes, (amax / 448.0).squeeze(-1) if per_token else (amax / 448.0).flatten(1)


def timed(impl: str, sq: int, sk: int, fn, context=nullcontext, **where) -> dict:
    """One row: ``fn``'s median ms and TFLOP/s (4 Sq Sk D H per call) after a first call inside ``context()``;
    a failure (an unsupported backend or tile) is a row with its error, not a stop."""
    try:
        with context():
            fn()
            ms = bench(fn)
    except Exception as e:  # noqa: BLE001
        return {"impl": impl, **where, "error": str(e).splitlines()[0][:120]}
    out = {"impl": impl, **where, "ms": ms, "tflops": tflops(4 * sq * sk * HEAD_DIM * HEADS, ms)}
    print(json.dumps(out), flush=True)
    return out


def pipeline_inputs(sq: int, sk: int, g: torch.Generator):
    """q (B, S, H, D) and K/V views of a cache buffer with a block of spare rows, as the pipeline holds them."""
    q = torch.randn(1, sq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    buf = torch.randn(2, 1, sk + 7040, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, buf[0, :, :sk], buf[1, :, :sk]


def sdpa(q, k, v):
    """SDPA on (B, S, H, D) tensors (the first 1024 queries: what the errors are measured on)."""
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q[:, :1024], k, v))).transpose(1, 2)


def sdpa_rows(sq: int, sk: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HEADS, sq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(2, 1, HEADS, sk, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    q_bshd, k_view, v_view = pipeline_inputs(sq, sk, g)
    layouts = {"(B,H,S,D) contiguous": (q, kv[0], kv[1]),
               "(B,S,H,D) views (pipeline)": (q_bshd.transpose(1, 2), k_view.transpose(1, 2), v_view.transpose(1, 2))}
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return [timed(f"bf16 SDPA {name}", sq, sk, partial(F.scaled_dot_product_attention, *args),
                  partial(sdpa_kernel, backend) if backend else nullcontext, layout=layout)
            for layout, args in layouts.items() for name, backend in backends.items()]


def ours_rows(sq: int, sk: int, sweep: bool = True) -> tuple[list[dict], dict]:
    q, k, v = pipeline_inputs(sq, sk, torch.Generator(device="cuda").manual_seed(1))
    quant = {"quantize q": bench(lambda: kern.quantize_q(q)), "quantize k (mean + codes)": bench(lambda: kern.quantize_k(k)),
             "quantize v (amax + codes)": bench(lambda: kern.quantize_v(v))}
    vc = kern.quantize_v(v)
    qc, kc = kern.quantize_q(q), kern.quantize_k(k)
    formats = {
        "INT8 q.k, one key scale per head (library)": (*qc, *kc, *vc),
        "INT8 q.k, per-token key scales": (*qc, *ref._int8_rows(k.transpose(1, 2).float() - ref.key_mean(k)[:, :, None]), *vc),
        "E4M3 q.k, one key scale per head": (*e4m3_codes(q, True), *e4m3_codes(k, False), *vc),
    }
    out = torch.empty_like(q)
    configs = CONFIGS if sweep else [tuple(kern.default_config(HEAD_DIM)[n] for n in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))]
    rows = [timed(f"8-bit launch: {fmt}", sq, sk, partial(kern.attention_codes, *codes, out, cfg), config=cfg)
            for fmt, codes in formats.items()
            for cfg in ({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s} for bm, bn, w, s in configs)]
    cfg = min((r for r in rows if r["impl"].endswith("(library)") and "ms" in r), key=lambda r: r["ms"])["config"]
    rows.append({**timed("8-bit attention, whole call (quantize + launch)", sq, sk, lambda: kern.fp8_attention(q, k, v, cfg),
                         config=cfg), "quantize_ms": quant})
    # errors on the first 1024 queries against float32 attention
    n = min(1024, sq)
    truth, ours, expected = sdpa(q.float(), k.float(), v.float()), kern.fp8_attention(q, k, v, cfg)[:, :n], ref.fp8_attention(q[:, :n], k, v)
    errors = {"bf16 SDPA vs float32": rel_l2(sdpa(q, k, v), truth), "8-bit vs float32": rel_l2(ours, truth),
              "8-bit reference vs float32": rel_l2(expected, truth), "8-bit kernel vs its reference": rel_l2(ours, expected)}
    print(json.dumps(errors), flush=True)
    return rows, {"best_config": cfg, "errors": errors}


def cudnn_rows(sq: int, sk: int) -> tuple[list[dict], dict]:
    """cuDNN's FP8 attention on the pipeline's layout (q (B, S, H, D), k / v views of a cache buffer)."""
    from longlive_kernels import fp8_sdpa as cud
    from longlive_kernels import fp8_sdpa_ref
    from longlive_kernels.fp8_quant import quantize_tensor

    q, k, v = pipeline_inputs(sq, sk, torch.Generator(device="cuda").manual_seed(1))
    quant = {f"quantize {name} (per tensor)": bench(partial(quantize_tensor, x)) for name, x in (("q", q), ("k", k), ("v", v))}
    codes = (*quantize_tensor(q), *quantize_tensor(k), *quantize_tensor(v))
    rows = [timed("cuDNN FP8 launch (per-tensor E4M3 q, k, v, P)", sq, sk, lambda: cud.attention_codes(*codes),
                  layout="codes (B,S,H,D)"),
            {**timed("cuDNN FP8 attention, whole call (quantize + launch)", sq, sk, lambda: cud.fp8_sdpa(q, k, v),
                     layout="(B,S,H,D) views (pipeline)"), "quantize_ms": quant}]
    n = min(1024, sq)
    truth, out, expected = sdpa(q.float(), k.float(), v.float()), cud.fp8_sdpa(q, k, v)[:, :n], fp8_sdpa_ref.fp8_sdpa(q[:, :n], k, v)
    errors = {"cuDNN FP8 vs float32": rel_l2(out, truth), "cuDNN FP8 reference vs float32": rel_l2(expected, truth),
              "cuDNN FP8 vs its reference": rel_l2(out, expected)}
    print(json.dumps(errors), flush=True)
    return rows, {"errors_cudnn": errors}


def markdown(res: dict) -> str:
    lines = [f"# 8-bit self-attention vs bf16 SDPA ({res['gpu']})", "",
             f"{res['date']}; torch {res['torch']}, triton {res['triton']}, cuDNN {res['cudnn']}. "
             f"Script: `python benchmarks/fp8_attention.py`. Random bf16 inputs, B=1, {HEADS} heads of {HEAD_DIM}; "
             "do_bench median; TFLOP/s = 4 Sq Sk D H / time.", ""]
    for shape, r in res["shapes"].items():
        sq, sk = SHAPES[shape]
        cells = [(row["impl"], row.get("layout") or ", ".join(f"{k}={v}" for k, v in row["config"].items()),
                  *(("-", row["error"]) if "error" in row else (f"{row['ms']:.3f}", f"{row['tflops']:.0f}")))
                 for row in r["rows"]]
        quant = {k: v for row in r["rows"] for k, v in row.get("quantize_ms", {}).items()}
        errors = {**r.get("errors", {}), **r.get("errors_cudnn", {})}
        lines += [f"## {shape}: {sq} queries over {sk} keys", "",
                  *md_table(("implementation", "layout / config", "ms", "TFLOP/s"), cells), "",
                  "Quantizers (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in quant.items()), "",
                  "Errors on the first 1024 queries, ||x - float32|| / ||float32||: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--name", default=None)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--impls", nargs="+", choices=("sdpa", "triton", "cudnn"), default=["sdpa", "triton", "cudnn"])
    ap.add_argument("--no-sweep", action="store_true", help="the Triton kernel with the library's tiles only")
    args = ap.parse_args()
    if missing_cuda("benchmarks/fp8_attention.py needs a CUDA GPU; on the CPU run "
                    "`pytest tests/unit/test_fp8_attention.py tests/unit/test_fp8_sdpa.py` instead"):
        return 2
    gpu = torch.cuda.get_device_name()
    res = {"gpu": gpu, **provenance("triton"), "cudnn": torch.backends.cudnn.version(),
           "quantized_sdpa_op": hasattr(torch.ops.aten, "_scaled_dot_product_attention_quantized"), "shapes": {}}
    print(json.dumps({k: v for k, v in res.items() if k != "shapes"}), flush=True)
    for shape in args.shapes:
        sq, sk = SHAPES[shape]
        rows, extra = (sdpa_rows(sq, sk) if "sdpa" in args.impls else []), {}
        for impl, fn in (("triton", lambda: ours_rows(sq, sk, sweep=not args.no_sweep)), ("cudnn", lambda: cudnn_rows(sq, sk))):
            if impl in args.impls:
                try:
                    more, ex = fn()
                except Exception as e:  # noqa: BLE001 -- one implementation failing is a row, not a stop
                    more, ex = [{"impl": impl, "layout": "-", "error": f"{type(e).__name__}: {e}"[:300]}], {}
                    print(json.dumps(more[0]), flush=True)
                rows += more
                extra.update(ex)
        res["shapes"][shape] = {"rows": rows, **extra}
        torch.cuda.empty_cache()
    save(args.out_dir, args.name or "fp8_attention_" + gpu_short(gpu), res, markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
