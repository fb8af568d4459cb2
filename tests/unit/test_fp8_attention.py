"""8-bit attention: ``kernels/fp8_attention.py`` against ``kernels/fp8_attention_ref.py``, the reference against
float32 attention, and the fast path's use of it.

* The quantizers (q, k: INT8 per token, k smoothed; v: E4M3 per channel, transposed) equal the reference bit
  for bit, in Triton's interpreter on CPU tensors and on a GPU.
* The attention kernel == the reference within KERNEL_FRO / KERNEL_MAX: both use the same codes and round P
  the same way, the kernel against its running max and the reference against the row's final max (the
  measured gap is 1-2% of the output's norm; a wrong tile, scale or mask is O(1)).
* The reference against exact float32 attention: QUANT_FRO is the price of the 8-bit formats (measured
  3-4% at random data, P and v's E4M3 rounding ~2.5% each, INT8 q.k ~1%; bf16 SDPA: 0.3-0.7%).
* Smoothing is exact in math: a large per-channel offset on every key leaves the output where it was,
  and without smoothing the same offset would cost far more.
* ``FusedAttentionCore(fp8_attention=True)`` runs the reference on CPU tensors, the kernel inside
  ``interpret_on_cpu``, and plain SDPA for masked calls.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from longlive_kernels import fp8_attention_ref as ref
from longlive.inference import optimize
from longlive.kernels_dispatch import interpret_on_cpu
from longlive.models.attention import KVCache
from longlive.models.dit import AttentionCore

KERNEL_FRO, KERNEL_MAX = 4e-2, 6e-2  # kernel vs reference: ||diff|| / ||ref||, max |diff| / max |ref|
QUANT_FRO = 6e-2  # reference vs float32 attention, ||diff|| / ||exact||
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="runs the kernel on CPU tensors in Triton's interpreter")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def randn(*shape, seed=0, device="cpu", dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def exact(q, k, v):
    out = F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v)))
    return out.transpose(1, 2)


def fro(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def max_rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def qkv(B, Sq, Sk, H, D, seed=0, key_offset=0.0, device="cpu", dtype=torch.float32):
    q = randn(B, Sq, H, D, seed=seed, device=device, dtype=dtype)
    k = randn(B, Sk, H, D, seed=seed + 1, device=device) + key_offset * randn(D, seed=seed + 3, device=device)
    v = randn(B, Sk, H, D, seed=seed + 2, device=device, dtype=dtype)
    return q, k.to(dtype), v


def test_reference_against_float32_attention():
    for shape in [(2, 40, 70, 3, 32), (1, 64, 256, 2, 64), (1, 17, 5, 1, 16)]:
        q, k, v = qkv(*shape)
        assert fro(ref.fp8_attention(q, k, v), exact(q, k, v)) < QUANT_FRO, shape


def test_reference_codes_dequantize_to_the_inputs():
    q, k, v = qkv(2, 33, 45, 3, 32, key_offset=4.0)
    qc, qs = ref.quantize_q(q)
    kc, ks = ref.quantize_k(k)
    vc, vs = ref.quantize_v(v)
    assert qc.dtype == kc.dtype == torch.int8 and vc.dtype == torch.float8_e4m3fn
    assert qc.shape == (2, 3, 33, 32) and qs.shape == (2, 3, 33) and kc.shape == (2, 3, 45, 32) and ks.shape == (2, 3)
    assert vc.shape == (2, 3, 32, 45) and vs.shape == (2, 3, 32)
    # INT8: within half a step of the row's scale; E4M3: within 2**-4 relative (plus its subnormal step)
    assert ((qc.float() * qs[..., None]) - q.transpose(1, 2)).abs().le(qs[..., None] / 2 + 1e-7).all()
    smoothed = k.transpose(1, 2) - ref.key_mean(k)[:, :, None]
    assert ((kc.float() * ks[..., None, None]) - smoothed).abs().le(ks[..., None, None] / 2 + 1e-6).all()
    vd = vc.float() * vs[..., None]
    vt = v.permute(0, 2, 3, 1)
    assert (vd - vt).abs().le(vt.abs() * 2**-4 + vs[..., None] * 2**-10).all()


def test_smoothing_makes_a_shared_key_offset_free():
    q, k, v = qkv(1, 48, 96, 2, 32)
    offset = 20.0 * randn(32, seed=7)
    base = ref.fp8_attention(q, k, v)
    shifted = ref.fp8_attention(q, k + offset, v)
    # softmax ignores q.offset (a constant per query row): the smoothed codes barely move
    assert fro(shifted, base) < 1e-2
    # INT8 logits alone (exact softmax and v), with and without smoothing: unsmoothed, INT8 spends its
    # range on the offset
    qc, qs = ref.quantize_q(q)

    def int8_logits_only(kc, ks):
        s = (qc.float() @ kc.float().transpose(2, 3)) * (qs[..., :, None] * ks[:, :, None, None]) * 32**-0.5
        return (torch.softmax(s, -1) @ v.transpose(1, 2)).transpose(1, 2)

    truth = exact(q, k, v)
    smoothed = fro(int8_logits_only(*ref.quantize_k(k + offset)), truth)
    raw = (k + offset).transpose(1, 2).float()
    codes, scale = ref._round_codes(raw, raw.abs().amax(dim=(2, 3), keepdim=True), ref.INT8_MAX, torch.int8)
    unsmoothed = fro(int8_logits_only(codes, scale[:, :, 0, 0]), truth)
    assert unsmoothed > 5 * smoothed


@needs_interpreter
def test_kernel_quantizers_equal_the_reference_bit_for_bit():
    from longlive_kernels import fp8_attention as kern

    x = randn(2, 37, 3, 32, seed=4) + 3 * randn(32, seed=5)
    x[0, 5] = 0.0  # an all-zero token row: the floored amax, no 0/0
    for name in ("q", "k", "v"):
        a_codes, a_scale = getattr(kern, f"quantize_{name}")(x)
        b_codes, b_scale = getattr(ref, f"quantize_{name}")(x)
        assert a_codes.dtype == b_codes.dtype and torch.equal(a_codes.view(torch.uint8), b_codes.view(torch.uint8)), name
        assert torch.equal(a_scale, b_scale), name


@needs_interpreter
@pytest.mark.parametrize("shape", [(2, 40, 70, 3, 32), (1, 33, 130, 2, 16), (1, 16, 32, 1, 64)])
def test_kernel_against_reference(shape):
    from longlive_kernels.fp8_attention import fp8_attention

    q, k, v = qkv(*shape)
    out, expected = fp8_attention(q, k, v), ref.fp8_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert fro(out, expected) < KERNEL_FRO and max_rel(out, expected) < KERNEL_MAX


@needs_interpreter
def test_kernel_reads_strided_cache_views():
    """q transposed from (B, H, S, D) and k / v as views of a larger (B, capacity, H, D) buffer, as the cache's."""
    from longlive_kernels.fp8_attention import fp8_attention

    B, Sq, Sk, H, D = 2, 20, 50, 2, 32
    q = randn(B, H, Sq, D, seed=1).transpose(1, 2)
    buf = randn(2, B, Sk + 14, H, D, seed=2)
    k, v = buf[0, :, 3:3 + Sk], buf[1, :, 3:3 + Sk]
    assert not q.is_contiguous() and not k.is_contiguous()
    out = fp8_attention(q, k, v)
    expected = ref.fp8_attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert fro(out, expected) < KERNEL_FRO


