"""The NVFP4 checkpoint of the quantize stage: a saved and reloaded model computes exactly what the converted
model computed (packed weights used as stored), incomplete checkpoints are refused, KV bytes per frame."""

import pytest
import torch

from longlive.config import DiTConfig, QuantConfig
from longlive.models.dit import WanDiT
from longlive.quant.checkpoint import QUANT_FILE, is_nvfp4_checkpoint, load_nvfp4_dit, save_nvfp4_dit
from longlive.quant.convert import convert_to_nvfp4
from longlive.quant.export import kv_bytes_per_frame
from longlive.quant.linear import NVFP4Linear


def test_nvfp4_checkpoint_roundtrip_is_exact(tmp_path):
    m = WanDiT(DiTConfig(num_layers=2, dim=64, num_heads=2, ffn_dim=128, freq_dim=32, patch_size=(1, 2, 2)), 4, 16)
    m.init_weights(0)
    torch.nn.init.normal_(m.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    g = torch.Generator().manual_seed(2)
    x, t, c = torch.randn(1, 4, 3, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        ref = m(x, t, c)
        cfg = QuantConfig(backend="emulated")
        report = convert_to_nvfp4(m, cfg)
        quantized = m(x, t, c)
        save_nvfp4_dit(m, tmp_path / "q", cfg, report)
        assert is_nvfp4_checkpoint(tmp_path / "q")
        loaded = load_nvfp4_dit(tmp_path / "q", backend="emulated")
        assert sum(isinstance(mod, NVFP4Linear) for mod in loaded.modules()) == len(report.quantized) > 0
        assert torch.equal(loaded(x, t, c), quantized)
    rel = float((quantized - ref).norm() / ref.norm())
    print(f"NVFP4 W4A4 micro DiT relative error vs fp32: {rel:.4f}")
    assert 0 < rel < 0.15
    (tmp_path / "q" / QUANT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not a complete NVFP4 checkpoint"):
        load_nvfp4_dit(tmp_path / "q")


def test_kv_bytes_per_frame_at_tiny_and_wan_sizes():
    for layers, tokens, heads, head_dim in ((4, 16, 4, 32), (30, 880, 24, 128)):
        bf16, nvfp4 = kv_bytes_per_frame(layers, tokens, heads, head_dim)
        assert bf16 == 2 * layers * tokens * heads * head_dim * 2
        assert nvfp4 <= 0.30 * bf16, (layers, nvfp4 / bf16)
