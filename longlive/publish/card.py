"""The model card (``README.md`` of a release): contents, metrics, how to use and reproduce, intended use, limits.

It is rendered from ``release.json`` and the metrics files only, with no timestamp, so the same
inputs give the same card.
"""

from __future__ import annotations

from longlive.config import Preset

MAX_ROWS = 60  # per metrics file; the full file is in metrics/


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def flatten_metrics(data, prefix: str = "") -> list[tuple[str, str]]:
    """Scalar leaves of a metrics JSON as ``(dotted.key, value)``; long lists are left to the file."""
    rows: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for k in sorted(data):
            rows += flatten_metrics(data[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        if len(data) <= 8 and all(isinstance(x, (int, float, bool, str)) for x in data):
            rows.append((prefix, "[" + ", ".join(_fmt(x) for x in data) + "]"))
    elif isinstance(data, (int, float, bool)) or (isinstance(data, str) and len(data) <= 80):
        rows.append((prefix, _fmt(data)))
    return rows


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _intended_use(preset: Preset) -> tuple[str, str]:
    if preset.text.kind == "tiny":  # the toy text encoder: synthetic vocabulary only
        use = (
            f"A `{preset.name}`-preset model trained on the pipeline's synthetic videos of single coloured shapes "
            "moving on a plain background, with a toy word-level text encoder. It exists to test and demonstrate "
            "the pipeline (training, distillation, quantization, evaluation, publishing) end to end."
        )
        limits = (
            "It generates only that synthetic domain (shapes, colours and motions from the synth vocabulary) at "
            f"{preset.video.width}x{preset.video.height}; it knows no other words and is useless for real video. "
            "Its quality is bounded by a tiny VAE; metrics are the built-in prompt-following check, not a human study."
        )
    else:
        use = (
            "Research on real-time, streaming, long-video generation (text-to-video and image-to-video with prompt "
            "switches), on the Wan2.2-TI2V-5B architecture distilled to a causal, block-autoregressive student."
        )
        limits = (
            "It inherits the limits and licence of the Wan2.2 base weights and of its training data. Quality drifts "
            "over very long videos; prompt switches take effect at block boundaries; NVFP4 variants trade some quality "
            "for speed and memory (see their metrics). There is no safety filter: outputs can be biased, wrong or "
            "harmful and must not be presented as real footage."
        )
    return use, limits


def render_card(release: dict, metrics: dict[str, dict], preset: Preset) -> str:
    version, url = release["version"], release.get("url")
    git = release.get("git") or {}
    lines = [
        f"# LongLive `{preset.name}` release `{version}`",
        "",
        f"A causal, block-autoregressive video diffusion transformer (LongLive 2.0 family, Wan2.2 DiT layout: "
        f"{preset.dit.num_layers} layers, dim {preset.dit.dim}, {preset.dit.num_heads} heads) with its VAE and text "
        f"encoder, produced by the LongLive pipeline from preset `{preset.name}` "
        f"({preset.video.width}x{preset.video.height}, {preset.video.fps} fps).",
        "",
        "## Contents",
        "",
        "| checkpoint | kind | weights | quantization | parameters | size |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in release["checkpoints"].items():
        q = c.get("quantization")
        qtext = ", ".join(f"{k}={v}" for k, v in sorted(q.items())) if q else "-"
        ar = c.get("ar_config") or {}
        notes = ["I2V" if ar.get("i2v") else "", f"{ar['distilled']}, {len(ar.get('denoising_steps', []))} steps"
                 if ar.get("distilled") else ""]
        kind = c["kind"] + "".join(f" ({n})" for n in notes if n)
        size = _bytes(c["bytes"])
        lines.append(f"| `checkpoints/{name}` | {kind} | {c['dtype']} | {qtext} | {c['parameters']:,} | {size} |")
    base = release["base"]
    lines += ["", f"Base models: {', '.join(f'`base/{b}`' for b in base['bundled']) or 'none'}."]
    for comp, why in base.get("not_bundled", {}).items():
        lines.append(f"Not bundled: `{comp}`: {why}.")
    if any(c.get("dtype") == "bf16" and "F32" in (c.get("source_dtypes") or {}) for c in release["checkpoints"].values()):
        lines += ["", "The DiT weights were trained in float32 and cast to bf16 for this release (norms and the time "
                  "embedding stay float32); the metrics below were measured before the cast."]
    lines += ["", "`config/preset.json` is the resolved preset; `manifest.json` lists the SHA-256 of every file, and "
              "`longlive pull` refuses a file that does not match it.", "", "## Metrics", ""]
    if not metrics:
        lines += ["No metrics were attached to this release.", ""]
    for name, data in metrics.items():
        rows = flatten_metrics(data)
        lines += [f"### {name} (`metrics/{name}.json`)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows[:MAX_ROWS]]
        if len(rows) > MAX_ROWS:
            lines.append(f"| ... | {len(rows) - MAX_ROWS} more in the file |")
        lines.append("")
    first = next(iter(release["checkpoints"]))
    where = f"{url.rstrip('/')}/{version}" if url else f"<store url>/{version}"
    lines += [
        "## Use",
        "",
        "```bash",
        f"longlive pull {where} --dest {version}",
        f"longlive generate --checkpoint {version}/checkpoints/{first} --prompt \"...\" --seconds 10 --out video.mp4",
        "```",
        "",
        "`generate` takes the base models and the preset from the release. In Python: "
        f"`longlive.inference.generate.load_release_models(\"{version}\", variant=\"{first}\")`.",
        "",
        "## Reproduce",
        "",
    ]
    if git.get("commit"):
        dirty = " (the working tree had uncommitted changes; see `provenance/git.json`)" if git.get("dirty") else ""
        lines += [f"Produced from commit `{git['commit']}`{dirty}.", ""]
    lines += [
        "```bash",
        "git clone <the LongLive pipeline repository> && cd <it>",
        f"git checkout {git.get('commit') or '<commit>'}",
        "bash scripts/setup.sh && source .venv/bin/activate",
        f"LONGLIVE_PRESET={preset.name} dvc repro",
        "```",
        "",
        "`provenance/dvc.lock` pins the hash of every stage's inputs and outputs in that run; compare it with the "
        "repository's `dvc.lock` (or `dvc status`) to see whether a rerun would produce the same files."
        if release.get("dvc_lock") else "No `dvc.lock` was recorded (the release was not built inside a DVC run).",
        "",
    ]
    use, limits = _intended_use(preset)
    lines += ["## Intended use", "", use, "", "## Limitations", "", limits, ""]
    return "\n".join(lines)
