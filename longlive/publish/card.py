"""The model card (``README.md`` of a release): contents, metrics, how to use and reproduce, intended use, limits.

It is rendered from ``release.json`` and the metrics files only, with no timestamp, so the same
inputs give the same card. It opens with the Hugging Face Hub's YAML front matter (licence, base model,
tags, pipeline tag, library), so the folder is a Hub model repo as it is (``longlive publish --hub``).
"""

from __future__ import annotations

import yaml

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


def front_matter(release: dict, preset: Preset) -> dict:
    """The Hub's model-card metadata. ``library_name: diffusers``: the folder is a ``WanPipeline`` repo and every
    DiT / VAE weight file a diffusers model (``WanTransformer3DModel``, ``AutoencoderKLWan``)."""
    ckpts = release["checkpoints"].values()
    i2v = [bool((c.get("ar_config") or {}).get("i2v")) for c in ckpts if c.get("kind") == "dit"]
    tags = ["longlive", "video-generation", "text-to-video", "autoregressive", "causal", "wan2.2", "diffusers",
            "safetensors"]
    if any(i2v):
        tags.append("image-to-video")
    if any(c.get("quantization") for c in ckpts):
        tags += ["nvfp4", "quantized"]
    if any(c.get("lora") for c in ckpts):
        tags.append("lora")
    meta = {"license": release.get("license") or "apache-2.0"}
    if release.get("base_model"):
        meta["base_model"] = release["base_model"]
    meta |= {"library_name": "diffusers", "pipeline_tag": "image-to-video" if i2v and all(i2v) else "text-to-video",
             "tags": tags}
    return meta


def _path(name: str, c: dict) -> str:
    return c.get("path") or f"checkpoints/{name}"


def _diffusers_usage(release: dict) -> list[str]:
    """Loading the components with diffusers alone (plus peft for a separate adapter)."""
    d = release.get("diffusers") or {}
    dits = {n: c for n, c in release["checkpoints"].items() if c.get("kind") == "dit"}
    text = d.get("text_encoder") or {}
    pipeline_dit = (d.get("transformer") or {}).get("checkpoint") if d.get("pipeline") else None
    others = {n: c for n, c in dits.items() if n != pipeline_dit}
    lines = ["### With diffusers", ""]
    if d.get("pipeline"):
        lines += [f"This folder is a diffusers `{d['pipeline']}` repo: `model_index.json`, `transformer/` (checkpoint "
                  f"`{pipeline_dit}`), `vae/` and `scheduler/` (flow matching, shift {d['scheduler']['shift']:g})"
                  + ("; every other DiT checkpoint's `dit/` is a `WanTransformer3DModel` too" if others else "")
                  + ". diffusers needs `accelerate` installed to load the transformer.", ""]
    elif dits:
        lines += ["Every DiT checkpoint's `dit/` is a diffusers `WanTransformer3DModel`; none loads without an adapter, "
                  "so there is no `model_index.json` (a pipeline cannot apply a peft adapter).", ""]
    code = ["from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel", "",
            "repo = \"<this repo or release folder>\""]
    if pipeline_dit:
        code.append(f"transformer = WanTransformer3DModel.from_pretrained(repo, subfolder=\"transformer\")  # {pipeline_dit}")
    if others:
        code.append(f"{'others' if pipeline_dit else 'transformers'} = {{  # DiT checkpoint -> WanTransformer3DModel")
        for n, c in others.items():
            sub = (c.get("diffusers") or {}).get("transformer", {}).get("subfolder", f"{_path(n, c)}/dit")
            note = "  # the base of a peft adapter, below" if c.get("lora") and not c["lora"].get("merged") else ""
            code.append(f"    \"{n}\": WanTransformer3DModel.from_pretrained(repo, subfolder=\"{sub}\"),{note}")
        code.append("}")
    if d.get("vae"):
        code.append(f"vae = AutoencoderKLWan.from_pretrained(repo, subfolder=\"{d['vae']['subfolder']}\")")
    if d.get("pipeline"):
        if text.get("library") == "transformers":
            code += ["from transformers import AutoTokenizer, UMT5EncoderModel", "",
                     f"text_encoder = UMT5EncoderModel.from_pretrained(\"{text['repo']}\", subfolder=\"{text['subfolder']}\")",
                     f"tokenizer = AutoTokenizer.from_pretrained(\"{text['repo']}\", subfolder=\"{text['tokenizer_subfolder']}\")",
                     "pipe = WanPipeline.from_pretrained(repo, text_encoder=text_encoder, tokenizer=tokenizer)"]
        else:
            code += ["# the text encoder is longlive's own: pass prompt_embeds (from it) to pipe(...)",
                     "pipe = WanPipeline.from_pretrained(repo, text_encoder=None, tokenizer=None)"]
    if not dits and not d.get("vae"):
        return []
    lines += ["```python", *code, "```", ""]
    if d.get("pipeline"):
        lines += ["`WanPipeline` samples the whole video at once with its scheduler's step list: a check that the weights "
                  "load and run, not how this causal, few-step student streams; generate with longlive as above.", ""]
    for n, ck in dits.items():
        lo = ck.get("lora")
        if lo:
            head = f"The LoRA adapter of `{n}` (rank {lo['rank']}, alpha {lo['alpha']}, {lo['modules']} layers)"
            if lo.get("merged"):
                lines += [f"{head} is merged into its weights (`{_path(n, ck)}`): load them as they are.", ""]
            else:
                lines += [f"{head} is kept apart in peft's format (`{lo['adapter']}/adapter_config.json`, diffusers' "
                          "module names); longlive applies it on load, with diffusers through peft:", "", "```python",
                          "from peft import PeftModel", "",
                          f"transformer = WanTransformer3DModel.from_pretrained(repo, subfolder=\"{lo['adapter']}/dit\")",
                          f"transformer = PeftModel.from_pretrained(transformer, repo, subfolder=\"{lo['adapter']}\")"
                          ".merge_and_unload()", "```", ""]
    if text.get("library") == "transformers":
        lines += [f"Text encoder: `{text['class']}` from `{text['repo']}` (subfolder `{text['subfolder']}`, tokenizer "
                  f"`{text['tokenizer_subfolder']}`), {text['max_tokens']} tokens; it is not bundled.", ""]
    elif text:
        where = f" in `{text['subfolder']}/`" if text.get("subfolder") else ""
        lines += [f"Text encoder: `{text['class']}`{where}, {text['note']}.", ""]
    return lines


