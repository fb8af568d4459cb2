"""Fused Triton kernels of the real-time path against their plain-PyTorch references.

* ``kernels/rope.py`` == ``kernels/rope_ref.py`` (== ``longlive.models.rope.apply_rope`` bit for bit);
* ``kernels/adaln.py`` == ``kernels/adaln_ref.py`` (== the arithmetic of ``longlive.models.dit.Block``);
* ``kernels/fp8_quant.py`` == ``kernels/fp8_quant_ref.py`` bit for bit (codes and scales);
* ``kernels/channel_rmsnorm.py`` == ``kernels/channel_rmsnorm_ref.py`` (== diffusers' ``WanRMS_norm`` [+ SiLU]).

On a machine without a GPU they run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with a GPU, on it. Shapes are small and odd (token counts and channel counts that
are not multiples of any tile, strided views, batch 2, per-frame and per-sample modulation).
"""

import os

import pytest
import torch

import torch.nn.functional as F

from longlive_kernels import adaln, adaln_ref, channel_rmsnorm, channel_rmsnorm_ref, fp8_quant, fp8_quant_ref, rope, rope_ref
from longlive.models import rope as model_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU these tests need Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def close(got, ref, dtype):
    """float32: a few float32 ulps of the output's scale (FMA contraction, order of sums); lower precisions:
    at most one rounding step of that dtype apart, element by element."""
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape and torch.isfinite(got).all()
    if dtype == torch.float32:
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6
    else:
        ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=torch.finfo(dtype).tiny)
        assert bool(((got - ref).abs() <= ulp + 1e-6).all()), float((got - ref).abs().max())


# ----------------------------------------------------------------------------- RoPE


