"""cuDNN FP8 attention: ``kernels/fp8_sdpa.py`` against ``kernels/fp8_sdpa_ref.py``, the reference against float32
attention, the per-tensor quantizer, and the fast path's use of them.

* ``kernels/fp8_quant.quantize_tensor`` (Triton) equals ``fp8_quant_ref.quantize_tensor`` bit for bit, in the
  interpreter on CPU tensors and on a GPU, on strided cache views and an all-zero tensor (floored amax).
* The reference against exact attention: QUANT_FRO is the price of per-tensor E4M3 q, k, v and P (measured
  5-9% of the output's norm on random RMS-normed q, k at head_dim 16-128: E4M3 k alone 7%, q 5%, v 3%, P 1%;
  the Triton kernel's INT8 q.k formats: 2-4% on the same inputs).
* On a GPU with cudnn-frontend, cuDNN's engine against the reference within KERNEL_FRO: both see the same codes;
  cuDNN rounds P against the running max of the key tiles seen so far, the reference against the final one.
* ``FusedAttentionCore(fp8_attention="cudnn")`` runs the reference on CPU tensors and SDPA for masked calls;
  ``inference.fp8_attention`` takes off / triton / cudnn (and the old booleans).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from longlive_kernels import fp8_quant_ref, fp8_sdpa_ref as ref
from longlive.inference import optimize
from longlive.models.attention import KVCache
from longlive.models.dit import AttentionCore

QUANT_FRO = 0.1  # reference vs float32 attention, ||diff|| / ||exact|| (measured 5-9%: E4M3 q and k cost the most)
KERNEL_FRO = 4e-2  # cuDNN vs reference (small shapes)
WAN_RATIO, WAN_FRO = 2.0, 0.15  # at Wan2.2-5B's shape: cuDNN's error vs float32 against the reference's
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="runs the kernel on CPU tensors in Triton's interpreter")


def _cudnn_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from longlive_kernels.fp8_sdpa import unavailable_reason

    return unavailable_reason() is None


needs_cudnn_fp8 = pytest.mark.skipif(not _cudnn_ready(), reason="needs a Hopper+ GPU and nvidia-cudnn-frontend")


def randn(*shape, seed=0, device="cpu", dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def qkv(B, Sq, Sk, H, D, seed=0, device="cpu", dtype=torch.float32):
    # q, k RMS-normed per token as the DiT's norm_q / norm_k leave them (logits of O(1), a peaked softmax)
    q, k = (F.rms_norm(randn(B, S, H, D, seed=seed + i), (D,)) * 2.0 for i, S in ((0, Sq), (1, Sk)))
    return q.to(device, dtype), k.to(device, dtype), randn(B, Sk, H, D, seed=seed + 2, device=device, dtype=dtype)


def exact(q, k, v):
    return F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def fro(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_reference_against_float32_attention():
    for shape in [(2, 40, 70, 3, 32), (1, 64, 256, 2, 64), (1, 17, 5, 1, 16), (1, 32, 600, 2, 128)]:
        q, k, v = qkv(*shape)
        out = ref.fp8_sdpa(q, k, v)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert fro(out, exact(q, k, v)) < QUANT_FRO, shape


def test_reference_quantizer_is_per_tensor_e4m3():
    x = randn(2, 33, 3, 32, seed=3) * 5
    codes, scale = fp8_quant_ref.quantize_tensor(x)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and scale.shape == (1,)
    assert float(scale) == pytest.approx(float(x.abs().max()) / 448, rel=1e-6)
    assert codes.float().abs().max() == 448  # the largest element maps to E4M3's largest value
    back = codes.float() * scale
    assert (back - x).abs().le(x.abs() * 2**-4 + scale * 2**-9).all()  # 3 mantissa bits (+ the subnormal step)
    zero_codes, zero_scale = fp8_quant_ref.quantize_tensor(torch.zeros(1, 4, 8))
    assert not zero_codes.float().any() and torch.isfinite(zero_scale).all() and zero_scale > 0


@needs_interpreter
def test_tensor_quantizer_kernel_equals_the_reference_bit_for_bit():
    from longlive_kernels.fp8_quant import quantize_tensor

    buf = randn(2, 50, 3, 16, seed=4) * 7
    cases = [buf[:, 3:40], randn(1, 37, 40, seed=5), torch.zeros(1, 6, 2, 16), randn(2, 9, 3, 16, seed=6).transpose(1, 2)]
    for x in cases:
        a, sa = quantize_tensor(x)
        b, sb = fp8_quant_ref.quantize_tensor(x)
        assert a.shape == x.shape and a.is_contiguous()
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb)


def test_tensor_quantizer_refuses_other_ranks():
    from longlive_kernels.fp8_quant import quantize_tensor

    with pytest.raises(ValueError, match=r"\(B, S, C\) or \(B, S, H, D\)"):
        quantize_tensor(torch.zeros(4, 4))


def test_fused_core_uses_the_reference_on_cpu_and_sdpa_when_masked():
    from longlive.models.rope import rope_freqs

    q, k, v = qkv(1, 32, 32, 2, 32, seed=11)
    rope = rope_freqs(32, torch.arange(2), 4, 4)
    core, plain = optimize.FusedAttentionCore(fp8_attention="cudnn"), AttentionCore()
    qr, kr = plain.rotate(q, *rope), plain.rotate(k, *rope)
    assert torch.equal(core(q, k, v, rope=rope), ref.fp8_sdpa(qr, kr, v))
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    assert torch.equal(core(q, k, v, rope=rope, mask=mask), plain(q, k, v, rope=rope, mask=mask))
    caches = [KVCache(1) for _ in range(2)]  # the cache is written exactly as by the plain core
    for cache, c in zip(caches, (core, plain)):
        with cache.writing():
            c(q, k, v, rope=rope, kv_cache=cache, layer=0)
    assert all(torch.equal(a, b) for a, b in zip(caches[0].held(0), caches[1].held(0)))


def test_fp8_attention_modes_in_config_and_optimize():
    from longlive.config import DiTConfig, InferenceConfig, ConfigError, load_preset
    from longlive.models.dit import WanDiT

    base = load_preset("tiny").inference.model_dump()
    assert InferenceConfig(**{**base, "fp8_attention": True}).fp8_attention == "triton"
    assert InferenceConfig(**{**base, "fp8_attention": False}).fp8_attention == "off"
    assert InferenceConfig(**{**base, "fp8_attention": "cudnn"}).fp8_attention == "cudnn"
    with pytest.raises(Exception, match="fp8_attention"):
        InferenceConfig(**{**base, "fp8_attention": "fa3"})
    cfg = DiTConfig(num_layers=2, dim=64, num_heads=2, ffn_dim=128, freq_dim=32, patch_size=(1, 2, 2))
    dit = WanDiT(cfg, 4, 32)
    assert optimize.optimize(dit, fp8_attention="cudnn")["fp8_attention"] == "cudnn"  # CPU: the reference, no check
    assert all(b.attn1.core.fp8_attention == "cudnn" and b.attn2.core.fp8_attention == "off" for b in dit.blocks)
    with pytest.raises(ValueError, match="fp8_attention must be one of"):
        optimize.FusedAttentionCore(fp8_attention="fa3")
    assert ConfigError  # imported for the preset loader's error type


def test_unavailable_reason_names_what_is_missing():
    from longlive_kernels.fp8_sdpa import unavailable_reason

    if not torch.cuda.is_available():
        assert unavailable_reason() == "no CUDA device"
    assert unavailable_reason("cpu")  # never None for a CPU device


@needs_cudnn_fp8
@pytest.mark.parametrize("shape", [(1, 200, 700, 4, 128), (2, 64, 129, 3, 64)])
def test_cudnn_against_reference(shape):
    from longlive_kernels.fp8_sdpa import fp8_sdpa

    q, k, v = qkv(*shape, device="cuda", dtype=torch.bfloat16)
    out = fp8_sdpa(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert fro(out, ref.fp8_sdpa(q, k, v)) < KERNEL_FRO
    assert fro(out, exact(q, k, v)) < QUANT_FRO


@needs_cudnn_fp8
def test_cudnn_at_wan_shape_on_cache_views():
    """Wan2.2-5B's steady block (7040 queries over 28160 keys, 24 heads of 128; a quarter of the heads), k and v
    views of a larger (B, capacity, H, D) buffer as the KV cache hands them; the quantizer bit-exact on them.

    At 28160 keys the kernel and the reference round P against different maxima (cuDNN's running max, rescaled
    lazily, against the final one), so their FP8 errors are of one size but independent: on an H200 the two
    differed by 12% while each is a few percent from float32 (random inputs: 6.0% and 5.4%,
    benchmarks/results/fp8_attention_h200.md). So both are held against float32: the kernel's error within
    WAN_RATIO of the reference's (a wrong scale, tile or layout costs O(1))."""
    from longlive_kernels.fp8_quant import quantize_tensor
    from longlive_kernels.fp8_sdpa import fp8_sdpa

    q, k, v = qkv(1, 7040, 28160 + 500, 6, 128, device="cuda", dtype=torch.bfloat16)
    k, v = k[:, 100:100 + 28160], v[:, 100:100 + 28160]
    for x in (q, k, v):
        a, b = quantize_tensor(x), fp8_quant_ref.quantize_tensor(x)
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])
    out = fp8_sdpa(q, k, v)
    assert torch.isfinite(out).all()
    n = 1024
    truth = exact(q[:, :n].float(), k.float(), v.float())
    kernel_err, ref_err = fro(out[:, :n], truth), fro(ref.fp8_sdpa(q[:, :n], k, v), truth)
    assert kernel_err < WAN_RATIO * ref_err and kernel_err < WAN_FRO, (kernel_err, ref_err)
