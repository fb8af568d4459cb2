"""The ``evaluate`` stage's library: every checkpoint variant of ``evaluate.variants``, measured alike.

Per variant (``{checkpoint, kind: t2v|i2v, denoising_steps, quant, inference}``), through the same
``generate_video`` path as ``longlive generate`` (see :mod:`longlive.eval.quality`):

* prompt following on the fixed held-out prompt set: single prompts (``num_prompts`` T2V or I2V clips),
  multi-shot (``num_multishot`` two-shot videos), a prompt schedule and a single prompt over videos of
  ``length_factor`` training clips (``num_drift`` each; the score per segment of one clip is the drift
  curve), each beside ``CHANCE_SCORE`` and with the standard error over videos;
* speed and memory (:mod:`longlive.eval.perf`): FPS, first-chunk latency, peak memory (what was measured
  is ``info.memory_kind``), KV cache and weight bytes;
* VBench dimensions on the first T2V/I2V videos (:mod:`longlive.eval.vbench`; skipped ones say why);
* sample mp4s.

Prompt following, multi-shot and drift scores come from the synthetic shape detector, so they are measured for
synthetic data only (``data.source: synth``). A preset trained on the user's videos (:func:`evaluate_real`)
generates T2V videos from ``evaluate.prompts`` (a given prompt set, or VBench's suite) and I2V videos from the
first frames and captions of the data's first clips, and reports speed, memory, VBench and samples.

:func:`write_outputs` lays them out for DVC under ``out_dir`` (``reports/evaluate``):
``metrics/<variant>.json`` (every flat number plus an ``info`` block: what ``longlive regress`` gates and the
release publishes), ``headline/<variant>.json`` (its ``HEADLINE`` figures: the stage's DVC metrics, a row per
variant in ``dvc metrics show`` and a column each in ``dvc exp show``), ``plots/drift/{schedule,single}.json``
(score per segment over time, a field per variant), ``plots/speed.json`` (FPS and latency per variant),
``report.json`` (everything, per-prompt rows and per-segment matches included) and ``report.md``; the samples
go to ``samples/<variant>/`` as they are generated.
"""

from __future__ import annotations

import datetime
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from longlive.config import EvaluateConfig, EvalVariantConfig, InferenceConfig, Preset
from longlive.device import resolve_device
from longlive.eval.perf import device_class, device_name, measure_speed, take_cuda_peaks, weights_mb
from longlive.eval.prompt_following import CHANCE_SCORE, MATCH_CHANCE
from longlive.eval.prompt_sets import PromptSetError, real_prompts
from longlive.eval.quality import (
    _generate, _sample_path, _seconds, clip_frames, eval_drift, eval_i2v, eval_multishot, eval_t2v, first_frame,
    heldout_prompts, write_json,
)
from longlive.eval.vbench import evaluate_vbench
from longlive.inference.build import Models, build_models
from longlive.io import write_text_atomic
from longlive.inference.generate import generate_video
from longlive.inference.schedule import PromptSchedule
from longlive.models.checkpoint import Checkpoint, inference_settings

if TYPE_CHECKING:
    from longlive.parallel import ParallelState

log = logging.getLogger(__name__)

METRICS_DIR, HEADLINE_DIR, PLOTS_DIR, SAMPLES_DIR = "metrics", "headline", "plots", "samples"
# What a user compares across experiments: `dvc exp show` has a column per figure and variant, so the other figures
# stay in metrics/<variant>.json (`dvc metrics show reports/evaluate/metrics`). Real data has no score.
HEADLINE = ("score", "fps")
PHASES = ("clips", "multishot", "schedule", "single", "speed", "vbench")
REAL_PHASES = ("clips", "speed", "vbench")  # real data: no detector to score prompt following with


class EvaluateError(RuntimeError):
    """A variant cannot be evaluated as configured; the message names the variant and the fix."""


