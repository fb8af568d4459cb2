"""WanDiT: shapes, per-frame timesteps, block-causal attention, the KV cache and RoPE offsets.

All comparisons run in float32; two computations of the same function must agree to ATOL = 1e-5
(they differ only by the order of floating-point operations: masked vs unmasked SDPA, concatenated
vs single-pass keys).
"""

import pytest
import torch

from longlive.config import load_preset
from longlive.models.attention import KVCache, block_causal_mask, teacher_forcing_mask
from longlive.models.dit import WanDiT
from longlive.models.rope import rope_dims, rope_freqs

ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> WanDiT:
    m = WanDiT(load_preset("tiny").dit, in_channels=16, text_dim=64)
    m.init_weights(seed=0)
    with torch.no_grad():  # the zero-initialised head would make every comparison trivially equal
        torch.nn.init.normal_(m.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    return m.eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, 8, 8, generator=g)
    context = torch.randn(2, 16, 64, generator=g)
    t_frames = torch.rand(2, 5, generator=g) * 1000
    return x, context, t_frames


def test_output_shape(model, inputs):
    x, context, _ = inputs
    with torch.no_grad():
        out = model(x, torch.tensor([10.0, 900.0]), context)
    assert out.shape == (2, 16, 5, 8, 8)
    assert torch.isfinite(out).all()
    assert model.tokens_per_frame(8, 8) == 16


def test_bad_timestep_shape(model, inputs):
    x, context, _ = inputs
    with pytest.raises(ValueError, match=r"timestep must be \(B,\) or \(B, 5\)"):
        model(x, torch.zeros(2, 4), context)


def test_per_frame_timestep_equals_scalar(model, inputs):
    x, context, _ = inputs
    t = torch.tensor([123.0, 777.0])
    with torch.no_grad():
        scalar = model(x, t, context)
        per_frame = model(x, t[:, None].expand(2, 5), context)
    torch.testing.assert_close(per_frame, scalar, atol=ATOL, rtol=0)


def test_block_causal_first_block_equals_bidirectional_on_it(model, inputs):
    x, context, t = inputs
    with torch.no_grad():
        causal = model(x, t, context, block_frames=2)
        alone = model(x[:, :, :2], t[:, :2], context)
        bidirectional = model(x, t, context)
    torch.testing.assert_close(causal[:, :, :2], alone, atol=ATOL, rtol=0)
    assert not torch.allclose(causal[:, :, 2:], bidirectional[:, :, 2:], atol=1e-3)  # later blocks differ


def test_block_causal_mask():
    mask = block_causal_mask(5, 1, 2)
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(mask, expected.bool())
    assert block_causal_mask(2, 3, 2, cached_frames=4) is None  # one whole block after its history
    assert block_causal_mask(3, 4, 2).shape == (12, 12)


def test_kv_cache_streaming_equals_masked_forward(model, inputs):
    """Blocks of 2 frames (2, 2, 1) streamed through the cache == one block-causal pass."""
    x, context, t = inputs
    with torch.no_grad():
        full = model(x, t, context, block_frames=2)
        cache, outs, sizes = KVCache(len(model.blocks)), [], []
        for f0 in range(0, 5, 2):
            xb, tb = x[:, :, f0 : f0 + 2], t[:, f0 : f0 + 2]
            # denoising passes read the cache and leave it unchanged ...
            read = model(xb, tb, context, kv_cache=cache, frame_offset=f0)
            assert cache.num_frames == f0 and cache.cache_bytes() == (sizes[-1] if sizes else 0)
            # ... then one pass writes the block's K/V
            with cache.writing():
                written = model(xb, tb, context, kv_cache=cache, frame_offset=f0)
            torch.testing.assert_close(read, written, atol=ATOL, rtol=0)
            outs.append(written)
            sizes.append(cache.cache_bytes())
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=ATOL, rtol=0)
    assert cache.num_frames == 5 and not cache.write
    # grows by the K and V of every layer: tokens x dim x 4 bytes x 2 x layers x batch
    per_frame = 16 * model.cfg.dim * 4 * 2 * len(model.blocks) * 2
    assert sizes == [2 * per_frame, 4 * per_frame, 5 * per_frame]
    cache.reset()
    assert cache.cache_bytes() == 0 and cache.num_frames == 0


