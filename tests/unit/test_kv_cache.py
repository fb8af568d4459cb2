"""The streaming KV cache: cache path == masked forward, sink/window bookkeeping (single and multi-shot),
relative RoPE far beyond the training length, re-cache on a prompt switch, constant memory on long videos.

Models are random and small; comparisons run in float32 with ATOL = 1e-5 (the two sides differ only
in the order of floating-point operations).
"""

import copy
import pytest
import torch

from longlive.config import DiTConfig, load_preset
from longlive.models.cache import FrameRecord, RollingKVCache
from longlive.inference.pipeline import StreamingPipeline, step_sigmas
from longlive.inference.schedule import BlockPlan, PromptSchedule, stream_block_sizes
from longlive.models.dit import WanDiT

ATOL = 1e-5
C, H, W = 4, 4, 4  # latent channels and size: 4 tokens per frame after the 2x2 patch


def micro_dit(seed: int = 0) -> WanDiT:
    cfg = DiTConfig(num_layers=2, dim=64, num_heads=2, ffn_dim=128, freq_dim=32, patch_size=(1, 2, 2))
    m = WanDiT(cfg, in_channels=C, text_dim=16)
    m.init_weights(seed)
    with torch.no_grad():  # the zero-initialised head would make every comparison trivially equal
        torch.nn.init.normal_(m.proj_out.weight, generator=torch.Generator().manual_seed(seed + 1), std=0.05)
    return m.eval()


def inference_cfg(**kw):
    base = load_preset("tiny").inference
    return base.model_copy(update=kw)


@pytest.fixture(scope="module")
def dit() -> WanDiT:
    return micro_dit()


@pytest.fixture(scope="module")
def contexts():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, 8, 16, generator=g) for _ in range(2)]


def plans_for(sizes, prompt=0, shot_at=None):
    out, start = [], 0
    for i, n in enumerate(sizes):
        shot = int(shot_at is not None and i >= shot_at)
        out.append(BlockPlan(i, start, n, prompt, shot, False, shot_at == i))
        start += n
    return out


def write_blocks(pipe: StreamingPipeline, latents: torch.Tensor, plans, context, shot_start=None):
    """Write clean latents block by block through the pipeline's cache path (what stream() does)."""
    shot_start = shot_start or {}
    for p in plans:
        x0 = latents[:, :, p.start : p.start + p.frames]
        positions = pipe.cache.next_positions(p.frames, p.shot)
        pipe.write(x0, context, positions)
        s0 = shot_start.get(p.shot, 0)
        pipe.cache.commit([FrameRecord(p.start + i, p.index, p.shot, p.start + i - s0, x0[:, :, i : i + 1])
                           for i in range(p.frames)])


def fake_write(cache: RollingKVCache, records: list[FrameRecord], tokens: int = 1) -> None:
    """Store dummy K/V for ``records`` (one value per frame) without a model."""
    n = len(records)
    with cache.writing():
        for layer in range(len(cache.k)):
            kv = torch.tensor([float(r.frame) for r in records]).repeat_interleave(tokens).view(1, n * tokens, 1, 1)
            cache.update(layer, kv, kv)
        cache.advance(cache.next_positions(n, records[0].shot))
    cache.commit(records)


def stream_fake(cache, num_blocks, block=2, new_shot_block=None):
    shot, shot_start = 0, 0
    for b in range(num_blocks):
        if b == new_shot_block:
            shot, shot_start = 1, b * block
        fake_write(cache, [FrameRecord(b * block + i, b, shot, b * block + i - shot_start, torch.zeros(1))
                           for i in range(block)])


