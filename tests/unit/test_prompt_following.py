"""Prompt-following check on synth clips: right captions score ~1 (also blurred, noisy, resampled,
dimmed), wrong ones lose exactly the wrong component, blank videos score 0, random ones score chance."""

import json

import numpy as np
import pytest
from scipy import ndimage

from longlive.config import load_preset
from longlive.data.synth import COLOURS, MOTIONS, SHAPES, make_caption, make_clip, parse_caption
from longlive.eval.prompt_following import CHANCE_SCORE, MATCH_CHANCE, detect, score_video

N_CLIPS = 40
N_RANDOM = 200  # per-video score sd ~0.23, so the mean's standard error is ~0.017
CHANCE_TOL = 0.05  # ~3 standard errors


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def clips(preset):
    return [make_clip(i, preset) for i in range(N_CLIPS)]


def schedule(clip):
    return [(s.start_frame, s.caption) for s in clip.shots]


def _u8(x):
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _blur(v, sigma):
    return ndimage.gaussian_filter(v.astype(np.float32), (0, sigma, sigma, 0))


def _down_up(v):
    small = ndimage.zoom(v.astype(np.float32), (1, 0.5, 0.5, 1), order=1)
    return ndimage.zoom(small, (1, 2, 2, 1), order=1)


def _grey(v):
    return v.astype(np.float32).mean(-1, keepdims=True)


DEGRADATIONS = {
    "clean": lambda v, g: v,
    "blur 1.5": lambda v, g: _u8(_blur(v, 1.5)),
    "blur 1.5 + noise 8": lambda v, g: _u8(_blur(v, 1.5) + g.normal(0, 8, v.shape)),
    "blur 2.0": lambda v, g: _u8(_blur(v, 2.0)),
    "noise 20": lambda v, g: _u8(v + g.normal(0, 20, v.shape)),
    "2x down/up": lambda v, g: _u8(_down_up(v)),
    "dim 0.6": lambda v, g: _u8(0.6 * v),
    "desaturate 40%": lambda v, g: _u8(0.6 * v + 0.4 * _grey(v)),
    "vae-like": lambda v, g: _u8(0.85 * _blur(0.75 * v + 0.25 * _grey(v), 1.5) + 10 + g.normal(0, 5, v.shape)),
}


def _mean_components(results):
    keys = ("score", "colour_acc", "shape_acc", "motion_acc")
    return {k: float(np.mean([getattr(r, k) for r in results])) for k in keys}


def test_accuracy_table_on_clean_and_degraded_clips(clips):
    g = np.random.default_rng(0)
    rows = {name: _mean_components([score_video(f(c.frames, g), schedule(c)) for c in clips])
            for name, f in DEGRADATIONS.items()}
    print(f"\nprompt following on {N_CLIPS} tiny synth clips (chance {CHANCE_SCORE:.3f})")
    print(f"{'video':<20}{'score':>7}{'colour':>8}{'shape':>7}{'motion':>8}")
    for name, r in rows.items():
        print(f"{name:<20}{r['score']:>7.3f}{r['colour_acc']:>8.3f}{r['shape_acc']:>7.3f}{r['motion_acc']:>8.3f}")
    assert rows["clean"]["score"] >= 0.95
    assert min(rows["clean"].values()) >= 0.9
    for name, r in rows.items():
        assert min(r.values()) >= 0.85, (name, r)


def test_detect_finds_colour_shape_and_centroid(clips):
    for c in clips[:10]:
        for t in (0, len(c.frames) - 1):
            shot = [s for s in c.shots if s.start_frame <= t][-1]
            d = detect(c.frames[t])
            assert d.present and (d.colour, d.shape) == (shot.colour, shot.shape)
            assert np.allclose(d.center, c.centers[t], atol=0.75)
            assert 0.01 < d.area < 0.2