def test_frame_offset_shifts_rope(model, inputs):
    x, context, t = inputs
    with torch.no_grad():
        cache = KVCache(len(model.blocks))
        with cache.writing():
            model(x[:, :, :2], t[:, :2], context, kv_cache=cache, frame_offset=0)
        xb, tb = x[:, :, 2:4], t[:, 2:4]
        a = model(xb, tb, context, kv_cache=cache, frame_offset=2)
        again = model(xb, tb, context, kv_cache=cache, frame_offset=2)
        further = model(xb, tb, context, kv_cache=cache, frame_offset=7)
        # without a cache only relative positions matter: a global shift leaves the output unchanged
        shifted = model(x, t, context, frame_offset=11)
        unshifted = model(x, t, context)
    assert torch.equal(a, again)
    assert (a - further).abs().max() > 1e-3
    torch.testing.assert_close(shifted, unshifted, atol=1e-4, rtol=0)


def test_context_mask_hides_padding(model, inputs):
    x, context, t = inputs
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :9] = True
    with torch.no_grad():
        masked = model(x, t, context, context_mask=mask)
        short = model(x, t, context[:, :9])
    torch.testing.assert_close(masked, short, atol=ATOL, rtol=0)


def test_rope_split():
    assert rope_dims(128) == (44, 42, 42)  # Wan2.2-5B head_dim
    assert rope_dims(32) == (12, 10, 10)  # tiny


