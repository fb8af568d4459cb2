"""The VBench adapter's plumbing on tiny videos: the weight-free temporal flickering formula, explicit skips
(no package, no weights directory, missing weight files), and a stand-in ``vbench`` package run in the
subprocess exactly as the real one would be (local weights, offline, custom_input, prompts by file)."""

import json
import sys
import textwrap

import numpy as np
import pytest

from longlive.config import VBENCH_DIMENSIONS, EvalVBenchConfig
from longlive.data.video_io import read_mp4, write_mp4
from longlive.eval.vbench import (
    WEIGHT_FILES, WEIGHT_FREE, check_dimensions, evaluate_vbench, temporal_flickering_frames,
)


def make_videos(tmp_path, n=3):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        frames = np.full((9, 32, 32, 3), 40, np.uint8)
        for t in range(9):  # a square moving right, plus a little noise so frames differ
            frames[t, 10:18, 2 + 2 * t: 10 + 2 * t] = (220, 40, 40)
        frames = np.clip(frames.astype(int) + rng.integers(0, 6 * (i + 1), frames.shape), 0, 255).astype(np.uint8)
        path = write_mp4(tmp_path / f"clip{i}.mp4", frames, fps=8)
        out.append((path, f"a red square moves right {i}"))
    return out


def test_dimension_lists_agree_with_config():
    assert set(WEIGHT_FILES) == set(VBENCH_DIMENSIONS)
    assert WEIGHT_FREE == ("temporal_flickering",)


@pytest.mark.parametrize("dims, message", [
    (["color"], "prompt suite"), (["colour_magic"], "unknown VBench"), (["dynamic_degree"] * 2, "twice")])
def test_unusable_dimensions_are_refused_at_load(dims, message):
    with pytest.raises(ValueError, match=message):
        check_dimensions(dims)
    with pytest.raises(ValueError, match=message):
        EvalVBenchConfig(dimensions=dims)


def test_temporal_flickering_is_vbenchs_formula():
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    # VBench's cal_score: mean over consecutive pairs of np.mean(cv2.absdiff(float32 a, float32 b))
    maes = [np.mean(np.abs(video[i].astype(np.float32) - video[i + 1].astype(np.float32))) for i in range(4)]
    assert temporal_flickering_frames(video) == pytest.approx((255.0 - np.mean(maes)) / 255.0, rel=1e-6)
    still = np.repeat(video[:1], 4, axis=0)
    assert temporal_flickering_frames(still) == 1.0
    with pytest.raises(ValueError, match="T >= 2"):
        temporal_flickering_frames(video[:1])


def test_without_the_package_weight_free_runs_and_the_rest_is_skipped_with_reasons(tmp_path):
    videos = make_videos(tmp_path)
    dims = ["subject_consistency", "temporal_flickering", "dynamic_degree"]
    r = evaluate_vbench(videos, dims, weights=None, python=sys.executable, work_dir=tmp_path / "work")
    assert list(r["dimensions"]) == dims  # the requested order
    flick = r["dimensions"]["temporal_flickering"]
    assert flick["status"] == "computed" and flick["source"] == "builtin"
    expected = np.mean([temporal_flickering_frames(read_mp4(p)) for p, _ in videos])
    assert flick["score"] == pytest.approx(expected) and 0.8 < flick["score"] < 1.0
    assert [v["video_path"] for v in flick["per_video"]] == [str(p) for p, _ in videos]
    for d in ("subject_consistency", "dynamic_degree"):
        assert r["dimensions"][d]["status"] == "skipped"
        assert "score" not in r["dimensions"][d]  # never a stand-in number
        assert "not importable" in r["dimensions"][d]["reason"]
    assert "pip install vbench" in r["package"]


FAKE_VBENCH = '''
import json, os
from pathlib import Path
from . import utils

class VBench:
    def __init__(self, device, full_info_dir, output_path):
        assert os.path.isfile(full_info_dir), full_info_dir
        self.device, self.output_path = device, output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, read_frame=False,
                 mode="vbench_standard", **kwargs):
        log = {"cache_dir": utils.CACHE_DIR, "env": os.environ.get("VBENCH_CACHE_DIR"), "local": local, "mode": mode,
               "offline": os.environ.get("HF_HUB_OFFLINE"), "dims": dimension_list, "device": self.device}
        with open(os.environ["FAKE_VBENCH_LOG"], "a") as f:
            f.write(json.dumps(log) + "\\n")
        dim, = dimension_list
        if dim == "dynamic_degree":
            raise RuntimeError("RAFT blew up")
        files = sorted(os.listdir(videos_path))
        assert set(files) == set(prompt_list), (files, prompt_list)
        per = [{"video_path": os.path.join(videos_path, f), "video_results": len(prompt_list[f]) / 100} for f in files]
        res = {dim: [sum(p["video_results"] for p in per) / len(per), per]}
        Path(self.output_path, name + "_eval_results.json").write_text(json.dumps(res))
'''


