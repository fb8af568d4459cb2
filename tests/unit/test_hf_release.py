"""A release as Hugging Face tools see it: a diffusers ``WanPipeline`` repo (model_index.json, transformer/, vae/,
scheduler/) whose DiT and VAE give outputs equal to ours, peft LoRA adapters that give our LoRA model's output on
diffusers' transformer, merged LoRA weights equal to base + adapter, Hub front matter in the card, the manifest
covering the new files, and ``longlive publish --hub`` making the expected Hub calls (a fake ``HfApi``: no Hub is
reachable here).

The release is built from random tiny-preset weights with ``build_release`` directly (seconds, no DAG).
Tolerance: outputs agree to 1e-5 absolute (float32 on the CPU; the bf16 checkpoint is loaded in float32 by both
sides, so only the order of float32 operations differs).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from longlive.config import LoRAConfig, PublishConfig
from longlive.models.dit import WanDiT
from longlive.models.lora import (
    ADAPTER_FILE, PEFT_CONFIG, PEFT_WEIGHTS, LoRAError, LoRALinear, _set, apply_lora, lora_state_dict, read_adapter,
    save_adapter, save_peft_adapter,
)
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE
from longlive.models.wan_adapter import load_dit, save_dit
from longlive.publish import ChecksumError, build_release, content_id, verify_folder
from longlive.publish.hf import HubError, push_release, push_to_hub
from longlive.publish.manifest import is_payload

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("accelerate")  # WanTransformer3DModel.from_pretrained refuses to load without it
peft = pytest.importorskip("peft")

ATOL = 1e-5
LORA = LoRAConfig(rank=4, alpha=8.0)
SHIFT = 5.0  # the plain checkpoint's timestep shift: the scheduler must carry it


def _random_dit(preset, seed: int) -> WanDiT:
    """init_weights zeroes the output projection (as Wan does): perturb everything so outputs carry information."""
    model = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _lora_student(preset) -> WanDiT:
    """A LoRA-trained student: random base weights and random (non-zero) adapters on the default targets."""
    torch.manual_seed(1)
    model = _random_dit(preset, 1)
    apply_lora(model, LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".up.weight"):
                p.normal_(0, 0.05)
    return model.eval()


def _ar_config(out: Path, shift: float = 3.0) -> None:
    (out / "ar_config.json").write_text(json.dumps({"variant": "t2v", "i2v": False, "block_frames": 1,
                                                    "denoising_steps": [1000, 500], "timestep_shift": shift}))


def _export(model: WanDiT, out: Path) -> None:
    """As train_dmd's export writes a LoRA student: the base dit/ and lora.safetensors beside it."""
    plain = copy.deepcopy(model)
    for name, m in list(plain.named_modules()):
        if isinstance(m, LoRALinear):
            _set(plain, name, m.base)
    save_dit(plain, out / "dit")
    save_adapter(model, LORA, out)
    _ar_config(out)


def _build(root: Path, preset, checkpoints: dict, version: str = "tiny-v1", folder: str = "release") -> Path:
    cfg = PublishConfig(url=str(root / "store"), base=str(root / "base"), checkpoints=checkpoints)
    build_release(root / folder, version=version, preset=preset, cfg=cfg, repo=root)
    return root / folder


@pytest.fixture(scope="module")
def release(tiny_preset, tmp_path_factory):
    """One release: ``plain`` (no LoRA, bf16: the pipeline's transformer), ``merged`` and ``separate`` (a LoRA
    student, float32 kept)."""
    preset = tiny_preset
    root = tmp_path_factory.mktemp("hf")
    plain = _random_dit(preset, 0)
    save_dit(plain, root / "plain/dit")
    _ar_config(root / "plain", SHIFT)
    student = _lora_student(preset)
    _export(student, root / "student")
    torch.manual_seed(2)
    WanVAE(preset.vae).save_pretrained(root / "base/vae")
    TinyTextEncoder(preset.text, seed=0).save(root / "base/text")
    checkpoints = {"plain": str(root / "plain"),
                   "merged": {"path": str(root / "student"), "dtype": "keep", "lora": "merged"},
                   "separate": {"path": str(root / "student"), "dtype": "keep", "lora": "separate"}}
    folder = _build(root, preset, checkpoints)
    info = json.loads((folder / "release.json").read_text())
    return SimpleNamespace(folder=folder, student=student, source=root, preset=preset, info=info,
                           checkpoints=checkpoints)