def render_card(release: dict, metrics: dict[str, dict], preset: Preset) -> str:
    version, url = release["version"], release.get("url")
    git = release.get("git") or {}
    meta = yaml.safe_dump(front_matter(release, preset), sort_keys=False, allow_unicode=True)
    lines = [
        "---",
        meta.rstrip("\n"),
        "---",
        "",
        f"# LongLive `{preset.name}` release `{version}`",
        "",
        f"A causal, block-autoregressive video diffusion transformer (LongLive 2.0 family, Wan2.2 DiT layout: "
        f"{preset.dit.num_layers} layers, dim {preset.dit.dim}, {preset.dit.num_heads} heads) with its VAE and text "
        f"encoder, produced by the LongLive pipeline from preset `{preset.name}` "
        f"({preset.video.width}x{preset.video.height}, {preset.video.fps} fps).",
        "",
        "## Contents",
        "",
        "| checkpoint | folder | kind | weights | quantization | parameters | size |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in release["checkpoints"].items():
        q = c.get("quantization")
        qtext = ", ".join(f"{k}={v}" for k, v in sorted(q.items())) if q else "-"
        ar = c.get("ar_config") or {}
        notes = ["I2V" if ar.get("i2v") else "", f"{ar['distilled']}, {len(ar.get('denoising_steps', []))} steps"
                 if ar.get("distilled") else ""]
        kind = c["kind"] + "".join(f" ({n})" for n in notes if n)
        size = _bytes(c["bytes"])
        lines.append(f"| {name} | `{_path(name, c)}/` | {kind} | {c['dtype']} | {qtext} | {c['parameters']:,} | {size} |")
    base = release["base"]
    bdir = base.get("dir", "base").strip("./")  # "." since the diffusers layout, "base" before
    lines += ["", f"Base models: {', '.join(f'`{bdir}/{b}`' if bdir else f'`{b}/`' for b in base['bundled']) or 'none'}."]
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
    first_path = _path(first, release["checkpoints"][first])
    lines += [
        "## Use",
        "",
        "```bash",
        f"longlive pull {where} --dest {version}",
        f"longlive generate --checkpoint {version}/{first_path} --prompt \"...\" --seconds 10 --out video.mp4",
        "```",
        "",
        "`generate` takes the base models and the preset from the release. In Python: "
        f"`longlive.inference.generate.load_release_models(\"{version}\", variant=\"{first}\")`.",
        "",
        *_diffusers_usage(release),
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
        f"dvc repro   # params.yaml at that commit holds preset {preset.name}; another: dvc exp run -S preset=NAME",
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
