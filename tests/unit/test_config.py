"""Config loading: the shipped presets validate, and bad values fail with a message naming the key."""

import copy

import pytest
import yaml

from longlive.config import DEFAULT_PARAMS, ConfigError, load_preset, preset_files

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


def test_default_preset_is_the_one_the_file_records_and_the_env_may_only_agree(tmp_path, monkeypatch):
    path = write_params(tmp_path)
    assert load_preset(path=path).name == "tiny"
    monkeypatch.setenv("LONGLIVE_PRESET", "tiny")
    assert load_preset(path=path).name == "tiny"
    monkeypatch.setenv("LONGLIVE_PRESET", "small")  # DVC would record tiny for what a stage ran as small
    with pytest.raises(ConfigError) as e:
        load_preset(path=path)
    assert str(e.value) == ("LONGLIVE_PRESET=small but params.yaml records preset: tiny (what DVC runs and records); "
                            "switch with `dvc exp run -S preset=small` and unset LONGLIVE_PRESET")
    assert load_preset("small", path=path).name == "small"  # named explicitly (longlive config/bench): conf/preset/


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
        # strict types: YAML's true is not 1, nor 1 true, nor "3" a number
        (lambda p: p["dit"].update(num_layers=True), "presets.tiny.dit.num_layers", "Input should be a valid integer"),
        (lambda p: p["dit"].update(cross_attn_norm=1), "presets.tiny.dit.cross_attn_norm", "valid boolean"),
        (lambda p: p["dit"].update(patch_size=[1, True, 2]), "presets.tiny.dit.patch_size.1", "valid integer"),
        (lambda p: p["ar"]["train"].update(lr=True), "presets.tiny.ar.train.lr", "valid number"),
        (lambda p: p["ar"]["train"].update(lr="1e-3"), "presets.tiny.ar.train.lr", "valid number"),
        # encode's loader and process settings
        (lambda p: p["encode"].update(nproc=0), "presets.tiny.encode.nproc", "must be >= 1 or auto"),
        (lambda p: p["encode"].update(nproc="all"), "presets.tiny.encode.nproc", "auto"),
        (lambda p: p["encode"].update(workers=-1), "presets.tiny.encode.workers", "greater than or equal to 0"),
        (lambda p: p["encode"].update(prefetch=0), "presets.tiny.encode.prefetch", "greater than or equal to 1"),
        (lambda p: p["encode"].update(batch_size=0), "presets.tiny.encode.batch_size", "greater than 0"),
        (lambda p: p["encode"].update(dtype="fp16"), "presets.tiny.encode.dtype", "'auto', 'bf16' or 'fp32'"),
        (lambda p: p["inference"].update(vae_decoder="diffusers"), "presets.tiny.inference.vae_decoder",
         "'fast' or 'reference'"),
        (lambda p: p["inference"].update(cuda_graphs="yes"), "presets.tiny.inference.cuda_graphs", "valid boolean"),
    ],
)
def test_bad_values_name_the_key(tmp_path, mutate, key, words):
    with pytest.raises(ConfigError) as e:
        load_preset(path=write_params(tmp_path, mutate))
    msg = str(e.value)
    assert key in msg and words in msg, msg


def _lax_numbers(annotation, metadata=()) -> bool:
    """Whether an annotation holds a plain int / float / bool, which pydantic's lax mode fills from True or "3"."""
    from typing import Annotated, get_args, get_origin

    from pydantic import Strict

    if annotation in (int, float, bool):
        return not any(isinstance(m, Strict) and m.strict for m in metadata)
    if get_origin(annotation) is Annotated:
        inner, *meta = get_args(annotation)
        return _lax_numbers(inner, meta)
    return any(_lax_numbers(a) for a in get_args(annotation))


