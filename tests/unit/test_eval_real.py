"""Evaluation of a preset trained on real data: the prompt set (the user's file or VBench's suite inside the vbench
package), videos generated from it (T2V) or from the data's first frames (I2V), speed and VBench reported, and no
synthetic-shape-detector score at all (that is for synthetic data only)."""

import json
import os
import stat
import sys

import pytest

from longlive.config import EvalVariantConfig, load_preset
from longlive.eval.prompt_sets import PromptSetError, read_vbench_suite, real_prompts, vbench_suite
from longlive.eval.suite import EvaluateError, evaluate_variant, markdown_report, run_evaluate

SUITE = [
    {"prompt_en": "In a still frame, a stop sign", "dimension": ["temporal_flickering"]},
    {"prompt_en": "a bird and a cat", "dimension": ["multiple_objects"],
     "auxiliary_info": {"multiple_objects": {"object": "bird and cat"}}},
    {"prompt_en": "a toilet, frozen in time", "dimension": ["temporal_flickering"]},
    {"prompt_en": "In a still frame, a stop sign", "dimension": ["temporal_flickering", "subject_consistency"]},
]


@pytest.fixture
def fake_vbench(tmp_path):
    """A directory holding a ``vbench`` package whose only content is its prompt suite."""
    root = tmp_path / "site"
    (root / "vbench").mkdir(parents=True)
    (root / "vbench" / "__init__.py").write_text("raise ImportError('needs numpy<2')  # as on this machine\n")
    (root / "vbench" / "VBench_full_info.json").write_text(json.dumps(SUITE))
    return root


def test_vbench_suite_is_found_without_importing_the_package(fake_vbench, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(fake_vbench))
    path = vbench_suite()
    assert path == fake_vbench / "vbench" / "VBench_full_info.json"
    assert read_vbench_suite(path, ["temporal_flickering"]) == ["In a still frame, a stop sign", "a toilet, frozen in time"]
    assert read_vbench_suite(path, ["aesthetic_quality"]) == [r["prompt_en"] for r in SUITE[:3]], "untagged: all"
    # the package in another interpreter's environment (evaluate.vbench.python)
    python = tmp_path / "vbench-python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={fake_vbench} exec {sys.executable} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    assert vbench_suite(str(python)) == path


def test_a_missing_suite_or_a_short_prompt_set_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "vbench" not in p])
    with pytest.raises(PromptSetError, match="no vbench package with VBench_full_info.json; install vbench there"):
        vbench_suite(sys.executable if os.path.exists(sys.executable) else None)
    (tmp_path / "p.txt").write_text("a dog on a beach\na dog on a beach\na city at night\n")
    assert real_prompts(str(tmp_path / "p.txt"), 2, dimensions=[]) == (str(tmp_path / "p.txt"),
                                                                       ["a dog on a beach", "a city at night"])
    with pytest.raises(PromptSetError, match=r"2 distinct prompts, fewer than the 3 .*\(evaluate.num_prompts\)"):
        real_prompts(str(tmp_path / "p.txt"), 3, dimensions=[])
    with pytest.raises(PromptSetError, match="^evaluate.prompts .* is not a file"):
        real_prompts(str(tmp_path / "none.txt"), 1, dimensions=[])


@pytest.fixture(scope="module")
def real_preset(tmp_path_factory):
    from _tiny_models import save_tiny_base

    root = tmp_path_factory.mktemp("real_eval")
    p = load_preset("tiny")
    base = save_tiny_base(p, root / "base")
    (root / "prompts.txt").write_text("a dog runs along a beach at sunset\na red car drives through rain\n")
    ev = p.evaluate.model_copy(update={
        "variants": {"t2v": EvalVariantConfig(checkpoint=str(base / "dit"), kind="t2v"),
                     "i2v": EvalVariantConfig(checkpoint=str(base / "dit"), kind="i2v")},
        "prompts": str(root / "prompts.txt"), "num_prompts": 2, "samples": 2, "threads": 1,
        "speed": p.evaluate.speed.model_copy(update={"runs": 1, "warmup": 0, "length_factor": 1}),
        "vbench": p.evaluate.vbench.model_copy(update={"dimensions": ["temporal_flickering"], "num_videos": 2})})
    data = p.data.model_copy(update={"source": str(root / "my-videos")})
    return p.model_copy(update={"evaluate": ev, "data": data}), base, root


