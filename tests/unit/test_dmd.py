"""DMD: each loss against a direct statement of its formula on fixed tensors, the self-forcing rollout
against the inference pipeline (train = test), and a short distillation run with its export.

Float32 throughout; ATOL = 1e-5 for model-path comparisons (operation order only), 1e-6 for formulas.
"""

import json

import pytest
import torch

from longlive.config import DiTConfig, load_preset
from longlive.diffusion import dmd, flow
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import BlockPlan
from longlive.models.dit import WanDiT

ATOL = 1e-5


def fixed(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def micro_dit(seed=0, channels=4) -> WanDiT:
    cfg = DiTConfig(num_layers=2, dim=64, num_heads=2, ffn_dim=128, freq_dim=32, patch_size=(1, 2, 2))
    m = WanDiT(cfg, in_channels=channels, text_dim=16)
    m.init_weights(seed)
    with torch.no_grad():
        torch.nn.init.normal_(m.proj_out.weight, generator=torch.Generator().manual_seed(seed + 1), std=0.05)
    return m.eval()


def test_dmd_gradient_and_generator_loss_match_the_formula():
    B, C, F, h, w = 2, 3, 4, 2, 2
    x, real, fake = fixed(B, C, F, h, w, seed=1), fixed(B, C, F, h, w, seed=2), fixed(B, C, F, h, w, seed=3)
    grad = dmd.dmd_gradient(x, real, fake)
    for b in range(B):  # (x0_fake - x0_real) / mean |x - x0_real|, per sample
        ref = (fake[b] - real[b]) / (x[b] - real[b]).abs().mean()
        torch.testing.assert_close(grad[b], ref, atol=1e-6, rtol=1e-6)
    # the surrogate's gradient with respect to x is grad / numel
    xg = x.clone().requires_grad_(True)
    dmd.generator_loss(xg, grad).backward()
    torch.testing.assert_close(xg.grad, grad / x.numel(), atol=1e-9, rtol=1e-6)
    # I2V: a masked frame gets no gradient and leaves the normaliser
    mask = torch.ones(B, F)
    mask[:, 0] = 0
    masked = dmd.dmd_gradient(x, real, fake, mask)
    assert torch.equal(masked[:, :, 0], torch.zeros_like(masked[:, :, 0]))
    for b in range(B):
        ref = (fake[b, :, 1:] - real[b, :, 1:]) / (x[b, :, 1:] - real[b, :, 1:]).abs().mean()
        torch.testing.assert_close(masked[b, :, 1:], ref, atol=1e-6, rtol=1e-6)


def test_critic_loss_and_x0_match_the_formula():
    B, C, F, h, w = 2, 3, 4, 2, 2
    v, x, eps = fixed(B, C, F, h, w, seed=4), fixed(B, C, F, h, w, seed=5), fixed(B, C, F, h, w, seed=6)
    torch.testing.assert_close(dmd.critic_loss(v, x, eps), ((v - (eps - x)) ** 2).mean(), atol=1e-6, rtol=1e-6)
    mask = torch.tensor([[0.0, 1, 1, 1], [0, 1, 1, 1]])
    ref = ((v - (eps - x)) ** 2)[:, :, 1:].mean()
    torch.testing.assert_close(dmd.critic_loss(v, x, eps, mask), ref, atol=1e-6, rtol=1e-6)
    sigma = torch.tensor([0.3, 0.8])
    torch.testing.assert_close(dmd.x0_from_velocity(x, sigma, v), x - sigma[:, None, None, None, None] * v)
    s = dmd.sample_dmd_sigma(1000, 3.0, 20, 980, torch.Generator().manual_seed(0))
    lo, hi = flow.shift_sigma(torch.tensor(0.02), 3.0), flow.shift_sigma(torch.tensor(0.98), 3.0)
    assert bool((s >= lo).all() and (s <= hi).all()) and s.std() > 0.1


def test_real_score_guidance_matches_the_formula():
    model = micro_dit(seed=2)
    x_t, sigma = fixed(2, 4, 3, 4, 4, seed=7), torch.tensor([0.4, 0.9])
    ctx, null = fixed(2, 5, 16, seed=8), fixed(5, 16, seed=9)
    with torch.no_grad():
        got = dmd.score_x0(model, x_t, sigma, ctx, null_context=null, guidance_scale=3.0)
        vc = model(x_t, 1000 * sigma, ctx)
        vu = model(x_t, 1000 * sigma, null.expand_as(ctx))
    ref = x_t - sigma[:, None, None, None, None] * (vu + 3.0 * (vc - vu))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="null_context"):
        dmd.score_x0(model, x_t, sigma, ctx, guidance_scale=2.0)


