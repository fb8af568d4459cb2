"""The benchmark's report: markdown (committed beside the JSON), a terminal table, atomic writes."""

from __future__ import annotations

from pathlib import Path

from longlive.bench import harness
from longlive.bench.kernels import ceiling_key
from longlive.io import write_text_atomic


def _fmt(v, f: str = "{:.1f}") -> str:
    return "-" if v is None else f.format(v)


def _gib(v: float | None) -> str:
    """Two decimals, or two significant digits below 0.01 GiB (the tiny preset)."""
    return "-" if v is None else f"{v:.2f}" if v >= 0.01 or v == 0 else f"{v:.1e}"


def ceiling_for(res: dict, row: dict, gemm: str = "bf16") -> float | None:
    return res.get("ceiling", {}).get(row["resolution"], {}).get(gemm, {}).get(ceiling_key(row["steps"], row["cache_pass"]))


def table_rows(res: dict) -> list[dict]:
    """The rows as strings, one dict per row (for markdown and the terminal)."""
    out = []
    for r in res["rows"]:
        c = ceiling_for(res, r)
        out.append({
            "resolution": r["resolution"], "variant": r["variant"], "steps": str(r["steps"]),
            "cache pass": "yes" if r["cache_pass"] else "no (last step writes)",
            "block ms": f"{r['block_ms']:.0f}", "step ms": f"{r['step_ms']:.0f}",
            "cache pass ms": f"{r['cache_pass_ms']:.0f}", "VAE ms": _fmt(r.get("vae_ms"), "{:.0f}"),
            "other ms": f"{r['other_ms']:.0f}", "host ms": _fmt(r.get("host_ms"), "{:.0f}"), "DiT FPS": f"{r['dit_fps']:.1f}",
            "steady FPS": f"{r['steady_fps']:.1f}", "first block s": f"{r['first_block_latency_s']:.2f}",
            "ceiling FPS": _fmt(c), "% of ceiling": _fmt(100 * r["dit_fps"] / c if c else None, "{:.0f}"),
            "host syncs / block": _fmt(r.get("host_syncs_per_block"), "{}"),
            "DiT peak GiB": _gib(r.get("dit_peak_mem_gib")), "peak GiB": _gib(r.get("peak_mem_gib")),
            "weights GiB": _gib(r.get("weights_gib")), "KV GiB": _gib(r.get("kv_cache_gib")),
        })
    return out