@pytest.mark.parametrize("component", ["colour", "shape", "motion"])
def test_wrong_caption_zeroes_only_that_component(clips, component):
    acc = {"colour": [], "shape": [], "motion": []}
    for c in clips:
        true = [parse_caption(s.caption) for s in c.shots]
        wrong = []
        for s, (col, shp, mot) in zip(c.shots, true):
            col = next(x for x in COLOURS if x != col) if component == "colour" else col
            shp = next(x for x in SHAPES if x != shp) if component == "shape" else shp
            mot = next(x for x in MOTIONS if x != mot) if component == "motion" else mot
            wrong.append((s.start_frame, make_caption(col, shp, mot)))
        r = score_video(c.frames, wrong)
        for k in acc:
            acc[k].append(r.colour_acc if k == "colour" else r.shape_acc if k == "shape" else r.motion_acc)
    means = {k: float(np.mean(v)) for k, v in acc.items()}
    assert means[component] <= 0.05, means
    assert all(v >= 0.9 for k, v in means.items() if k != component), means


def test_blank_video_scores_zero(preset):
    v = preset.video
    plain = np.full((v.num_frames, v.height, v.width, 3), (16, 16, 20), np.uint8)
    noisy = _u8(plain + np.random.default_rng(1).normal(0, 10, plain.shape))
    for frames in (plain, np.zeros_like(plain), noisy):
        r = score_video(frames, [(0, "a red circle stays still"), (9, "a blue square moves up")])
        assert r.score == 0.0 and r.per_segment == [0.0, 0.0] and r.transition_delays == [None]
        assert [s.motion_detected for s in r.shots] == ["none", "none"]
        assert not any(d.present for d in map(detect, frames))


def test_multishot_both_shots_scored_and_cut_is_immediate(clips):
    multi = [c for c in clips if len(c.shots) == 2]
    assert len(multi) >= 5
    for c in multi:
        r = score_video(c.frames, schedule(c))
        cut = c.shots[1].start_frame
        assert [(s.start_frame, s.end_frame) for s in r.shots] == [(0, cut), (cut, len(c.frames))]
        assert all(s.score >= 0.99 for s in r.shots), r.shots
        assert r.transition_delays == [0] and r.per_segment == [1.0, 1.0] and r.stability == 1.0


def test_late_switch_reports_its_delay(clips):
    for c in (c for c in clips if len(c.shots) == 2):
        cut = c.shots[1].start_frame
        r = score_video(c.frames, [(0, c.shots[0].caption), (cut - 3, c.shots[1].caption)])
        assert r.transition_delays == [3]
        assert r.per_segment[0] == 1.0 and r.per_segment[1] == pytest.approx(1 - 3 / (len(c.frames) - cut + 3))


def test_segments_measure_drift(clips):
    c = next(c for c in clips if len(c.shots) == 1)
    frames = c.frames.copy()
    frames[8:] = frames[0, 0, 0]  # the object vanishes halfway: drift to nothing
    r = score_video(frames, schedule(c), segment_frames=4)
    n = len(frames)
    segments = -(-n // 4)
    assert r.per_segment == [1.0, 1.0] + [0.0] * (segments - 2)
    assert r.stability == pytest.approx(1 - 1 / (segments - 1))  # one drop among segments - 1 changes
    assert r.shots[0].colour_acc == pytest.approx(8 / n)  # vanished frames count as wrong
    d = json.loads(json.dumps(r.to_dict()))
    assert d["chance_score"] == CHANCE_SCORE and d["shots"][0]["caption"] == c.shots[0].caption


def test_chance_level_matches_random_captions(preset):
    assert CHANCE_SCORE == pytest.approx((1 / 8 + 1 / 3 + 1 / 5) / 3) and 0 < CHANCE_SCORE < 0.5
    assert MATCH_CHANCE == pytest.approx(1 / 24)
    g = np.random.default_rng(2)
    captions = [make_caption(col, shp, mot) for col in COLOURS for shp in SHAPES for mot in MOTIONS]
    scores = [score_video(make_clip(1000 + i, preset).frames, [(0, str(g.choice(captions)))]).score
              for i in range(N_RANDOM)]
    assert abs(np.mean(scores) - CHANCE_SCORE) <= CHANCE_TOL, (np.mean(scores), CHANCE_SCORE)


def test_bad_schedules_are_refused(clips):
    frames = clips[0].frames
    still, square = "a red circle stays still", "a red square stays still"
    end = len(frames)  # a switch at or past the last frame
    for bad in ([], [(1, still)], [(0, still), (0, square)], [(0, still), (end, square)], [(0, "a purple blob")]):
        with pytest.raises(ValueError):
            score_video(frames, bad)
    with pytest.raises(ValueError):
        detect(frames[0].astype(np.float32))
