"""The Wan2.2 loader against diffusers' own WanTransformer3DModel (the reference).

A small random diffusers model is saved with ``save_pretrained`` (single file and sharded), loaded
with ``load_wan_transformer``, and both forwards are compared in float32 to ATOL = 1e-5.
"""

import json

import pytest
import torch

from longlive.config import DiTConfig
from longlive.models.wan_adapter import (
    dit_config_from_diffusers,
    from_diffusers_state_dict,
    load_dit,
    load_wan_transformer,
    save_dit,
    to_diffusers_state_dict,
)

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5
KWARGS = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
    text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**KWARGS).eval()


@pytest.fixture(scope="module")
def saved(reference, tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    reference.save_pretrained(single)
    reference.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return {"single": single, "sharded": sharded}


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)  # 3 frames of 2 x 3 tokens
    context = torch.randn(2, 7, 24, generator=g)
    t_frames = torch.tensor([[0.0, 500.0, 900.0], [100.0, 100.0, 700.0]])
    return x, context, t_frames


def _reference(reference, x, t, context):
    return reference(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_matches_diffusers(reference, saved, layout):
    model = load_wan_transformer(saved[layout]).eval()
    x, context, t_frames = _inputs()
    with torch.no_grad():
        t = torch.tensor([999.0, 250.0])
        torch.testing.assert_close(model(x, t, context), _reference(reference, x, t, context), atol=ATOL, rtol=0)
        # Wan2.2 TI2V's per-token timesteps, expanded from our per-frame ones (6 tokens per frame)
        per_token = t_frames.repeat_interleave(6, dim=1)
        ours = model(x, t_frames, context)
        torch.testing.assert_close(ours, _reference(reference, x, per_token, context), atol=ATOL, rtol=0)


def test_key_round_trip(reference):
    sd = reference.state_dict()
    ours = from_diffusers_state_dict(sd)
    assert "blocks.0.ffn.linear_1.weight" in ours and "time_proj.weight" in ours
    assert "blocks.1.attn2.to_out.weight" in ours
    assert to_diffusers_state_dict(ours).keys() == sd.keys()


def test_config_from_diffusers(reference):
    spec = dit_config_from_diffusers(dict(reference.config))
    assert spec.dit.dim == 32 and spec.dit.num_heads == 2 and spec.dit.patch_size == (1, 2, 2)
    assert (spec.in_channels, spec.text_dim, spec.out_channels) == (16, 24, 16)
    for bad, match in [
        ({"image_dim": 1280}, "image_dim"),
        ({"added_kv_proj_dim": 5120}, "added_kv_proj_dim"),
        ({"qk_norm": "rms_norm"}, "qk_norm"),
    ]:
        with pytest.raises(ValueError, match=match):
            dit_config_from_diffusers({**reference.config, **bad})


def test_save_dit_round_trip(reference, saved, tmp_path):
    model = load_wan_transformer(saved["single"], dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32  # kept in fp32, as diffusers does
    assert model.time_embedder.linear_1.weight.dtype == torch.float32
    out = save_dit(model, tmp_path / "ckpt")
    save_dit(model, out)  # overwriting replaces the directory
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # no temp dirs left behind
    again = load_dit(out)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_diffusers_reads_save_dit(saved, tmp_path):
    """Our checkpoint is a diffusers directory: its config builds the model and the weights load strictly.

    (``from_pretrained`` itself needs ``accelerate``, which this environment lacks.)
    """
    from safetensors.torch import load_file

    model = load_wan_transformer(saved["single"]).eval()
    out = save_dit(model, tmp_path / "ckpt")
    config = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if not k.startswith("_")}
    theirs = diffusers.WanTransformer3DModel(**config).eval()
    theirs.load_state_dict(load_file(out / "diffusion_pytorch_model.safetensors"), strict=True)
    x, context, _ = _inputs()
    t = torch.tensor([30.0, 600.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context), _reference(theirs, x, t, context), atol=ATOL, rtol=0)


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_wan_transformer(tmp_path / "nope")


def test_missing_config_and_weights(saved, tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_wan_transformer(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text((saved["single"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_wan_transformer(tmp_path / "a")


def test_truncated_weights(saved, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "config.json").write_text((saved["single"] / "config.json").read_text())
    data = (saved["single"] / "diffusion_pytorch_model.safetensors").read_bytes()
    (d / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read .*diffusion_pytorch_model.safetensors"):
        load_wan_transformer(d)


def test_missing_shard(saved, tmp_path):
    import shutil

    d = tmp_path / "s"
    shutil.copytree(saved["sharded"], d)
    shard = sorted(d.glob("*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_wan_transformer(d)


def test_config_differs_from_expect(saved):
    spec = dit_config_from_diffusers(json.loads((saved["single"] / "config.json").read_text()))
    load_wan_transformer(saved["single"], expect=spec.dit)  # matches
    expect = DiTConfig(**{**spec.dit.model_dump(), "num_layers": 4})
    with pytest.raises(ValueError, match="num_layers is 2 in the checkpoint but 4 expected"):
        load_wan_transformer(saved["single"], expect=expect)


def test_key_and_shape_mismatch(saved, tmp_path):
    config = json.loads((saved["single"] / "config.json").read_text())
    weights = (saved["single"] / "diffusion_pytorch_model.safetensors").read_bytes()
    for name, change, match in [
        ("layers", {"num_layers": 3}, r"missing keys: blocks\.2\."),
        ("layers", {"num_layers": 1}, r"unexpected keys: blocks\.1\."),
        ("ffn", {"ffn_dim": 48}, r"shape mismatch: blocks\.0\.ffn\.linear_1\.bias: \[64\]"),
    ]:
        d = tmp_path / f"{name}-{change}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**config, **change}))
        (d / "diffusion_pytorch_model.safetensors").write_bytes(weights)
        with pytest.raises(ValueError, match=match):
            load_wan_transformer(d)