def test_bad_inputs_are_named():
    from longlive_kernels.fp8_attention import fp8_attention

    q, k, v = qkv(1, 8, 8, 2, 24)
    with pytest.raises(ValueError, match="power of 2"):
        fp8_attention(q, k, v)
    q, k, v = qkv(1, 8, 8, 2, 32)
    with pytest.raises(ValueError, match="same B, H, D"):
        fp8_attention(q, k[:, :, :1], v)
    if not INTERPRETER and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            fp8_attention(q, k, v)


def _core_inputs():
    from longlive.models.rope import rope_freqs

    B, S, H, D = 1, 32, 2, 32  # 2 frames of 4 x 4 tokens
    q, k, v = qkv(B, S, S, H, D, seed=11)
    return q, k, v, rope_freqs(D, torch.arange(2), 4, 4)


def test_fused_core_uses_the_reference_on_cpu_and_sdpa_when_masked():
    q, k, v, rope = _core_inputs()
    core = optimize.FusedAttentionCore(fp8_attention=True)
    plain = AttentionCore()
    qr, kr = plain.rotate(q, *rope), plain.rotate(k, *rope)
    assert torch.equal(core(q, k, v, rope=rope), ref.fp8_attention(qr, kr, v))
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
    assert torch.equal(core(q, k, v, rope=rope, mask=mask), plain(q, k, v, rope=rope, mask=mask))
    # off by default: the plain numbers
    assert torch.equal(optimize.FusedAttentionCore()(q, k, v, rope=rope), plain(q, k, v, rope=rope))


