"""WanDiT: shapes, per-frame timesteps, block-causal attention, the KV cache and RoPE offsets.

All comparisons run in float32; two computations of the same function must agree to ATOL = 1e-5
(they differ only by the order of floating-point operations: masked vs unmasked SDPA, concatenated
vs single-pass keys).
"""

import pytest
import torch

from longlive.config import load_preset
from longlive.models.attention import KVCache, block_causal_mask
from longlive.models.dit import WanDiT
from longlive.models.rope import rope_dims

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