def _inputs(preset, frames: int = 2):
    g = torch.Generator().manual_seed(3)
    c, _, h, w = preset.latent_shape
    x = torch.randn(1, c, frames, h, w, generator=g)
    context = torch.randn(1, 5, preset.text.dim, generator=g)
    return x, torch.tensor([700.0]), context


def _diffusers_forward(model, x, t, context):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]


# ----------------------------------------------------------------------------- diffusers layout


def test_release_is_a_diffusers_pipeline_repo_with_one_copy_of_each_weight(release):
    folder, info = release.folder, release.info
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == index["tokenizer"] == [None, None], "referenced, not bundled"
    for f in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "transformer/ar_config.json",
              "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "text/model.safetensors", "checkpoints/merged/dit/config.json", "checkpoints/separate/dit/config.json"):
        assert (folder / f).is_file(), f
    # The pipeline's transformer IS the plain checkpoint (no checkpoints/plain/dit beside it), vae/ the only VAE.
    assert not (folder / "checkpoints/plain").exists() and not (folder / "base").exists()
    assert info["checkpoints"]["plain"]["path"] == "transformer"
    assert info["checkpoints"]["merged"]["path"] == "checkpoints/merged"
    assert info["base"]["dir"] == "."
    manifest = verify_folder(folder)
    weights = {f: m["sha256"] for f, m in manifest["files"].items() if f.endswith(".safetensors")}
    assert len(set(weights.values())) == len(weights), f"a weight file is stored twice: {weights}"
    # the text encoder reference: the tiny preset's is ours (and says so); UMT5's would name Wan2.2's repo
    d = info["diffusers"]
    assert d["transformer"] == {"class": "WanTransformer3DModel", "subfolder": "transformer", "checkpoint": "plain"}
    assert d["text_encoder"]["subfolder"] == "text" and "not UMT5" in d["text_encoder"]["note"]
    assert json.loads((folder / "scheduler/scheduler_config.json").read_text())["shift"] == SHIFT


def test_transformer_loads_in_diffusers_and_matches_ours(release):
    from longlive.inference.generate import load_release_models
    from longlive.publish.release import find_release

    theirs = diffusers.WanTransformer3DModel.from_pretrained(release.folder / "transformer",
                                                             torch_dtype=torch.float32).eval()
    # ours through the project's own release loader, which must find the same files
    models, preset = load_release_models(release.folder, "plain", dtype=torch.float32)
    assert preset.inference.timestep_shift == SHIFT, "ar_config.json beside the transformer still applies"
    assert find_release(release.folder / "transformer")[1] == "plain"
    assert find_release(release.folder / "checkpoints/plain")[1] == "plain"  # the path older cards printed
    x, t, context = _inputs(release.preset)
    with torch.no_grad():
        want = _diffusers_forward(theirs, x, t, context)
        assert want.abs().mean() > 0.01, "an all-zero output would make the comparison empty"
        torch.testing.assert_close(models.dit(x, t, context), want, atol=ATOL, rtol=0)


def test_vae_loads_in_diffusers_and_decodes_like_ours(release):
    theirs = diffusers.AutoencoderKLWan.from_pretrained(release.folder / "vae", torch_dtype=torch.float32).eval()
    ours = WanVAE.from_pretrained(release.folder / "vae", expect=release.preset.vae).eval()
    z = torch.randn(1, release.preset.vae.z_dim, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = theirs.decode(z).sample
        assert want.abs().mean() > 0.01
        torch.testing.assert_close(ours.decode_raw(z), want, atol=ATOL, rtol=0)


def test_wan_pipeline_loads_from_the_release_and_runs(release):
    with pytest.raises(ValueError, match="text_encoder"):  # the reference must be supplied, as the card says
        diffusers.DiffusionPipeline.from_pretrained(release.folder)
    pipe = diffusers.DiffusionPipeline.from_pretrained(release.folder, text_encoder=None, tokenizer=None)
    assert type(pipe).__name__ == "WanPipeline" and pipe.scheduler.config.shift == SHIFT
    want = load_dit(release.folder / "transformer").state_dict()
    from longlive.models.wan_adapter import to_diffusers_state_dict

    got = pipe.transformer.state_dict()
    assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in to_diffusers_state_dict(want).items())
    emb = torch.randn(1, 5, release.preset.text.dim, generator=torch.Generator().manual_seed(5))
    _, _, h, w = release.preset.latent_shape
    s = pipe.vae_scale_factor_spatial
    out = pipe(prompt_embeds=emb, height=h * s, width=w * s, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
               output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, 5, 3, h * s, w * s) and torch.isfinite(out).all()



