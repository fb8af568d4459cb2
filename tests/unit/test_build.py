"""One owner of the checkpoint layout and the settings merge (``longlive.models.checkpoint``), one build of every
entry point's model (``longlive.inference.build``), and a pipeline that streams a model without changing it."""

from __future__ import annotations

import json

import pytest
import torch

from longlive.config import DMDConfig, EvalVariantConfig
from longlive.data.encode import encode_dataset
from longlive.errors import UsageError
from longlive.inference.build import build_dit
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import PromptSchedule, stream_block_sizes
from longlive.models import wan_adapter
from longlive.models.checkpoint import AR_CONFIG_NAME, CRITIC_DIR, DIT_DIR, Checkpoint, inference_settings
from longlive.models.dit import WanDiT
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE
from longlive.train.ar import inference_config


class Reached(Exception):
    """The entry point got its model; the test stops it there."""


@pytest.fixture
def preset(tiny_preset):
    return tiny_preset.model_copy(update={
        "device": "cpu", "tracking": tiny_preset.tracking.model_copy(update={"wandb_mode": "disabled"})})


@pytest.fixture(scope="module")
def base_dir(tiny_preset, tmp_path_factory):
    """Random tiny base models in the base stage's layout."""
    out = tmp_path_factory.mktemp("build") / "base"
    torch.manual_seed(0)
    WanVAE(tiny_preset.vae).save_pretrained(out / "vae")
    TinyTextEncoder(tiny_preset.text, seed=0).save(out / "text")
    dit = WanDiT(tiny_preset.dit, in_channels=tiny_preset.vae.z_dim, text_dim=tiny_preset.text.dim)
    dit.init_weights(0)
    wan_adapter.save_dit(dit, out / DIT_DIR)
    return out


@pytest.fixture(scope="module")
def shards(synth_dir, fake_encoders, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("build") / "shards")
    encode_dataset(synth_dir, url, encode_video=fake_encoders[0], encode_text=fake_encoders[1], samples_per_shard=4)
    return url


def validated(url: str, report) -> str:
    from longlive.data.shards import read_manifest_digest

    report.write_text(json.dumps({"success": True, "manifest_sha256": read_manifest_digest(url)[1]}))
    return str(report)


def export_dir(path, base_dir, preset, *, critic: bool = False):
    """A train_ar (or, with ``critic``, train_dmd) export whose weights are the base teacher's."""
    path.mkdir(parents=True)
    (path / DIT_DIR).symlink_to(base_dir / DIT_DIR)
    if critic:
        (path / CRITIC_DIR).symlink_to(base_dir / DIT_DIR)
    (path / AR_CONFIG_NAME).write_text(json.dumps(inference_config(preset, "t2v")))
    return path


@pytest.fixture
def loads(monkeypatch):
    """Every DiT any code loads from a checkpoint directory, so a test can check each came out of the build."""
    seen = []
    load_dit = wan_adapter.load_dit
    monkeypatch.setattr(wan_adapter, "load_dit", lambda *a, **k: seen.append(load_dit(*a, **k)) or seen[-1])
    return seen


def assert_built(*models: torch.nn.Module) -> None:
    for m in models:
        record = getattr(m, "build_record", None)
        assert record is not None, f"{type(m).__name__} reached its user without going through build_dit"
        assert record.steps, "an empty build record"


# ----------------------------------------------------------------------------- the settings merge


def test_inference_settings_merge_preset_then_trained_then_variant_then_set(preset):
    base = preset.inference.model_copy(update={"block_frames": 2, "sink_frames": 1, "window_frames": 3,
                                               "denoising_steps": [1000, 750, 500, 250], "guidance_scale": 1.0})
    trained = {"block_frames": 3, "denoising_steps": [1000, 500], "timestep_shift": 5.0, "sink_frames": 2,
               "window_frames": 4, "i2v": False}
    variant = {"denoising_steps": [1000, 750], "sink_frames": 0}
    merged = inference_settings(base, trained, variant, ["sink_frames=5", "guidance_scale=2"])
    assert merged.block_frames == 3 and merged.timestep_shift == 5.0  # trained over preset
    assert merged.window_frames == 4  # the trained window over the preset's
    assert merged.denoising_steps == [1000, 750]  # variant over trained
    assert merged.sink_frames == 5 and merged.guidance_scale == 2.0  # --set over everything
    assert inference_settings(base, trained, variant).sink_frames == 0  # variant over trained
    assert inference_settings(base, trained).sink_frames == 2  # trained over preset
    assert inference_settings(base).sink_frames == 1  # the preset alone
    # a student trained on whole clips records no window: the preset's sink and window stay
    whole = {**trained, "sink_frames": 0, "window_frames": None}
    assert (inference_settings(base, whole).sink_frames, inference_settings(base, whole).window_frames) == (1, 3)
    with pytest.raises(UsageError, match=f"{AR_CONFIG_NAME} beside .*re-export"):
        inference_settings(base, {"block_frames": 0})
    with pytest.raises(UsageError, match="--set: sink_frames"):
        inference_settings(base, trained, overrides=["sink_frames=-1"])