@dataclass
class VariantResult:
    name: str
    metrics: dict
    details: dict
    curves: dict[str, list[dict]] = field(default_factory=dict)  # "schedule" / "single" -> per-segment rows


# ----------------------------------------------------------------------------- loading a variant


def variant_settings(variant: EvalVariantConfig) -> dict:
    """The variant's own inference settings (level 3 of :func:`~longlive.models.checkpoint.inference_settings`)."""
    update = dict(variant.inference)
    if variant.denoising_steps is not None:
        update["denoising_steps"] = list(variant.denoising_steps)
    return update


def variant_inference(preset: Preset, variant: EvalVariantConfig, ar_config: dict | None) -> InferenceConfig:
    """The preset's inference settings, then the export's trained layout, then the variant's own."""
    return inference_settings(preset.inference, ar_config, variant_settings(variant), source=variant.checkpoint)


def load_variant(name: str, variant: EvalVariantConfig, preset: Preset, base_dir: str | os.PathLike,
                 device: torch.device, parallel: ParallelState | None = None) -> tuple[Models, Preset, dict | None, dict]:
    """Models built on ``device`` (bf16 DiT on CUDA, as ``longlive generate``; ``quant: nvfp4`` converted at load;
    sequence parallel over ``parallel``, a :class:`~longlive.parallel.ParallelState`), the preset with the
    variant's inference settings, the export's ``ar_config.json`` and what quantization the DiT runs with."""
    ckpt = Checkpoint.open(variant.checkpoint)
    if not ckpt.exists:
        raise EvaluateError(f"variant {name}: checkpoint {variant.checkpoint} not found; run the stage that "
                            f"produces it (dvc repro) or fix evaluate.variants.{name}.checkpoint")
    ar_config = ckpt.trained
    if ar_config is not None and bool(ar_config.get("i2v")) != (variant.kind == "i2v"):
        raise EvaluateError(f"variant {name}: kind {variant.kind} but {variant.checkpoint} was trained with "
                            f"i2v={ar_config.get('i2v')}; fix evaluate.variants.{name}.kind")
    preset = preset.model_copy(update={"inference": variant_inference(preset, variant, ar_config)})
    dtype = torch.bfloat16 if device.type == "cuda" else None
    models = build_models(preset, base_dir, ckpt, device=device, dtype=dtype, quant=variant.quant, parallel=parallel)
    return models, preset, ar_config, dict(models.dit.build_record.quant)


# ----------------------------------------------------------------------------- one variant


def _curve(drift: dict, fps: int) -> list[dict]:
    L = drift["segment_frames"]
    return [{"segment": j, "time_s": round(j * L / fps, 4), "score": s, "match": m}
            for j, (s, m) in enumerate(zip(drift["per_segment"], drift["per_segment_match"]))]