def test_step_sigmas_follow_the_shifted_schedule():
    s = step_sigmas([1000, 750, 500, 250], 3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and len(s) == 5
    torch.testing.assert_close(s[1], torch.tensor(3 * 0.75 / (1 + 2 * 0.75)))


def test_cache_path_equals_masked_forward(dit, contexts):
    """Each block read through the pipeline's cache == a block-causal forward over [clean history, noisy block]."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(1, C, 6, H, W, generator=g)
    noisy = torch.randn(1, C, 6, H, W, generator=g)
    pipe = StreamingPipeline(dit, inference_cfg(sink_frames=0, window_frames=100))
    ctx = contexts[0]
    with torch.no_grad():
        for p in plans_for([2, 2, 2]):
            f0, f1 = p.start, p.start + p.frames
            t = torch.full((p.frames,), 700.0)
            positions = pipe.cache.next_positions(p.frames, p.shot)
            assert positions.tolist() == list(range(f0, f1))
            got = pipe.velocity(noisy[:, :, f0:f1], t, ctx, positions)
            ref = dit(torch.cat((clean[:, :, :f0], noisy[:, :, f0:f1]), dim=2),
                      torch.cat((torch.zeros(f0), t))[None], ctx, block_frames=2)[:, :, f0:]
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
            write_blocks(pipe, clean, [p], ctx)
    assert pipe.cache.held_frames() == list(range(6))


def test_sink_and_window_keep_the_right_frames():
    cache = RollingKVCache(2, sink_frames=1, window_frames=4)
    stream_fake(cache, 20)
    assert cache.held_frames() == [0, 36, 37, 38, 39]
    assert cache.positions.tolist() == [0, 1, 2, 3, 4]  # the gap after the sink is closed
    assert cache.next_positions(2, 0).tolist() == [5, 6]
    assert cache.k[0].flatten().tolist() == [0.0, 36.0, 37.0, 38.0, 39.0]  # K/V follow their frames

    no_sink = RollingKVCache(2, sink_frames=0, window_frames=3)
    stream_fake(no_sink, 7)
    assert no_sink.held_frames() == [11, 12, 13]

    wide_sink = RollingKVCache(2, sink_frames=3, window_frames=2)
    stream_fake(wide_sink, 6)
    assert wide_sink.held_frames() == [0, 1, 2, 10, 11]


def test_multishot_sink_reanchors_with_rope_offset():
    cache = RollingKVCache(1, sink_frames=1, window_frames=4, multishot_sink=True, shot_rope_offset=3)
    stream_fake(cache, 11, new_shot_block=10)  # shot 1 starts at latent frame 20
    # the old sink (frame 0) is dropped; frame 20 is the new sink; the old shot's tail stays in the window
    assert cache.held_frames() == [17, 18, 19, 20, 21]
    assert cache.positions.tolist() == [0, 1, 2, 6, 7]  # +3 between the shots
    assert cache.next_positions(2, 1).tolist() == [8, 9]
    stream_fake_more = [FrameRecord(22 + i, 11 + i // 2, 1, 2 + i, torch.zeros(1)) for i in range(6)]
    for i in range(0, 6, 2):
        fake_write(cache, stream_fake_more[i : i + 2])
    assert cache.held_frames() == [20, 24, 25, 26, 27]
    assert cache.positions.tolist() == [0, 1, 2, 3, 4]

    kept = RollingKVCache(1, sink_frames=1, window_frames=4, multishot_sink=False, shot_rope_offset=3)
    stream_fake(kept, 12, new_shot_block=10)
    assert kept.held_frames() == [0, 20, 21, 22, 23]  # the video's first frame stays the sink
    assert kept.positions.tolist() == [0, 4, 5, 6, 7]


def test_relative_rope_beyond_training_length(dit, contexts):
    """Block 3 and block 300 with the same cache contents give the same output (tiny clips are 5 frames)."""
    cfg = inference_cfg(sink_frames=1, window_frames=4)
    g = torch.Generator().manual_seed(1)
    ctx = contexts[0]
    a, b = StreamingPipeline(dit, cfg), StreamingPipeline(dit, cfg)
    max_position = 0
    with torch.no_grad():
        write_blocks(a, torch.randn(1, C, 6, H, W, generator=g), plans_for([2] * 3), ctx)
        long = torch.randn(1, C, 600, H, W, generator=g)
        for p in plans_for([2] * 300):
            write_blocks(b, long, [p], ctx)
            max_position = max(max_position, int(b.cache.positions.max()))
    assert b.cache.held_frames() == [0, 596, 597, 598, 599] and a.cache.held_frames() == [0, 2, 3, 4, 5]
    assert max_position <= cfg.sink_frames + cfg.window_frames  # positions never grow
    assert torch.equal(a.cache.positions, b.cache.positions)
    b.cache.storage = copy.deepcopy(a.cache.storage)  # same contents, absolute index 600 instead of 6
    noisy, t = torch.randn(1, C, 2, H, W, generator=g), torch.full((2,), 500.0)
    with torch.no_grad():
        out_a = a.velocity(noisy, t, ctx, a.cache.next_positions(2, 0))
        out_b = b.velocity(noisy, t, ctx, b.cache.next_positions(2, 0))
        absolute = b.velocity(noisy, t, ctx, torch.tensor([600, 601]))
    assert torch.equal(out_a, out_b)
    assert (absolute - out_b).abs().max() > 1e-4  # absolute positions would change the result


@pytest.mark.parametrize("shot_at", [None, 4])
def test_recache_equals_cache_built_from_scratch(dit, contexts, shot_at):
    """After a switch the re-cached K/V == writing the held frames block by block under the new prompt."""
    cfg = inference_cfg(sink_frames=1, window_frames=3, multishot_rope_offset=2)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, C, 10, H, W, generator=g)
    plans = plans_for([2] * 5, shot_at=shot_at)
    shot_start = {1: 8} if shot_at else {}
    pipe = StreamingPipeline(dit, cfg)
    with torch.no_grad():
        write_blocks(pipe, latents, plans, contexts[0], shot_start)
        held = list(pipe.cache.frames)
        before = [pipe.cache.held(layer)[0].clone() for layer in range(len(dit.blocks))]
        pipe.recache(contexts[1])
        # from scratch: only the held frames, grouped by their blocks, under the new prompt
        fresh = StreamingPipeline(dit, cfg)
        for block in sorted({r.block for r in held}):
            recs = [r for r in held if r.block == block]
            x0 = torch.cat([r.latent for r in recs], dim=2)
            fresh.write(x0, contexts[1], fresh.cache.next_positions(len(recs), recs[0].shot))
            fresh.cache.commit([FrameRecord(r.frame, r.block, r.shot, r.shot_frame, r.latent) for r in recs])
    expected_held = [0, 7, 8, 9] if not shot_at else [6, 7, 8, 9]  # a new shot: 8 is its sink
    assert pipe.cache.held_frames() == fresh.cache.held_frames() == expected_held
    assert torch.equal(pipe.cache.positions, fresh.cache.positions)
    assert pipe.cache.positions.tolist() == ([0, 1, 2, 3] if not shot_at else [0, 1, 4, 5])
    for layer in range(len(dit.blocks)):
        for got, want in zip(pipe.cache.held(layer), fresh.cache.held(layer)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (before[-1] - pipe.cache.held(len(dit.blocks) - 1)[0]).abs().max() > 1e-4  # the prompt did change the cache


def test_stream_recaches_on_switch(dit, contexts):
    schedule = PromptSchedule.from_list([{"start": 0, "prompt": "a"}, {"frame": 17, "prompt": "b"}])
    plans = schedule.plan(stream_block_sizes(8, 2), fps=8, temporal_compression=4)
    # pixel 17 lies in latent frame 5, inside block [4, 5]: the switch waits for the block starting at 6
    assert [p.prompt for p in plans] == [0, 0, 0, 1] and plans[3].switch

    def run(recache: bool):
        pipe = StreamingPipeline(dit, inference_cfg(recache_on_switch=recache))
        blocks = list(pipe.stream(plans, contexts, (C, H, W), generator=torch.Generator().manual_seed(0)))
        return torch.cat([b.latents for b in blocks], dim=2), blocks

    with_recache, blocks = run(True)
    without, _ = run(False)
    assert "recache_s" in blocks[3].timings and "recache_s" not in blocks[2].timings
    assert torch.equal(with_recache[:, :, :6], without[:, :, :6])
    assert (with_recache[:, :, 6:] - without[:, :, 6:]).abs().max() > 1e-4


def test_cfg_with_equal_contexts_is_plain_conditional(dit, contexts):
    plans = plans_for([2, 2])
    outs = []
    for scale in (1.0, 4.0):
        pipe = StreamingPipeline(dit, inference_cfg(guidance_scale=scale))
        blocks = pipe.stream(plans, contexts[:1], (C, H, W), null_context=contexts[0],
                             generator=torch.Generator().manual_seed(0))
        outs.append(torch.cat([b.latents for b in blocks], dim=2))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)


def test_cache_memory_constant_over_10x_training_length():
    preset = load_preset("tiny")
    cfg = preset.inference
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    _, clip_frames, h, w = preset.latent_shape
    n = 10 * clip_frames
    pipe = StreamingPipeline(dit.eval(), cfg)
    ctx = torch.randn(1, preset.text.max_tokens, preset.text.dim, generator=torch.Generator().manual_seed(0))
    sizes = stream_block_sizes(n, cfg.block_frames)
    nbytes, held, top = [], [], []
    for block in pipe.stream(plans_for(sizes), [ctx], (preset.vae.z_dim, h, w)):
        nbytes.append(block.timings["cache_bytes"])
        held.append(len(block.timings["cache_frames"]))
        top.append(int(pipe.cache.positions.max()))
    full = cfg.sink_frames + cfg.window_frames
    warm = next(i for i, k in enumerate(held) if k == full)
    per_frame = dit.tokens_per_frame(h, w) * preset.dit.dim * 4 * 2 * preset.dit.num_layers
    print(f"cache bytes over {sum(sizes)} latent frames: {sorted(set(nbytes))}, constant from block {warm}")
    assert sum(sizes) >= n and warm <= full // cfg.block_frames + 1
    assert set(nbytes[warm:]) == {full * per_frame} and set(held[warm:]) == {full}
    assert max(top) < full


def direct_history(blocks, shots, sink, window, multishot_sink=True):
    """Frame by frame: which earlier frames the rolling cache holds while each frame's block runs."""
    F = len(blocks)
    out = torch.zeros(F, F, dtype=torch.bool)
    for q in range(F):
        hist = [k for k in range(F) if blocks[k] < blocks[q]]
        if not hist:
            continue
        anchor = shots[hist[-1]] if multishot_sink else shots[0]
        start = min(k for k in range(F) if shots[k] == anchor)
        sink_set = [k for k in hist if shots[k] == anchor and k - start < sink]
        rest = [k for k in hist if k not in sink_set]
        for k in sink_set + rest[len(rest) - min(window, len(rest)):]:
            out[q, k] = True
    return out


@pytest.mark.parametrize("shots", [[0] * 9, [0, 0, 0, 0, 1, 1, 1, 1, 1]])
def test_cached_history_matches_the_direct_rule(shots):
    from longlive.models.attention import cached_history
    from longlive.train.ar import frame_blocks

    for independent in (False, True):
        blocks = frame_blocks(9, 2, independent)
        for sink, window, ms in ((1, 3, True), (0, 2, True), (2, 1, False), (1, 0, True)):
            got = cached_history(blocks, torch.tensor(shots), sink_frames=sink, window_frames=window, multishot_sink=ms)
            assert torch.equal(got, direct_history(blocks.tolist(), shots, sink, window, ms)), (independent, sink, window)
    full = cached_history(frame_blocks(9, 2))
    assert torch.equal(full, frame_blocks(9, 2)[None, :] < frame_blocks(9, 2)[:, None])


@pytest.mark.parametrize("independent", [False, True])
def test_windowed_teacher_forcing_equals_streaming_with_the_rolling_cache(dit, contexts, independent):
    """Train as you stream: the noisy half of a windowed teacher-forcing forward (sink 1 + window 3 over a
    9-frame clip) == each block denoised through the rolling cache with ``max_block_position``, and
    past the clip every block sees its sink and window at the positions the clip's last block saw."""
    from longlive.train.ar import attention_mask, clip_block_sizes, max_block_position

    F, sink, window = 9, 1, 3
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(1, C, F, H, W, generator=g)
    noisy = torch.randn(1, C, F, H, W, generator=g)
    t = torch.full((F,), 600.0)
    tokens = dit.tokens_per_frame(H, W)
    mask = attention_mask(F, tokens, 2, independent, sink_frames=sink, window_frames=window)
    ref = dit(torch.cat((clean, noisy), dim=2), torch.cat((torch.zeros(F), t))[None], contexts[0],
              attn_mask=mask, frame_positions=torch.arange(F).repeat(2))[:, :, F:]
    top = max_block_position(F, 2, independent)
    pipe = StreamingPipeline(dit, inference_cfg(sink_frames=sink, window_frames=window, max_block_position=top))
    plans = plans_for(clip_block_sizes(F, 2, independent))
    with torch.no_grad():
        for p in plans:
            f0, f1 = p.start, p.start + p.frames
            positions = pipe.cache.next_positions(p.frames, p.shot)
            if f0 <= top:  # t2v's last block is a partial one ([8]); streaming never starts a block past `top`
                assert positions.tolist() == list(range(f0, f1)), "within a training clip positions are the true ones"
                got = pipe.velocity(noisy[:, :, f0:f1], t[f0:f1], contexts[0], positions)
                torch.testing.assert_close(got, ref[:, :, f0:f1], atol=ATOL, rtol=0)
            write_blocks(pipe, clean, [p], contexts[0])
        # far past the clip: the cache layout freezes at the training clip's last whole block
        long = torch.randn(1, C, 40, H, W, generator=g)
        extra = [BlockPlan(len(plans) + i, F + 2 * i, 2, 0, 0, False, False) for i in range(12)]
        for p in extra:
            x = long[:, :, p.start - F : p.start - F + 2]
            positions = pipe.cache.next_positions(2, 0)
            pipe.write(x, contexts[0], positions)
            pipe.cache.commit([FrameRecord(p.start + i, p.index, 0, p.start + i, x[:, :, i : i + 1]) for i in range(2)])
        assert pipe.cache.positions.tolist() == [0, top - 3, top - 2, top - 1]
        assert pipe.cache.next_positions(2, 0).tolist() == [top, top + 1]
        assert pipe.cache.held_frames()[0] == 0 and len(pipe.cache.held_frames()) == sink + window
