"""Attention over the NVFP4 KV cache: ``kernels/nvfp4_attention.py`` against ``kernels/nvfp4_attention_ref.py``,
the reference against the model's path, and the fast path's use of it.

* The reference == ``AttentionCore`` over a ``KVCache`` with ``NVFP4KVStorage`` (dequantize + cat + RoPE +
  SDPA) bit for bit on the CPU, reading or writing, with an empty or a filled cache.
* The Triton kernel (Triton's interpreter on CPU tensors, float32) == the reference within ATTN_RTOL of the
  output's scale: both decode the same float32 values and round them the same way, so what differs is
  the order of float32 sums and the online softmax's rescaling (measured ~5e-7).
* ``FusedAttentionCore(nvfp4_attention=True)`` runs the reference path on the CPU (bit-identical), the kernel
  inside ``interpret_on_cpu``, and stores exactly the same packed K/V either way; without the flag (the
  default: the kernel is slower than dequantize + SDPA on an H100) it never runs the kernel.
* On a GPU, at Wan2.2-5B's shape in bf16, the kernel's error against a float32 evaluation of the same
  attention is within BF16_FACTOR of bf16 SDPA's own (both round P and the operands to bf16).
"""

import os
from contextlib import nullcontext

import pytest
import torch

from longlive_kernels import nvfp4_attention_ref
from longlive_kernels.nvfp4_quant_ref import global_scale, quantize_rows
from longlive_kernels.rope_ref import apply_rope
from longlive.inference import optimize
from longlive.kernels_dispatch import ENV, interpret_on_cpu
from longlive.models.attention import KVCache
from longlive.models.dit import AttentionCore
from longlive.models.rope import rope_freqs
from longlive.quant import NVFP4KVStorage

ATTN_RTOL = 1e-5  # float32, max |kernel - reference| / max |reference|
BF16_FACTOR = 2.0  # bf16 on the GPU: kernel error vs float32 <= BF16_FACTOR x bf16 SDPA's error vs float32
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="runs the kernel on CPU tensors in Triton's interpreter")


