"""NVFP4 KV cache: per-token NVFP4 storage along head_dim, in place, with eviction; bytes per frame; and the
streaming pipeline with it close to the dense cache.

Tolerance of the pipeline comparison (random tiny-preset DiT, 4 denoising steps, sink 1 + window 3,
blocks of 2, 8 blocks so eviction and re-basing run): relative L2 error of the generated latents,
NVFP4 cache vs dense cache, below KV_RTOL = 0.05 (measured 0.003, 0.005 with CFG and a re-cache); two seeds
differ by ~1.4.
"""

import pytest
import torch

from longlive.config import DiTConfig, load_preset
from longlive.models.cache import FrameRecord, RollingKVCache
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import BlockPlan, PromptSchedule, stream_block_sizes
from longlive.models.attention import KVCache
from longlive.models.dit import WanDiT
from longlive.quant import NVFP4KVStorage, quantize

KV_RTOL = 0.05


def plans_for(sizes, prompt=0):
    out, start = [], 0
    for i, n in enumerate(sizes):
        out.append(BlockPlan(i, start, n, prompt, 0, False, False))
        start += n
    return out


def kv(batch, tokens, heads=2, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, heads, head_dim, generator=g), torch.randn(batch, tokens, heads, head_dim, generator=g)


def per_token_fake_quant(x):
    """Reference: each token (all heads) quantized on its own with ``longlive.quant.quantize``."""
    B, S, H, D = x.shape
    rows = x.reshape(B * S, 1, H * D)
    return torch.stack([quantize(r).dequantize() for r in rows]).reshape(B, S, H, D)


def test_storage_holds_per_token_nvfp4_and_reads_cached_then_new():
    cache = KVCache(2, storage=NVFP4KVStorage(2))
    k1, v1 = kv(2, 6)
    with cache.writing():
        for layer in range(2):
            k, v = cache.update(layer, k1, v1)
            assert torch.equal(k, k1) and torch.equal(v, v1)  # nothing cached yet: the new K/V as they are
        cache.advance(torch.arange(3))  # 3 frames of 2 tokens
    k2, v2 = kv(2, 2, seed=1)
    k, v = cache.update(1, k2, v2)  # a read: cached (dequantized) then new (exact)
    assert torch.equal(k[:, :6], per_token_fake_quant(k1)) and torch.equal(v[:, :6], per_token_fake_quant(v1))
    assert torch.equal(k[:, 6:], k2) and cache.storage.length == [6, 6]
    rel = float((k[:, :6] - k1).norm() / k1.norm())
    assert 0.02 < rel < 0.2, rel


def test_eviction_keeps_the_right_frames_in_place():
    storage = NVFP4KVStorage(1, max_frames=6)
    cache = RollingKVCache(1, sink_frames=1, window_frames=3, storage=storage)
    tokens, frames = 2, []
    ptrs = set()
    for b in range(8):  # blocks of 2 frames; each frame's K is filled with its frame index
        recs = [FrameRecord(2 * b + i, b, 0, 2 * b + i, torch.zeros(1)) for i in range(2)]
        val = torch.tensor([float(r.frame) for r in recs]).repeat_interleave(tokens)
        k = val.view(1, 2 * tokens, 1, 1).expand(1, 2 * tokens, 1, 16).contiguous()
        with cache.writing():
            cache.update(0, k, -k)
            cache.advance(cache.next_positions(2, 0))
        cache.commit(recs)
        frames.append(cache.held_frames())
        if b >= 1:
            ptrs.add(storage.k[0].packed.data_ptr())
    assert cache.held_frames() == [0, 13, 14, 15]
    held_k, held_v = cache.update(0, torch.zeros(1, 0, 1, 16), torch.zeros(1, 0, 1, 16))
    # a constant token quantizes to 6 * 448 * (amax / 2688): its value up to float32 rounding
    assert [round(x, 4) for x in held_k[0, :, 0, 0].tolist()] == [0.0, 0.0, 13.0, 13.0, 14.0, 14.0, 15.0, 15.0]
    assert torch.equal(held_v, -held_k)
    assert len(ptrs) == 1 and storage.reallocations == 2, "allocated in the first block, then updated in place"
    assert storage.k[0].capacity == 6 * tokens
    cache.reset()
    assert cache.cache_bytes() == 0 and storage.k[0] is not None, "reset keeps the buffers"