def test_real_data_evaluation_uses_the_prompt_set_and_no_detector(real_preset, synth_dir, tmp_path):
    preset, base, root = real_preset
    # synth's folder has the layout ingest writes: it stands in for data/ingest (the I2V first frames)
    results = run_evaluate(preset, out_dir=tmp_path / "out", base_dir=base, clips_dir=synth_dir,
                           work_dir=tmp_path / "work")
    t2v, i2v = results["t2v"], results["i2v"]
    for r in (t2v, i2v):
        m = r.metrics
        assert m["videos"] == 2 and m["fps"] > 0 and 0 < m["vbench_temporal_flickering"] <= 1
        assert m["info"]["domain"] == "real" and not any(k.startswith(("score", "multishot", "drift")) for k in m)
        assert set(r.details["runtime_s"]) == {"clips", "speed", "vbench"}
    assert [row["caption"] for row in t2v.details["t2v"]["rows"]] == ["a dog runs along a beach at sunset",
                                                                       "a red car drives through rain"]
    assert t2v.metrics["info"]["prompt_set"] == str(root / "prompts.txt")
    from longlive.data.synth import read_index

    index = read_index(synth_dir)
    assert [row["clip"] for row in i2v.details["i2v"]["rows"]] == [r["key"] for r in index[:2]]
    assert [row["caption"] for row in i2v.details["i2v"]["rows"]] == [r["captions"][0] for r in index[:2]]
    assert sorted(p.name for p in (tmp_path / "out/samples/t2v").glob("*.mp4")) == ["t2v_00.mp4", "t2v_01.mp4"]
    report = (tmp_path / "out/report.md").read_text()
    assert "Real data: no prompt-following score" in report and "Held-out prompts" not in report
    assert json.loads((tmp_path / "out/metrics/t2v.json").read_text())["videos"] == 2
    # the DVC metrics: FPS alone (no score without the detector); no drift curves to plot
    assert json.loads((tmp_path / "out/headline/t2v.json").read_text()) == {"fps": t2v.metrics["fps"]}
    assert not (tmp_path / "out/plots/drift").exists()


def test_real_data_without_a_prompt_set_fails_before_loading_a_model(real_preset, monkeypatch, tmp_path):
    preset, base, _ = real_preset
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "vbench" not in p])
    vbench = preset.model_copy(update={"evaluate": preset.evaluate.model_copy(update={"prompts": None})})
    with pytest.raises(EvaluateError, match="evaluate.prompts is vbench, but this environment"):
        evaluate_variant("t2v", vbench.evaluate.variants["t2v"], vbench, vbench.evaluate, base_dir=tmp_path / "no-base")
    with pytest.raises(EvaluateError, match="I2V on real data .* has 0, evaluate.num_prompts is 2"):
        evaluate_variant("i2v", preset.evaluate.variants["i2v"], preset, preset.evaluate, base_dir=tmp_path / "no-base",
                         clips_dir=tmp_path / "empty")


def test_synthetic_report_labels_the_detector():
    m = {"score": 0.4, "score_sem": 0.1, "multishot_score": 0.3, "schedule_score": 0.3, "drift_score": 0.3,
         "drift_last": 0.2, "fps": 10.0, "first_chunk_latency_s": 0.1, "peak_memory_mb": 5.0, "kv_cache_mb": 0.1,
         "info": {"kind": "t2v", "quant": "none", "denoising_steps": "1000", "device": "cpu", "memory_kind": "rss"}}
    report = {"preset": "tiny", "date": "today", "chance_score": 0.1, "evaluate": load_preset("tiny").evaluate.model_dump(),
              "variants": {"ar_t2v": {"metrics": m, "details": {}}}}
    text = markdown_report(report)
    assert "the synthetic shape detector; synthetic data only" in text and "Real data" not in text
