"""LoRA: adapters start as the identity, match the direct formula, a trained model and its merged copy
agree, merging is idempotent, and mismatched adapters are refused with a clear error.
Float32; ATOL = 1e-5 (merged vs unmerged differ in summation order only)."""

import pytest
import torch

from longlive.config import DiTConfig, LoRAConfig
from longlive.models.dit import WanDiT
from longlive.models.lora import (
    LoRAError, LoRALinear, apply_lora, has_lora, load_and_merge_adapter, load_lora_state_dict, lora_state_dict,
    merge_lora, save_adapter,
)

ATOL = 1e-5
CFG = DiTConfig(num_layers=2, dim=32, num_heads=2, ffn_dim=64, freq_dim=16, patch_size=(1, 2, 2))


def model(seed=0):
    m = WanDiT(CFG, in_channels=4, text_dim=8)
    m.init_weights(seed)
    with torch.no_grad():
        torch.nn.init.normal_(m.proj_out.weight, generator=torch.Generator().manual_seed(seed + 1), std=0.05)
    return m.eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 3, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 8, generator=g)


def trained_lora_model(rank=4):
    m = apply_lora(model(), LoRAConfig(rank=rank, alpha=8))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.up.weight.normal_(0, 0.05, generator=g)  # as if trained
    return m


def test_adapter_is_identity_at_init_and_matches_the_formula():
    base, x = model(), inputs()
    ref = base(*x)
    wrapped = apply_lora(model(), LoRAConfig(rank=4, alpha=8))
    torch.testing.assert_close(wrapped(*x), ref, atol=0, rtol=0)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".down.weight", ".up.weight")) for n in trainable)
    lin = trained_lora_model().blocks[0].attn1.to_q
    h = torch.randn(3, 32)
    direct = h @ lin.base.weight.T + lin.base.bias + (8 / 4) * (h @ lin.down.weight.T) @ lin.up.weight.T
    torch.testing.assert_close(lin(h), direct, atol=ATOL, rtol=0)
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(wrapped, LoRAConfig(rank=4, alpha=8))
    with pytest.raises(LoRAError, match="no nn.Linear"):
        apply_lora(model(), LoRAConfig(rank=4, alpha=8, targets=["attn9.to_zz"]))


def test_merged_copy_gives_the_same_output_and_merge_is_idempotent():
    m, x = trained_lora_model(), inputs(1)
    with torch.no_grad():
        before = m(*x)
        merge_lora(m)
        assert not has_lora(m) and type(m.blocks[0].attn1.to_q) is torch.nn.Linear
        after = m(*x)
        torch.testing.assert_close(after, before, atol=ATOL, rtol=0)
        weights = {k: v.clone() for k, v in m.state_dict().items()}
        merge_lora(m)  # nothing left to merge: unchanged
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in weights.items())
    assert set(weights) == set(model().state_dict()), "a merged model has the plain model's state-dict keys"


def test_adapter_roundtrip_and_mismatched_shapes_are_refused(tmp_path):
    m, x = trained_lora_model(), inputs(2)
    save_adapter(m, LoRAConfig(rank=4, alpha=8), tmp_path)
    with torch.no_grad():
        ref = m(*x)
        fresh = model()
        assert load_and_merge_adapter(fresh, tmp_path)
        torch.testing.assert_close(fresh(*x), ref, atol=ATOL, rtol=0)
    assert not load_and_merge_adapter(model(), tmp_path / "none")
    other_rank = apply_lora(model(), LoRAConfig(rank=2, alpha=8))
    with pytest.raises(LoRAError, match="shape"):
        load_lora_state_dict(other_rank, lora_state_dict(m))
    fewer = apply_lora(model(), LoRAConfig(rank=4, alpha=8, targets=["attn1.to_q"]))
    with pytest.raises(LoRAError, match="do not match"):
        load_lora_state_dict(fewer, lora_state_dict(m))
    wider = WanDiT(CFG.model_copy(update={"dim": 64, "ffn_dim": 128}), in_channels=4, text_dim=8)
    with pytest.raises(LoRAError, match="shape"):
        load_and_merge_adapter(wider, tmp_path)