@pytest.fixture
def fake_vbench(tmp_path, monkeypatch):
    """A stand-in `vbench` package importable by the subprocess (the real one cannot share our environment)."""
    pkg = tmp_path / "site" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_VBENCH))
    (pkg / "utils.py").write_text("import os\nCACHE_DIR = os.environ.get('VBENCH_CACHE_DIR', '~/.cache/vbench')\n")
    (pkg / "VBench_full_info.json").write_text("[]")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_VBENCH_LOG", str(log))
    return log


def test_package_runs_with_local_weights_offline_and_reports_each_dimension(tmp_path, fake_vbench):
    videos = make_videos(tmp_path)
    weights = tmp_path / "weights"
    for rel in WEIGHT_FILES["subject_consistency"] + WEIGHT_FILES["dynamic_degree"]:
        (weights / rel).parent.mkdir(parents=True, exist_ok=True)
        (weights / rel).write_bytes(b"w")
    # motion_smoothness's checkpoint is absent: skipped, naming the file, and never handed to vbench
    dims = ["temporal_flickering", "subject_consistency", "motion_smoothness", "dynamic_degree"]
    r = evaluate_vbench(videos, dims, weights=weights, python=sys.executable, work_dir=tmp_path / "work")
    d = r["dimensions"]
    assert r["package"] == "importable"
    assert d["temporal_flickering"]["source"] == "vbench"  # the package, when importable, computes it
    sc = d["subject_consistency"]
    assert sc["status"] == "computed" and sc["source"] == "vbench"
    # prompts reached vbench keyed by the file each video was linked as, in order
    assert [v["video_results"] for v in sc["per_video"]] == [len(p) / 100 for _, p in videos]
    assert sc["score"] == pytest.approx(np.mean([len(p) / 100 for _, p in videos]))
    assert d["motion_smoothness"]["status"] == "skipped"
    assert str(weights / "amt_model/amt-s.pth") in d["motion_smoothness"]["reason"]
    assert d["dynamic_degree"]["status"] == "failed" and "RAFT blew up" in d["dynamic_degree"]["reason"]
    calls = [json.loads(line) for line in fake_vbench.read_text().splitlines()]
    assert [c["dims"] for c in calls] == [["temporal_flickering"], ["subject_consistency"], ["dynamic_degree"]]
    for c in calls:
        assert c["local"] is True and c["mode"] == "custom_input" and c["offline"] == "1"
        assert c["cache_dir"] == c["env"] == str(weights.resolve())
    assert not list((tmp_path / "work").iterdir()), "the temporary video links are cleaned up"


def test_weights_not_set_skips_weighted_dimensions(tmp_path, fake_vbench):
    r = evaluate_vbench(make_videos(tmp_path, 1), ["imaging_quality", "temporal_flickering"], weights=None,
                        python=sys.executable)
    assert r["dimensions"]["imaging_quality"]["status"] == "skipped"
    assert "evaluate.vbench.weights is not set" in r["dimensions"]["imaging_quality"]["reason"]
    assert r["dimensions"]["temporal_flickering"]["status"] == "computed"


def test_a_crashing_subprocess_fails_the_dimensions_it_ran(tmp_path, fake_vbench):
    init = tmp_path / "site" / "vbench" / "__init__.py"
    init.write_text(init.read_text().replace('        dim, = dimension_list\n',
                                             '        dim, = dimension_list\n        os._exit(7)\n'))
    weights = tmp_path / "weights"
    for rel in WEIGHT_FILES["background_consistency"]:
        (weights / rel).parent.mkdir(parents=True, exist_ok=True)
        (weights / rel).write_bytes(b"w")
    r = evaluate_vbench(make_videos(tmp_path, 1), ["background_consistency", "temporal_flickering"], weights=weights,
                        python=sys.executable)
    for dim in ("background_consistency", "temporal_flickering"):
        assert r["dimensions"][dim]["status"] == "failed", r["dimensions"][dim]
        assert "exited 7" in r["dimensions"][dim]["reason"]
        assert "score" not in r["dimensions"][dim]


def test_a_broken_package_counts_as_not_importable(tmp_path, fake_vbench):
    (tmp_path / "site" / "vbench" / "__init__.py").write_text("raise ImportError('needs transformers==4.33.2')\n")
    r = evaluate_vbench(make_videos(tmp_path, 1), ["temporal_flickering", "subject_consistency"],
                        python=sys.executable)
    assert "transformers==4.33.2" in r["package"]
    assert r["dimensions"]["subject_consistency"]["status"] == "skipped"
    assert r["dimensions"]["temporal_flickering"]["source"] == "builtin"