def evaluate_variant(
    name: str, variant: EvalVariantConfig, preset: Preset, cfg: EvaluateConfig, *,
    base_dir: str | os.PathLike = "models/base", samples_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None, work_dir: str | os.PathLike | None = None,
    parallel: ParallelState | None = None, clips_dir: str | os.PathLike = "data/ingest",
) -> VariantResult:
    """Run every evaluation of one variant; ``parallel`` (a :class:`~longlive.parallel.ParallelState`, from the
    stage under torchrun): the DiT is built sequence parallel over its SP group. ``clips_dir``: the user's clips
    (real data: the I2V images)."""
    t_start = time.perf_counter()
    device = resolve_device(device or preset.device)
    take_cuda_peaks(device)  # from here on, this variant's peaks (per phase: details["cuda_peak_mb"])
    if not preset.data.is_synth:  # the prompt set first: a missing one fails before any model is loaded
        prompts = real_eval_prompts(preset, cfg, variant.kind == "i2v", clips_dir)
    models, vpreset, ar_config, quant = load_variant(name, variant, preset, base_dir, device, parallel=parallel)
    if not preset.data.is_synth:
        return evaluate_real(name, variant, vpreset, cfg, models, prompts, ar_config=ar_config, quant=quant,
                             device=device, samples_dir=samples_dir, work_dir=work_dir, t_start=t_start)
    image = variant.kind == "i2v"
    vb = cfg.vbench
    clip_videos = min(cfg.num_prompts, max(cfg.samples, vb.num_videos if vb.dimensions else 0))
    prompts = heldout_prompts(vpreset, max(cfg.num_prompts, cfg.num_multishot, cfg.num_drift))
    out = Path(samples_dir) if samples_dir is not None else None
    fps = vpreset.video.fps
    details: dict = {"kind": variant.kind, "checkpoint": variant.checkpoint, **quant,
                     "ar_config": ar_config, "inference": vpreset.inference.model_dump(), "runtime_s": {}}
    cuda_peaks = {"load": take_cuda_peaks(device)} if device.type == "cuda" else None
    bar = tqdm(PHASES, desc=f"evaluate {name}", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15.0)
    for phase in bar:
        bar.set_postfix_str(phase)
        t0 = time.perf_counter()
        if phase == "clips":
            fn = eval_i2v if image else eval_t2v
            details[variant.kind] = fn(models, vpreset, prompts[: cfg.num_prompts], seed=cfg.seed, out_dir=out,
                                       samples=clip_videos)
        elif phase == "multishot":
            details["multishot"] = eval_multishot(models, vpreset, prompts[: cfg.num_multishot], image=image,
                                                  seed=cfg.seed, out_dir=out, samples=cfg.samples)
        elif phase in ("schedule", "single"):
            # the preset's own sink and re-cache settings: this measures the variant as it would be served
            details[phase] = eval_drift(
                models, vpreset, prompts[: cfg.num_drift], length_factor=cfg.length_factor, sink=True,
                recache=vpreset.inference.recache_on_switch, switching=phase == "schedule", image=image,
                seed=cfg.seed, out_dir=out, samples=cfg.samples, name=f"drift {phase}")
        elif phase == "speed":
            p0 = prompts[0]
            img = first_frame(vpreset, p0) if image else None
            seconds = cfg.speed.length_factor * clip_frames(vpreset) / fps
            speed = measure_speed(
                lambda: generate_video(models, vpreset, PromptSchedule.single(p0["caption"]), seconds=seconds,
                                       image=img, seed=cfg.seed),
                device, runs=cfg.speed.runs, warmup=cfg.speed.warmup)
            details["speed"] = {**speed.metrics(), "memory_kind": speed.memory_kind, "pixel_frames": speed.pixel_frames,
                                "runs": speed.runs, "warmup": cfg.speed.warmup, "seconds": seconds}
        elif phase == "vbench" and vb.dimensions:
            rows = details[variant.kind]["rows"][:clip_videos]
            videos = [(out / f"{variant.kind}_{i:02d}.mp4", r["caption"]) for i, r in enumerate(rows)] if out else []
            if not videos:
                details["vbench"] = {"dimensions": {d: {"status": "skipped", "reason": "no sample videos were written "
                                                        "(the stage was run without a samples directory)"}
                                                    for d in vb.dimensions}}
            else:
                details["vbench"] = evaluate_vbench(videos, vb.dimensions, weights=vb.weights, python=vb.python,
                                                    device=str(device), work_dir=work_dir)
        details["runtime_s"][phase] = time.perf_counter() - t0
        if cuda_peaks is not None:
            cuda_peaks[phase] = take_cuda_peaks(device)
        log.info("%s: %s done in %.1f s", name, phase, details["runtime_s"][phase])
    bar.close()
    total = time.perf_counter() - t_start
    info = {"kind": variant.kind, "checkpoint": variant.checkpoint, "quant": quant["quant"],
            "denoising_steps": ",".join(str(t) for t in vpreset.inference.denoising_steps),
            "device": device_name(device), "device_class": device_class(device),
            "memory_kind": details["speed"]["memory_kind"], "threads": torch.get_num_threads(),
            "num_prompts": cfg.num_prompts, "num_multishot": cfg.num_multishot, "num_drift": cfg.num_drift,
            "length_factor": cfg.length_factor}
    metrics = variant_metrics(details, variant.kind)
    metrics["weights_mb"] = weights_mb(models.dit)
    if cuda_peaks is not None:
        # the whole evaluation of the variant (clips, drift, VBench, ...), not just the one generation that
        # peak_memory_mb measures: the reserved figure is what the process held from the GPU at worst
        details["cuda_peak_mb"] = cuda_peaks
        metrics["eval_peak_allocated_mb"] = max(p["allocated"] for p in cuda_peaks.values())
        metrics["eval_peak_reserved_mb"] = max(p["reserved"] for p in cuda_peaks.values())
    metrics["runtime_s"] = total
    metrics["info"] = info
    curves = {phase: _curve(details[phase], fps) for phase in ("schedule", "single")}
    return VariantResult(name, metrics, details, curves)


