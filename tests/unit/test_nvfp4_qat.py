"""QAT wiring: ``quant.qat: true`` makes ``train_ar`` train through NVFP4 fake quantization (weights and
activations, straight-through gradients); the loss goes down and the export is a plain DiT checkpoint."""

import json

import torch

from conftest import validate_into
from longlive.data.encode import encode_dataset
from longlive.models.dit import WanDiT
from longlive.models.wan_adapter import load_dit, save_dit
from longlive.quant import NVFP4FakeQuantLinear
from longlive.models.checkpoint import AR_CONFIG_NAME
from longlive.train.ar import qat_fingerprint, train_ar


def test_train_ar_with_qat(tiny_preset, synth_dir, fake_encoders, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    shards = str(tmp_path / "shards")
    encode_dataset(synth_dir, shards, encode_video=fake_encoders[0], encode_text=fake_encoders[1], samples_per_shard=4)
    record = validate_into(shards, tiny_preset, tmp_path / "validate")
    preset = tiny_preset.model_copy(update={
        "quant": tiny_preset.quant.model_copy(update={"qat": True}),
        "ar": tiny_preset.ar.model_copy(update={
            "train": tiny_preset.ar.train.model_copy(update={"steps": 16, "batch_size": 2, "lr": 2e-3, "log_every": 1}),
            "ema": tiny_preset.ar.ema.model_copy(update={"decay": 0.5, "start_step": 0}),
        }),
    })
    assert qat_fingerprint(preset) and not qat_fingerprint(tiny_preset), "plain runs keep their fingerprint"
    torch.manual_seed(0)
    base = WanDiT(preset.dit, in_channels=preset.vae.z_dim, text_dim=preset.text.dim)
    base.init_weights(0)
    save_dit(base, tmp_path / "base" / "dit")
    null = torch.zeros(preset.text.max_tokens, preset.text.dim)
    result = train_ar(preset, "t2v", shards_url=shards, base_dir=tmp_path / "base", out_dir=tmp_path / "out",
                      work_dir=tmp_path / "work", plots_dir=tmp_path / "plots", null_context=null,
                      validation_report=record)

    wrapped = [n for n, m in result.model.named_modules() if isinstance(m, NVFP4FakeQuantLinear)]
    assert len(wrapped) == 10 * preset.dit.num_layers, "every block linear trains through NVFP4"
    losses = [r["loss"] for r in json.loads((tmp_path / "plots" / "loss.json").read_text())]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"QAT teacher forcing: loss first-4 mean {first:.4f} -> last-4 mean {last:.4f}")
    assert last < 0.8 * first
    exported = load_dit(tmp_path / "out" / "dit")  # a plain DiT: the QAT layers left no trace in the weights
    assert all(type(m) is not NVFP4FakeQuantLinear for m in exported.modules())
    for k, v in exported.state_dict().items():
        assert torch.equal(v, result.model.state_dict()[k])
    assert json.loads((tmp_path / "out" / AR_CONFIG_NAME).read_text())["qat"] is True