def randn(*shape, seed=0, device="cpu", dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def pack(x, capacity=None):
    """(B, n, H, D) -> (packed, scales, global_) views of n tokens in buffers of ``capacity`` rows (a cache's)."""
    B, n, H, D = x.shape
    rows = x.reshape(B * n, H * D)
    g, inv_g = global_scale(rows, per_row=True)
    p, s = quantize_rows(rows, g, inv_g)
    cap = capacity or n
    bufs = (torch.zeros(B, cap, H * D // 2, dtype=torch.uint8, device=x.device),
            torch.zeros(B, cap, H * D // 16, dtype=torch.float8_e4m3fn, device=x.device),
            torch.zeros(B, cap, dtype=torch.float32, device=x.device))
    for buf, t in zip(bufs, (p.view(B, n, -1), s.view(B, n, -1), g.view(B, n))):
        buf[:, :n] = t
    return tuple(b[:, :n] for b in bufs)


def tables(D, frames, tokens, batch=None):
    """Key RoPE tables of ``frames`` frames of ``tokens`` tokens (h = tokens, w = 1); one set per sample if batch."""
    pos = torch.arange(frames) * 2 + 1
    if batch:
        pos = torch.stack([pos + i for i in range(batch)])
    return rope_freqs(D, pos, tokens, 1)


def filled_cache(frames, tokens, B=2, H=2, D=32, seed=0):
    cache = KVCache(1, storage=NVFP4KVStorage(1, max_frames=frames + 3))
    if frames:
        with cache.writing():
            cache.update(0, randn(B, frames * tokens, H, D, seed=seed), randn(B, frames * tokens, H, D, seed=seed + 1))
            cache.advance(torch.arange(frames))
    return cache


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("held_frames", [0, 3])
@pytest.mark.parametrize("write", [False, True])
def test_reference_is_the_model_path(held_frames, write):
    tokens, B, H, D, Sn = 4, 2, 2, 32, 8
    cache = filled_cache(held_frames, tokens, B, H, D)
    q, k, v = (randn(B, Sn, H, D, seed=10 + i) for i in range(3))
    rope = tables(D, 2, tokens)
    key_rope = tables(D, held_frames + 2, tokens)
    n = held_frames * tokens
    held = (cache.storage.k[0].view(n), cache.storage.v[0].view(n)) if n else (None, None)
    held = tuple(None if h is None else tuple(t.clone() for t in h) for h in held)
    with cache.writing() if write else nullcontext():
        got = AttentionCore()(q, k, v, rope=rope, key_rope=key_rope, kv_cache=cache, layer=0)
    ref = nvfp4_attention_ref.nvfp4_attention(apply_rope(q, *rope), *held, k, v, *key_rope)
    assert torch.equal(got, ref)


# ----------------------------------------------------------------------------- the kernel (interpreter)


@needs_interpreter
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("n", [0, 5, 37])
@pytest.mark.parametrize("Sq", [8, 20])
def test_kernel_matches_reference(D, n, Sq):
    from longlive_kernels import nvfp4_attention

    B, H, Sn = 2, 2, 8
    q = randn(B, Sq, H, D, seed=1)
    k, v = randn(B, Sn, H, D, seed=2), randn(B, Sn, H, D, seed=3) * 2
    k_held = pack(randn(B, n, H, D, seed=4) * 3, capacity=n + 11) if n else None  # strided views, as a cache's
    v_held = pack(randn(B, n, H, D, seed=5), capacity=n + 11) if n else None
    cos, sin = rope_freqs(D, torch.arange(n + Sn) * 3, 1, 1)
    for c, s in ((cos, sin), tuple(torch.stack((t, t.flip(0))) for t in (cos, sin))):  # shared, per sample
        ref = nvfp4_attention_ref.nvfp4_attention(q, k_held, v_held, k, v, c, s)
        got = nvfp4_attention.nvfp4_attention(q, k_held, v_held, k, v, c, s)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert float((got - ref).abs().max()) <= ATTN_RTOL * float(ref.abs().max())


@needs_interpreter
@pytest.mark.parametrize("D", [16, 48])
def test_kernel_pads_head_dims_that_are_not_a_power_of_two(D):
    """head_dim / 2 padded to the next power of 2 (and to the 16 tl.dot needs)."""
    from longlive_kernels import nvfp4_attention

    B, H, Sn, n = 1, 3, 5, 9
    q, k, v = (randn(B, Sn, H, D, seed=i) for i in range(3))
    k_held, v_held = pack(randn(B, n, H, D, seed=7)), pack(randn(B, n, H, D, seed=8))
    cos, sin = rope_freqs(D, torch.arange(n + Sn), 1, 1)
    ref = nvfp4_attention_ref.nvfp4_attention(q, k_held, v_held, k, v, cos, sin)
    got = nvfp4_attention.nvfp4_attention(q, k_held, v_held, k, v, cos, sin)
    assert float((got - ref).abs().max()) <= ATTN_RTOL * float(ref.abs().max())


@needs_interpreter
def test_kernel_rejects_bad_inputs():
    from longlive_kernels import nvfp4_attention

    q = randn(1, 4, 2, 32)
    cos, sin = rope_freqs(32, torch.arange(4), 1, 1)
    with pytest.raises(ValueError, match="cos/sin must be"):
        nvfp4_attention.nvfp4_attention(q, pack(randn(1, 3, 2, 32)), pack(randn(1, 3, 2, 32)), q, q, cos, sin)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_attention.nvfp4_attention(q[..., :24], None, None, q[..., :24], q[..., :24], cos[..., :12], sin[..., :12])


# ----------------------------------------------------------------------------- the fast path


def _fast_core_run(core, held_frames, write, interpret):
    tokens, B, H, D, Sn = 4, 2, 2, 32, 8
    cache = filled_cache(held_frames, tokens, B, H, D)
    q, k, v = (randn(B, Sn, H, D, seed=20 + i) for i in range(3))
    with interpret_on_cpu() if interpret else nullcontext(), cache.writing() if write else nullcontext():
        out = core(q, k, v, rope=tables(D, 2, tokens), key_rope=tables(D, held_frames + 2, tokens),
                   kv_cache=cache, layer=0)
    return out, cache.storage


def test_fast_core_on_cpu_is_the_plain_path(monkeypatch):
    for held_frames, write in ((0, True), (3, False), (3, True)):
        plain, s_plain = _fast_core_run(AttentionCore(), held_frames, write, interpret=False)
        got, s_got = _fast_core_run(optimize.FusedAttentionCore(nvfp4_attention=True), held_frames, write, interpret=False)
        assert torch.equal(got, plain) and s_got.length == s_plain.length
    if INTERPRETER:  # the one switch: no kernel even inside interpret_on_cpu
        monkeypatch.setenv(ENV, "0")
        got, _ = _fast_core_run(optimize.FusedAttentionCore(nvfp4_attention=True), 3, True, interpret=True)
        assert torch.equal(got, plain)


@needs_interpreter
@pytest.mark.parametrize("held_frames", [0, 3])
def test_fast_core_runs_the_kernel_and_writes_the_same_cache(held_frames, monkeypatch):
    import longlive_kernels.nvfp4_attention as kernel

    calls = []
    real = kernel.nvfp4_attention
    monkeypatch.setattr(kernel, "nvfp4_attention", lambda *a: calls.append(1) or real(*a))
    plain, s_plain = _fast_core_run(AttentionCore(), held_frames, True, interpret=False)
    _fast_core_run(optimize.FusedAttentionCore(), held_frames, True, interpret=True)
    assert calls == []  # off unless asked for (slower than dequantize + SDPA on an H100)
    got, s_got = _fast_core_run(optimize.FusedAttentionCore(nvfp4_attention=True), held_frames, True, interpret=True)
    assert calls == [1]
    assert float((got - plain).abs().max()) <= ATTN_RTOL * float(plain.abs().max())
    assert s_got.length == s_plain.length
    n = s_plain.length[0]
    for a, b in zip(s_got.k[0].view(n) + s_got.v[0].view(n), s_plain.k[0].view(n) + s_plain.v[0].view(n)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ----------------------------------------------------------------------------- GPU, Wan2.2-5B


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_gpu_at_wan22_5b_shape():
    """24 heads x 128, a block of 8 frames x 880 tokens against 24 cached frames, bf16."""
    from longlive_kernels import nvfp4_attention

    B, H, D, Sq, n = 1, 24, 128, 8 * 880, 24 * 880  # 880 tokens per latent frame
    dev = "cuda"
    q = randn(B, Sq, H, D, seed=1, device=dev, dtype=torch.bfloat16)
    k, v = (randn(B, Sq, H, D, seed=s, device=dev, dtype=torch.bfloat16) for s in (2, 3))
    k_held = pack(randn(B, n, H, D, seed=4, device=dev) * 2, capacity=n + Sq)
    v_held = pack(randn(B, n, H, D, seed=5, device=dev), capacity=n + Sq)
    cos, sin = (t.to(dev) for t in rope_freqs(D, torch.arange(32), 44, 20))
    got = nvfp4_attention.nvfp4_attention(q, k_held, v_held, k, v, cos, sin)
    ref = nvfp4_attention_ref.nvfp4_attention(q, k_held, v_held, k, v, cos, sin)
    exact = nvfp4_attention_ref.nvfp4_attention(q.float(), k_held, v_held, k.float(), v.float(), cos, sin)
    err_kernel = float((got.float() - exact).abs().max())
    err_sdpa = float((ref.float() - exact).abs().max())
    scale = float(exact.abs().max())
    print(f"kernel vs float32 {err_kernel:.3g}, bf16 SDPA vs float32 {err_sdpa:.3g}, output scale {scale:.3g}")
    assert err_kernel <= BF16_FACTOR * err_sdpa + torch.finfo(torch.bfloat16).eps * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_core_on_gpu_runs_the_kernel_and_writes_the_same_cache():
    tokens, B, H, D, held_frames = 20, 2, 3, 64, 3
    outs, stores = [], []
    for core in (AttentionCore(), optimize.FusedAttentionCore(nvfp4_attention=True)):
        cache = KVCache(1, storage=NVFP4KVStorage(1, max_frames=8))
        with cache.writing():
            cache.update(0, randn(B, held_frames * tokens, H, D, seed=1, device="cuda", dtype=torch.bfloat16),
                         randn(B, held_frames * tokens, H, D, seed=2, device="cuda", dtype=torch.bfloat16))
            cache.advance(torch.arange(held_frames))
        q, k, v = (randn(B, 2 * tokens, H, D, seed=3 + i, device="cuda", dtype=torch.bfloat16) for i in range(3))
        rope = tuple(t.cuda() for t in tables(D, 2, tokens))
        key_rope = tuple(t.cuda() for t in tables(D, held_frames + 2, tokens))
        with cache.writing():
            outs.append(core(q, k, v, rope=rope, key_rope=key_rope, kv_cache=cache, layer=0).float())
        stores.append(cache.storage)
    ref, got = outs
    assert float((got - ref).abs().max()) <= 2 * torch.finfo(torch.bfloat16).eps * float(ref.abs().max())
    n = stores[0].length[0]
    assert stores[1].length[0] == n == (held_frames + 2) * tokens
    for a, b in zip(stores[0].k[0].view(n) + stores[0].v[0].view(n), stores[1].k[0].view(n) + stores[1].v[0].view(n)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