def real_eval_prompts(preset: Preset, cfg: EvaluateConfig, image: bool, clips_dir: str | os.PathLike) -> tuple[str, list[dict]]:
    """``(what they are, [{"caption", "image"?, "clip"?}])``: T2V from ``evaluate.prompts`` (or VBench's suite);
    I2V from the first frames and first captions of the first ``num_prompts`` clips of ``clips_dir`` (clips the
    students trained on: this measures continuing a real frame, not generalisation to unseen ones)."""
    n = cfg.num_prompts
    if image:
        from longlive.data.synth import load_frames, read_index

        try:
            index = read_index(clips_dir)
        except FileNotFoundError:
            index = []
        if len(index) < n:
            raise EvaluateError(f"I2V on real data starts from the first frames of {clips_dir}'s clips: it has "
                                f"{len(index)}, evaluate.num_prompts is {n}; run `dvc repro ingest` or lower num_prompts")
        return (f"first frames + captions of the first {n} clips of {clips_dir}",
                [{"caption": r["captions"][0], "clip": r["key"], "image": load_frames(clips_dir, r["key"])[0]}
                 for r in index[:n]])
    try:
        what, listed = real_prompts(cfg.prompts, n, dimensions=cfg.vbench.dimensions, python=cfg.vbench.python,
                                    storage_options=preset.data.storage_options or None)
    except PromptSetError as e:
        raise EvaluateError(str(e)) from None
    return what, [{"caption": p} for p in listed]


