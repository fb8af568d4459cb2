"""AR teacher forcing: the [clean | noisy] batch against a direct construction, I2V first-frame
handling, multi-shot context indices, the loss going down on synthetic shards, and the DVC stage."""

import json

import pytest
import torch

from _project import run
from conftest import validate_into
from longlive.config import DiTConfig
from longlive.data.encode import encode_dataset
from longlive.models.dit import WanDiT
from longlive.models.checkpoint import AR_CONFIG_NAME
from longlive.models.wan_adapter import load_dit, save_dit
from longlive.train.ar import (
    Clip, ShardClips, attention_mask, build_batch, clip_block_sizes, collate, masked_flow_loss,
    step_sigmas, tf_forward, train_ar,
)

C, F, H, W = 3, 5, 2, 2  # latent (channels, frames, height, width) of the hand-made examples
TINY_DIT = DiTConfig(num_layers=1, dim=32, num_heads=2, ffn_dim=64, freq_dim=16, patch_size=(1, 1, 1))


def ar_cfg(preset, **update):
    return preset.ar.model_copy(update={"block_frames": 2, "timestep_shift": 3.0, **update})


def variant(preset, name):
    return preset.ar.variants[name]


def direct_mask(blocks: list[int], frame_tokens: int) -> torch.Tensor:
    """Token-by-token statement of the teacher-forcing rule over [clean | noisy]."""
    n = len(blocks)
    seq = [("clean", blocks[f]) for f in range(n)] + [("noisy", blocks[f]) for f in range(n)]
    m = torch.zeros(2 * n * frame_tokens, 2 * n * frame_tokens, dtype=torch.bool)
    for i, (qh, qb) in enumerate(seq):
        for j, (kh, kb) in enumerate(seq):
            ok = (kh == "clean" and kb <= qb) if qh == "clean" else ((kh == "clean" and kb < qb) or (kh == "noisy" and kb == qb))
            m[i * frame_tokens:(i + 1) * frame_tokens, j * frame_tokens:(j + 1) * frame_tokens] = ok
    return m


def example(batch=4, shots=((0,), (0, 3), (0,), (0, 2))):
    g = torch.Generator().manual_seed(0)
    clips = [Clip(f"c{i}", torch.randn(C, F, H, W, generator=g).half(), torch.randn(len(s), 3, 8, generator=g).half(), list(s))
             for i, s in zip(range(batch), shots)]
    return clips, torch.randn(3, 8, generator=g)


