"""Every stage puts every model it builds or loads on the preset's device, and its batches with them.

CPU-only CI cannot see a model left on the CPU beside an idle GPU (``base`` trained there for a while), nor
a CPU tensor mixed into CUDA work (``train_dmd`` crashed at its first critic-only step). Here the preset's
device is ``meta``: a second device that every CPU has. Models land there only through the code paths that
would take them to ``cuda``, and an op mixing a meta tensor with a CPU one fails as it would on a GPU. Each
stage runs up to its training loop (or first generation), where a stand-in checks the models, runs a step
or two of the real loss on meta and stops the stage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from longlive.config import DMDConfig, LightDecoderConfig, TrainConfig
from longlive.data.encode import encode_dataset
from longlive.device import DeviceError, module_devices, resolve_device
from longlive.models.dit import WanDiT
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE
from longlive.models.wan_adapter import save_dit
from longlive.train.loop import clip_grad_norms, step_generator

META = torch.device("meta")
ROOT = Path(__file__).resolve().parents[2]


class Reached(Exception):
    """The stage got to its training loop (or first generation) with everything checked."""


@pytest.fixture
def meta_items(monkeypatch):
    """``.item()`` of a meta tensor is 0.0: the losses log a few scalars, which meta tensors have no value for."""
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: 0.0 if t.is_meta else item(t))


def on_meta(preset):
    return preset.model_copy(update={"device": "meta",
                                     "tracking": preset.tracking.model_copy(update={"wandb_mode": "disabled"})})


def assert_on(device: torch.device, **modules: torch.nn.Module) -> None:
    for name, m in modules.items():
        assert module_devices(m) == {device}, f"{name} sits on {module_devices(m)}, not on {device}"


def stand_in_training(steps: tuple[int, ...] = (0,)):
    """A ``run_training`` that checks where the model is, runs ``steps`` of its loss with backward and the loop's
    gradient clipping on that device, and stops the stage; ``seen`` records each run's model by name.

    With several parameter groups (DMD: generator and critic) it also clips with gradients in one group only,
    each in turn, as on a critic-only step. The causal DiT's losses read frame positions back to the host
    (RoPE tables are cached by position), which meta tensors cannot: for them ``steps`` is empty."""
    seen: dict[str, torch.nn.Module] = {}

    def run_training(name, model, loss_fn, cfg, run_dir, *, seed, param_groups=None, **kw):
        device = next(model.parameters()).device
        assert device == META, f"{name}: training on {device}, the preset says meta"
        assert_on(META, **{name: model})
        groups = param_groups or [{"name": "model", "params": [p for p in model.parameters() if p.requires_grad]}]
        for step in steps:
            model.zero_grad(set_to_none=True)
            loss, _ = loss_fn(step, step_generator(seed, step))
            assert loss.device == META, f"{name} step {step}: the loss was computed on {loss.device}"
            loss.backward()
            norms, total = clip_grad_norms(groups, 1.0, device)
            assert {n.device for n in norms.values()} == {total.device} == {META}
        for only in groups if len(groups) > 1 else ():
            model.zero_grad(set_to_none=True)
            for p in only["params"]:
                p.grad = torch.ones_like(p)
            norms, total = clip_grad_norms(groups, 1.0, device)
            assert {n.device for n in norms.values()} == {total.device} == {META}, f"only {only['name']} has grads"
        seen[name] = model
        raise Reached(name)

    return run_training, seen


def validated(url: str, report: Path) -> Path:
    """A passing validation record of the shards at ``url`` (what the validate stage writes for good data)."""
    from longlive.data.shards import read_manifest_digest

    report.write_text(json.dumps({"success": True, "manifest_sha256": read_manifest_digest(url)[1]}))
    return report


@pytest.fixture(scope="module")
def shards(synth_dir, fake_encoders, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("devices") / "shards")
    encode_dataset(synth_dir, url, encode_video=fake_encoders[0], encode_text=fake_encoders[1], samples_per_shard=4)
    return url


@pytest.fixture(scope="module")
def base_dir(tiny_preset, tmp_path_factory):
    """Random tiny base models in the layout of the base stage (VAE, text encoder, teacher DiT)."""
    out = tmp_path_factory.mktemp("devices") / "base"
    torch.manual_seed(0)
    WanVAE(tiny_preset.vae).save_pretrained(out / "vae")
    TinyTextEncoder(tiny_preset.text, seed=0).save(out / "text")
    dit = WanDiT(tiny_preset.dit, in_channels=tiny_preset.vae.z_dim, text_dim=tiny_preset.text.dim)
    dit.init_weights(0)
    with torch.no_grad():  # a non-zero head, so the students' first steps have gradients everywhere
        torch.nn.init.normal_(dit.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    save_dit(dit, out / "dit")
    return out


# ----------------------------------------------------------------------------- the resolver


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("meta") == META and resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA device.*device: auto"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="not a torch device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(DeviceError, match="1 CUDA device"):
        resolve_device("cuda:1")


def test_one_resolver():
    """A second copy of the device rule is how stages drifted apart; longlive/device.py holds the only one."""
    pattern = re.compile(r"^def resolve_device\(|torch\.device\(\s*\"cuda\" if torch\.cuda\.is_available", re.M)
    holders = sorted(str(p.relative_to(ROOT)) for d in ("longlive", "stages") for p in (ROOT / d).rglob("*.py")
                     if pattern.search(p.read_text()))
    assert holders == ["longlive/device.py"], holders


# ----------------------------------------------------------------------------- gradient clipping


def test_clip_grad_norms_with_a_group_without_gradients():
    """DMD's critic-only step: the generator's group has no gradients. Its norm is 0 on the training device (a
    CPU scalar from clip_grad_norm_ cannot be stacked with the critic's GPU norm); the other group is clipped."""
    torch.manual_seed(0)
    gen, critic = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    critic(torch.randn(3, 4)).pow(2).sum().mul(100).backward()
    groups = [{"name": "generator", "params": list(gen.parameters())},
              {"name": "critic", "params": list(critic.parameters())}]
    unclipped = torch.cat([p.grad.flatten() for p in critic.parameters()]).norm()
    norms, total = clip_grad_norms(groups, 1.0, torch.device("cpu"))
    assert norms["generator"] == 0 and torch.allclose(norms["critic"], unclipped) and torch.allclose(total, unclipped)
    assert torch.allclose(torch.cat([p.grad.flatten() for p in critic.parameters()]).norm(), torch.tensor(1.0))

    gen, critic = gen.to(META), critic.to(META)  # on another device than the CPU, as on a GPU
    critic(torch.randn(3, 4, device=META)).sum().backward()
    groups = [{"name": "generator", "params": list(gen.parameters())},
              {"name": "critic", "params": list(critic.parameters())}]
    norms, total = clip_grad_norms(groups, 1.0, META)
    assert norms["generator"].device == norms["critic"].device == total.device == META


# ----------------------------------------------------------------------------- the stages


def test_base_trains_the_vae_and_the_teacher_on_the_preset_device(tiny_preset, synth_dir, tmp_path, monkeypatch,
                                                                   meta_items):
    from longlive.train import base_models as base

    preset = on_meta(tiny_preset)
    run, seen = stand_in_training()
    monkeypatch.setattr(base, "run_training", run)
    with pytest.raises(Reached, match="vae"):
        base.build_base(preset, synth_dir, tmp_path / "base", tmp_path / "work", tmp_path / "plots")
    # the teacher trains on latents and text the (CPU-fitted) VAE and text encoder made
    latents = torch.randn(4, *preset.latent_shape)
    context = torch.randn(4, preset.text.max_tokens, preset.text.dim)
    with pytest.raises(Reached, match="teacher"):
        base.train_teacher(preset, latents, context, context[0], tmp_path / "work")
    assert set(seen) == {"vae", "teacher"}


def test_encode_loads_the_vae_and_text_encoder_on_the_preset_device(tiny_preset, synth_dir, base_dir, tmp_path,
                                                                      monkeypatch):
    import stages.encode as stage

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synth").symlink_to(synth_dir)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(base_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage, "setup", lambda name: on_meta(tiny_preset))

    def encode_dataset(videos_dir, url, *, encode_video, encode_text, **kw):
        v = tiny_preset.video
        video = torch.zeros(1, 3, v.num_frames, v.height, v.width)  # as the loader hands it over: on the CPU
        assert encode_video(video).device == META, "the VAE did not encode on the preset's device"
        assert encode_text(["a red circle"]).device == META, "the text encoder did not run on the preset's device"
        raise Reached("encode")

    monkeypatch.setattr(stage, "encode_dataset", encode_dataset)
    with pytest.raises(Reached):
        stage.main()


def test_train_ar_trains_on_the_preset_device(tiny_preset, shards, base_dir, tmp_path, monkeypatch):
    from longlive.train import ar

    run, seen = stand_in_training(steps=())
    monkeypatch.setattr(ar, "run_training", run)
    with pytest.raises(Reached):
        ar.train_ar(on_meta(tiny_preset), "i2v", shards_url=shards, base_dir=base_dir, out_dir=tmp_path / "out",
                    work_dir=tmp_path / "work", plots_dir=tmp_path / "plots",
                    validation_report=validated(shards, tmp_path / "report.json"))
    assert len(seen) == 1


@pytest.mark.parametrize("qat", [False, True])
def test_train_dmd_puts_generator_critic_and_teacher_on_the_preset_device(tiny_preset, shards, base_dir, tmp_path,
                                                                          monkeypatch, qat):
    """The frozen teacher too; gradient clipping with the critic's gradients alone (the step that crashed on CUDA)."""
    from longlive.models import wan_adapter
    from longlive.train import dmd
    from longlive.models.checkpoint import AR_CONFIG_NAME
    from longlive.train.ar import inference_config

    cfg = DMDConfig(train={"steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1}, timestep_shift=3.0,
                    students={"2step": [1000, 500]}, variants=["t2v"], critic_updates=2, tf_weight=1.0,
                    qat_students=["2step"], qat_steps=2)
    preset = on_meta(tiny_preset.model_copy(update={"dmd": cfg}))
    ar_dir = tmp_path / "ar"
    (ar_dir / "dit").parent.mkdir(parents=True)
    (ar_dir / "dit").symlink_to(base_dir / "dit")
    (ar_dir / AR_CONFIG_NAME).write_text(json.dumps(inference_config(preset, "t2v")))
    qat_from = None
    if qat:  # a train_dmd export: dit/ and critic/
        qat_from = tmp_path / "dmd"
        qat_from.mkdir()
        for name in ("dit", "critic"):
            (qat_from / name).symlink_to(base_dir / "dit")
        (qat_from / AR_CONFIG_NAME).write_text(json.dumps(inference_config(preset, "t2v")))
    loaded = []
    load_dit = wan_adapter.load_dit
    monkeypatch.setattr(wan_adapter, "load_dit", lambda *a, **k: loaded.append(load_dit(*a, **k)) or loaded[-1])
    run, seen = stand_in_training(steps=())
    monkeypatch.setattr(dmd, "run_training", run)
    with pytest.raises(Reached):
        dmd.train_dmd(preset, "t2v", "2step", ar_dir=ar_dir, base_dir=base_dir, out_dir=tmp_path / "out",
                      work_dir=tmp_path / "work", plots_dir=tmp_path / "plots", shards_url=shards,
                      validation_report=validated(shards, tmp_path / "report.json"), qat_from=qat_from)
    assert len(loaded) == 3, "teacher, generator and critic"
    assert_on(META, **{f"loaded_{i}": m for i, m in enumerate(loaded)})
    assert len(seen) == 1


def test_distill_decoder_puts_vae_and_light_decoder_on_the_preset_device(tiny_preset, shards, synth_dir, base_dir,
                                                                         tmp_path, monkeypatch, meta_items):
    from longlive.train import light_decoder

    sizes = dict(channels=[16, 8, 8], blocks=[2, 1], spatial_upsample=[True, True], temporal_upsample=[True, True],
                 patch_size=2)
    cfg = LightDecoderConfig(**sizes, distill={"train": TrainConfig(steps=2, batch_size=2, lr=1e-3, log_every=1),
                                               "eval_clips": 2, "cache": False})
    vaes = []
    from_pretrained = WanVAE.from_pretrained.__func__
    monkeypatch.setattr(light_decoder.WanVAE, "from_pretrained",
                        classmethod(lambda cls, *a, **k: vaes.append(from_pretrained(cls, *a, **k)) or vaes[-1]))
    run, seen = stand_in_training()
    monkeypatch.setattr(light_decoder, "run_training", run)
    with pytest.raises(Reached):
        light_decoder.distill_decoder(
            on_meta(tiny_preset.model_copy(update={"light_decoder": cfg})), shards_url=shards, synth_dir=synth_dir,
            base_dir=base_dir, out_dir=tmp_path / "out", work_dir=tmp_path / "work", plots_dir=tmp_path / "plots",
            validation_report=validated(shards, tmp_path / "report.json"))
    assert_on(META, vae=vaes[0])
    assert len(seen) == 1


def test_quantize_stage_converts_on_the_preset_device(tiny_preset, monkeypatch):
    import stages.quantize as stage

    cfg = DMDConfig(train={"steps": 1, "batch_size": 1, "lr": 1e-3}, timestep_shift=3.0,
                    students={"2step": [1000, 500]}, variants=["t2v"])
    monkeypatch.setattr(stage, "setup", lambda name: on_meta(tiny_preset.model_copy(update={"dmd": cfg})))
    asked = {}

    def quantize_student(preset, student_dir, out_dir, *, device, **kw):
        asked["device"] = device
        raise Reached("quantize")

    monkeypatch.setattr(stage, "quantize_student", quantize_student)
    with pytest.raises(Reached):
        stage.main(["t2v-2step"])
    assert resolve_device(asked["device"]) == META


def test_quantize_student_converts_and_evaluates_on_its_device(tiny_preset, base_dir, tmp_path, monkeypatch):
    from longlive.eval import quality
    from longlive.eval.quantize import quantize_student
    from longlive.quant import export
    from longlive.models.checkpoint import AR_CONFIG_NAME
    from longlive.train.ar import inference_config

    student = tmp_path / "student"
    student.mkdir()
    (student / "dit").symlink_to(base_dir / "dit")
    (student / AR_CONFIG_NAME).write_text(json.dumps(inference_config(tiny_preset, "t2v")))

    def convert_to_nvfp4(model, cfg, *, backend, device):
        assert resolve_device(device) == META
        assert_on(META, student=model)
        raise Reached("convert")

    monkeypatch.setattr(export, "convert_to_nvfp4", convert_to_nvfp4)
    with pytest.raises(Reached):
        quantize_student(tiny_preset, student, tmp_path / "out", base_dir=base_dir, num_prompts=1, device="meta")
    # its quality check loads the bf16 and NVFP4 students through load_checkpoint
    models = quality.load_checkpoint(tiny_preset, student, base_dir, device="meta")[0]
    assert_on(META, dit=models.dit, vae=models.vae)


def test_evaluate_loads_every_model_on_the_preset_device(tiny_preset, base_dir, monkeypatch):
    from longlive.config import EvalVariantConfig
    from longlive.eval import suite

    load_variant = suite.load_variant

    def stop_after_loading(name, variant, preset, base, device, **kw):
        models, *rest = load_variant(name, variant, preset, base, device, **kw)
        assert device == META
        assert_on(META, dit=models.dit, vae=models.vae)
        raise Reached(name)

    monkeypatch.setattr(suite, "load_variant", stop_after_loading)
    variant = EvalVariantConfig(checkpoint=str(base_dir / "dit"), kind="t2v")
    with pytest.raises(Reached):
        suite.evaluate_variant("teacher", variant, on_meta(tiny_preset), tiny_preset.evaluate, base_dir=base_dir)


# ----------------------------------------------------------------------------- bf16 autocast, GPU memory figures


def test_no_norm_dtype_mismatch_under_bf16_autocast(tiny_preset):
    """Training runs an fp32 DiT under bf16 autocast: q and k reach their RMSNorms in bf16. nn.RMSNorm then warns
    "Mismatch dtype between input and weight ... Cannot dispatch to fused implementation" (CPU and CUDA alike)
    and takes the slow path; the DiT's own RMSNorm computes in the weight's dtype and gives nn.RMSNorm's result."""
    import warnings

    from longlive.models.dit import RMSNorm

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    ours, plain = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        plain.weight.copy_(ours.weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = plain(x)
    assert any("Mismatch dtype" in str(w.message) for w in caught), "torch no longer warns: this test checks nothing"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ours(x)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), expected.float(), atol=1e-2)

    dit = WanDiT(tiny_preset.dit, in_channels=tiny_preset.vae.z_dim, text_dim=tiny_preset.text.dim)
    dit.init_weights(0)
    c, f, h, w = tiny_preset.latent_shape
    x = torch.randn(2, c, f, h, w)
    context = torch.randn(2, tiny_preset.text.max_tokens, tiny_preset.text.dim)
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        dit(x, torch.tensor([500.0, 250.0]), context).float().pow(2).mean().backward()
    assert not [str(w.message) for w in caught if "dtype" in str(w.message)]


class FakeCuda:
    """torch.cuda's peak counters for a device this CPU lacks: ``alloc``/``reserved`` bytes since the last reset."""

    def __init__(self, monkeypatch):
        self.alloc = self.reserved = 0
        for name, fn in (("synchronize", lambda d=None: None), ("reset_peak_memory_stats", self.reset),
                         ("max_memory_allocated", lambda d=None: self.alloc),
                         ("max_memory_reserved", lambda d=None: self.reserved), ("empty_cache", lambda: None)):
            monkeypatch.setattr(torch.cuda, name, fn)

    def reset(self, d=None):
        self.alloc = self.reserved = 0


def test_evaluate_reports_reserved_as_well_as_allocated_gpu_memory(monkeypatch):
    """An evaluation reported a 1.3 GiB peak while its process held 20 GiB: allocated alone hides the allocator's
    cache. One generation's peaks and each phase's (take_cuda_peaks) carry both, and the report shows both."""
    from longlive.eval import perf, suite

    cuda = FakeCuda(monkeypatch)

    class Result:
        timings = {"generated_fps": 10.0, "first_block_latency_s": 0.1, "max_cache_bytes": 2**20, "pixel_frames": 9}

    def generate():
        cuda.alloc, cuda.reserved = 3 * 2**30, 20 * 2**30
        return Result()

    speed = perf.measure_speed(generate, torch.device("cuda"), runs=2, warmup=0)
    assert speed.peak_memory_mb == 3 * 1024 and speed.peak_reserved_mb == 20 * 1024
    assert speed.metrics()["peak_reserved_mb"] == 20 * 1024
    assert perf.take_cuda_peaks("cuda") == {"allocated": 3 * 1024, "reserved": 20 * 1024}
    assert perf.take_cuda_peaks("cuda") == {"allocated": 0, "reserved": 0}, "a take resets, so phases are separate"
    assert perf.take_cuda_peaks("cpu") is None

    q = dict.fromkeys(("score", "score_sem", "colour_acc", "shape_acc", "motion_acc", "match_rate", "object_rate"), 0.5)
    curve = dict.fromkeys(("mean", "mean_sem", "first", "last", "slope"), 0.5)
    details = {"t2v": q, "multishot": {"score": 0.5, "score_sem": 0.1, "transition_rate": 1.0, "stuck_rate": 0.0},
               "schedule": curve, "single": curve, "speed": {**speed.metrics(), "memory_kind": "cuda_max_allocated"}}
    metrics = suite.variant_metrics(details, "t2v")
    assert metrics["peak_memory_mb"] == 3 * 1024 and metrics["peak_reserved_mb"] == 20 * 1024
    metrics.update(eval_peak_allocated_mb=4096.0, eval_peak_reserved_mb=21504.0,
                   info={"kind": "t2v", "quant": "none", "denoising_steps": [1000, 500], "device": "H100",
                         "memory_kind": "cuda_max_allocated"})
    report = {"chance_score": 0.25, "preset": "small", "date": "today", "variants": {"ar_t2v": {"metrics": metrics, "details": details}},
              "evaluate": {"num_prompts": 2, "num_multishot": 1, "num_drift": 1, "length_factor": 2,
                           "speed": {"runs": 2}}}
    text = suite.markdown_report(report)
    assert "| ar_t2v | 3072.0 | 20480.0 | 4096.0 | 21504.0 |" in text, text