def evaluate_real(
    name: str, variant: EvalVariantConfig, vpreset: Preset, cfg: EvaluateConfig, models: Models,
    prompts: tuple[str, list[dict]], *, ar_config: dict | None, quant: dict, device: torch.device,
    samples_dir: str | os.PathLike | None, work_dir: str | os.PathLike | None, t_start: float,
) -> VariantResult:
    """Real data: videos of a training clip's length from the prompt set, speed and memory, VBench, samples."""
    what, rows_in = prompts
    kind, out = variant.kind, Path(samples_dir) if samples_dir is not None else None
    vb = cfg.vbench
    clip_videos = min(cfg.num_prompts, max(cfg.samples, vb.num_videos if vb.dimensions else 0))
    fps = vpreset.video.fps
    details: dict = {"kind": kind, "checkpoint": variant.checkpoint, **quant, "domain": "real", "prompt_set": what,
                     "ar_config": ar_config, "inference": vpreset.inference.model_dump(), "runtime_s": {}}
    cuda_peaks = {"load": take_cuda_peaks(device)} if device.type == "cuda" else None
    for phase in REAL_PHASES:
        t0 = time.perf_counter()
        if phase == "clips":
            seconds, n = _seconds(vpreset, None)
            rows = []
            for i, p in enumerate(tqdm(rows_in, desc=f"evaluate {name} clips", disable=None)):
                path = _sample_path(out, kind, i, clip_videos)
                _generate(models, vpreset, PromptSchedule.single(p["caption"]), seconds=seconds, seed=cfg.seed + i,
                          image=p.get("image"), out=path)
                rows.append({"caption": p["caption"], "seed": cfg.seed + i, "clip": p.get("clip"),
                             "sample": str(path) if path else None})
            details[kind] = {"n": len(rows), "pixel_frames": n, "seconds": seconds, "rows": rows}
        elif phase == "speed":
            p0 = rows_in[0]
            seconds = cfg.speed.length_factor * clip_frames(vpreset) / fps
            speed = measure_speed(
                lambda: generate_video(models, vpreset, PromptSchedule.single(p0["caption"]), seconds=seconds,
                                       image=p0.get("image"), seed=cfg.seed),
                device, runs=cfg.speed.runs, warmup=cfg.speed.warmup)
            details["speed"] = {**speed.metrics(), "memory_kind": speed.memory_kind, "pixel_frames": speed.pixel_frames,
                                "runs": speed.runs, "warmup": cfg.speed.warmup, "seconds": seconds}
        elif phase == "vbench" and vb.dimensions:
            videos = [(r["sample"], r["caption"]) for r in details[kind]["rows"][:clip_videos] if r["sample"]]
            details["vbench"] = (evaluate_vbench(videos, vb.dimensions, weights=vb.weights, python=vb.python,
                                                 device=str(device), work_dir=work_dir) if videos else
                                 {"dimensions": {d: {"status": "skipped", "reason": "no sample videos were written "
                                                     "(the stage was run without a samples directory)"}
                                                 for d in vb.dimensions}})
        details["runtime_s"][phase] = time.perf_counter() - t0
        if cuda_peaks is not None:
            cuda_peaks[phase] = take_cuda_peaks(device)
        log.info("%s: %s done in %.1f s", name, phase, details["runtime_s"][phase])
    sp = details["speed"]
    metrics = {"videos": details[kind]["n"]}
    metrics.update({k: sp[k] for k in ("fps", "fps_median", "first_chunk_latency_s", "first_chunk_latency_median_s",
                                       "peak_memory_mb", "kv_cache_mb")})
    if "peak_reserved_mb" in sp:
        metrics["peak_reserved_mb"] = sp["peak_reserved_mb"]
    metrics.update(_vbench_metrics(details))
    metrics["weights_mb"] = weights_mb(models.dit)
    if cuda_peaks is not None:
        details["cuda_peak_mb"] = cuda_peaks
        metrics["eval_peak_allocated_mb"] = max(p["allocated"] for p in cuda_peaks.values())
        metrics["eval_peak_reserved_mb"] = max(p["reserved"] for p in cuda_peaks.values())
    metrics["runtime_s"] = time.perf_counter() - t_start
    metrics["info"] = {"kind": kind, "checkpoint": variant.checkpoint, "quant": quant["quant"], "domain": "real",
                       "prompt_set": what, "denoising_steps": ",".join(str(t) for t in vpreset.inference.denoising_steps),
                       "device": device_name(device), "device_class": device_class(device),
                       "memory_kind": sp["memory_kind"], "threads": torch.get_num_threads(), "num_prompts": cfg.num_prompts}
    return VariantResult(name, metrics, details)


def _vbench_metrics(details: dict) -> dict:
    m, skipped = {}, 0
    for dim, r in details.get("vbench", {}).get("dimensions", {}).items():
        if r["status"] == "computed":
            m[f"vbench_{dim}"] = r["score"]
        else:
            skipped += 1  # never a number standing in for a dimension that did not run; report.md says why
    if "vbench" in details:
        m["vbench_not_computed"] = skipped
    return m


