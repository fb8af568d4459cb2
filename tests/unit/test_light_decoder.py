"""The light causal decoder: the VAE's frame layout, block-by-block streaming equal to a whole-video decode, config
checks, checkpoints, a short distillation, and ``inference.decoder: light`` in generation (random tiny models)."""

import json

import numpy as np
import pytest
import torch

from longlive.config import ConfigError, LightDecoderConfig, load_preset
from longlive.data.encode import encode_dataset
from longlive.data.video_io import tensor_to_frames
from longlive.inference.build import build_models
from longlive.inference.generate import Models, generate_video
from longlive.inference.schedule import PromptSchedule
from longlive.models.dit import WanDiT
from longlive.models.light_decoder import LightDecoder
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE
from longlive.models.wan_adapter import save_dit
from longlive.train.light_decoder import distill_decoder
from conftest import validate_into
from tests.unit.test_config import write_params

SIZES = dict(channels=[16, 8, 8], blocks=[2, 1], spatial_upsample=[True, True], temporal_upsample=[True, True],
             patch_size=2)  # 4x8x8, the tiny VAE's compression


@pytest.fixture(scope="module")
def preset():
    p = load_preset("tiny")
    return p.model_copy(update={"light_decoder": LightDecoderConfig(**SIZES)})


@pytest.fixture(scope="module")
def light(preset) -> LightDecoder:
    torch.manual_seed(0)
    return LightDecoder(preset.light_decoder, preset.vae.z_dim).eval()


@pytest.fixture(scope="module")
def vae(preset) -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(preset.vae).eval()


def latents(frames: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, frames, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_frames_and_shape_match_the_vae(light, vae, frames):
    z = latents(frames, batch=2)
    with torch.no_grad():
        ours, theirs = light.decode(z), vae.decode(z)
    assert ours.shape == theirs.shape == (2, 3, 1 + 4 * (frames - 1), 64, 64)
    assert ours.dtype == theirs.dtype and ours.abs().max() <= 1.0


@pytest.mark.parametrize("chunks", [[1, 2, 2], [3, 2], [1, 1, 1, 1, 1], [5]])
def test_streaming_equals_whole_video(light, chunks):
    z = latents(sum(chunks), seed=1)
    with torch.no_grad():
        whole = light.decode(z)
        stream = light.streaming_decoder()
        parts, i = [], 0
        for n in chunks:
            parts.append(stream.decode(z[:, :, i : i + n]))
            i += n
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=0)
    assert [p.shape[2] for p in parts] == [1 + 4 * (chunks[0] - 1)] + [4 * n for n in chunks[1:]]


def test_two_streams_keep_their_own_memory(light):
    a, b = latents(4, seed=2), latents(4, seed=3)
    with torch.no_grad():
        sa, sb = light.streaming_decoder(), light.streaming_decoder()
        out_a = [sa.decode(a[:, :, :2]), None]
        out_b = sb.decode(b[:, :, :2])
        out_a[1] = sa.decode(a[:, :, 2:])
        torch.testing.assert_close(torch.cat(out_a, 2), light.decode(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.cat([out_b, sb.decode(b[:, :, 2:])], 2), light.decode(b), atol=1e-5, rtol=0)


def test_the_memory_is_causal(light):
    z = latents(4, seed=4)
    z2 = z.clone()
    z2[:, :, 3] += 1.0  # a change in the last latent frame leaves every earlier pixel frame alone
    with torch.no_grad():
        a, b = light.decode(z), light.decode(z2)
    assert torch.equal(a[:, :, : 1 + 4 * 2], b[:, :, : 1 + 4 * 2]) and not torch.equal(a, b)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda p: p["light_decoder"].update(patch_size=1), ["light_decoder upsamples [4, 4, 4]", "vae.compression is [4, 8, 8]"]),
        (lambda p: p["light_decoder"].update(temporal_upsample=[False, True]), ["light_decoder upsamples [2, 8, 8]", "vae.compression"]),
        (lambda p: p["light_decoder"].update(blocks=[1]), ["presets.tiny.light_decoder", "blocks needs len(channels) - 1 = 2"]),
        (lambda p: p["light_decoder"].update(channels=[16, 0, 8]), ["presets.tiny.light_decoder", "must be positive"]),
        (lambda p: p["light_decoder"]["distill"].update(gt_weight=-1), ["presets.tiny.light_decoder.distill.gt_weight"]),
        (lambda p: p["inference"].update(decoder="tiny"), ["presets.tiny.inference.decoder", "'vae' or 'light'"]),
        (lambda p: (p.pop("light_decoder"), p["inference"].update(decoder="light")), ["no light_decoder section"]),
    ],
)
def test_config_errors_name_the_keys(tmp_path, mutate, words):
    def with_section(p):
        p["light_decoder"] = {**SIZES, "distill": {"train": {"steps": 1, "batch_size": 1, "lr": 1e-3}}}
        mutate(p)

    with pytest.raises(ConfigError) as e:
        load_preset(path=write_params(tmp_path, with_section))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_shipped_presets_match_their_vae():
    for name in ("tiny", "small", "wan22-5b"):
        p = load_preset(name)
        assert p.inference.decoder == "vae" and p.light_decoder is not None and p.light_decoder.distill is not None
        assert p.light_decoder.spatial_upsampling == p.vae.spatial_compression
    assert load_preset("wan22-5b").light_decoder.channels == [256, 128, 64, 64]


