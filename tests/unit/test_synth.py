"""Synthetic dataset: determinism, multi-shot layout, ground truth that agrees with the pixels."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from longlive.data import synth
from longlive.data.synth import (
    CAPTION_WORDS, COLOURS, DIRECTIONS, MOTIONS, SHAPES, load_frames, make_caption, make_clip, parse_caption,
    read_index, write_dataset,
)
from longlive.data.video_io import frames_to_tensor, read_mp4, tensor_to_frames, write_mp4

N = 24  # enough clips to see every motion and several multi-shot clips


@pytest.fixture(scope="module")
def clips(make_preset):
    p = make_preset(N)
    return p, [make_clip(i, p) for i in range(N)]


def test_same_seed_gives_identical_files(synth_dir, tiny_preset, tmp_path):
    again = tmp_path / "again"
    write_dataset(tiny_preset, again)
    assert (again / "index.jsonl").read_bytes() == (synth_dir / "index.jsonl").read_bytes()
    assert (again / "stats.json").read_bytes() == (synth_dir / "stats.json").read_bytes()
    for row in read_index(synth_dir):
        name = f"videos/{row['key']}.npy"
        assert (again / name).read_bytes() == (synth_dir / name).read_bytes(), name


def test_clip_depends_only_on_seed_and_index(tiny_preset, make_preset):
    other = make_preset(1000)  # more clips must not change clip 5
    assert np.array_equal(make_clip(5, tiny_preset).frames, make_clip(5, other).frames)
    seed1 = make_preset(seed=1)
    differ = [not np.array_equal(make_clip(i, tiny_preset).frames, make_clip(i, seed1).frames) for i in range(4)]
    assert all(differ)


def test_dataset_layout_and_stats(synth_dir, tiny_preset):
    rows = read_index(synth_dir)
    v = tiny_preset.video
    assert [r["key"] for r in rows] == [f"clip-{i:06d}" for i in range(tiny_preset.synth.num_videos)]
    for r in rows:
        assert (r["num_frames"], r["fps"], r["height"], r["width"]) == (v.num_frames, v.fps, v.height, v.width)
        assert len(r["centers"]) == len(r["radii"]) == v.num_frames
        assert r["captions"] == [s["caption"] for s in r["shots"]]
        frames = load_frames(synth_dir, r["key"])
        assert frames.dtype == np.uint8 and frames.shape == (v.num_frames, v.height, v.width, 3)
    stats = json.loads((synth_dir / "stats.json").read_text())
    assert stats["clips"] == len(rows)
    assert stats["multishot_clips"] == sum(len(r["shots"]) == 2 for r in rows) == 3  # 12 * 0.25
    assert sum(stats["shape"].values()) == sum(stats["colour"].values()) == stats["shots"]
    previews = sorted(p.name for p in (synth_dir / "previews").iterdir())
    assert previews == [f"clip-{i:06d}.mp4" for i in range(8)]
    video = read_mp4(synth_dir / "previews" / previews[0])
    assert video.shape == (v.num_frames, v.height, v.width, 3)
    assert np.abs(video.astype(int) - load_frames(synth_dir, "clip-000000")).mean() < 6  # lossy, but the same video


def test_multishot_boundary_on_latent_group_edge(clips):
    p, cs = clips
    tc = p.vae.temporal_compression
    multi = [c for c in cs if len(c.shots) == 2]
    assert len(multi) == round(N * p.synth.multishot_fraction)
    for c in multi:
        a, b = c.shots
        assert a.start_frame == a.start_latent_frame == 0
        assert b.start_frame > 1 and (b.start_frame - 1) % tc == 0
        assert b.start_latent_frame == (b.start_frame - 1) // tc + 1
        assert a.caption != b.caption and a.motion != b.motion
        assert (a.colour, a.shape) != (b.colour, b.shape)
        # A hard cut: the last frame of shot 1 and the first of shot 2 differ.
        assert not np.array_equal(c.frames[b.start_frame - 1], c.frames[b.start_frame])
    assert all(len(c.shots) == 1 for c in cs if c not in multi)


def test_ground_truth_matches_pixels(clips):
    p, cs = clips
    seen_motions = set()
    for c in cs:
        bounds = [s.start_frame for s in c.shots] + [p.video.num_frames]
        for shot, start, end in zip(c.shots, bounds, bounds[1:]):
            seen_motions.add(shot.motion)
            assert shot.rgb == COLOURS[shot.colour]
            for t in range(start, end):
                x, y = c.centers[t]
                assert tuple(c.frames[t, round(y), round(x)]) == shot.rgb, (c.key, t)
                mask = np.all(c.frames[t] == shot.rgb, axis=-1)
                ys, xs = np.nonzero(mask)
                assert abs(xs.mean() - x) < 1.5 and abs(ys.mean() - y) < 1.5, (c.key, t)
                # Whole shape in frame: it never touches the border.
                assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            move = c.centers[end - 1] - c.centers[start]
            dx, dy = DIRECTIONS[shot.motion]
            if shot.motion == "still":
                assert np.allclose(move, 0)
            else:
                along = move[0] * dx + move[1] * dy
                across = abs(move[0] * dy) + abs(move[1] * dx)
                assert along > 0.5 * (end - start - 1) and across < 1e-9, (c.key, shot.motion, move)
    assert seen_motions == set(MOTIONS)


def test_parse_caption_inverts_template():
    for colour, shape, motion in itertools.product(COLOURS, SHAPES, MOTIONS):
        caption = make_caption(colour, shape, motion)
        assert parse_caption(caption) == (colour, shape, motion)
        assert set(caption.split()) <= set(CAPTION_WORDS)
    assert make_caption("orange", "square", "still") == "an orange square stays still"
    assert make_caption("red", "circle", "left") == "a red circle moves left"
    for bad in ("", "a red circle", "a purple circle moves left", "a red circle moves still", "a red circle stays left"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_write_dataset_is_atomic(tiny_preset, tmp_path, monkeypatch):
    out = tmp_path / "synth"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    real = synth.make_clip

    def failing(index, preset):
        if index == 3:
            raise RuntimeError("boom")
        return real(index, preset)

    monkeypatch.setattr(synth, "make_clip", failing)
    with pytest.raises(RuntimeError, match="boom"):
        write_dataset(tiny_preset, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # no temp dir left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the previous output is untouched


def test_video_io_round_trip(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (3, 5, 16, 24) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(tensor_to_frames(x), frames)
    batched = frames_to_tensor(np.stack([frames, frames]))
    assert batched.shape == (2, 3, 5, 16, 24)
    flat = np.full((5, 16, 24, 3), 200, np.uint8)
    path = write_mp4(tmp_path / "v.mp4", flat, fps=8)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    back = read_mp4(path)
    assert back.shape == flat.shape and np.abs(back.astype(int) - 200).max() <= 3