def test_fused_core_updates_the_cache_as_the_plain_core():
    q, k, v, rope = _core_inputs()
    caches = [KVCache(1) for _ in range(2)]
    for cache, core in zip(caches, (optimize.FusedAttentionCore(fp8_attention=True), AttentionCore())):
        with cache.writing():
            core(q, k, v, rope=rope, kv_cache=cache, layer=0)
    held = [c.held(0) for c in caches]
    assert all(torch.equal(a, b) for a, b in zip(held[0], held[1]))


@needs_interpreter
def test_fused_core_runs_the_kernel_in_the_interpreter():
    from longlive_kernels.fp8_attention import fp8_attention

    q, k, v, rope = _core_inputs()
    core = optimize.FusedAttentionCore(fp8_attention=True)
    with interpret_on_cpu():
        out = core(q, k, v, rope=rope)
        qr, kr = core.rotate(q, *rope), core.rotate(k, *rope)
        assert torch.equal(out, fp8_attention(qr, kr, v))


def test_optimize_installs_fp8_attention_on_self_attention_only():
    from longlive.config import DiTConfig
    from longlive.models.dit import WanDiT

    cfg = DiTConfig(num_layers=2, dim=64, num_heads=2, ffn_dim=128, freq_dim=32, patch_size=(1, 2, 2))
    dit = WanDiT(cfg, 4, 32)
    applied = optimize.optimize(dit, fp8_attention=True)
    assert applied["fp8_attention"] == "triton"
    assert all(b.attn1.core.fp8_attention == "triton" and b.attn2.core.fp8_attention == "off" for b in dit.blocks)
    assert optimize.optimize(WanDiT(cfg, 4, 32), kernels=False, fp8_attention=True)["fp8_attention"] == "off"


@needs_cuda
def test_kernel_on_gpu_at_wan_shape():
    """Wan2.2-5B's steady block in bf16 (7040 queries over 28160 keys, 24 heads of 128; a quarter of the
    heads to keep it quick): codes bit-exact, kernel vs reference and vs exact attention as on the CPU."""
    from longlive_kernels import fp8_attention as kern

    q, k, v = qkv(1, 7040, 28160, 6, 128, device="cuda", dtype=torch.bfloat16)
    for name in ("q", "k", "v"):
        a, b = getattr(kern, f"quantize_{name}")(k if name == "k" else q if name == "q" else v), \
            getattr(ref, f"quantize_{name}")(k if name == "k" else q if name == "q" else v)
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1]), name
    out = kern.fp8_attention(q, k, v)
    expected = ref.fp8_attention(q[:, :1024], k, v)
    assert fro(out[:, :1024], expected) < KERNEL_FRO
    truth = exact(q[:, :1024].float(), k.float(), v.float())
    assert fro(out[:, :1024], truth) < QUANT_FRO
