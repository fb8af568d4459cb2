"""Presets and data.source: small and wan22-5b read the user's videos and leave data.source empty until it is set;
every stage that reads clips then stops with one line naming the key. tiny keeps synth."""

import pytest

from longlive.config import ConfigError, load_preset


def test_real_presets_wait_for_a_source_and_tiny_keeps_synth():
    assert load_preset("tiny").data.is_synth
    for name in ("small", "wan22-5b"):
        data = load_preset(name).data
        assert data.source is None and not data.is_synth
        with pytest.raises(ConfigError, match=rf"^presets\.{name}\.data\.source is not set: point it at a folder"):
            data.require_source(name)


@pytest.mark.parametrize("stage", ["ingest", "encode", "base", "distill_decoder"])
def test_a_stage_that_reads_clips_names_the_key_to_set(stage, tmp_path, monkeypatch):
    import importlib

    import runpy
    from pathlib import Path

    # the small preset as `dvc exp run -S preset=small` records it (LONGLIVE_PRESET alone is refused)
    root = Path(__file__).resolve().parents[2]
    runpy.run_path(str(root / "scripts/compose_params.py"))["compose"](["preset=small"], out=tmp_path / "params.yaml")
    monkeypatch.setenv("LONGLIVE_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"stages.{stage}")
    with pytest.raises(SystemExit) as e:
        module.main()
    message = str(e.value)
    assert message.startswith(f"{stage}: presets.small.data.source is not set") and "\n" not in message


def test_synth_draws_nothing_for_a_real_source(tmp_path, monkeypatch):
    import json

    import yaml

    from longlive.config import DEFAULT_PARAMS
    from stages import synth

    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    params["presets"]["tiny"]["data"] = {"source": str(tmp_path / "videos")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("LONGLIVE_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.delenv("LONGLIVE_PRESET", raising=False)
    monkeypatch.chdir(tmp_path)
    synth.main()
    assert (tmp_path / "data/synth/index.jsonl").read_text() == ""
    assert json.loads((tmp_path / "reports/synth/metrics.json").read_text()) == {"clips": 0}