def test_releases_of_the_earlier_layout_still_load(release, tmp_path):
    """Published before the diffusers layout: checkpoints/<name>/dit and base/{vae,text}, no paths recorded."""
    from longlive.inference.generate import load_release_models

    old = tmp_path / "old"
    shutil.copytree(release.folder, old)
    (old / "checkpoints/plain").mkdir()
    shutil.move(old / "transformer/ar_config.json", old / "checkpoints/plain/ar_config.json")
    shutil.move(old / "transformer", old / "checkpoints/plain/dit")
    (old / "base").mkdir()
    for comp in ("vae", "text"):
        shutil.move(old / comp, old / "base" / comp)
    info = json.loads((old / "release.json").read_text())
    for c in info["checkpoints"].values():
        c.pop("path")
    info["base"].pop("dir")
    (old / "release.json").write_text(json.dumps(info))
    models, preset = load_release_models(old / "checkpoints/plain")
    new, _ = load_release_models(release.folder, "plain")
    assert preset.inference.timestep_shift == SHIFT
    assert all(torch.equal(v, new.dit.state_dict()[k]) for k, v in models.dit.state_dict().items())

# ----------------------------------------------------------------------------- LoRA


def test_separate_lora_loads_with_peft_and_equals_ours(release):
    ck = release.folder / "checkpoints/separate"
    assert (ck / PEFT_CONFIG).is_file() and (ck / PEFT_WEIGHTS).is_file() and not (ck / ADAPTER_FILE).exists()
    from safetensors import safe_open

    with safe_open(str(ck / PEFT_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.blocks.0.attn1.to_out.0.lora_A.weight" in keys
    assert "base_model.model.blocks.1.ffn.net.0.proj.lora_B.weight" in keys
    assert release.info["checkpoints"]["separate"]["lora"]["merged"] is False

    base = diffusers.WanTransformer3DModel.from_pretrained(release.folder, subfolder="checkpoints/separate/dit",
                                                           torch_dtype=torch.float32).eval()
    x, t, context = _inputs(release.preset)
    with torch.no_grad():
        want = release.student(x, t, context)  # the project's LoRA model: base + (alpha / r) B A, unmerged
        without = _diffusers_forward(base, x, t, context)
        theirs = peft.PeftModel.from_pretrained(base, release.folder, subfolder="checkpoints/separate").eval()
        assert isinstance(theirs.base_model.model.blocks[0].attn1.to_q, peft.tuners.lora.LoraLayer)
        unmerged = _diffusers_forward(theirs.base_model.model, x, t, context)  # the adapter applied on the fly
        merged = _diffusers_forward(theirs.merge_and_unload().eval(), x, t, context)  # as the card shows
    assert (want - without).abs().max() > 100 * ATOL, "the adapter must change the output for this test to mean much"
    torch.testing.assert_close(unmerged, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(merged, want, atol=ATOL, rtol=0)


def test_merged_lora_equals_base_plus_adapter(release):
    ck = release.folder / "checkpoints/merged"
    assert not (ck / ADAPTER_FILE).exists() and not (ck / PEFT_CONFIG).exists(), \
        "nothing to apply beside merged weights, or our loader would apply the adapter twice"
    lo = release.info["checkpoints"]["merged"]["lora"]
    assert lo["merged"] is True and lo["rank"] == LORA.rank
    assert lo["modules"] == len(lora_state_dict(release.student)) // 2
    theirs = diffusers.WanTransformer3DModel.from_pretrained(ck, subfolder="dit", torch_dtype=torch.float32).eval()
    base = load_dit(release.folder / "checkpoints/separate/dit", dtype=torch.float32)
    x, t, context = _inputs(release.preset)
    with torch.no_grad():
        torch.testing.assert_close(_diffusers_forward(theirs, x, t, context), release.student(x, t, context),
                                   atol=ATOL, rtol=0)
        # the merged weights are the base weights plus the adapter's (alpha / r) B A, layer by layer
        got = load_dit(ck / "dit", dtype=torch.float32).state_dict()
        scale = LORA.alpha / LORA.rank
        for name, m in release.student.named_modules():
            if isinstance(m, LoRALinear):
                delta = scale * m.up.weight @ m.down.weight
                torch.testing.assert_close(got[f"{name}.weight"], base.state_dict()[f"{name}.weight"] + delta,
                                           atol=1e-6, rtol=0)


def test_our_loader_reads_both_adapter_formats(release, tmp_path):
    old = read_adapter(release.source / "student")  # the project's own format stays loadable
    new = read_adapter(release.folder / "checkpoints/separate")
    assert old is not None and new is not None
    (old_cfg, old_sd), (new_cfg, new_sd) = old, new
    assert (new_cfg.rank, new_cfg.alpha) == (old_cfg.rank, old_cfg.alpha) and new_sd.keys() == old_sd.keys()
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in old_sd)
    # and our release loader gives the LoRA model from the separate checkpoint
    from longlive.inference.generate import load_release_models

    models, _ = load_release_models(release.folder, "separate")
    x, t, context = _inputs(release.preset)
    with torch.no_grad():
        torch.testing.assert_close(models.dit(x, t, context), release.student(x, t, context), atol=ATOL, rtol=0)

    # what plain LoRA cannot express is refused, not loaded wrong
    save_peft_adapter(LORA, lora_state_dict(release.student), tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG).read_text())
    (tmp_path / PEFT_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAError, match="use_dora"):
        read_adapter(tmp_path)


def test_no_pipeline_when_every_dit_needs_its_adapter(release, tmp_path):
    """WanPipeline cannot apply a peft adapter: a release of only a separate-LoRA checkpoint has no model_index."""
    shutil.copytree(release.source / "base", tmp_path / "base")
    folder = _build(tmp_path, release.preset, {"separate": release.checkpoints["separate"]})
    assert not (folder / "model_index.json").exists() and not (folder / "transformer").exists()
    assert (folder / "vae/config.json").is_file() and (folder / "checkpoints/separate/dit/config.json").is_file()
    info = json.loads((folder / "release.json").read_text())
    assert info["diffusers"]["pipeline"] is None and info["diffusers"]["vae"]["subfolder"] == "vae"
    assert "no `model_index.json`" in (folder / "README.md").read_text()


# ----------------------------------------------------------------------------- manifest


def test_manifest_covers_the_diffusers_files(release, tmp_path):
    """model_index.json and scheduler/ are payload: deterministic from the model (no version, date or commit),
    and they change what diffusers builds. The same inputs under another version give the same content id."""
    manifest = verify_folder(release.folder)
    for f in ("model_index.json", "scheduler/scheduler_config.json", "transformer/diffusion_pytorch_model.safetensors",
              "vae/config.json", "checkpoints/separate/adapter_model.safetensors"):
        assert f in manifest["files"] and is_payload(f), f
    assert not is_payload("release.json") and not is_payload("README.md")
    again = _build(release.source, release.preset, release.checkpoints, version="tiny-v2", folder="again")
    assert (again / "model_index.json").read_bytes() == (release.folder / "model_index.json").read_bytes()
    assert content_id(verify_folder(again)) == content_id(manifest)

    copy_ = tmp_path / "copy"
    shutil.copytree(release.folder, copy_)
    index = json.loads((copy_ / "model_index.json").read_text())
    (copy_ / "model_index.json").write_text(json.dumps({**index, "vae": [None, None]}))
    with pytest.raises(ChecksumError, match="model_index.json"):
        verify_folder(copy_)


# ----------------------------------------------------------------------------- model card


def test_card_front_matter_parses_as_a_hub_model_card(release):
    from huggingface_hub import ModelCard

    card = ModelCard.load(release.folder / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0"
    assert "base_model" not in meta, "the tiny preset is trained from scratch: no base model"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-video"
    assert {"longlive", "text-to-video", "lora"} <= set(meta["tags"])
    body = card.text
    assert body.lstrip().startswith("# LongLive")
    assert 'subfolder="transformer"' in body and 'subfolder="vae"' in body
    assert '"merged": WanTransformer3DModel.from_pretrained(repo, subfolder="checkpoints/merged/dit")' in body
    assert "| plain | `transformer/` | dit | bf16 |" in body
    assert "WanPipeline.from_pretrained(repo, text_encoder=None, tokenizer=None)" in body
    assert "TinyTextEncoder" in body and "not UMT5" in body
    assert 'PeftModel.from_pretrained(transformer, repo, subfolder="checkpoints/separate")' in body
    assert "longlive generate --checkpoint tiny-v1/transformer" in body


def test_card_names_wan22_as_base_model_and_umt5_as_text_encoder(tiny_preset):
    from longlive.publish.card import _diffusers_usage, front_matter
    from longlive.publish.hf import base_model, text_encoder_ref

    wan = tiny_preset.model_copy(update={
        "dit": tiny_preset.dit.model_copy(update={"num_layers": 30, "dim": 3072, "num_heads": 24, "ffn_dim": 14336}),
        "text": tiny_preset.text.model_copy(update={"kind": "umt5", "path": "/models/umt5", "max_tokens": 512})})
    assert base_model(PublishConfig(), wan) == "Wan-AI/Wan2.2-TI2V-5B"
    assert base_model(PublishConfig(base_model="me/other"), tiny_preset) == "me/other"
    release = {"checkpoints": {"i2v": {"kind": "dit", "ar_config": {"i2v": True}, "path": "transformer",
                                       "diffusers": {"transformer": {"subfolder": "transformer"}}}},
               "license": "other", "base_model": "Wan-AI/Wan2.2-TI2V-5B",
               "diffusers": {"pipeline": "WanPipeline", "vae": {"subfolder": "vae"}, "scheduler": {"shift": 5.0},
                             "transformer": {"checkpoint": "i2v"}, "text_encoder": text_encoder_ref(wan)}}
    meta = front_matter(release, wan)
    assert meta["base_model"] == "Wan-AI/Wan2.2-TI2V-5B" and meta["license"] == "other"
    assert meta["pipeline_tag"] == "image-to-video"
    usage = "\n".join(_diffusers_usage(release))
    assert 'UMT5EncoderModel.from_pretrained("Wan-AI/Wan2.2-TI2V-5B-Diffusers", subfolder="text_encoder")' in usage
    assert "WanPipeline.from_pretrained(repo, text_encoder=text_encoder, tokenizer=tokenizer)" in usage


# ----------------------------------------------------------------------------- --hub


class FakeHfApi:
    """Records calls; ``list_repo_files`` answers with what the last upload_folder would have put there."""

    def __init__(self, **kwargs):
        assert "token" not in kwargs, "the token must come from huggingface_hub's own login, never from us"
        self.calls, self.uploaded = [], []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        folder = Path(kw["folder_path"])
        self.uploaded = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        return SimpleNamespace(oid="c0ffee" * 6 + "abcd")

    def list_repo_files(self, repo_id, **kw):
        self.calls.append(("list_repo_files", repo_id, kw))
        return list(self.uploaded)

    def delete_tag(self, repo_id, **kw):
        self.calls.append(("delete_tag", repo_id, kw))

    def create_tag(self, repo_id, **kw):
        self.calls.append(("create_tag", repo_id, kw))


@pytest.fixture
def hf_login(monkeypatch, tmp_path):
    """A token in HF_TOKEN and nowhere else (no stored login of this machine leaks into the tests)."""
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-stored-tokens"))
    monkeypatch.setenv("HF_TOKEN", "hf_TestTokenNotReal0123456789")
    return monkeypatch


def _fake_hub(monkeypatch, cls=FakeHfApi) -> list:
    import huggingface_hub

    apis = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: apis.append(cls(**kw)) or apis[-1])
    return apis


def _publish_args(release, url, *extra):
    return ["publish", "--url", str(url), "--folder", str(release.folder), "--quiet", *extra]


def test_cli_hub_push_makes_the_expected_calls(release, tmp_path, hf_login, capsys):
    from longlive.cli import main

    apis = _fake_hub(hf_login)
    store = tmp_path / "store"
    assert main(_publish_args(release, store, "--hub", "me/longlive-tiny")) == 0, capsys.readouterr().err
    assert "pushed tiny-v1 to the Hugging Face Hub" in capsys.readouterr().out
    (api,) = apis
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder", "list_repo_files", "create_tag"]
    assert api.calls[0][1:] == ("me/longlive-tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    _, _, kw = api.calls[1]
    # the upload is the verified, published folder in the store, replacing what main held before
    assert kw == {"repo_id": "me/longlive-tiny", "repo_type": "model", "folder_path": str(store / "tiny-v1"),
                  "commit_message": "LongLive release tiny-v1", "delete_patterns": ["*"]}
    assert set(api.uploaded) == set(verify_folder(release.folder)["files"]) | {"manifest.json"}
    assert {"model_index.json", "transformer/config.json", "vae/config.json", "README.md"} <= set(api.uploaded)
    assert api.calls[3][1:] == ("me/longlive-tiny", {"tag": "tiny-v1", "revision": "c0ffee" * 6 + "abcd",
                                                     "repo_type": "model", "tag_message": "LongLive release tiny-v1"})

    # --hub-public and --force: a public repo, and the version's tag moved to the new upload
    assert main(_publish_args(release, store, "--hub", "me/x", "--hub-public", "--force")) == 0
    api = apis[-1]
    assert api.calls[0][2]["private"] is False
    assert [c[0] for c in api.calls][-2:] == ["delete_tag", "create_tag"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_hub_without_token_or_network_is_one_line(release, tmp_path, hf_login, capsys):
    from longlive.cli import main

    # no token: refused before anything is published or sent
    hf_login.delenv("HF_TOKEN")
    apis = _fake_hub(hf_login)
    assert main(_publish_args(release, tmp_path / "store", "--hub", "me/x")) == 2
    err = _one_line_error(capsys)
    assert err.startswith("longlive publish: Hugging Face Hub: no token") and "hf auth login" in err
    assert not apis and not (tmp_path / "store").exists()

    # no network: the publish stands, the push fails in one line that says how to retry
    hf_login.setenv("HF_TOKEN", "hf_TestTokenNotReal0123456789")
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(HfHubHTTPError.__bases__[0].__module__.split(".")[0])  # httpx or httpx2

    class Offline(FakeHfApi):
        def create_repo(self, repo_id, **kw):
            raise http.ConnectError("[Errno -3] Temporary failure in name resolution")

    _fake_hub(hf_login, Offline)
    assert main(_publish_args(release, tmp_path / "store", "--hub", "me/x")) == 2
    err = _one_line_error(capsys)
    assert err.startswith("longlive publish --hub: Hugging Face Hub: create_repo failed for me/x")
    assert "name resolution" in err and "check the network" in err and "run the same command again" in err
    assert (tmp_path / "store/tiny-v1/manifest.json").is_file()

    # a bad repo id: refused before publishing
    assert main(_publish_args(release, tmp_path / "other", "--hub", "me/x/y")) == 2
    assert "not a Hub repo id" in _one_line_error(capsys) and not (tmp_path / "other").exists()


def test_hub_push_refuses_an_unverified_folder_and_reports_hub_errors(release, tmp_path, hf_login):
    from huggingface_hub.errors import HfHubHTTPError

    copy_ = tmp_path / "copy"
    shutil.copytree(release.folder, copy_)
    (copy_ / "transformer/extra.json").write_text("{}")  # not in the manifest
    api = FakeHfApi()
    with pytest.raises(ChecksumError, match="extra.json"):
        push_to_hub(copy_, "me/x", api=api)
    assert api.calls == [], "nothing reaches the Hub before the folder verifies"

    class Unauthorized(FakeHfApi):
        def create_repo(self, repo_id, **kw):
            response = SimpleNamespace(status_code=401, headers={}, request=None)
            raise HfHubHTTPError("401 Client Error: Unauthorized (token hf_TestTokenNotReal0123456789)",
                                 response=response)

    with pytest.raises(HubError, match="hf auth login") as e:
        push_release(release.folder, "me/x", api=Unauthorized())
    assert "hf_TestTokenNotReal" not in str(e.value), "the token never reaches a message"

    class Partial(FakeHfApi):
        def list_repo_files(self, repo_id, **kw):
            return [f for f in self.uploaded if not f.endswith(".safetensors")]

    api = Partial()
    with pytest.raises(HubError, match="lacks"):
        push_to_hub(release.folder, "me/x", api=api)
    assert "create_tag" not in [c[0] for c in api.calls], "no tag on an incomplete upload"