def test_checkpoint_layout_is_read_in_one_place(tmp_path, preset, base_dir):
    ck = export_dir(tmp_path / "ar", base_dir, preset)
    opened = Checkpoint.open(ck)
    assert opened.dit_dir == ck / DIT_DIR and opened.trained == inference_config(preset, "t2v")
    assert Checkpoint.open(ck / DIT_DIR).trained == opened.trained  # the DiT directory finds it beside itself
    assert not opened.nvfp4 and opened.adapter_dir is None and not opened.i2v
    (ck / "lora.safetensors").write_bytes(b"")
    assert Checkpoint.open(ck).adapter_dir == ck
    assert Checkpoint.open(ck).critic().adapter_dir is None  # the critic never takes the generator's adapter
    assert Checkpoint.open(tmp_path / "missing").trained is None and not Checkpoint.open(tmp_path / "missing").exists
    (ck / AR_CONFIG_NAME).write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        Checkpoint.open(ck)


# ----------------------------------------------------------------------------- one build for every entry point


def test_the_pipeline_streams_a_model_without_changing_it(preset):
    torch.manual_seed(0)
    dit = build_dit(WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim), preset, inference=preset.inference)
    assert "inference path" in dit.build_record.steps
    plain = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim).train()  # never built: stays as it is too
    for model in (dit, plain):
        before = [(n, type(m), id(m), m.training, sorted(m.__dict__)) for n, m in model.named_modules()]
        pipe = StreamingPipeline(model, preset.inference)
        C, _, h, w = preset.latent_shape
        plans = PromptSchedule.single("a red circle moves left").plan(stream_block_sizes(4, 2), 8, 4)
        ctx = torch.randn(1, preset.text.max_tokens, preset.text.dim)
        list(pipe.stream(plans, [ctx], (C, h, w)))
        assert [(n, type(m), id(m), m.training, sorted(m.__dict__)) for n, m in model.named_modules()] == before


def test_train_ar_and_train_dmd_build_their_models(preset, base_dir, shards, tmp_path, monkeypatch, loads):
    from longlive.train import ar, dmd

    got = {}

    def run_training(name, model, *a, **k):
        got[name] = model
        raise Reached(name)

    monkeypatch.setattr(ar, "run_training", run_training)
    monkeypatch.setattr(dmd, "run_training", run_training)
    report = validated(shards, tmp_path / "report.json")
    qat = preset.model_copy(update={"quant": preset.quant.model_copy(update={"qat": True})})
    with pytest.raises(Reached):
        ar.train_ar(qat, "t2v", shards_url=shards, base_dir=base_dir, out_dir=tmp_path / "out",
                    work_dir=tmp_path / "work", plots_dir=tmp_path / "plots", validation_report=report)
    assert_built(got["train_ar-t2v"])
    assert got["train_ar-t2v"].build_record.steps == ["load", "to cpu", "qat"]

    cfg = DMDConfig(train={"steps": 1, "batch_size": 2, "lr": 1e-3}, timestep_shift=3.0,
                    students={"2step": [1000, 500]}, variants=["t2v"], lora={"rank": 4, "alpha": 4})
    dmd_preset = preset.model_copy(update={"dmd": cfg})
    ar_dir = export_dir(tmp_path / "ar", base_dir, preset)
    init = export_dir(tmp_path / "dmd", base_dir, preset, critic=True)
    for qat_from in (None, init):
        loads.clear()
        with pytest.raises(Reached):
            dmd.train_dmd(dmd_preset, "t2v", "2step", ar_dir=ar_dir, base_dir=base_dir, out_dir=tmp_path / "o",
                          work_dir=tmp_path / "w", plots_dir=tmp_path / "p", shards_url=shards,
                          validation_report=report, qat_from=qat_from)
        models = got["train_dmd-t2v-2step"]
        assert len(loads) == 3
        assert_built(models.generator, models.critic, *loads)  # the frozen teacher too
        assert ("lora adapters" in models.generator.build_record.steps) == (qat_from is None)
        assert ("qat" in models.generator.build_record.steps) == (qat_from is not None)


def test_quantize_evaluate_eval_quality_generate_and_bench_build_their_models(preset, base_dir, tmp_path,
                                                                            monkeypatch, loads):
    from longlive.bench.variants import BenchModel
    from longlive.eval import quality, suite
    from longlive.inference import generate
    from longlive.inference.request import GenerateRequest
    from longlive.eval.quantize import quantize_student
    from longlive.quant import export

    student = export_dir(tmp_path / "student", base_dir, preset)

    def convert(model, cfg, **kw):
        assert_built(model)
        raise Reached("quantize")

    monkeypatch.setattr(export, "convert_to_nvfp4", convert)
    with pytest.raises(Reached):
        quantize_student(preset, student, tmp_path / "q", base_dir=base_dir, num_prompts=1)

    models, *_ = quality.load_checkpoint(preset, student, base_dir)
    assert_built(models.dit)

    variant = EvalVariantConfig(checkpoint=str(student), kind="t2v", quant="nvfp4")
    models, _, _, quant = suite.load_variant("v", variant, preset, base_dir, torch.device("cpu"))
    assert_built(models.dit)
    assert models.dit.build_record.steps[-2:] == ["nvfp4", "inference path"]  # quantized before the kernels
    assert quant["quant"] == "nvfp4" and quant["nvfp4_source"] == "converted at load"

    def stand_in(models, *a, **k):
        assert_built(models.dit)
        raise Reached("generate")

    monkeypatch.setattr(generate, "generate_video", stand_in)
    request = GenerateRequest(preset, base_dir, student, PromptSchedule.single("x"), 1.0, tmp_path / "x.mp4",
                              None, None, "cpu")
    with pytest.raises(Reached):
        generate.run_request(request)

    assert loads and all(hasattr(m, "build_record") for m in loads)
    assert_built(BenchModel(preset, torch.device("cpu")).dit)