def variant_metrics(details: dict, kind: str) -> dict:
    """The flat numbers of one variant (what DVC shows and ``longlive regress`` gates)."""
    q, ms, sch, sg, sp = details[kind], details["multishot"], details["schedule"], details["single"], details["speed"]
    m = {"score": q["score"], "score_sem": q["score_sem"], "colour_acc": q["colour_acc"], "shape_acc": q["shape_acc"],
         "motion_acc": q["motion_acc"], "match_rate": q["match_rate"], "object_rate": q["object_rate"]}
    if "after_first" in q:
        m["score_after_first"] = q["after_first"]["score"]
    m.update({"multishot_score": ms["score"], "multishot_score_sem": ms["score_sem"],
              "multishot_switch_rate": ms["transition_rate"], "multishot_stuck_rate": ms["stuck_rate"]})
    for prefix, d in (("schedule", sch), ("drift", sg)):
        m.update({f"{prefix}_score": d["mean"], f"{prefix}_score_sem": d["mean_sem"], f"{prefix}_first": d["first"],
                  f"{prefix}_last": d["last"], f"{prefix}_slope": d["slope"]})
    m.update({k: sp[k] for k in ("fps", "fps_median", "first_chunk_latency_s", "first_chunk_latency_median_s",
                                 "peak_memory_mb", "kv_cache_mb")})
    if "peak_reserved_mb" in sp:  # CUDA only
        m["peak_reserved_mb"] = sp["peak_reserved_mb"]
    m.update(_vbench_metrics(details))
    m["chance_score"] = CHANCE_SCORE
    return m


# ----------------------------------------------------------------------------- the stage


def run_evaluate(
    preset: Preset, *, out_dir: str | os.PathLike = "reports/evaluate", base_dir: str | os.PathLike = "models/base",
    names: list[str] | None = None, device: str | None = None, parallel: ParallelState | None = None,
    write: bool = True, work_dir: str | os.PathLike | None = None, clips_dir: str | os.PathLike = "data/ingest",
    worker_init: Callable[[], None] | None = None,
) -> dict[str, VariantResult]:
    """Evaluate ``names`` (default: every variant of ``preset.evaluate``) and write the outputs; ``parallel``: see
    :func:`evaluate_variant`. With ``evaluate.workers > 1`` on the CPU the variants are spread over that many
    processes; ``worker_init`` (picklable) sets up each one's logging as the caller's own."""
    cfg = preset.evaluate
    if not cfg.variants:
        raise EvaluateError(f"presets.{preset.name}.evaluate.variants is empty; add e.g. "
                            f"ar_t2v: {{checkpoint: models/ar/t2v, kind: t2v}}")
    names = names or list(cfg.variants)
    unknown = [n for n in names if n not in cfg.variants]
    if unknown:
        raise EvaluateError(f"unknown variants {unknown}; evaluate.variants has {list(cfg.variants)}")
    out_dir = Path(out_dir)
    jobs = {name: dict(name=name, variant=cfg.variants[name], preset=preset, cfg=cfg, base_dir=base_dir, device=device,
                       samples_dir=out_dir / SAMPLES_DIR / name if write else None, work_dir=work_dir,
                       clips_dir=clips_dir) for name in names}
    workers = min(cfg.workers, len(names))
    if workers > 1 and (parallel is not None or resolve_device(device or preset.device).type != "cpu"):
        log.info("evaluate.workers %d: the variants run one after another (workers are CPU processes; this run "
                 "uses %s)", cfg.workers, "torchrun" if parallel is not None else "a GPU")
        workers = 1
    if workers > 1:
        results = _evaluate_in_processes(jobs, workers, threads=cfg.threads or preset.cpu_threads, init=worker_init)
    else:
        results = {name: evaluate_variant(**job, parallel=parallel) for name, job in jobs.items()}
    if write:
        write_outputs(results, preset, out_dir)
    return results


def _worker_start(threads: int | None, init: Callable[[], None] | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)  # as the stage process would: a variant's bits do not depend on the pool
    if init is not None:
        init()