@pytest.mark.parametrize("i2v", [False, True])
def test_rollout_is_what_the_streaming_pipeline_generates(i2v):
    """Self-forcing trains on exactly the inference chunk loop: same cache view, positions, noise order."""
    model = micro_dit(seed=3)
    sizes = [1, 2, 2, 2, 2] if i2v else [2, 2, 2, 2, 1]
    steps = [1000, 500]
    layout = dmd.RolloutLayout(sizes, flow.step_list_sigmas(steps, 3.0), sink_frames=1, window_frames=3,
                               max_block_position=7 if i2v else 6, image_first=i2v)
    ctx, image = fixed(1, 5, 16, seed=10), fixed(1, 4, 1, 4, 4, seed=11)
    with torch.no_grad():
        got = dmd.rollout(model, (1, 4, 9, 4, 4), ctx, layout, torch.Generator().manual_seed(5),
                          image=image if i2v else None, grad=False)
    cfg = load_preset("tiny").inference.model_copy(update={
        "denoising_steps": steps, "timestep_shift": 3.0, "sink_frames": 1, "window_frames": 3,
        "max_block_position": layout.max_block_position, "sampler": "renoise", "guidance_scale": 1.0})
    pipe = StreamingPipeline(model, cfg)
    plans, start = [], 0
    for i, n in enumerate(sizes):
        plans.append(BlockPlan(i, start, n, 0, 0, False, False))
        start += n
    ref = torch.cat([o.latents for o in pipe.stream(plans, [ctx], (4, 4, 4), image_latent=image if i2v else None,
                                                    generator=torch.Generator().manual_seed(5))], dim=2)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    if i2v:
        assert torch.equal(got[:, :, :1], image)


def test_rollout_differentiates_only_the_exit_step():
    model = micro_dit(seed=4).train()
    layout = dmd.RolloutLayout([2, 2], flow.step_list_sigmas([1000, 750, 500, 250], 3.0))
    x = dmd.rollout(model, (1, 4, 4, 4, 4), fixed(1, 5, 16, seed=12), layout, torch.Generator().manual_seed(0),
                    exit_step=1)
    assert x.requires_grad
    x.sum().backward()
    assert model.proj_out.weight.grad is not None and model.proj_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exit_step"):
        dmd.rollout(model, (1, 4, 4, 4, 4), fixed(1, 5, 16), layout, torch.Generator(), exit_step=4)
    with pytest.raises(ValueError, match="cover"):
        dmd.rollout(model, (1, 4, 5, 4, 4), fixed(1, 5, 16), layout, torch.Generator())


@pytest.fixture(scope="module")
def shards(synth_dir, fake_encoders, tmp_path_factory):
    from longlive.data.encode import encode_dataset

    url = str(tmp_path_factory.mktemp("dmd") / "shards")
    encode_video, encode_text = fake_encoders
    encode_dataset(synth_dir, url, encode_video=encode_video, encode_text=encode_text, samples_per_shard=4)
    return url


@pytest.fixture(scope="module")
def record(shards, tiny_preset, tmp_path_factory):
    from conftest import validate_into

    return validate_into(shards, tiny_preset, tmp_path_factory.mktemp("dmd_validate"))