def markdown(res: dict) -> str:
    lines = [f"# Streaming FPS, {res['preset']} preset, random weights ({res['device']})", "",
             (f"{res['date']}; machine kind `{res['machine_kind']}`; torch {res['torch']}, triton {res.get('triton')}, "
              f"diffusers {res.get('diffusers')}. Command: `{res['command']}`."), "",
             f"Timing: {res['timing']}", ""]
    for name, text in res.get("shape_text", {}).items():
        lines.append(f"Shapes ({name}): {text}; steps {res['steps']}.")
    lines += ["", f"VAE: {res.get('vae')}", ""]
    for v in (v for opts in res.get("vae_options", {}).values() for v in opts):
        lines.append(f"VAE streaming decode of one block at {v['resolution']} ({v['latent_frames_per_block']} latent -> "
                     f"{v['pixel_frames_per_block']} frames of {v['frame_shape'][0]}x{v['frame_shape'][1]}), "
                     f"{v['frames_per_call']} latent frame(s) per call, "
                     + ("channels-last decoder (fast_vae)" if v.get("fast") else f"fused norm kernels {v['kernels']}") + ": "
                     f"{1e3 * v['block_decode_s']:.0f} ms ({v['pixel_frames_per_block'] / v['block_decode_s']:.1f} FPS alone"
                     + (f"; {v['block_tflop']:.4g} TFLOP per block, {v['tflops']:.3g} TFLOP/s" if "block_tflop" in v else "")
                     + (f"; peak {v['peak_mem_gib']:.1f} GiB)" if v.get("peak_mem_gib") is not None else ")"))
    for resolution, profiles in res.get("vae_profile", {}).items():
        for kern, v in profiles.items():
            if v and "gpu_kernel_s_by_family" in v:
                lines.append(f"VAE GPU kernel time per block at {resolution}, fused norm kernels {kern}: " + ", ".join(
                    f"{k} {1e3 * t:.0f} ms" for k, t in v["gpu_kernel_s_by_family"].items())
                    + f" (busy {100 * v['gpu_busy_fraction']:.0f}% of wall)")
    rows = table_rows(res)
    cols = list(rows[0]) if rows else ["resolution", "variant", "steps"]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.values()) + " |" for r in rows]
    lines += ["", "Per block (steady state) in ms: DiT (denoising steps) + cache pass + VAE + other = total:"]
    for r in res["rows"]:
        lines.append(f"* {r['resolution']} {r['variant']}, {r['steps']} steps"
                     f"{'' if r['cache_pass'] else ', last step writes'}: {r['dit_ms']:.1f} + {r['cache_pass_ms']:.1f} + "
                     f"{_fmt(r.get('vae_ms'))} + {r['other_ms']:.1f} = {r['total_ms']:.1f} "
                     f"({r['steady_blocks']} steady block(s) from block {r['steady_from_block']}"
                     f"{'' if r['window_full'] else ', window not yet full'})")
    lines.append("")
    for resolution, c in res.get("ceiling", {}).items():
        for gemm, title in (("bf16", "bf16 GEMMs"), ("fp8", "FP8 GEMMs")):
            if c.get(gemm):
                layers = res["shapes"][resolution]["layers"]
                lines.append(f"Ceiling at {resolution} (one layer's GEMMs + attention timed alone, x {layers} layers "
                             f"x passes; {title}): layer {c[gemm]['layer_ms']:.3f} ms; "
                             + ", ".join(f"{k} {v:.1f}" for k, v in c[gemm].items() if k.startswith("fps_")))
    if res.get("profile"):
        p = res["profile"]
        lines.append(f"Where a steady {p['steps']}-step block of 'bf16 fast' at {p['resolution']} spends GPU time "
                     "(torch.profiler, ms): " + ", ".join(f"{k} {v:.0f}" for k, v in p["block_ms_by_family"].items()))
    for e in res.get("end_to_end", []):
        c = ceiling_for(res, {"resolution": e["resolution"], "steps": e["steps"], "cache_pass": True})
        lines.append(f"End to end at {e['resolution']} ({e['variant']}, {e['steps']} steps, VAE in its thread "
                     f"(and stream, on CUDA) on the same device, {e['vae_frames_per_call']} latent frame(s) per decoder "
                     f"call, " + ("channels-last decoder" if e.get("vae_fast") else f"fused VAE norms {e['vae_kernels']}")
                     + f"): steady {e['steady_fps']:.1f} FPS"
                     + (f" ({100 * e['steady_fps'] / c:.0f}% of the DiT-only ceiling, {c:.1f} FPS)" if c else "")
                     + f", first-block latency {e['first_block_latency_s']:.2f} s")
    if res.get("kernels"):
        lines += ["", f"Kernel checks at {res.get('kernels_resolution')}:", "",
                  "| kernel check | max rel err | kernel ms | reference ms | speedup | bit exact |", "|---|---|---|---|---|---|"]
    for k in res.get("kernels", []):
        if "kernel_ms" in k:
            lines.append(f"| {k['kernel']} | {k['max_rel_err']:.1e} | {k['kernel_ms']:.3f} | {k['reference_ms']:.3f} | "
                         f"{k['speedup']:.1f}x | {k.get('bit_exact', '-')} |")
        else:
            lines.append(f"| {k['kernel']} (vs float32 emulation; vs bf16 {k['rel_l2_vs_bf16']:.1e}; GEMM alone "
                         f"{k.get('fp8_gemm_only_ms', float('nan')):.3f} ms, "
                         f"quantization {k.get('fp8_quant_only_ms', float('nan')):.3f} ms) | "
                         f"{k['max_rel_err_vs_emulated']:.1e} | {k['fp8_ms']:.3f} | {k['bf16_ms']:.3f} (bf16) | "
                         f"{k['speedup']:.2f}x | - |")
    if res.get("skipped"):
        lines += ["", "Not run here: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items())]
    if res.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in res["errors"].items())]
    lines += ["", res.get("notes", ""), ""]
    return "\n".join(lines)


TERMINAL_COLUMNS = ("resolution", "variant", "steps", "cache pass", "steady FPS", "first block s", "block ms",
                    "cache pass ms", "VAE ms", "other ms", "host ms", "DiT FPS", "ceiling FPS", "% of ceiling",
                    "DiT peak GiB", "peak GiB")


def print_table(res: dict, file=None) -> None:
    """The rows on the terminal (rich when it imports, plain text otherwise)."""
    rows = [{c: r[c] for c in TERMINAL_COLUMNS} for r in table_rows(res)]
    title = f"streaming FPS, {res['preset']} preset, {res['device']} ({res['timing_short']})"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title, file=file)
        print(" | ".join(TERMINAL_COLUMNS), file=file)
        for r in rows:
            print(" | ".join(r.values()), file=file)
        return
    table = Table(title=title)
    for c in TERMINAL_COLUMNS:
        table.add_column(c, justify="left" if c in ("resolution", "variant", "cache pass") else "right", no_wrap=True,
                         min_width=len(c))
    for r in rows:
        table.add_row(*r.values())
    console = Console(file=file, width=max(260, Console(file=file).width))
    console.print(table)


def write_results(res: dict, json_path: Path) -> None:
    """The JSON, then the markdown beside it (``.md``), each atomically; a markdown failure (a partial result
    missing a field) keeps the JSON."""
    harness.write_json(json_path, res)
    try:
        write_text_atomic(json_path.with_suffix(".md"), markdown(res))
    except Exception as e:  # noqa: BLE001 - a partial result must not lose the JSON
        print(f"markdown failed: {e}", flush=True)