def test_teacher_forcing_batch_matches_direct_construction(tiny_preset):
    cfg = ar_cfg(tiny_preset, caption_dropout=0.0)
    clips, null = example()
    x0, context, index = collate(clips)
    b = build_batch(x0, context, index, null, cfg, variant(tiny_preset, "t2v"), torch.Generator().manual_seed(1))

    assert torch.equal(b.frame_positions, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4]))
    assert torch.equal(b.x[:, :, :F], x0), "the first half is the clean clip"
    noise = b.target + x0  # target = noise - x0
    s = b.sigma[:, None, :, None, None]
    assert torch.allclose(b.x[:, :, F:], (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.equal(b.timestep[:, :F], torch.zeros(4, F))
    assert torch.allclose(b.timestep[:, F:], 1000 * b.sigma)
    # one level per block [0,1] [2,3] [4], drawn from the shifted step list (shift 3: 1, .9, .75, .5)
    levels = step_sigmas([1000, 750, 500, 250], 3.0)
    assert torch.allclose(levels, torch.tensor([1.0, 0.9, 0.75, 0.5]))
    assert torch.equal(b.sigma[:, 0], b.sigma[:, 1]) and torch.equal(b.sigma[:, 2], b.sigma[:, 3])
    assert all(bool((levels - v).abs().min() < 1e-6) for v in b.sigma.flatten())
    assert torch.equal(b.loss_mask, torch.ones(4, F))
    assert clip_block_sizes(F, 2) == [2, 2, 1] and clip_block_sizes(F, 2, independent_first_frame=True) == [1, 2, 2]

    for independent, blocks in ((False, [0, 0, 1, 1, 2]), (True, [0, 1, 1, 2, 2])):
        assert torch.equal(attention_mask(F, 3, 2, independent), direct_mask(blocks, 3)), independent
    # blocks draw their levels independently
    many = build_batch(*collate(example(4)[0] * 8), null, cfg, variant(tiny_preset, "t2v"), torch.Generator().manual_seed(2))
    assert bool((many.sigma[:, 0] != many.sigma[:, 2]).any())


def test_i2v_first_frame_is_clean_at_t0_and_outside_the_loss(tiny_preset):
    cfg = ar_cfg(tiny_preset)
    i2v = variant(tiny_preset, "i2v")
    assert i2v.i2v and i2v.independent_first_frame
    clips, null = example()
    x0, context, index = collate(clips)
    b = build_batch(x0, context, index, null, cfg, i2v, torch.Generator().manual_seed(1))
    assert torch.equal(b.x[:, :, F], x0[:, :, 0]), "noisy-half frame 0 is the clean image latent"
    assert torch.equal(b.timestep[:, F], torch.zeros(4)) and bool((b.timestep[:, F + 1:] > 0).all())
    assert torch.equal(b.loss_mask[:, 0], torch.zeros(4)) and torch.equal(b.loss_mask[:, 1:], torch.ones(4, F - 1))

    torch.manual_seed(0)
    model = WanDiT(TINY_DIT, in_channels=C, text_dim=8)
    mask = attention_mask(F, H * W, 2, independent_first_frame=True)
    with torch.no_grad():
        pred = tf_forward(model, b, mask)
    loss = masked_flow_loss(pred, b)
    changed = pred.clone()
    changed[:, :, F] += 100.0  # the prediction for the image frame
    assert masked_flow_loss(changed, b) == loss
    changed[:, :, F + 1] += 1.0  # a generated frame
    assert masked_flow_loss(changed, b) != loss


def test_multishot_frames_attend_to_their_own_shot_caption(tiny_preset):
    clips, null = example()
    x0, context, index = collate(clips)
    assert context.shape == (4, 2, 3, 8)
    assert index.tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]]
    b = build_batch(x0, context, index, null, ar_cfg(tiny_preset, caption_dropout=0.0), variant(tiny_preset, "t2v"),
                    torch.Generator().manual_seed(1))
    assert torch.equal(b.context_index, index.repeat(1, 2))

    # Changing clip 1's second caption (frames 3-4) leaves block 0 (frames 0-1, both halves) unchanged.
    torch.manual_seed(0)
    model = WanDiT(TINY_DIT, in_channels=C, text_dim=8)
    mask = attention_mask(F, H * W, 2)
    with torch.no_grad():
        before = tf_forward(model, b, mask)
        b.context[1, 1] += 1.0
        after = tf_forward(model, b, mask)
    for f in (0, 1, F, F + 1):
        assert torch.allclose(before[1, :, f], after[1, :, f], atol=1e-6), f
    assert not torch.allclose(before[1, :, F + 3], after[1, :, F + 3])
    assert torch.equal(before[0], after[0])

    # caption dropout swaps every caption of a clip for the empty prompt
    dropped = build_batch(x0, context, index, null, ar_cfg(tiny_preset, caption_dropout=1.0), variant(tiny_preset, "t2v"),
                          torch.Generator().manual_seed(1))
    assert torch.equal(dropped.context, null.expand_as(context))