@pytest.mark.parametrize("variant,lora", [("t2v", False), ("i2v", True)])
def test_train_dmd_runs_and_exports_a_student(tiny_preset, shards, record, tmp_path, monkeypatch, variant, lora):
    from longlive.config import DMDConfig, LoRAConfig
    from longlive.models.lora import ADAPTER_FILE
    from longlive.models.wan_adapter import save_dit
    from longlive.models.checkpoint import AR_CONFIG_NAME
    from longlive.train.ar import inference_config
    from longlive.train.dmd import train_dmd

    monkeypatch.setenv("WANDB_MODE", "disabled")
    dmd_cfg = DMDConfig(train={"steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1}, timestep_shift=3.0,
                        students={"2step": [1000, 500]}, variants=[variant], critic_updates=2, ckpt_every=2,
                        lora=LoRAConfig(rank=4, alpha=4) if lora else None)
    preset = tiny_preset.model_copy(update={"dmd": dmd_cfg})
    torch.manual_seed(0)
    base = WanDiT(preset.dit, in_channels=preset.vae.z_dim, text_dim=preset.text.dim)
    base.init_weights(0)
    with torch.no_grad():  # a trained model's head is not zero; with a zero head LoRA gets no gradient
        torch.nn.init.normal_(base.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    save_dit(base, tmp_path / "base" / "dit")
    ar_dir = tmp_path / "ar"
    save_dit(base, ar_dir / "dit")
    (ar_dir / AR_CONFIG_NAME).write_text(json.dumps(inference_config(preset, variant)))
    null = torch.zeros(preset.text.max_tokens, preset.text.dim)
    kw = dict(ar_dir=ar_dir, base_dir=tmp_path / "base", work_dir=tmp_path / "work", plots_dir=tmp_path / "plots",
              shards_url=shards, validation_report=record, null_context=null)
    metrics = train_dmd(preset, variant, "2step", out_dir=tmp_path / "out", **kw)
    assert metrics["steps"] == 4 and metrics["denoising_steps"] == 2
    critic = json.loads((tmp_path / "plots" / "critic_loss.json").read_text())
    assert len(critic) == 4 and all(r["loss"] > 0 for r in critic)
    assert len(json.loads((tmp_path / "plots" / "dmd_grad.json").read_text())) == 2  # steps 0 and 2
    cfg = json.loads((tmp_path / "out" / AR_CONFIG_NAME).read_text())
    assert cfg["denoising_steps"] == [1000, 500] and cfg["distilled"] == "dmd" and cfg["i2v"] == (variant == "i2v")
    assert (tmp_path / "out" / ADAPTER_FILE).is_file() == lora
    assert not (tmp_path / "work" / "checkpoint.pt").exists()
    from longlive.models.lora import load_and_merge_adapter
    from longlive.models.wan_adapter import load_dit

    student = load_dit(tmp_path / "out" / "dit")
    assert load_and_merge_adapter(student, tmp_path / "out") == lora
    changed = any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), base.state_dict().values()))
    assert changed, "distillation moved the generator's weights"


def test_activation_checkpointing_gives_the_same_gradients():
    """The critic's (bidirectional) forward recomputed in backward gives the same gradients."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from longlive.models.dit import Block

    x, eps, ctx = fixed(2, 4, 4, 4, 4, seed=14), fixed(2, 4, 4, 4, 4, seed=15), fixed(2, 5, 16, seed=16)
    sigma = torch.tensor([0.3, 0.7])
    grads = []
    for checkpointed in (False, True):
        model = micro_dit(seed=5).train()
        if checkpointed:
            apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
        v = model(flow.add_noise(x, eps, sigma), flow.timestep(sigma), ctx)
        dmd.critic_loss(v, x, eps).backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=ATOL, rtol=1e-4, msg=n)
