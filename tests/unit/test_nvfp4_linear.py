"""NVFP4 linear layers and model conversion: backends agree with ``emulated``, the emulated layer is the
W4A4 definition, layer selection by config, weight bytes, and clear errors for unavailable backends.

Tolerances: ``triton`` (run on the CPU under TRITON_INTERPRET=1) vs ``emulated``: max |diff| <=
1e-5 x max |y| in float32 (same quantized operands; only the order of float32 additions differs).
The Triton kernels run in Triton's CPU interpreter (tests/conftest.py turns it on without a GPU).
``native`` needs FP4 tensor cores and ``transformer_engine`` TE: off the CPU, they are checked for
their error messages here and numerically on the device (see benchmarks/nvfp4_linear.py).
"""

import copy
import os

import pytest
import torch
from torch import nn

from longlive.config import DiTConfig, QuantConfig, load_preset
from longlive.models.dit import WanDiT
from longlive.quant import (
    NVFP4FakeQuantLinear, NVFP4Linear, apply_qat, convert_to_nvfp4, planned_weight_bytes, quantize, remove_qat,
    resolve_backend, weight_bytes,
)
from longlive.quant.convert import is_kept
from longlive.quant.linear import check_backend

TRITON_RTOL = 1e-5
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors through the Triton kernels


def micro_dit(seed=0) -> WanDiT:
    cfg = DiTConfig(num_layers=2, dim=64, num_heads=2, ffn_dim=128, freq_dim=32, patch_size=(1, 2, 2))
    m = WanDiT(cfg, in_channels=4, text_dim=16)
    m.init_weights(seed)
    with torch.no_grad():  # the zero-initialised head would make outputs trivially equal
        nn.init.normal_(m.proj_out.weight, generator=torch.Generator().manual_seed(seed + 1), std=0.05)
    return m.eval()


def dit_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 3, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 8, 16, generator=g)