def test_every_config_field_has_strict_numbers():
    # a new field written as `int` would take `true` as 1 again: the StrictInt / StrictFloat / StrictBool rule
    import inspect

    import pydantic

    import longlive.config as config

    lax = [f"{cls.__name__}.{name}" for cls in vars(config).values()
           if inspect.isclass(cls) and issubclass(cls, pydantic.BaseModel) and cls.__module__ == config.__name__
           for name, field in cls.model_fields.items() if _lax_numbers(field.annotation, field.metadata)]
    # quantization's values are a smart union, where True stays a bool and 1 an int
    assert lax == ["PublishCheckpoint.quantization"], lax


def test_every_shipped_preset_loads_and_floats_take_yaml_ints(tmp_path):
    assert sorted(preset_files()) == ["small", "tiny", "wan22-5b"]
    for name in preset_files():
        assert load_preset(name).name == name
    preset = load_preset(path=write_params(tmp_path, lambda p: p["ar"]["train"].update(lr=1)))
    assert preset.ar.train.lr == 1.0 and isinstance(preset.ar.train.lr, float)


SECRET, KEY_ID = "S3cretCanary/42+xyz", "AKIDCANARY0042"


@pytest.mark.parametrize("mutate, keys", [
    (lambda p: p["publish"].update(storage_options={"key": KEY_ID, "secret": SECRET}),
     ["presets.tiny.publish.storage_options.key", "presets.tiny.publish.storage_options.secret"]),
    (lambda p: p["publish"].update(storage_options={"endpoint_url": f"http://{KEY_ID}:{SECRET}@minio:9000"}),
     ["presets.tiny.publish.storage_options.endpoint_url"]),
    (lambda p: p["publish"].update(storage_options={"client_kwargs": {"aws_session_token": SECRET}}),
     ["presets.tiny.publish.storage_options.client_kwargs.aws_session_token"]),
    (lambda p: p["publish"].update(url=f"https://{KEY_ID}:{SECRET}@example.com/releases"), ["presets.tiny.publish.url"]),
    (lambda p: p["encode"].update(url=f"http://{KEY_ID}:{SECRET}@example.com/shards"), ["presets.tiny.encode.url"]),
])
def test_credentials_in_params_are_refused_naming_the_key_not_the_value(tmp_path, mutate, keys):
    with pytest.raises(ConfigError) as e:
        load_preset(path=write_params(tmp_path, mutate))
    msg = str(e.value)
    assert all(k in msg for k in keys) and "AWS_SECRET_ACCESS_KEY" in msg and "profile" in msg, msg
    assert SECRET not in msg and KEY_ID not in msg and "S3cretCanary" not in msg, msg


def test_a_profile_is_allowed_and_other_errors_do_not_echo_secrets(tmp_path):
    preset = load_preset(path=write_params(tmp_path, lambda p: p["publish"].update(
        storage_options={"profile": "releases", "endpoint_url": "http://127.0.0.1:9000"})))
    assert preset.publish.storage_options["profile"] == "releases"

    def misplaced(p):  # a credential where no key is allowed, and a URL where a mapping belongs
        p["publish"]["secret_access_key"] = SECRET
        p["encode"]["samples_per_shard"] = f"http://{KEY_ID}:{SECRET}@example.com"
    with pytest.raises(ConfigError) as e:
        load_preset(path=write_params(tmp_path, misplaced))
    msg = str(e.value)
    assert "presets.tiny.publish.secret_access_key" in msg and "presets.tiny.encode.samples_per_shard" in msg, msg
    assert SECRET not in msg and KEY_ID not in msg, msg


def test_cli_config_redacts_even_what_slipped_past_validation(monkeypatch, capsys):
    import longlive.cli as cli

    tiny = load_preset("tiny")
    leaky = tiny.model_copy(update={"publish": tiny.publish.model_copy(update={  # model_copy skips validation
        "storage_options": {"secret": SECRET, "endpoint_url": f"http://{KEY_ID}:{SECRET}@h"}})})
    monkeypatch.setattr(cli, "load_preset", lambda *a: leaky)
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and KEY_ID not in out and '"secret": "***"' in out and "http://***@h" in out, out


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
