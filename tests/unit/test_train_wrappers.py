"""Training wrappers (longlive.parallel.training through build_dit): activation checkpointing and compiled blocks
change how a step runs, not what it computes or what a checkpoint holds."""

import pytest
import torch
import torch.nn.functional as F

from longlive.config import load_preset
from longlive.bench.variants import random_dit
from longlive.inference.build import build_dit
from longlive.models.attention import FrameMask, block_causal_frames
from longlive.parallel.training import unwrap_blocks


def _tf_step(model, x, t, ctx, mask, pos):
    out = model(x, t, ctx, attn_mask=mask, frame_positions=pos)
    F.mse_loss(out[:, :, 2:], x[:, :, :2]).backward()
    # the checkpoint wrapper's module sits in the parameter names (not in the state dict's)
    return out.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                          for n, p in model.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True], ids=["checkpointed", "checkpointed+compiled"])
def test_wrapped_dit_step_equals_the_plain_one_in_float32(compiled):
    torch.manual_seed(0)
    preset = load_preset("tiny")
    preset = preset.model_copy(update={"dit": preset.dit.model_copy(update={"num_layers": 2})})
    plain = random_dit(preset, torch.device("cpu"), torch.float32, 0).train()
    wrapped = build_dit(random_dit(preset, torch.device("cpu"), torch.float32, 0), preset, training=True,
                        checkpointing=True, compile_blocks=compiled).train()
    C, Fr, h, w = preset.latent_shape
    x = torch.randn(1, C, 4, h, w)
    t, ctx = torch.rand(1, 4) * 1000, torch.randn(1, preset.text.max_tokens, preset.text.dim)
    mask = FrameMask(block_causal_frames(4, 2), plain.tokens_per_frame(h, w), backend="dense")
    pos = torch.arange(4)
    out0, g0 = _tf_step(plain, x, t, ctx, mask, pos)
    out1, g1 = _tf_step(wrapped, x, t, ctx, mask, pos)
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints keep the plain names
    assert g1.keys() == g0.keys()
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert wrapped.build_record.steps[-1] == ("compile blocks" if compiled else "activation checkpointing")
    assert all(type(b).__name__ == "Block" for b in unwrap_blocks(wrapped))



@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention with gradients needs CUDA")
def test_compiled_blocks_with_flex_attention_equal_eager_dense_on_cuda():
    # the 5B training path: the DiT hands compiled blocks the BlockMask; eager dense SDPA is the reference
    torch.manual_seed(0)
    preset = load_preset("tiny")
    preset = preset.model_copy(update={"dit": preset.dit.model_copy(update={"num_layers": 2})})
    dev = torch.device("cuda")
    plain = random_dit(preset, dev, torch.float32, 0).train()
    wrapped = build_dit(random_dit(preset, dev, torch.float32, 0), preset, training=True, checkpointing=True,
                        compile_blocks=True).train()
    C, Fr, h, w = preset.latent_shape
    x = torch.randn(1, C, 4, h, w, device=dev)
    t, ctx = torch.rand(1, 4, device=dev) * 1000, torch.randn(1, preset.text.max_tokens, preset.text.dim, device=dev)
    frames = block_causal_frames(4, 2)
    out0, g0 = _tf_step(plain, x, t, ctx, FrameMask(frames, plain.tokens_per_frame(h, w), backend="dense"), torch.arange(4))
    out1, g1 = _tf_step(wrapped, x, t, ctx, FrameMask(frames, plain.tokens_per_frame(h, w), backend="flex"), torch.arange(4))
    torch.testing.assert_close(out1, out0, atol=2e-3, rtol=2e-3)  # TF32 matmuls on either side
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, atol=2e-3, rtol=2e-2, msg=name)