def linear(k=80, n=40, bias=True, seed=0):
    m = nn.Linear(k, n, bias=bias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        if bias:
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return m


def rel_max(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("scale_rule", ["six", "four_over_six"])
@pytest.mark.parametrize("block_2d", [False, True])
def test_emulated_layer_is_the_w4a4_definition(scale_rule, block_2d):
    lin = linear(80, 48)
    x = torch.randn(3, 7, 80, generator=torch.Generator().manual_seed(1))
    q = NVFP4Linear.from_linear(lin, backend="emulated", scale_rule=scale_rule, block_2d=block_2d)
    want = (quantize(x, scale_rule=scale_rule).dequantize()
            @ quantize(lin.weight.detach(), scale_rule=scale_rule, block_2d=block_2d).dequantize().T) + lin.bias.detach()
    assert torch.equal(q(x), want)
    with torch.no_grad():
        err = float((q(x) - lin(x)).norm() / lin(x).norm())
    print(f"W4A4 relative error vs float32 ({scale_rule}, 2d={block_2d}): {err:.4f}")
    assert 0.01 < err < 0.2


@pytest.mark.skipif(not INTERPRETER, reason="runs the Triton kernels on CPU tensors (TRITON_INTERPRET=1)")
def test_triton_backend_matches_emulated():
    for k, n, m, bias in [(80, 40, 21, True), (48, 17, 5, False), (128, 64, 33, True)]:
        lin = linear(k, n, bias)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
        emu = NVFP4Linear.from_linear(lin, backend="emulated")
        tri = NVFP4Linear.from_linear(lin, backend="triton")
        for operand in ("packed", "float16"):
            tri.triton_activation = operand
            assert rel_max(tri(x), emu(x)) < TRITON_RTOL, operand
        # 4-over-6 activations go through the PyTorch quantizer, the GEMM is still the kernel
        emu46 = NVFP4Linear.from_linear(lin, backend="emulated", scale_rule="four_over_six")
        tri46 = NVFP4Linear.from_linear(lin, backend="triton", scale_rule="four_over_six")
        assert rel_max(tri46(x), emu46(x)) < TRITON_RTOL


def test_converted_model_backends_agree_and_weights_shrink():
    """A micro WanDiT converted with each CPU backend: same outputs as emulated; packed weights."""
    m = micro_dit()
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        ref = m(x, t, ctx)
    emu = copy.deepcopy(m)
    report = convert_to_nvfp4(emu, QuantConfig(backend="emulated"))
    assert report.backend == "emulated"
    assert set(report.kept) == {"time_embedder.linear_1", "time_embedder.linear_2", "time_proj",
                                "text_embedder.linear_1", "text_embedder.linear_2", "proj_out"}
    assert len(report.quantized) == 2 * 10 and all(0.05 < e < 0.15 for e in report.weight_error.values())
    assert isinstance(emu.blocks[0].attn1.to_q, NVFP4Linear) and type(emu.proj_out) is nn.Linear
    with torch.no_grad():
        out_emu = emu(x, t, ctx)
    err = float((out_emu - ref).norm() / ref.norm())
    print(f"micro DiT, NVFP4 (emulated) vs float32 output: relative error {err:.4f}")
    assert 0 < err < 0.2

    if INTERPRETER:
        tri = copy.deepcopy(m)
        convert_to_nvfp4(tri, QuantConfig(backend="triton"))
        with torch.no_grad():
            assert rel_max(tri(x, t, ctx), out_emu) < 1e-4  # kernel-vs-emulated differences pass through 2 blocks

    # state dict round trip of the packed model
    again = copy.deepcopy(m)
    convert_to_nvfp4(again, QuantConfig(backend="emulated"))
    again.load_state_dict(emu.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x, t, ctx), out_emu)


def test_weight_bytes_of_quantized_layers_and_models():
    """Quantized linears: <= 0.30x bf16 (4.5 bits per weight). Whole Wan2.2-5B DiT (built on the meta
    device; 30 layers, dim 3072, ffn 14336) with the default kept layers: <= 0.30x bf16 too. The tiny
    preset's whole model is not: its kept embedders and time_proj are a large share of a 1M-weight model."""
    p = load_preset("tiny")
    tiny = WanDiT(p.dit, p.vae.z_dim, p.text.dim)
    before, planned = weight_bytes(tiny), planned_weight_bytes(tiny, p.quant)
    convert_to_nvfp4(tiny, QuantConfig(backend="emulated"))
    assert weight_bytes(tiny) == planned
    layers = [m for m in tiny.modules() if isinstance(m, NVFP4Linear)]
    q_bytes = sum(m.weight_nvfp4().nbytes for m in layers)
    bf16_bytes = sum(m.in_features * m.out_features * 2 for m in layers)
    print(f"tiny: quantized linears {q_bytes / bf16_bytes:.3f}x bf16; whole model {planned / before:.3f}x")
    assert q_bytes <= 0.30 * bf16_bytes

    with torch.device("meta"):
        wan = WanDiT(load_preset("wan22-5b").dit, in_channels=48, text_dim=4096)
    ratio = planned_weight_bytes(wan) / weight_bytes(wan)
    print(f"Wan2.2-5B DiT: {weight_bytes(wan) / 2**30:.2f} GiB bf16 -> {planned_weight_bytes(wan) / 2**30:.2f} GiB "
          f"NVFP4 ({ratio:.3f}x)")
    assert ratio <= 0.30


def test_layer_selection_patterns():
    assert is_kept("time_embedder.linear_1", ["time_embedder"])
    assert is_kept("blocks.3.ffn.linear_2", ["blocks.*.ffn"])
    assert not is_kept("blocks.3.attn1.to_q", ["blocks.*.ffn", "proj_out"])
    m = micro_dit()
    r = convert_to_nvfp4(m, QuantConfig(backend="emulated", keep_high_precision=[
        "time_embedder", "text_embedder", "time_proj", "proj_out", "blocks.*.attn2"]))
    assert not any(".attn2." in n for n in r.quantized) and len(r.quantized) == 2 * 6
    with pytest.raises(ValueError, match="text_embedder"):
        convert_to_nvfp4(micro_dit(), QuantConfig(backend="emulated", keep_high_precision=["time_embedder"]))


def test_layers_that_cannot_be_nvfp4_fail_by_name():
    model = nn.Sequential(nn.Linear(24, 32))
    with pytest.raises(ValueError, match=r"0: in_features 24 .*quant.keep_high_precision"):
        convert_to_nvfp4(model, QuantConfig(backend="emulated", keep_high_precision=[]))
    model = nn.Sequential(nn.Linear(32, 24))
    with pytest.raises(ValueError, match="weight_block_2d"):
        convert_to_nvfp4(model, QuantConfig(backend="emulated", keep_high_precision=[], weight_block_2d=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error messages")
def test_unavailable_backends_say_what_to_use():
    assert resolve_backend("auto", "cpu") == "emulated"
    with pytest.raises(RuntimeError, match=r"compute capability >= 10.*triton.*emulated"):
        check_backend("native", "cpu")
    with pytest.raises(RuntimeError, match="transformer_engine|TransformerEngine|CUDA"):
        check_backend("transformer_engine", "cpu")
    with pytest.raises(ValueError, match="unknown NVFP4 backend"):
        resolve_backend("fp4000", "cpu")
    with pytest.raises(RuntimeError, match="compute capability"):
        NVFP4Linear.from_linear(linear(), backend="native")(torch.randn(2, 80))


# ---------------------------------------------------------------------------------------------
# QAT


def test_qat_layer_keeps_parameters_and_equals_emulated():
    m = micro_dit()
    params = {n: p for n, p in m.named_parameters()}
    keys = set(m.state_dict())
    wrapped = apply_qat(m, QuantConfig())
    assert len(wrapped) == 20 and isinstance(m.blocks[1].ffn.linear_2, NVFP4FakeQuantLinear)
    assert set(m.state_dict()) == keys
    assert all(p is params[n] for n, p in m.named_parameters()), "same Parameter objects (optimizer, EMA)"
    x = torch.randn(2, 5, 64)
    lin = m.blocks[0].attn1.to_q
    assert torch.equal(lin(x), NVFP4Linear.from_linear(lin, backend="emulated")(x))
    remove_qat(m)
    assert type(m.blocks[0].attn1.to_q) is nn.Linear and all(p is params[n] for n, p in m.named_parameters())


def test_qat_gradients_flow_and_training_reduces_the_loss():
    torch.manual_seed(0)
    m = micro_dit().train()
    apply_qat(m, QuantConfig(scale_rule="four_over_six"))
    x, t, ctx = dit_inputs(1)
    target = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        loss = (m(x, t, ctx) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, mod in m.named_modules():
                if isinstance(mod, NVFP4FakeQuantLinear):
                    assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    print(f"QAT loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]


def test_straight_through_gradient_is_the_identity():
    lin = NVFP4FakeQuantLinear.from_linear(linear(32, 16))
    x = torch.randn(4, 32, requires_grad=True)
    lin(x).sum().backward()
    wq = quantize(lin.weight.detach()).dequantize()
    torch.testing.assert_close(x.grad, torch.ones(4, 16) @ wq)  # d/dx through dq(q(x)) is the identity
    torch.testing.assert_close(lin.weight.grad, torch.ones(16, 4) @ quantize(x.detach()).dequantize())