def test_bytes_per_frame_are_under_0_30x_bf16():
    preset = load_preset("tiny")
    d = preset.dit
    tokens = 16
    storage = NVFP4KVStorage(d.num_layers)
    cache = KVCache(d.num_layers, storage=storage)
    with cache.writing():
        for layer in range(d.num_layers):
            cache.update(layer, *kv(1, 3 * tokens, d.num_heads, d.head_dim))
        cache.advance(torch.arange(3))
    per_frame = cache.cache_bytes() / cache.num_frames
    bf16 = tokens * d.dim * 2 * 2 * d.num_layers  # K and V, 2 bytes each
    wan = load_preset("wan22-5b").dit.dim
    wan_ratio = (wan // 2 + wan // 16 + 4) / (2 * wan)
    print(f"KV cache bytes per frame: tiny {per_frame / bf16:.3f}x bf16; Wan2.2-5B (3072 channels) {wan_ratio:.3f}x")
    assert per_frame <= 0.30 * bf16 and wan_ratio <= 0.30


@pytest.fixture(scope="module")
def tiny_dit():
    preset = load_preset("tiny")
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    with torch.no_grad():  # the zero-initialised head would make every comparison trivially equal
        torch.nn.init.normal_(dit.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    return preset, dit.eval()


def stream(preset, dit, kv_cache, plans, contexts, seed=0, null_context=None, **cfg):
    _, _, h, w = preset.latent_shape
    pipe = StreamingPipeline(dit, preset.inference.model_copy(update=cfg), kv_cache=kv_cache)
    blocks = list(pipe.stream(plans, contexts, (preset.vae.z_dim, h, w), null_context=null_context,
                              generator=torch.Generator().manual_seed(seed)))
    return torch.cat([b.latents for b in blocks], dim=2), blocks, pipe


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_streaming_with_nvfp4_cache_is_close_to_dense(tiny_dit):
    preset, dit = tiny_dit
    ctx = torch.randn(1, preset.text.max_tokens, preset.text.dim, generator=torch.Generator().manual_seed(0))
    plans = plans_for([2] * 8)
    with torch.no_grad():
        dense, dense_blocks, _ = stream(preset, dit, "dense", plans, [ctx], sink_frames=1, window_frames=3)
        nvfp4, blocks, pipe = stream(preset, dit, "nvfp4", plans, [ctx], sink_frames=1, window_frames=3)
        other_seed, _, _ = stream(preset, dit, "dense", plans, [ctx], seed=1, sink_frames=1, window_frames=3)
    err, spread = rel(nvfp4, dense), rel(other_seed, dense)
    ratio = blocks[-1].timings["cache_bytes"] / dense_blocks[-1].timings["cache_bytes"]
    print(f"NVFP4 vs dense KV cache: latents relative error {err:.4f} (another seed: {spread:.3f}); "
          f"cache bytes {ratio:.3f}x the float32 cache ({2 * ratio:.3f}x bf16)")
    assert err < KV_RTOL and spread > 10 * err
    assert blocks[-1].timings["cache_frames"] == dense_blocks[-1].timings["cache_frames"] == [0, 13, 14, 15]
    assert 2 * ratio <= 0.30
    assert pipe.cache.storage.reallocations == 2 * len(dit.blocks), "twice per layer, both in the first block"


def test_prompt_switch_recache_and_cfg_with_nvfp4_cache(tiny_dit):
    preset, dit = tiny_dit
    g = torch.Generator().manual_seed(3)
    contexts = [torch.randn(1, preset.text.max_tokens, preset.text.dim, generator=g) for _ in range(2)]
    schedule = PromptSchedule.from_list([{"start": 0, "prompt": "a"}, {"frame": 17, "prompt": "b"}])
    plans = schedule.plan(stream_block_sizes(10, 2), fps=8, temporal_compression=4)
    assert any(p.switch for p in plans)
    null = torch.zeros_like(contexts[0])
    with torch.no_grad():
        dense, _, _ = stream(preset, dit, "dense", plans, contexts, null_context=null, guidance_scale=3.0)
        nvfp4, blocks, pipe = stream(preset, dit, "nvfp4", plans, contexts, null_context=null, guidance_scale=3.0)
    assert any("recache_s" in b.timings for b in blocks)
    assert pipe.cache.storage.k[0].packed.shape[0] == 2, "CFG: the batch of two shares one storage"
    err = rel(nvfp4, dense)
    print(f"NVFP4 vs dense cache with a prompt switch (re-cache) and CFG 3: relative error {err:.4f}")
    assert err < KV_RTOL
