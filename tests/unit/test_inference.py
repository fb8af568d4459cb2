"""Streaming generation end to end: prompt schedules, I2V first frame, async == sync decoding, and
``longlive generate`` writing an mp4 and its timings (random tiny models, no trained weights)."""

import json

import numpy as np
import pytest
import torch

from longlive.cli import main
from longlive.config import load_preset
from longlive.data.video_io import read_mp4
from longlive.inference.generate import Models, generate_video, load_image, timings_path
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import PromptSchedule, eval_schedule, latent_frame_at, stream_block_sizes
from longlive.models.dit import WanDiT
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE
from longlive.models.wan_adapter import save_dit


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def models(preset) -> Models:
    torch.manual_seed(0)
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    with torch.no_grad():  # a non-zero head, so generated latents depend on everything upstream
        torch.nn.init.normal_(dit.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    return Models(dit.eval(), WanVAE(preset.vae).eval(), TinyTextEncoder(preset.text, seed=0))


# ----------------------------------------------------------------------------- schedules


def test_schedule_from_yaml_and_json(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "- {start: 0, prompt: a red circle moves left}\n"
        "- {start: 2.5, prompt: a red circle moves right}\n"
        "- {frame: 40, prompt: a blue square stays still, shot: true}\n"
    )
    (tmp_path / "s.json").write_text(json.dumps([[0, "a red circle moves left"], [2.5, "a red circle moves right"]]))
    s = PromptSchedule.load(tmp_path / "s.yaml")
    assert [e.start_frame(8) for e in s.entries] == [0, 20, 40] and s.entries[2].shot
    assert PromptSchedule.load(tmp_path / "s.json").prompts == s.prompts[:2]
    plans = s.plan(stream_block_sizes(14, 2), fps=8, temporal_compression=4)
    # pixel 20 -> latent 6 (block 3); pixel 40 -> latent 11 -> the block starting at 12
    assert [p.prompt for p in plans] == [0, 0, 0, 1, 1, 1, 2]
    assert [p.shot for p in plans] == [0] * 6 + [1] and plans[6].new_shot and plans[3].switch
    assert eval_schedule(plans, s.prompts, 4) == [(0, s.prompts[0]), (21, s.prompts[1]), (45, s.prompts[2])]
    with pytest.raises(ValueError, match="entry 0 has start 1 s: the first entry must start at 0"):
        PromptSchedule.from_list([{"start": 1, "prompt": "x"}])
    with pytest.raises(ValueError, match="unknown keys"):
        PromptSchedule.from_list([{"start": 0, "prompt": "x", "when": 3}])


def test_block_sizes_and_frame_mapping():
    assert stream_block_sizes(5, 2) == [2, 2, 2]
    assert stream_block_sizes(5, 2, first_alone=True) == [1, 2, 2]
    # the first latent frame whose pixel frames start at or after p (latent j >= 1 starts at pixel 4j - 3)
    assert [latent_frame_at(p, 4) for p in (0, 1, 2, 5, 6, 9)] == [0, 1, 2, 2, 3, 3]


# ----------------------------------------------------------------------------- I2V


@pytest.mark.parametrize("independent_first_frame", [True, False])
def test_i2v_first_latent_is_the_image(preset, models, independent_first_frame):
    cfg = preset.inference.model_copy(update={"independent_first_frame": independent_first_frame})
    C, _, h, w = preset.latent_shape
    image = torch.randn(1, C, 1, h, w, generator=torch.Generator().manual_seed(4))
    sizes = stream_block_sizes(5, cfg.block_frames, first_alone=independent_first_frame)
    plans = PromptSchedule.single("a red circle moves left").plan(sizes, 8, 4)
    ctx = models.text.encode(["a red circle moves left"])[0]
    pipe = StreamingPipeline(models.dit, cfg)
    blocks = list(pipe.stream(plans, [ctx], (C, h, w), image_latent=image))
    latents = torch.cat([b.latents for b in blocks], dim=2)
    assert torch.equal(latents[:, :, :1], image)
    assert blocks[0].plan.frames == (1 if independent_first_frame else 2)
    assert pipe.cache.frames[0].frame == 0 and torch.equal(pipe.cache.frames[0].latent, image)  # cached as sink
    assert not torch.allclose(latents[:, :, 1], image[:, :, 0])


def test_i2v_from_an_image_file(preset, models, tmp_path):
    import imageio.v3 as iio

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[8:20, 10:30] = (255, 0, 0)
    iio.imwrite(tmp_path / "first.png", rgb)
    pixels = load_image(tmp_path / "first.png", preset.video.height, preset.video.width)
    assert pixels.shape == (1, 3, 1, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    result = generate_video(models, preset, PromptSchedule.single("a red circle moves left"), latent_frames=3,
                            image=tmp_path / "first.png", keep_latents=True)
    with torch.no_grad():
        expected = models.vae.encode(pixels)
    torch.testing.assert_close(result.latents[:, :, :1], expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- decoding


def test_async_decode_equals_sync(preset, models):
    schedule = PromptSchedule.from_list([{"start": 0, "prompt": "a red circle moves left"},
                                         {"frame": 9, "prompt": "a blue square moves up", "shot": True}])
    runs = {}
    for async_decode in (True, False):
        cfg = preset.inference.model_copy(update={"async_decode": async_decode})
        runs[async_decode] = generate_video(models, preset, schedule, latent_frames=6, inference=cfg,
                                            keep_frames=True, keep_latents=True)
    a, s = runs[True], runs[False]
    assert torch.equal(a.latents, s.latents)
    assert a.frames.shape == (1 + 4 * 5, 64, 64, 3) and np.array_equal(a.frames, s.frames)
    from longlive.data.video_io import tensor_to_frames
    from longlive.inference.fast_vae import FastStreamingDecoder

    assert preset.inference.vae_decoder == "fast"
    with torch.no_grad():  # and both equal decoding the whole latent video at once, with the same decoder
        whole = FastStreamingDecoder(models.vae).decode(a.latents)
        reference = models.vae.decode(a.latents)  # diffusers' modules: the same frames up to float rounding
    assert np.array_equal(tensor_to_frames(whole[0]), a.frames)
    diff = np.abs(tensor_to_frames(reference[0]).astype(int) - a.frames.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert [b["block"] for b in a.timings["blocks"]] == [0, 1, 2] and all("decode_s" in b for b in a.timings["blocks"])


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_interrupted_generation_leaves_the_previous_video(preset, models, tmp_path, monkeypatch, fault):
    """Ctrl-C (or a crash) after some blocks were encoded: the error propagates, the half-written mp4 is removed,
    and what was at --out before (an earlier video and its timings) is untouched."""
    out = tmp_path / "video.mp4"
    out.write_bytes(b"the previous video")
    timings_path(out).write_text("{}")
    real_stream = StreamingPipeline.stream

    def stream(self, *args, **kwargs):
        for block in real_stream(self, *args, **kwargs):
            yield block
            if block.plan.index == 2:
                raise fault()

    monkeypatch.setattr(StreamingPipeline, "stream", stream)
    with pytest.raises(fault):
        generate_video(models, preset, PromptSchedule.single("a red circle moves left"), latent_frames=12, out=out)
    assert out.read_bytes() == b"the previous video" and timings_path(out).read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.json", "video.mp4"]  # no temporary file left


# ----------------------------------------------------------------------------- CLI


def test_cli_generate_writes_mp4_and_timings(preset, models, tmp_path, capsys):
    base = tmp_path / "base"
    models.vae.save_pretrained(base / "vae")
    models.text.save(base / "text")
    save_dit(models.dit, base / "dit")
    (tmp_path / "schedule.yaml").write_text(
        "- {start: 0, prompt: a red circle moves left}\n- {start: 1, prompt: a green square moves up, shot: true}\n"
    )
    out = tmp_path / "out" / "video.mp4"
    rc = main(["generate", "--prompt-schedule", str(tmp_path / "schedule.yaml"), "--seconds", "2",
               "--out", str(out), "--base", str(base), "--preset", "tiny", "--set", "guidance_scale=3"])
    assert rc == 0 and out.is_file()
    timings = json.loads(timings_path(out).read_text())
    frames = read_mp4(out)
    assert frames.shape == (timings["pixel_frames"], 64, 64, 3) and timings["pixel_frames"] >= 16
    for key in ("first_block_latency_s", "generated_fps", "total_s", "denoise_s", "decode_s", "max_cache_bytes"):
        assert timings[key] > 0, key
    assert timings["inference"]["guidance_scale"] == 3
    assert [s[0] for s in timings["schedule"]] == [0, 13]  # 1 s = pixel 8 -> latent 3 -> the block at latent 4
    assert all({"denoise_s", "cache_s", "decode_s"} <= set(b) for b in timings["blocks"])
    assert "wrote" in capsys.readouterr().out

    import imageio.v3 as iio

    iio.imwrite(tmp_path / "first.png", np.full((64, 64, 3), 40, np.uint8))
    save_dit(models.dit, tmp_path / "ar" / "dit")  # a train_ar export: its ar_config.json sets the layout
    (tmp_path / "ar" / "ar_config.json").write_text(json.dumps(
        {"i2v": True, "independent_first_frame": True, "block_frames": 1, "denoising_steps": [1000, 500],
         "timestep_shift": 2.0}))
    rc = main(["generate", "--prompt", "a red circle moves left", "--image", str(tmp_path / "first.png"),
               "--seconds", "1", "--out", str(tmp_path / "i2v.mp4"), "--base", str(base), "--preset", "tiny",
               "--checkpoint", str(tmp_path / "ar" / "dit")])
    timings = json.loads(timings_path(tmp_path / "i2v.mp4").read_text())
    assert rc == 0 and read_mp4(tmp_path / "i2v.mp4").shape[0] == timings["pixel_frames"] == 9
    assert timings["inference"]["block_frames"] == 1 and timings["inference"]["denoising_steps"] == [1000, 500]
    assert [b["frames"] for b in timings["blocks"]] == [1, 1, 1]
    assert main(["generate", "--prompt", "x", "--seconds", "1", "--out", str(tmp_path / "bad.mp4"),
                 "--base", str(base), "--set", "sink_frames=-1"]) == 2
