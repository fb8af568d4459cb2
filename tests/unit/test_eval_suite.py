"""The evaluate stage's library without a trained model: variant settings and their errors, metrics that
never stand in for a skipped VBench dimension, speed aggregation, peak memory, and the sequence-parallel
launch hook."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from longlive.config import EvalVariantConfig, load_preset
from longlive.eval.perf import PeakMemory, measure_speed
from longlive.eval.suite import EvaluateError, load_variant, run_evaluate, variant_inference, variant_metrics


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


def test_variant_settings_resolve_like_generate(preset):
    ar_config = {"block_frames": 1, "denoising_steps": [1000, 500], "timestep_shift": 3.0}
    v = EvalVariantConfig(checkpoint="x", kind="t2v")
    assert variant_inference(preset, v, ar_config).denoising_steps == [1000, 500]  # the export's steps
    v = EvalVariantConfig(checkpoint="x", kind="t2v", denoising_steps=[1000, 750], inference={"sink_frames": 0})
    cfg = variant_inference(preset, v, ar_config)
    assert cfg.denoising_steps == [1000, 750] and cfg.sink_frames == 0 and cfg.block_frames == 1
    with pytest.raises(ValueError, match="not inference settings"):
        EvalVariantConfig(checkpoint="x", kind="t2v", inference={"sink": 0})
    with pytest.raises(ValueError, match="strictly decreasing"):
        EvalVariantConfig(checkpoint="x", kind="t2v", denoising_steps=[500, 1000])


def test_variant_errors_name_the_variant_and_the_fix(preset, tmp_path):
    with pytest.raises(EvaluateError, match="variant gone: checkpoint .* not found"):
        load_variant("gone", EvalVariantConfig(checkpoint=str(tmp_path / "nope"), kind="t2v"), preset, "models/base", torch.device("cpu"))
    (tmp_path / "ck" / "dit").mkdir(parents=True)
    (tmp_path / "ck" / "ar_config.json").write_text(json.dumps({"i2v": True}))
    with pytest.raises(EvaluateError, match="kind t2v but .* i2v=True; fix evaluate.variants.mixed.kind"):
        load_variant("mixed", EvalVariantConfig(checkpoint=str(tmp_path / "ck"), kind="t2v"), preset, "models/base", torch.device("cpu"))
    empty = preset.model_copy(update={"evaluate": preset.evaluate.model_copy(update={"variants": {}})})
    with pytest.raises(EvaluateError, match="evaluate.variants is empty"):
        run_evaluate(empty, write=False)
    with pytest.raises(EvaluateError, match=r"unknown variants \['ar_t2x'\]"):
        run_evaluate(preset, names=["ar_t2x"], write=False)


def _details(vbench: dict) -> dict:
    clip = {"score": 0.4, "score_sem": 0.05, "colour_acc": 0.5, "shape_acc": 0.3, "motion_acc": 0.4,
            "match_rate": 0.1, "object_rate": 0.9, "after_first": {"score": 0.38}}
    drift = {"mean": 0.3, "mean_sem": 0.1, "first": 0.5, "last": 0.2, "slope": -0.01}
    speed = {"fps": 30.0, "fps_median": 28.0, "first_chunk_latency_s": 0.1, "first_chunk_latency_median_s": 0.12,
             "peak_memory_mb": 50.0, "kv_cache_mb": 0.25}
    return {"i2v": clip, "multishot": {"score": 0.3, "score_sem": 0.05, "transition_rate": 0.5, "stuck_rate": 0.1},
            "schedule": drift, "single": drift, "speed": speed, "vbench": vbench}


def test_metrics_hold_only_computed_vbench_dimensions():
    vb = {"dimensions": {"temporal_flickering": {"status": "computed", "score": 0.97},
                         "subject_consistency": {"status": "skipped", "reason": "no weights"},
                         "dynamic_degree": {"status": "failed", "reason": "boom"}}}
    m = variant_metrics(_details(vb), "i2v")
    assert m["vbench_temporal_flickering"] == 0.97 and m["vbench_not_computed"] == 2
    assert "vbench_subject_consistency" not in m and "vbench_dynamic_degree" not in m
    assert m["score_after_first"] == 0.38 and m["drift_last"] == 0.2 and m["multishot_switch_rate"] == 0.5


def test_speed_is_best_of_runs_with_medians_and_memory_per_run():
    fps = iter([5.0, 40.0, 20.0, 30.0])  # warm-up, then three timed runs
    lat = iter([9.0, 0.3, 0.1, 0.2])

    def generate():
        return SimpleNamespace(timings={"generated_fps": next(fps), "first_block_latency_s": next(lat),
                                        "max_cache_bytes": 2**19, "pixel_frames": 33})

    r = measure_speed(generate, torch.device("cpu"), runs=3, warmup=1)
    assert (r.fps, r.fps_median) == (40.0, 30.0)
    assert (r.first_chunk_latency_s, r.first_chunk_latency_median_s) == (0.1, 0.2)
    assert r.kv_cache_mb == 0.5 and r.runs == 3 and r.memory_kind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset is Linux's /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_run_s_allocations_even_after_a_larger_earlier_one():
    x = torch.ones(30_000_000)  # 120 MB, freed before the measured run
    del x
    with PeakMemory("cpu") as m:
        y = torch.ones(10_000_000)  # 40 MB
        y += 1
        del y
    assert m.kind == "cpu_peak_rss_increase"
    assert 30 <= m.peak_mb <= 100, m.peak_mb


def test_multi_process_preset_relaunches_the_stage_under_torchrun(monkeypatch):
    pytest.importorskip("longlive.parallel.launch", reason="sequence-parallel inference lives in longlive.parallel")
    import stages.evaluate as stage
    from longlive.config import ParallelConfig

    preset = load_preset("tiny")
    preset = preset.model_copy(update={"parallel": ParallelConfig(nproc=2, sp=2)})
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)

    class Exec(Exception):
        pass

    def fake_execv(path, cmd):
        raise Exec(cmd)

    monkeypatch.setattr(stage.os, "execv", fake_execv)
    with pytest.raises(Exec) as e:
        stage._parallel(preset, ["ar_t2v"])
    cmd = e.value.args[0]
    assert "--nproc_per_node=2" in cmd and cmd[-3:] == ["-m", "stages.evaluate", "ar_t2v"]


TIMING = {"fps", "fps_median", "first_chunk_latency_s", "first_chunk_latency_median_s", "peak_memory_mb", "runtime_s"}


def test_variants_spread_over_worker_processes_give_the_one_process_figures(tmp_path):
    """evaluate.workers: each variant in its own process draws what it draws from evaluate.seed, so every figure
    but timing and memory equals a one-process run's, variant by variant and in the configured order."""
    import shutil

    from _tiny_models import save_tiny_base

    preset = load_preset("tiny")
    base = save_tiny_base(preset, tmp_path / "base")
    variants = {}
    for kind in ("t2v", "i2v"):  # the untrained teacher as an AR student of either kind
        ck = tmp_path / kind
        shutil.copytree(base / "dit", ck / "dit")
        (ck / "ar_config.json").write_text(json.dumps({"i2v": kind == "i2v", "block_frames": 2, "sink_frames": 1,
                                                       "window_frames": 3}))
        variants[f"ar_{kind}"] = EvalVariantConfig(checkpoint=str(ck), kind=kind)
    speed = preset.evaluate.speed.model_copy(update={"runs": 1, "warmup": 0, "length_factor": 1})
    vbench = preset.evaluate.vbench.model_copy(update={"dimensions": []})
    cfg = preset.evaluate.model_copy(update={"variants": variants, "num_prompts": 2, "num_multishot": 1, "num_drift": 1,
                                             "length_factor": 2, "samples": 0, "speed": speed, "vbench": vbench})
    runs = {}
    for workers in (1, 2):
        p = preset.model_copy(update={"evaluate": cfg.model_copy(update={"workers": workers})})
        runs[workers] = run_evaluate(p, base_dir=base, write=False, device="cpu")
    assert list(runs[2]) == list(runs[1]) == ["ar_t2v", "ar_i2v"]
    for name in runs[1]:
        one, two = runs[1][name].metrics, runs[2][name].metrics
        same = {k for k in one if k not in TIMING and k != "info"}
        assert same and {k: one[k] for k in same} == {k: two[k] for k in same}, name
        assert one["score"] == two["score"]


def test_a_worker_that_dies_is_one_error_naming_the_fix(monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    import longlive.eval.suite as suite

    class Pool:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, **kwargs):
            class F:
                def result(self):
                    raise BrokenProcessPool("a child process terminated abruptly")
            return F()

    monkeypatch.setattr(suite, "ProcessPoolExecutor", Pool)
    with pytest.raises(EvaluateError, match="evaluate worker process died .* evaluate.workers: 1"):
        suite._evaluate_in_processes({"a": {}, "b": {}}, 2, threads=1, init=None)
