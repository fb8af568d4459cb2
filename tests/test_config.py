"""Config loading: the shipped presets validate, and bad values fail with a message naming the key."""

import copy

import pytest
import yaml

from longlive.config import DEFAULT_PARAMS, ConfigError, load_preset

RAW = yaml.safe_load(DEFAULT_PARAMS.read_text())


def write_params(tmp_path, mutate=None, preset="tiny"):
    data = copy.deepcopy(RAW)
    data["preset"] = preset
    if mutate:
        mutate(data["presets"]["tiny"])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_presets_have_the_real_sizes():
    tiny = load_preset("tiny")
    assert tiny.latent_shape == (16, 9, 8, 8)
    wan = load_preset("wan22-5b")
    d = wan.dit
    assert (d.num_layers, d.dim, d.num_heads, d.ffn_dim, d.patch_size) == (30, 3072, 24, 14336, (1, 2, 2))
    assert wan.vae.z_dim == 48 and tuple(wan.vae.compression) == (4, 16, 16)
    assert wan.text.kind == "umt5" and wan.text.max_tokens == 512 and wan.text.dim == 4096
    assert wan.latent_shape == (48, 32, 44, 80)  # 704x1280, 880 tokens per latent frame after 1x2x2 patches
    assert load_preset("small").dit.head_dim == 64


def test_default_preset_comes_from_the_file_and_env(tmp_path, monkeypatch):
    path = write_params(tmp_path)
    assert load_preset(path=path).name == "tiny"
    monkeypatch.setenv("LONGLIVE_PRESET", "small")
    assert load_preset(path=path).name == "small"


@pytest.mark.parametrize(
    "mutate, key, words",
    [
        (lambda p: p["dit"].update(num_heads=3), "presets.tiny.dit", "divisible by num_heads"),
        (lambda p: p["dit"].update(num_layers=-1), "presets.tiny.dit.num_layers", "greater than 0"),
        (lambda p: p["dit"].update(dim="wide"), "presets.tiny.dit.dim", "integer"),
        (lambda p: p["video"].update(num_frames=16), "presets.tiny", "1 + 4k"),
        (lambda p: p["video"].update(height=60), "presets.tiny", "video.height 60 must be a multiple of 16"),
        (lambda p: p["vae"].update(compression=[4, 16, 16]), "presets.tiny.vae", "does not match"),
        (lambda p: p["text"].update(kind="bert"), "presets.tiny.text.kind", "'tiny' or 'umt5'"),
        (lambda p: p["synth"].update(multishot_fraction=1.5), "presets.tiny.synth.multishot_fraction", "less than or equal to 1"),
        (lambda p: p.pop("dit"), "presets.tiny.dit", "missing"),
        (lambda p: p.update(dti={}), "presets.tiny.dti", "Extra inputs are not permitted"),
        (lambda p: p.update(cpu_threads=0), "presets.tiny.cpu_threads", "greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_key(tmp_path, mutate, key, words):
    with pytest.raises(ConfigError) as e:
        load_preset(path=write_params(tmp_path, mutate))
    msg = str(e.value)
    assert key in msg and words in msg, msg


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_preset("huge", path=write_params(tmp_path))
    with pytest.raises(ConfigError, match="not found"):
        load_preset(path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("presets: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_preset(path=bad)


def test_cli_config_prints_and_fails_cleanly(tmp_path, capsys):
    from longlive.cli import main

    assert main(["config", "--preset", "wan22-5b"]) == 0
    assert '"num_layers": 30' in capsys.readouterr().out
    assert main(["config", "--params", str(write_params(tmp_path, lambda p: p["dit"].update(num_heads=0)))]) == 2
    assert "presets.tiny.dit.num_heads" in capsys.readouterr().err


def test_stage_setup_pins_the_presets_cpu_threads(monkeypatch):
    # A different thread count gives different float bits and, after training, different models: the tiny
    # preset pins one so CI reproduces the committed regression baseline exactly.
    import torch

    from stages._common import setup

    monkeypatch.delenv("LONGLIVE_PRESET", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        preset = setup("test")
        assert preset.cpu_threads == 1 and torch.get_num_threads() == 1
        assert load_preset("wan22-5b").cpu_threads is None  # GPU presets keep torch's default
    finally:
        torch.set_num_threads(before)