@pytest.fixture(scope="module")
def shards(synth_dir, fake_encoders, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ar") / "shards")
    encode_video, encode_text = fake_encoders
    encode_dataset(synth_dir, url, encode_video=encode_video, encode_text=encode_text, samples_per_shard=4)
    return url


@pytest.fixture(scope="module")
def record(shards, tiny_preset, tmp_path_factory):
    return validate_into(shards, tiny_preset, tmp_path_factory.mktemp("ar_validate"))


def test_shard_clips_follow_shot_starts_and_stream(shards, record):
    data = ShardClips(shards, validation_report=record)
    multi = [c for c in data._all if len(c.shot_starts) > 1]
    assert multi, "the synthetic set has multi-shot clips"
    _, _, index = collate(multi)
    frames = multi[0].latents.shape[1]
    for clip, row in zip(multi, index):
        k = clip.shot_starts[1]
        assert 0 < k < frames and row.tolist() == [0] * k + [1] * (frames - k)
    stream = ShardClips(shards, shards_in_memory=1, validation_report=record)
    assert stream.streaming and len(stream) == len(data) == 12
    keys = lambda d: [c.key for c in d.sample(4, torch.Generator().manual_seed(5))]  # noqa: E731
    assert keys(stream) == keys(ShardClips(shards, shards_in_memory=1, validation_report=record)), "a batch is a function of the generator"
    assert any(set(keys(stream)) <= set(e["keys"]) for e in stream.entries), "a streamed batch comes from one shard"
    assert len(stream._cache) == 1


def test_loss_goes_down_and_the_export_is_the_ema(tiny_preset, shards, record, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    preset = tiny_preset.model_copy(update={"ar": tiny_preset.ar.model_copy(update={
        "train": tiny_preset.ar.train.model_copy(update={"steps": 40, "batch_size": 4, "lr": 2e-3, "log_every": 1}),
        "ema": tiny_preset.ar.ema.model_copy(update={"decay": 0.9, "start_step": 10}),
    })})
    torch.manual_seed(0)
    base = WanDiT(preset.dit, in_channels=preset.vae.z_dim, text_dim=preset.text.dim)
    base.init_weights(0)
    save_dit(base, tmp_path / "base" / "dit")
    null = torch.zeros(preset.text.max_tokens, preset.text.dim)
    result = train_ar(preset, "i2v", shards_url=shards, base_dir=tmp_path / "base", out_dir=tmp_path / "out",
                      work_dir=tmp_path / "work", plots_dir=tmp_path / "plots", null_context=null,
                      validation_report=record)

    losses = [r["loss"] for r in json.loads((tmp_path / "plots" / "loss.json").read_text())]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"teacher-forcing loss: first-5 mean {first:.4f} -> last-5 mean {last:.4f}")
    assert last < 0.7 * first
    exported = load_dit(tmp_path / "out" / "dit")
    for k, v in exported.state_dict().items():
        assert torch.equal(v, result.model.state_dict()[k])
    cfg = json.loads((tmp_path / "out" / AR_CONFIG_NAME).read_text())
    assert cfg["i2v"] and cfg["independent_first_frame"] and cfg["train_block_sizes"] == [1, 2, 2, 2, 2]
    assert cfg["denoising_steps"] == [1000, 750, 500, 250] and cfg["weights"] == "ema"
    assert result.metrics["eval_loss_ema"] > 0 and not (tmp_path / "work" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_stage_runs_end_to_end_in_a_tmp_project(built_project, tmp_path):
    project = built_project.copy(tmp_path / "proj", "train_ar")  # the session's shared `dvc repro train_ar`
    for v, blocks in (("t2v", [2, 2, 2, 2, 1]), ("i2v", [1, 2, 2, 2, 2])):
        load_dit(project / "models/ar" / v / "dit")
        assert json.loads((project / "models/ar" / v / AR_CONFIG_NAME).read_text())["train_block_sizes"] == blocks
        metrics = json.loads((project / "reports/train_ar" / v / "metrics.json").read_text())
        assert metrics["steps"] == len(json.loads((project / "reports/train_ar" / v / "loss.json").read_text()))
        assert not (project / ".work/train_ar" / v / "checkpoint.pt").exists()
        assert list((project / ".work/train_ar" / v / "wandb").glob("offline-run-*")), "wandb offline by default"
    assert "up to date" in run(["dvc", "repro", "train_ar"], project).stdout
