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


def _dmd_grads(checkpointing, preset):
    from longlive.diffusion import dmd, flow
    from longlive.train.ar import clip_block_sizes, max_block_position
    from longlive.train.dmd import DMDModels, dmd_step_losses

    cpu = torch.device("cpu")
    generator = build_dit(random_dit(preset, cpu, torch.float32, 0), preset, training=True,
                          checkpointing=checkpointing).train()
    critic = build_dit(random_dit(preset, cpu, torch.float32, 1), preset, training=True,
                       checkpointing=bool(checkpointing)).train()
    teacher = random_dit(preset, cpu, torch.float32, 2).requires_grad_(False)
    cfg, ar = preset.dmd, preset.ar
    C, F, h, w = preset.latent_shape
    steps = next(iter(cfg.students.values()))
    layout = dmd.RolloutLayout(clip_block_sizes(F, ar.block_frames), flow.step_list_sigmas(steps, cfg.timestep_shift),
                               ar.sink_frames, ar.window_frames, max_block_position(F, ar.block_frames))
    g = torch.Generator().manual_seed(5)
    x_data = torch.randn(1, C, F, h, w, generator=g)
    context = torch.randn(1, preset.text.max_tokens, preset.text.dim, generator=g)
    null = torch.zeros(preset.text.max_tokens, preset.text.dim)
    loss, _ = dmd_step_losses(DMDModels(generator, critic), teacher, layout, cfg, x_data, context, null,
                              torch.Generator().manual_seed(7), update_generator=True)
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for n, p in generator.named_parameters() if p.grad is not None}
    return loss.detach(), grads, generator


def test_dmd_generator_with_cache_free_checkpointing_equals_the_plain_step():
    """The generator's rollout reads a rolling KV cache that later blocks overwrite: only its cross-attention and
    FFN recompute in backward, so its loss and gradients are those of the plain step (the whole-block wrapper
    would recompute self-attention against the changed cache)."""
    torch.manual_seed(0)
    preset = load_preset("tiny")
    preset = preset.model_copy(update={"dit": preset.dit.model_copy(update={"num_layers": 2})})
    loss0, g0, _ = _dmd_grads(False, preset)
    loss1, g1, wrapped = _dmd_grads("cache_free", preset)
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-6)
    assert g1.keys() == g0.keys() and g0
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    wrapped_names = {n for n, _ in wrapped.named_parameters() if "_checkpoint_wrapped_module" in n}
    assert any(".attn2." in n for n in wrapped_names) and any(".ffn." in n for n in wrapped_names)
    assert not any(".attn1." in n for n in wrapped_names)  # the self-attention keeps its activations
    assert wrapped.build_record.steps[-1] == "activation checkpointing (cross-attention, FFN)"


def test_ema_averages_the_parameters_of_a_checkpointed_model():
    """named_parameters() of a wrapped model carry the wrapper's prefix, its state dict does not: the EMA must
    average by the state dict's names, or every wrapped parameter is copied instead of averaged."""
    from longlive.train.ema import EMA

    preset = load_preset("tiny")
    preset = preset.model_copy(update={"dit": preset.dit.model_copy(update={"num_layers": 2})})
    for checkpointing in (True, "cache_free"):
        model = build_dit(random_dit(preset, torch.device("cpu"), torch.float32, 0), preset, training=True,
                          checkpointing=checkpointing)
        ema = EMA(model, decay=0.5)
        before = {k: v.clone() for k, v in ema.shadow.items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(0)
        params = {k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter)}
        assert len(params) == len(list(model.parameters()))
        for k in params:
            torch.testing.assert_close(ema.shadow[k], before[k] + 0.5, msg=f"{checkpointing}: {k}")
