"""Block-sparse attention (FrameMask -> FlexAttention BlockMask) against the dense boolean mask and SDPA.

Every training layout: block-causal (with a cache), teacher forcing [clean | noisy] for T2V and for I2V with an
independent first frame, sink + window histories, multi-shot sinks, per-sample tables and the rows a
sequence-parallel rank holds. Frame sizes are chosen so frames straddle the 128-token tiles (partial tiles) and
sequences end mid-tile.

On the CPU FlexAttention has no backward (torch refuses it), so the CPU tests check the BlockMask tile by tile
against ``create_block_mask`` over the same predicate and the forward in float32 against SDPA; the CUDA tests
check the compiled kernel's forward and gradients (float32 and bf16 tolerances stated there).
"""

import pytest
import torch
import torch.nn.functional as F

from longlive.config import DiTConfig
from longlive.models.attention import (
    FLEX_BLOCK, FrameMask, attention, block_causal, block_causal_frames, block_causal_mask, cached_history,
    teacher_forcing_frames, teacher_forcing_mask,
)
from longlive.models.dit import WanDiT
from longlive.train.ar import attention_frames, shot_index

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CPU_ATOL = 2e-5  # float32 flex (its eager reference) vs SDPA: the same sums in another order
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention with gradients needs CUDA")


def layouts() -> dict[str, FrameMask]:
    """name -> FrameMask, at 24 or 40 tokens per frame (frames straddle tiles; sequences end mid-tile)."""
    F9 = 9
    shots = shot_index([0, 5], F9)
    out = {
        "block_causal": FrameMask(block_causal_frames(7, 2), 24),
        "block_causal_cached": FrameMask(block_causal_frames(3, 2, cached_frames=4), 24),
        "tf_t2v": FrameMask(attention_frames(F9, 2), 24),
        "tf_i2v_independent_first": FrameMask(attention_frames(F9, 2, True), 40),
        "tf_sink_window": FrameMask(attention_frames(F9, 2, sink_frames=1, window_frames=3), 24),
        "tf_multishot_sink": FrameMask(attention_frames(F9, 2, shots=shots, sink_frames=1, window_frames=3), 24),
        "tf_multishot_first_shot_sink": FrameMask(
            attention_frames(F9, 2, shots=shots, sink_frames=1, window_frames=3, multishot_sink=False), 24),
        "tf_per_sample": FrameMask(torch.stack([
            attention_frames(F9, 2, shots=shot_index(s, F9), sink_frames=1, window_frames=3)
            for s in ([0], [0, 3], [0, 6])]), 24),
    }
    out["tf_per_sample_stacked"] = FrameMask.stack([  # what ClipMasks hands a batch: each clip's mask, stacked
        FrameMask(t, 24) for t in out["tf_per_sample"].frames])
    tf = out["tf_sink_window"]
    out["sp_rows_strided"] = tf.select_rows(torch.arange(1, tf.q_len, 2))  # a spatial split: part of every frame
    out["sp_rows_frames"] = tf.select_rows(torch.arange(4 * 24, 13 * 24))  # a temporal split: whole frames
    return out