def test_init_weights_deterministic():
    cfg = load_preset("tiny").dit
    a, b = WanDiT(cfg, 16, 64), WanDiT(cfg, 16, 64)
    a.init_weights(3)
    b.init_weights(3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert a.proj_out.weight.abs().sum() == 0  # zero head: the untrained model predicts 0


def test_wan22_5b_param_count_on_meta():
    cfg = load_preset("wan22-5b").dit
    with torch.device("meta"):
        m = WanDiT(cfg, in_channels=48, text_dim=4096)
    n = m.num_params()
    print(f"wan22-5b WanDiT parameters: {n:,} ({n / 1e9:.3f}B)")
    assert 4.9e9 < n < 5.2e9


def test_frame_positions_override_offset(model, inputs):
    x, context, t = inputs
    with torch.no_grad():
        by_offset = model(x, t, context, frame_offset=3)
        by_positions = model(x, t, context, frame_positions=torch.arange(3, 8))
        gaps = torch.tensor([0, 1, 2, 9, 10])
        per_sample = model(x, t, context, frame_positions=torch.stack((gaps, torch.arange(5))))
        first = model(x[:1], t[:1], context[:1], frame_positions=gaps)
        second = model(x[1:], t[1:], context[1:])
    assert torch.equal(by_offset, by_positions)
    torch.testing.assert_close(per_sample, torch.cat((first, second)), atol=ATOL, rtol=0)
    assert (first - model(x[:1], t[:1], context[:1])).abs().max() > 1e-3  # a gap in positions matters
    with pytest.raises(ValueError, match="frame_positions"):
        model(x, t, context, frame_positions=torch.arange(4))


def test_batched_rope_tables_match_per_row():
    pos = torch.tensor([[0, 5, 6], [2, 3, 40]])
    cos, sin = rope_freqs(32, pos, 2, 3)
    assert cos.shape == (2, 18, 1, 16)
    for b in range(2):
        c, s_ = rope_freqs(32, pos[b], 2, 3)
        assert torch.equal(cos[b], c) and torch.equal(sin[b], s_)


def _brute_force_teacher_forcing(num_frames, frame_tokens, block_frames):
    n = 2 * num_frames * frame_tokens
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qi in range(n):
        q_noisy, q_frame = divmod(qi // frame_tokens, num_frames)
        for ki in range(n):
            k_noisy, k_frame = divmod(ki // frame_tokens, num_frames)
            qb, kb = q_frame // block_frames, k_frame // block_frames
            if not q_noisy:
                mask[qi, ki] = not k_noisy and kb <= qb
            else:
                mask[qi, ki] = (not k_noisy and kb < qb) or (k_noisy and kb == qb)
    return mask


@pytest.mark.parametrize("num_frames,frame_tokens,block_frames", [(5, 1, 2), (4, 3, 1), (6, 2, 3), (3, 2, 4)])
def test_teacher_forcing_mask_matches_brute_force(num_frames, frame_tokens, block_frames):
    got = teacher_forcing_mask(num_frames, frame_tokens, block_frames)
    assert torch.equal(got, _brute_force_teacher_forcing(num_frames, frame_tokens, block_frames))


def test_teacher_forcing_forward_equals_streaming(model, inputs):
    """[clean | noisy] in one pass == each noisy block denoised after its clean history (block-causal)."""
    x, context, t = inputs
    clean, noisy = x, torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    tokens = model.tokens_per_frame(8, 8)
    with torch.no_grad():
        out = model(
            torch.cat((clean, noisy), dim=2),
            torch.cat((torch.zeros_like(t), t), dim=1),
            context,
            attn_mask=teacher_forcing_mask(5, tokens, 2),
            frame_positions=torch.arange(5).repeat(2),
        )
        for f0 in range(0, 5, 2):
            f1 = min(f0 + 2, 5)
            ref = model(
                torch.cat((clean[:, :, :f0], noisy[:, :, f0:f1]), dim=2),
                torch.cat((torch.zeros_like(t[:, :f0]), t[:, f0:f1]), dim=1),
                context,
                block_frames=2,
            )
            torch.testing.assert_close(out[:, :, 5 + f0 : 5 + f1], ref[:, :, f0:], atol=ATOL, rtol=0)


def test_multi_prompt_context_single_prompt_equivalence(model, inputs):
    x, context, t = inputs
    other = torch.randn(context.shape, generator=torch.Generator().manual_seed(7))
    both = torch.stack((context, other), dim=1)  # (B, 2, L, D)
    with torch.no_grad():
        single = model(x, t, context, block_frames=2)
        assert torch.allclose(model(x, t, context[:, None], block_frames=2), single, atol=ATOL, rtol=0)
        all_first = model(x, t, both, context_index=torch.zeros(2, 5, dtype=torch.long), block_frames=2)
        all_second = model(x, t, both, context_index=torch.ones(2, 5, dtype=torch.long), block_frames=2)
        single_other = model(x, t, other, block_frames=2)
    torch.testing.assert_close(all_first, single, atol=ATOL, rtol=0)
    torch.testing.assert_close(all_second, single_other, atol=ATOL, rtol=0)


def test_multi_prompt_context_per_frame(model, inputs):
    """Prompt 0 for the first block, prompt 1 after: block-causal streaming with the matching prompt."""
    x, context, t = inputs
    other = torch.randn(context.shape, generator=torch.Generator().manual_seed(7))
    both = torch.stack((context, other), dim=1)
    mask = torch.zeros(2, 2, 16, dtype=torch.bool)
    mask[:, 0, :9], mask[:, 1, :12] = True, True
    index = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    with torch.no_grad():
        mixed = model(x, t, both, context_index=index, context_mask=mask, block_frames=2)
        for b in range(2):
            n0, n1 = int(index[b, 0]), int(index[b, 2])
            short = [both[b : b + 1, n, : int(mask[b, n].sum())] for n in (n0, n1)]
            first = model(x[b : b + 1, :, :2], t[b : b + 1, :2], short[0])
            torch.testing.assert_close(mixed[b : b + 1, :, :2], first, atol=ATOL, rtol=0)
            cache = KVCache(len(model.blocks))
            with cache.writing():
                model(x[b : b + 1, :, :2], t[b : b + 1, :2], short[0], kv_cache=cache)
            rest = model(x[b : b + 1, :, 2:], t[b : b + 1, 2:], short[1], kv_cache=cache, frame_offset=2, block_frames=2)
            torch.testing.assert_close(mixed[b : b + 1, :, 2:], rest, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="context_index"):
        model(x, t, both)