def _evaluate_in_processes(jobs: dict[str, dict], workers: int, *, threads: int | None,
                           init: Callable[[], None] | None) -> dict[str, VariantResult]:
    """Each variant in a process of a pool of ``workers``: a variant's evaluation seeds everything it draws from
    ``evaluate.seed``, so its figures equal a one-process run's; only timing and memory see the neighbour.
    The standard library's pool is enough here (one machine, independent jobs, results back as objects); "spawn",
    since forking a process whose torch has started its OpenMP threads can hang."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_start,
                             initargs=(threads, init)) as pool:
        futures = {name: pool.submit(evaluate_variant, **job) for name, job in jobs.items()}
        try:
            return {name: f.result() for name, f in futures.items()}
        except BrokenProcessPool as e:
            raise EvaluateError(f"an evaluate worker process died ({e}); rerun with evaluate.workers: 1 to see "
                                f"the error in this process (a worker killed for memory needs fewer workers)") from e


def write_outputs(results: dict[str, VariantResult], preset: Preset, out_dir: str | os.PathLike) -> None:
    out_dir = Path(out_dir)
    for name, r in results.items():
        write_json(r.metrics, out_dir / METRICS_DIR / f"{name}.json")
        write_json(headline(r.metrics), out_dir / HEADLINE_DIR / f"{name}.json")
    for setting, rows in drift_plots({n: r.curves for n, r in results.items()}).items():
        write_json(rows, out_dir / PLOTS_DIR / "drift" / f"{setting}.json")
    write_json([{"variant": n, "fps": r.metrics["fps"], "first_chunk_latency_s": r.metrics["first_chunk_latency_s"],
                 "peak_memory_mb": r.metrics["peak_memory_mb"]} for n, r in results.items()],
               out_dir / PLOTS_DIR / "speed.json")
    report = {"preset": preset.name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "chance_score": CHANCE_SCORE, "match_chance": MATCH_CHANCE, "evaluate": preset.evaluate.model_dump(),
              "variants": {n: {"metrics": r.metrics, "details": r.details} for n, r in results.items()}}
    write_json(report, out_dir / "report.json")
    write_text_atomic(out_dir / "report.md", markdown_report(report))


def headline(metrics: dict) -> dict:
    """The ``HEADLINE`` figures of one variant's metrics that it has."""
    return {k: metrics[k] for k in HEADLINE if k in metrics}