def _tiles(bm) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) dense tile tables of a BlockMask, from its (num_blocks, indices) rows."""
    def dense(num, idx):
        n_cols = -(-bm.seq_lengths[1] // bm.BLOCK_SIZE[1])
        out = torch.zeros(*idx.shape[:-1], n_cols, dtype=torch.bool)
        keep = torch.arange(idx.shape[-1]) < num[..., None]
        for pos in zip(*torch.nonzero(keep, as_tuple=True)):
            out[pos[:-1] + (idx[pos].item(),)] = True
        return out
    return dense(bm.kv_num_blocks.cpu(), bm.kv_indices.cpu()), dense(bm.full_kv_num_blocks.cpu(), bm.full_kv_indices.cpu())


def test_dense_mask_is_the_frame_table_expanded_to_tokens():
    for name, m in layouts().items():
        table = m.frames if m.batched else m.frames[None]
        tokens = table.repeat_interleave(m.frame_tokens, 1).repeat_interleave(m.frame_tokens, 2)
        if m.rows is not None:
            tokens = tokens[:, m.rows]
        want = tokens[:, None] if m.batched else tokens[0]
        assert torch.equal(m.dense(), want), name
    # the helpers keep their dense answers
    assert block_causal_mask(2, 3, 2, cached_frames=4) is None and block_causal(2, 3, 2, cached_frames=4) is None
    assert block_causal(5, 3, 2) is block_causal(5, 3, 2), "kept per layout"
    blocks = torch.arange(5) // 2
    assert torch.equal(teacher_forcing_mask(5, 3, 2),
                       FrameMask(teacher_forcing_frames(cached_history(blocks), blocks), 3).dense())


def test_block_mask_equals_create_block_mask_over_the_same_predicate():
    from torch.nn.attention.flex_attention import create_block_mask

    for name, m in layouts().items():
        ours = m.block_mask("cpu")
        ref = create_block_mask(m.mask_mod("cpu"), m.frames.shape[0] if m.batched else None, None, m.q_len, m.kv_len,
                                device="cpu", BLOCK_SIZE=FLEX_BLOCK)
        (p, f), (rp, rf) = _tiles(ours), _tiles(ref)
        assert torch.equal(p, rp) and torch.equal(f, rf), name
        assert ours.seq_lengths == (m.q_len, m.kv_len)
        assert m.block_mask("cpu") is ours, "built once per layout"


def test_flex_forward_equals_dense_sdpa_in_float32_on_cpu():
    g = torch.Generator().manual_seed(0)
    for name, m in layouts().items():
        B = m.frames.shape[0] if m.batched else 2
        q = torch.randn(B, m.q_len, 3, 16, generator=g)
        k, v = (torch.randn(B, m.kv_len, 3, 16, generator=g) for _ in range(2))
        with torch.no_grad():
            want = attention(q, k, v, m.dense())
            got = attention(q, k, v, m.with_backend("flex"))
        assert (got - want).abs().max() < CPU_ATOL, name


def test_auto_backend_is_dense_on_cpu_and_flex_on_cuda():
    m = layouts()["tf_t2v"]
    assert not m.use_flex(torch.device("cpu")) and m.use_flex(torch.device("cuda"))
    assert m.with_backend("flex").use_flex(torch.device("cpu")) and not m.with_backend("dense").use_flex(torch.device("cuda"))
    with pytest.raises(ValueError, match="backend"):
        m.with_backend("sdpa")
    with pytest.raises(ValueError, match="bool table"):
        FrameMask(torch.ones(3, 3), 4)


def test_5b_teacher_forcing_tiles_are_whole_blocks():
    """704x1280: 880 tokens a frame, blocks of 8 frames = 55 tiles of 128, so no tile needs the mask_mod."""
    m = FrameMask(attention_frames(32, 8), 880)
    partial, full = m.tiles()
    assert not partial.any()
    assert int(full.sum()) * FLEX_BLOCK**2 == m.allowed_pairs()
    assert m.allowed_pairs() / m.q_len == 17_600  # keys per query (issue 20's count)
    # I2V's lone first frame cuts tiles: those are partial, and they cover what the whole tiles do not
    i2v = FrameMask(attention_frames(32, 8, True), 880)
    partial, full = i2v.tiles()
    assert partial.any() and int(full.sum()) * FLEX_BLOCK**2 < i2v.allowed_pairs()


def test_allowed_pairs_counts_the_dense_mask():
    for name, m in layouts().items():
        assert m.allowed_pairs() == int(m.dense().sum()), name


def _tiny_dit(seed=0):
    torch.manual_seed(seed)
    cfg = DiTConfig(num_layers=2, dim=64, num_heads=4, ffn_dim=128, freq_dim=32, patch_size=(1, 2, 2))
    model = WanDiT(cfg, in_channels=4, text_dim=8)
    model.init_weights(seed)
    torch.nn.init.normal_(model.proj_out.weight, std=0.02)  # a non-zero head, so gradients reach every block
    return model


def _tf_inputs(F_=5, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 2 * F_, 8, 12, generator=g)  # 4 x 6 = 24 tokens a frame
    t = torch.cat((torch.zeros(batch, F_), 1000 * torch.rand(batch, F_, generator=g)), dim=1)
    return x, t, torch.randn(batch, 6, 8, generator=g), torch.arange(F_).repeat(2)


def test_dit_teacher_forcing_flex_equals_dense_on_cpu():
    model = _tiny_dit()
    x, t, ctx, pos = _tf_inputs()
    mask = FrameMask(attention_frames(5, 2, True, sink_frames=1, window_frames=2), 24)
    with torch.no_grad():
        want = model(x, t, ctx, attn_mask=mask.with_backend("dense"), frame_positions=pos)
        got = model(x, t, ctx, attn_mask=mask.with_backend("flex"), frame_positions=pos)
    assert (got - want).abs().max() < CPU_ATOL


# ---------------------------------------------------------------------------------------------- CUDA


@CUDA
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 2e-4, 1e-3), (torch.bfloat16, 3e-2, 3e-2)])
def test_compiled_flex_forward_and_gradients_equal_dense_sdpa_on_cuda(dtype, atol, rtol):
    """Outputs and q/k/v gradients of compiled flex vs SDPA with the dense mask. float32: the same math in another
    order; bf16: both kernels round to bf16, compared to each other at bf16's resolution (relative 3e-2)."""
    g = torch.Generator().manual_seed(0)
    for name, m in layouts().items():
        B = m.frames.shape[0] if m.batched else 2
        base = [torch.randn(B, n, 4, 64, generator=g) for n in (m.q_len, m.kv_len, m.kv_len)]
        grad_out = torch.randn(B, m.q_len, 4, 64, generator=g).cuda().to(dtype)
        results = []
        for mask in (m.dense("cuda"), m.with_backend("flex")):
            q, k, v = (t.cuda().to(dtype).requires_grad_() for t in base)
            out = attention(q, k, v, mask)
            out.backward(grad_out)
            results.append([out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()])
        for what, want, got in zip(("out", "dq", "dk", "dv"), *results):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=f"{name} {what} ({dtype})")


@CUDA
def test_dit_teacher_forcing_step_flex_equals_dense_on_cuda():
    """The whole teacher-forcing loss and every parameter gradient of a tiny DiT, float32, flex vs dense."""
    x, t, ctx, pos = _tf_inputs()
    mask = FrameMask(attention_frames(5, 2, sink_frames=1, window_frames=2), 24)
    grads = []
    for backend in ("dense", "flex"):
        model = _tiny_dit().cuda()
        out = model(x.cuda(), t.cuda(), ctx.cuda(), attn_mask=mask.with_backend(backend), frame_positions=pos)
        F.mse_loss(out[:, :, 5:], x[:, :, :5].cuda()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-3, msg=n)