def test_rope_reference_is_the_model_rope():
    x = randn(2, 15, 3, 12, seed=1)
    cos, sin = model_rope.rope_freqs(12, torch.tensor([0, 3, 4]), 5, 1)
    assert torch.equal(rope_ref.apply_rope(x.cpu(), cos, sin), model_rope.apply_rope(x.cpu(), cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,frames,h,w,heads,head_dim", [(1, 3, 5, 3, 3, 12), (2, 2, 3, 7, 5, 24), (1, 1, 1, 1, 1, 6)])
def test_rope_kernel_matches_reference(dtype, B, frames, h, w, heads, head_dim):
    S = frames * h * w
    x = randn(B, S, heads, head_dim, seed=S + heads, dtype=dtype)
    cos, sin = model_rope.rope_freqs(head_dim, torch.arange(2, 2 + frames) * 3, h, w, device=DEVICE)
    close(rope.apply_rope(x, cos, sin), rope_ref.apply_rope(x, cos, sin), dtype)
    # one table per sample, (B, S, 1, head_dim / 2)
    cos_b, sin_b = model_rope.rope_freqs(head_dim, torch.stack([torch.arange(frames) + i for i in range(B)]), h, w,
                                         device=DEVICE)
    close(rope.apply_rope(x, cos_b, sin_b), rope_ref.apply_rope(x, cos_b, sin_b), dtype)


def test_rope_kernel_reads_a_strided_cache_view():
    """Keys are a slice of a preallocated (B, capacity, heads, head_dim) buffer: batch stride != S * C."""
    buf = randn(2, 40, 3, 12, seed=7, dtype=torch.bfloat16)
    k = buf[:, :33]
    cos, sin = model_rope.rope_freqs(12, torch.arange(11), 3, 1, device=DEVICE)
    out = rope.apply_rope(k, cos, sin)
    assert out.is_contiguous()
    close(out, rope_ref.apply_rope(k.contiguous(), cos, sin), torch.bfloat16)


def test_rope_kernel_rejects_bad_tables():
    x = randn(1, 6, 2, 8)
    cos, sin = model_rope.rope_freqs(8, torch.arange(2), 3, 1, device=DEVICE)
    with pytest.raises(ValueError, match="cos/sin must be"):
        rope.apply_rope(x[:, :5], cos, sin)


# ----------------------------------------------------------------------------- LayerNorm + adaLN, gated residual


def mods(B, f, D, seed):
    scale, shift, gate = (randn(B, f, 1, D, seed=seed + i, scale=0.5) for i in range(3))
    return scale, shift, gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,f,frame_tokens,D", [(1, 3, 5, 48), (2, 1, 7, 72), (2, 4, 3, 200)])
def test_layernorm_modulate_matches_reference(dtype, B, f, frame_tokens, D):
    x = randn(B, f * frame_tokens, D, seed=D, dtype=dtype, scale=3.0) + 0.7
    scale, shift, _ = mods(B, f, D, seed=f)
    close(adaln.layernorm_modulate(x, scale, shift), adaln_ref.layernorm_modulate(x, scale, shift), dtype)
    # affine LayerNorm without modulation (the cross-attention norm), and with both
    w, b = randn(D, seed=3) + 1, randn(D, seed=4)
    close(adaln.layernorm_modulate(x, weight=w, bias=b), adaln_ref.layernorm_modulate(x, weight=w, bias=b), dtype)
    close(adaln.layernorm_modulate(x, scale, shift, weight=w, bias=b),
          adaln_ref.layernorm_modulate(x, scale, shift, weight=w, bias=b), dtype)
    # a batch-1 modulation broadcast over a batch of 2 (CFG batches share one timestep)
    if B == 2:
        close(adaln.layernorm_modulate(x, scale[:1], shift[:1]), adaln_ref.layernorm_modulate(x, scale[:1], shift[:1]), dtype)


def test_layernorm_modulate_reference_is_the_block_arithmetic():
    """Block.forward: (_frames(norm1(x), f) * (1 + scale) + shift).flatten(1, 2).type_as(x)."""
    from longlive.models.dit import LayerNorm32

    x = randn(2, 12, 16, seed=5, dtype=torch.bfloat16).cpu()
    scale, shift, gate = (t.cpu() for t in mods(2, 3, 16, seed=9))
    norm = LayerNorm32(16, 1e-6, elementwise_affine=False)
    want = (norm(x).unflatten(1, (3, -1)) * (1 + scale) + shift).flatten(1, 2).type_as(x)
    assert torch.equal(adaln_ref.layernorm_modulate(x, scale, shift), want)
    h = randn(2, 12, 16, seed=6, dtype=torch.bfloat16).cpu()
    want = (x.float().unflatten(1, (3, -1)) + h.unflatten(1, (3, -1)) * gate).flatten(1, 2).type_as(x)
    assert torch.equal(adaln_ref.gated_residual(x, h, gate), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,f,frame_tokens,D", [(1, 3, 5, 48), (2, 1, 7, 72), (2, 4, 3, 200)])
def test_gated_residual_matches_reference(dtype, B, f, frame_tokens, D):
    x = randn(B, f * frame_tokens, D, seed=D + 1, dtype=dtype)
    h = randn(B, f * frame_tokens, D, seed=D + 2, dtype=dtype, scale=2.0)
    _, _, gate = mods(B, f, D, seed=2 * f)
    close(adaln.gated_residual(x, h, gate), adaln_ref.gated_residual(x, h, gate), dtype)
    # h in float32 while x is bf16 (the FFN branch), and a non-contiguous x
    xt = randn(B, D, f * frame_tokens, seed=1, dtype=dtype).transpose(1, 2)
    close(adaln.gated_residual(xt, h.float(), gate), adaln_ref.gated_residual(xt, h.float(), gate), dtype)


def test_adaln_kernels_reject_bad_modulation():
    x = randn(1, 10, 16)
    with pytest.raises(ValueError, match="scale must be"):
        adaln.layernorm_modulate(x, randn(1, 3, 1, 16), randn(1, 3, 1, 16))
    with pytest.raises(ValueError, match="together"):
        adaln.layernorm_modulate(x, randn(1, 2, 1, 16), None)


# ----------------------------------------------------------------------------- FP8 row-wise quantization


def fp8_data(R, K, seed, dtype):
    x = randn(R, K, seed=seed, dtype=torch.float32) * torch.logspace(-3, 3, R, device=DEVICE)[:, None]
    x[0] = 0.0  # an all-zero row
    if R > 2:  # subnormal codes, ties and -0.0 in row 2: values k * 2**-10 * amax / 448 for small k
        x[2, :16] = torch.arange(-8, 8, device=DEVICE) * 2.0**-10
        x[2, 16 % K] = 448.0
        x[2, 17 % K] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,K", [(5, 16), (7, 100), (3, 300), (1, 1)])
def test_fp8_quantize_kernel_is_bit_exact(dtype, R, K):
    x = fp8_data(R, K, seed=R * K, dtype=dtype)
    codes, scales = fp8_quant.quantize_rows(x)
    ref_codes, ref_scales = fp8_quant_ref.quantize_rows(x)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scales, ref_scales)
    deq = fp8_quant_ref.dequantize_rows(codes, scales)
    assert float((deq - x.float()).abs().max()) <= float(x.float().abs().max()) * 2**-4  # E4M3: 3 mantissa bits


def test_fp8_quantize_reference_covers_every_code():
    """Every finite E4M3 value times a power of two survives a round trip (no double rounding)."""
    all_codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    values = all_codes.float()
    finite = values[torch.isfinite(values)]
    x = finite[None].repeat(2, 1).to(DEVICE) * torch.tensor([[1.0], [2.0**-20]], device=DEVICE)
    for impl in (fp8_quant_ref, fp8_quant):
        codes, scales = impl.quantize_rows(x)
        assert torch.equal(fp8_quant_ref.dequantize_rows(codes, scales), x)


# ----------------------------------------------------------------------------- the VAE's channel RMS norm


def test_channel_rmsnorm_reference_is_the_diffusers_module():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    for images, shape in ((False, (2, 12, 3, 5, 7)), (True, (3, 12, 5, 7))):
        norm = WanRMS_norm(12, images=images, bias=True)
        with torch.no_grad():
            norm.gamma.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(1))
            norm.bias.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(2))
        norm = norm.to(torch.bfloat16)
        x = randn(*shape, seed=3, dtype=torch.bfloat16).cpu()
        assert torch.equal(channel_rmsnorm_ref.rms_norm(x, norm.gamma, norm.bias), norm(x))
        assert torch.equal(channel_rmsnorm_ref.rms_norm(x, norm.gamma, norm.bias, silu=True), F.silu(norm(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 12, 3, 5, 7), (2, 40, 2, 3, 3), (3, 9, 5, 7)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_channel_rmsnorm_kernel_matches_reference(dtype, shape, bias, silu):
    C = shape[1]
    x = randn(*shape, seed=C, dtype=dtype, scale=2.0)
    x[0, :, 0] = 0.0  # all-zero positions: the eps of F.normalize
    ones = (1,) * (len(shape) - 2)  # diffusers' (C, 1, 1, 1) for videos, (C, 1, 1) for images
    gamma = (randn(C, *ones, seed=1, scale=0.2) + 1).to(dtype)
    b = randn(C, *ones, seed=2, scale=0.2).to(dtype) if bias else 0.0
    got = channel_rmsnorm.rms_norm(x, gamma, b, silu=silu)
    ref = channel_rmsnorm_ref.rms_norm(x, gamma, b, silu=silu)
    if dtype == torch.float32:
        close(got, ref, dtype)
    else:  # the reference rounds to bf16 after the norm, each product and the SiLU; the kernel once
        err = (got.float() - ref.float()).abs()
        assert bool((err <= 4 * torch.finfo(dtype).eps * ref.float().abs() + 1e-2).all()), float(err.max())
