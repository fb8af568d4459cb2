"""Quality evaluation plumbing on a tiny random-weight model: the held-out set, report shapes, drift
segments and settings reaching the pipeline, atomic JSON, and ``longlive eval-quality`` (no trained weights)."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

import longlive.inference.generate as generate
from longlive.cli import main
from longlive.config import load_preset
from longlive.data.synth import COLOURS, MOTIONS, SHAPES, is_multishot, make_clip, parse_caption
from longlive.eval import quality
from longlive.eval.prompt_following import CHANCE_SCORE
from longlive.models.dit import WanDiT
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE
from longlive.models.wan_adapter import save_dit


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def saved(preset, tmp_path_factory):
    """Random tiny models saved as a base directory plus a train_ar-style export (``ar/dit`` + ar_config)."""
    root = tmp_path_factory.mktemp("quality")
    torch.manual_seed(0)
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    with torch.no_grad():  # a non-zero head, so videos depend on the prompt and the cache
        torch.nn.init.normal_(dit.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    WanVAE(preset.vae).eval().save_pretrained(root / "base" / "vae")
    TinyTextEncoder(preset.text, seed=0).save(root / "base" / "text")
    save_dit(dit, root / "base" / "dit")
    save_dit(dit, root / "ar" / "dit")
    (root / "ar" / "ar_config.json").write_text(json.dumps(
        {"i2v": False, "independent_first_frame": False, "block_frames": 2, "denoising_steps": [1000, 500],
         "timestep_shift": 3.0}))
    return root


@pytest.fixture(scope="module")
def loaded(preset, saved):
    return quality.load_checkpoint(preset, saved / "ar", saved / "base")


@pytest.fixture(scope="module")
def prompts(preset):
    return quality.heldout_prompts(preset, 3)


def test_heldout_prompts_are_balanced_unseen_and_stable(preset):
    prompts = quality.heldout_prompts(preset, 24)
    assert [p["k"] for p in prompts] == list(range(24))
    for p in prompts:
        assert p["clip"] >= quality.HELDOUT_START and not is_multishot(p["clip"], preset.synth.multishot_fraction)
        assert make_clip(p["clip"], preset).shots[0].caption == p["caption"]
    targets = [parse_caption(p["caption"]) for p in prompts]
    assert set(Counter(t[0] for t in targets).values()) == {24 // len(COLOURS)}
    assert set(Counter(t[1] for t in targets).values()) == {24 // len(SHAPES)}
    assert set(Counter(t[2] for t in targets).values()) <= {24 // len(MOTIONS), 24 // len(MOTIONS) + 1}
    assert len({p["caption"] for p in prompts}) == 24
    assert quality.heldout_prompts(preset, 5) == prompts[:5]  # prompt k does not depend on N
    for p in prompts:  # multi-shot: the motion always changes, and the colour or the shape too
        a, b = parse_caption(p["caption"]), parse_caption(quality.second_caption(p["k"], p["caption"]))
        assert a[2] != b[2] and (a[0] != b[0] or a[1] != b[1])


def _check_clip_summary(r, n_prompts, pixel_frames):
    assert r["n"] == len(r["rows"]) == n_prompts and r["pixel_frames"] == pixel_frames
    assert r["chance_score"] == CHANCE_SCORE
    for key in ("score", "colour_acc", "shape_acc", "motion_acc", "match_rate", "object_rate"):
        assert 0.0 <= r[key] <= 1.0, key
    assert set(r["by_colour"]) <= set(COLOURS) and set(r["by_motion"]) <= set(MOTIONS)
    assert sum(sum(c.values()) for c in r["motion_confusion"].values()) == n_prompts


def test_t2v_and_i2v_reports(preset, loaded, prompts, tmp_path):
    models, cfg, _ = loaded
    t2v = quality.eval_t2v(models, cfg, prompts, seed=3, out_dir=tmp_path, samples=1)
    _check_clip_summary(t2v, 3, preset.video.num_frames)
    assert [r["seed"] for r in t2v["rows"]] == [3, 4, 5]
    assert (tmp_path / "t2v_00.mp4").is_file() and not (tmp_path / "t2v_01.mp4").exists()
    again = quality.eval_t2v(models, cfg, prompts[:1], seed=3)  # fixed seeds: the same video, the same score
    assert again["rows"][0] == t2v["rows"][0]

    i2v = quality.eval_i2v(models, cfg, prompts[:2])
    _check_clip_summary(i2v, 2, preset.video.num_frames)
    assert all(r["clip"] == p["clip"] for r, p in zip(i2v["rows"], prompts))
    _check_clip_summary({**i2v["after_first"], "rows": i2v["rows"], "pixel_frames": i2v["pixel_frames"]},
                        2, preset.video.num_frames)


def test_multishot_report(loaded, prompts):
    models, cfg, _ = loaded
    r = quality.eval_multishot(models, cfg, prompts[:2])
    # blocks [2, 2, 2, 2, 2] over the clip's 9 latent frames: the start nearest 4.5 is 4, pixel frame 1 + 4 * 3
    assert r["cut_frame"] == 13
    assert len(r["shots"]) == 2 and r["n"] == 2
    for row in r["rows"]:
        assert [s["caption"] for s in row["shots"]] == row["captions"] and row["cut_frame"] == 13
        assert row["shots"][1]["start_frame"] == 13 and row["shots"][1]["end_frame"] == 33
    assert 0.0 <= r["transition_rate"] <= 1.0 and 0.0 <= r["stuck_rate"] <= 1.0


@pytest.fixture
def pipeline_configs(monkeypatch):
    """The InferenceConfig every StreamingPipeline was built with."""
    seen = []

    class Spy(generate.StreamingPipeline):
        def __init__(self, dit, cfg, device=None, **kwargs):
            seen.append(cfg)
            super().__init__(dit, cfg, device, **kwargs)

    monkeypatch.setattr(generate, "StreamingPipeline", Spy)
    return seen


@pytest.mark.parametrize("switching", [True, False])
def test_drift_segments_and_settings_reach_the_pipeline(preset, loaded, prompts, pipeline_configs, switching):
    models, cfg, _ = loaded
    runs = {}
    for sink, recache in ((True, True), (False, True), (True, False)):
        pipeline_configs.clear()
        runs[sink, recache] = r = quality.eval_drift(models, cfg, prompts[:1], length_factor=3, sink=sink,
                                                     recache=recache, switching=switching)
        assert [(c.sink_frames, c.recache_on_switch) for c in pipeline_configs] == [
            (cfg.inference.sink_frames if sink else 0, recache)]
        assert r["length_factor"] == 3 and r["pixel_frames"] == 3 * preset.video.num_frames
        assert len(r["per_segment"]) == len(r["per_segment_match"]) == len(r["videos"][0]["segments"]) == 3
        segs = r["videos"][0]["segments"]
        assert segs[0]["start_frame"] == 0 and segs[-1]["end_frame"] == r["pixel_frames"]
        assert r["first"] == r["per_segment"][0] and r["last"] == r["per_segment"][-1]
        # memory: the cache is full after the first clip and never grows past sink + window
        assert r["cache_frames_max"] == (cfg.inference.sink_frames if sink else 0) + cfg.inference.window_frames
        assert r["cache_bytes_max"] == r["cache_bytes_first_clip"] > 0
    assert runs[False, True]["sink_frames"] == 0 and runs[True, True]["sink_frames"] == cfg.inference.sink_frames
    assert runs[False, True]["cache_bytes_max"] < runs[True, True]["cache_bytes_max"]
    if switching:
        assert runs[True, True]["videos"][0]["switches"] == 2
        assert len({r["videos"][0]["segments"][1]["caption"] for r in runs.values()}) == 1
        assert runs[True, True]["recache_s"] > 0 and runs[True, False]["recache_s"] == 0
    else:
        assert all(r["recache_s"] == 0 for r in runs.values())
        assert {s["caption"] for s in runs[True, True]["videos"][0]["segments"]} == {prompts[0]["caption"]}


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "out" / "r.json"
    quality.write_json({"a": np.float32(0.5), "b": [np.int64(2), np.bool_(True)]}, path)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [2, True]}
    with pytest.raises(TypeError):
        quality.write_json({"a": object()}, path)
    assert json.loads(path.read_text())["a"] == 0.5  # the old report survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_cli_eval_quality_writes_report_and_samples(saved, tmp_path, capsys):
    out = tmp_path / "reports" / "q.json"
    rc = main(["eval-quality", "--checkpoint", str(saved / "ar"), "--base", str(saved / "base"), "--preset", "tiny",
               "--num-prompts", "2", "--num-drift", "1", "--length-factor", "2", "--samples", "1",
               "--out", str(out), "--set", "window_frames=3"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"t2v", "multishot", "drift"} <= set(report) and "i2v" not in report
    assert set(report["drift"]) == {name for name, *_ in quality.DRIFT_SETTINGS}
    assert report["inference"]["window_frames"] == 3 and report["inference"]["denoising_steps"] == [1000, 500]
    assert report["t2v"]["n"] == 2 and report["chance_score"] == CHANCE_SCORE
    assert (tmp_path / "reports" / "q_samples" / "t2v_00.mp4").is_file()
    printed = capsys.readouterr().out
    assert "t2v" in printed and f"{CHANCE_SCORE:.3f}" in printed and "wrote" in printed
    assert main(["eval-quality", "--checkpoint", str(saved / "ar"), "--base", str(saved / "base"),
                 "--set", "sink_frames=-1", "--out", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists()