def test_checkpoint_roundtrip_and_mismatch(light, preset, tmp_path):
    light.save_pretrained(tmp_path / "ld")
    loaded = LightDecoder.from_pretrained(tmp_path / "ld", expect=preset.light_decoder, latent_channels=16)
    z = latents(3, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), light.decode(z))
    other = LightDecoderConfig(**{**SIZES, "channels": [16, 8, 4]})
    with pytest.raises(ConfigError, match=r"channels: .* has \[16, 8, 8\], the preset expects \[16, 8, 4\]"):
        LightDecoder.from_pretrained(tmp_path / "ld", expect=other)
    with pytest.raises(ConfigError, match="latent_channels: .* has 16, the VAE has z_dim 48"):
        LightDecoder.from_pretrained(tmp_path / "ld", latent_channels=48)
    with pytest.raises(FileNotFoundError, match="dvc repro distill_decoder"):
        LightDecoder.from_pretrained(tmp_path / "nowhere")


def test_short_distillation_lowers_the_loss(preset, vae, synth_dir, fake_encoders, tiny_preset, tmp_path):
    encode_video, encode_text = fake_encoders  # synthetic latents with the real shapes
    encode_dataset(synth_dir, str(tmp_path / "shards"), encode_video=encode_video, encode_text=encode_text,
                   samples_per_shard=8)
    record = validate_into(str(tmp_path / "shards"), tiny_preset, tmp_path / "validate")
    vae.save_pretrained(tmp_path / "base" / "vae")
    cfg = LightDecoderConfig(**SIZES, distill={"train": {"steps": 60, "batch_size": 2, "lr": 3e-3, "log_every": 5},
                                               "eval_clips": 2, "ckpt_every": 20})
    p = preset.model_copy(update={"light_decoder": cfg,
                                  "tracking": preset.tracking.model_copy(update={"wandb_mode": "disabled"})})
    metrics = distill_decoder(p, shards_url=str(tmp_path / "shards"), synth_dir=synth_dir, base_dir=tmp_path / "base",
                              out_dir=tmp_path / "ld", work_dir=tmp_path / "work", plots_dir=tmp_path / "plots",
                              validation_report=record)
    assert metrics["loss_last"] < 0.8 * metrics["loss_first"], metrics
    assert metrics["train_clips"] == 10 and metrics["eval_clips"] == 2
    for key in ("psnr_light_vs_vae_db", "psnr_light_vs_gt_db", "psnr_vae_vs_gt_db"):
        assert np.isfinite(metrics[key]), key
    assert metrics["params_light"] < metrics["params_vae_decoder"]
    rows = json.loads((tmp_path / "plots" / "loss.json").read_text())
    assert rows[0]["step"] == 0 and {"step", "loss"} == set(rows[0])
    assert not (tmp_path / "work" / "checkpoint.pt").exists()  # resume state removed after success
    LightDecoder.from_pretrained(tmp_path / "ld", expect=cfg, latent_channels=16)


# ----------------------------------------------------------------------------- inference.decoder: light


@pytest.fixture(scope="module")
def models(preset, vae, light) -> Models:
    torch.manual_seed(0)
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    with torch.no_grad():  # a non-zero head, so generated latents depend on everything upstream
        torch.nn.init.normal_(dit.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    return Models(dit.eval(), vae, TinyTextEncoder(preset.text, seed=0), light)


def test_light_decoder_generates_the_vae_layout(preset, models):
    schedule = PromptSchedule.single("a red circle moves left")
    runs = {}
    for decoder, async_decode in (("vae", True), ("light", True), ("light", False)):
        cfg = preset.inference.model_copy(update={"decoder": decoder, "async_decode": async_decode})
        runs[decoder, async_decode] = generate_video(models, preset, schedule, latent_frames=5, inference=cfg,
                                                     keep_frames=True, keep_latents=True)
    vae_run, light_run = runs["vae", True], runs["light", True]
    assert light_run.frames.shape == vae_run.frames.shape == (1 + 4 * 5, 64, 64, 3)  # 5 -> 3 blocks of 2
    assert light_run.timings["pixel_frames"] == vae_run.timings["pixel_frames"] == 21
    assert torch.equal(light_run.latents, vae_run.latents)  # the decoder changes nothing upstream
    assert np.array_equal(light_run.frames, runs["light", False].frames)  # async == sync
    with torch.no_grad():  # block-by-block == the whole latent video at once
        whole = tensor_to_frames(models.light_decoder.decode(light_run.latents)[0])
    assert np.abs(whole.astype(int) - light_run.frames.astype(int)).max() <= 1  # uint8 rounding of equal floats


def test_missing_light_decoder_is_a_clear_error(preset, models, tmp_path):
    cfg = preset.inference.model_copy(update={"decoder": "light"})
    bare = Models(models.dit, models.vae, models.text)
    with pytest.raises(ValueError, match="no light decoder was loaded.*dvc repro distill_decoder"):
        generate_video(bare, preset, PromptSchedule.single("x"), latent_frames=1, inference=cfg)
    base = tmp_path / "base"
    models.vae.save_pretrained(base / "vae")
    models.text.save(base / "text")
    save_dit(models.dit, base / "dit")
    light_preset = preset.model_copy(update={"inference": cfg})
    with pytest.raises(FileNotFoundError, match="distill_decoder stage writes.*dvc repro distill_decoder"):
        build_models(light_preset, base, light_decoder=tmp_path / "missing")
    models.light_decoder.save_pretrained(tmp_path / "ld")
    loaded = build_models(light_preset, base, light_decoder=tmp_path / "ld")
    assert isinstance(loaded.light_decoder, LightDecoder)
    assert build_models(preset, base, light_decoder=tmp_path / "missing").light_decoder is None  # decoder: vae
