"""WanVAE: shapes, streaming decode == whole decode, diffusers-layout save/load, clear errors."""

import json

import pytest
import torch
from diffusers import AutoencoderKLWan

from longlive.config import ConfigError, load_preset
from longlive.models.vae import WanVAE, diffusers_kwargs

ATOL = 1e-5  # fp32 on CPU; the streaming path runs the same ops in the same order, so it is ~exact


@pytest.fixture(scope="module")
def cfg():
    return load_preset("tiny").vae


@pytest.fixture(scope="module")
def vae(cfg):
    torch.manual_seed(0)
    return WanVAE(cfg).eval()


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 17, 64, 64, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def latents(vae, video):
    with torch.no_grad():
        return vae.encode(video)


def test_shapes(vae, video, latents):
    assert (vae.z_dim, vae.temporal_compression, vae.spatial_compression) == (16, 4, 8)
    assert latents.shape == (1, 16, 5, 8, 8)
    with torch.no_grad():
        out = vae.decode(latents)
    assert out.shape == video.shape
    assert out.abs().max() <= 1.0
    with torch.no_grad():
        z = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(0))
    assert z.shape == latents.shape and not torch.equal(z, latents)


def test_bad_frame_count(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 8, 64, 64))


def test_decode_matches_diffusers(vae, latents):
    with torch.no_grad():
        ref = vae.model.decode(latents).sample  # identity stats: normalised == raw
        torch.testing.assert_close(vae.decode(latents), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunks", [[1, 2, 2], [1, 1, 1, 1, 1], [3, 2]])
def test_streaming_equals_whole(vae, latents, chunks):
    with torch.no_grad():
        whole = vae.decode(latents)
        dec, outs, i = vae.streaming_decoder(), [], 0
        for c in chunks:
            outs.append(dec.decode(latents[:, :, i : i + c]))
            i += c
        assert [o.shape[2] for o in outs] == [1 + 4 * (c - 1) if k == 0 else 4 * c for k, c in enumerate(chunks)]
        torch.testing.assert_close(torch.cat(outs, 2), whole, atol=ATOL, rtol=0)
        dec.reset()  # after reset the decoder starts a new video
        torch.testing.assert_close(dec.decode(latents), whole, atol=ATOL, rtol=0)


def test_two_streaming_decoders_interleave(vae, latents):
    with torch.no_grad():
        whole = vae.decode(latents)
        a, b = vae.streaming_decoder(), vae.streaming_decoder()
        outs_a, outs_b = [], []
        for i in range(latents.shape[2]):
            outs_a.append(a.decode(latents[:, :, i : i + 1]))
            outs_b.append(b.decode(latents[:, :, i : i + 1]))
        torch.testing.assert_close(torch.cat(outs_a, 2), whole, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.cat(outs_b, 2), whole, atol=ATOL, rtol=0)


def test_latent_stats_round_trip(cfg, vae, video, tmp_path):
    with torch.no_grad():
        raw = vae.encode_dist(video).mode()
        mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4))
        v = WanVAE(cfg)
        v.load_state_dict(vae.state_dict())
        v.set_latent_stats(mean, std)
        z = v.encode(video)
        torch.testing.assert_close(z, (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(v.denormalize(z), raw, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(v.decode(z), vae.decode_raw(raw), atol=ATOL, rtol=0)
        v.save_pretrained(tmp_path / "vae")
        w = WanVAE.from_pretrained(tmp_path / "vae")
        torch.testing.assert_close(w.latent_stats()[0].flatten(), mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(w.encode(video), z, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="16 values"):
        v.set_latent_stats(torch.zeros(3), torch.ones(3))


def test_save_load_round_trip(cfg, vae, latents, tmp_path):
    path = tmp_path / "vae"
    vae.save_pretrained(path)
    vae.save_pretrained(path)  # overwriting an existing save is atomic too
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]  # no temp dirs left behind
    loaded = WanVAE.from_pretrained(path, expect=cfg)
    assert set(loaded.model.state_dict()) == set(AutoencoderKLWan(**diffusers_kwargs(cfg)).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(latents), vae.decode(latents), atol=0, rtol=0)


def test_load_real_diffusers_layout(cfg, video, tmp_path):
    """A directory written by diffusers itself, with Wan-style stats and a stale config key."""
    kwargs = diffusers_kwargs(cfg)
    del kwargs["latents_mean"], kwargs["latents_std"]  # diffusers' defaults: the Wan2.1 16-channel stats
    torch.manual_seed(2)
    ref = AutoencoderKLWan(**kwargs).eval()
    ref.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae/config.json").read_text())
    config["clip_output"] = False  # present in the published Wan2.2 config, unknown to diffusers 0.42
    (tmp_path / "vae/config.json").write_text(json.dumps(config))

    vae = WanVAE.from_pretrained(tmp_path / "vae", expect=cfg)
    mean, std = (torch.tensor(ref.config[k]).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    with torch.no_grad():
        raw = ref.encode(video).latent_dist.mode()
        torch.testing.assert_close(vae.encode(video), (raw - mean) / std, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(vae.decode((raw - mean) / std), ref.decode(raw).sample, atol=ATOL, rtol=0)


def test_load_errors(cfg, vae, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WanVAE.from_pretrained(tmp_path / "nowhere")

    path = tmp_path / "vae"
    vae.save_pretrained(path)
    (path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{path}.*no diffusion_pytorch_model.safetensors"):
        WanVAE.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        WanVAE.from_pretrained(path)

    vae.save_pretrained(path)
    other = cfg.model_copy(update={"decoder_base_dim": 32})
    with pytest.raises(ConfigError, match="decoder_base_dim: .* has 24, the preset expects 32"):
        WanVAE.from_pretrained(path, expect=other)

    # weights from one size, config of another: the error names the path and the keys
    config = json.loads((path / "config.json").read_text())
    config["decoder_base_dim"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"(?s){path} does not match.*shape mismatches.*decoder.conv_in.weight: checkpoint"):
        WanVAE.from_pretrained(path)