def drift_plots(curves: dict[str, dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """``{setting: rows}`` from each variant's ``{setting: per-segment rows}``: a row per segment with each
    variant's score as a field named after it, so one plot draws a line per variant (dvc.yaml's top-level plots,
    ``y: ${dag.evaluate}``). The per-segment matches stay in report.json."""
    out: dict[str, dict[tuple, dict]] = {}
    for name, by_setting in curves.items():
        for setting, rows in by_setting.items():
            merged = out.setdefault(setting, {})
            for r in rows:
                row = merged.setdefault((r["segment"], r["time_s"]), {"segment": r["segment"], "time_s": r["time_s"]})
                row[name] = r["score"]
    return {setting: [rows[k] for k in sorted(rows)] for setting, rows in out.items()}



def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pm(m: dict, key: str) -> str:
    sem = m.get(f"{key}_sem")
    return _f(m.get(key)) + (f" ± {_f(sem)}" if sem is not None else "")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _variant_cells(i: dict) -> str:
    return f"{i['kind']}{' nvfp4' if i['quant'] != 'none' else ''} | {i['denoising_steps']}"


def _speed_cells(m: dict) -> str:
    return (f"{_f(m['fps'], 1)} | {_f(m['first_chunk_latency_s'])} | {_f(m['peak_memory_mb'], 1)} | "
            f"{_f(m['kv_cache_mb'], 2)}")


def markdown_report(report: dict) -> str:
    """The human summary: one table of headline numbers per variant, then VBench's status per dimension."""
    c = report["chance_score"]
    e = report["evaluate"]
    real = {n: v for n, v in report["variants"].items() if v["metrics"]["info"].get("domain") == "real"}
    lines = [f"# evaluate ({report['preset']} preset, {report['date']})", ""]
    if real:
        lines += [f"Real data: no prompt-following score (its shape detector reads synthetic shapes only); "
                  f"{e['num_prompts']} videos per variant, VBench below. Speed: best of {e['speed']['runs']} runs "
                  "(median in metrics/*.json).", "",
                  "| variant | kind | steps | prompts | videos | FPS | first chunk (s) | peak memory (MiB) | KV cache (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, v in real.items():
            m, i = v["metrics"], v["metrics"]["info"]
            lines.append(f"| {name} | {_variant_cells(i)} | {_md_cell(i['prompt_set'])} | {m['videos']} | "
                         f"{_speed_cells(m)} |")
        lines.append("")
    synthetic = {n: v for n, v in report["variants"].items() if n not in real}
    if synthetic:
        lines += [f"Held-out prompts (synth clips >= 100000): {e['num_prompts']} single-prompt clips, {e['num_multishot']} "
                  f"two-shot videos, {e['num_drift']} videos of {e['length_factor']} training clips per drift setting. "
                  f"Scores (the synthetic shape detector; synthetic data only): mean ± standard error over videos; "
                  f"chance {c:.3f}. Speed: best of {e['speed']['runs']} runs (median in metrics/*.json).", "",
                  "| variant | kind | steps | score | multi-shot | schedule (drift) | single prompt (drift) | drift last segment "
                  "| FPS | first chunk (s) | peak memory (MiB) | KV cache (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in synthetic.items():
        m, i = v["metrics"], v["metrics"]["info"]
        lines.append(f"| {name} | {_variant_cells(i)} | {_pm(m, 'score')} | {_pm(m, 'multishot_score')} | "
                     f"{_pm(m, 'schedule_score')} | {_pm(m, 'drift_score')} | {_f(m['drift_last'])} | {_speed_cells(m)} |")
    first = next(iter(report["variants"].values()))["metrics"]["info"]
    lines += ["", f"Device: {first['device']}; memory: `{first['memory_kind']}` (see longlive/eval/perf.py).", ""]
    gpu = [(n, v["metrics"]) for n, v in report["variants"].items() if "eval_peak_reserved_mb" in v["metrics"]]
    if gpu:
        lines += ["GPU memory (MiB): one generation (the peak memory column) and the whole evaluation of the variant; "
                  "allocated = tensors, reserved = what the caching allocator held from the GPU.", "",
                  "| variant | generation allocated | generation reserved | evaluation allocated | evaluation reserved |",
                  "|---|---|---|---|---|"]
        lines += [f"| {n} | {_f(m['peak_memory_mb'], 1)} | {_f(m.get('peak_reserved_mb'), 1)} | "
                  f"{_f(m['eval_peak_allocated_mb'], 1)} | {_f(m['eval_peak_reserved_mb'], 1)} |" for n, m in gpu]
        lines.append("")
    lines += ["## VBench", ""]
    for name, v in report["variants"].items():
        vb = v["details"].get("vbench")
        if not vb:
            continue
        lines += [f"**{name}** ({vb.get('videos', 0)} videos; package: {vb.get('package', '-')}; "
                  f"weights: {vb.get('weights') or 'not set'})", "", "| dimension | status | score | source / reason |",
                  "|---|---|---|---|"]
        for dim, r in vb["dimensions"].items():
            detail = r.get("source") if r["status"] == "computed" else r.get("reason", "")
            lines.append(f"| {dim} | {r['status']} | {_f(r.get('score'))} | {detail} |")
        lines.append("")
    lines += ["Per-prompt rows, per-segment curves and timings: report.json; curves also in plots/drift/.", ""]
    return "\n".join(lines)
