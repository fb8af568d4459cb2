"""wandb as its users expect, read back from what wandb itself wrote offline (tests/_wandb_runs.py): every training
stage tracked, the base stage too; the stage's resolved settings as a nested config; WANDB_PROJECT and
WANDB_ENTITY honoured; a resumed run continues its wandb run and tracking leaves the numbers alone; the evaluate
stage's sample videos and metrics table."""

import ast
import json
from pathlib import Path

import pytest
import torch

from _tiny_models import save_tiny_base
from _wandb_runs import offline_runs
from longlive.config import EvalVariantConfig, TrackingConfig, TrainConfig
from longlive.train.loop import run_training
from longlive.tracking import NullTracker, stage_config, start_tracking, wandb_target
from test_train_loop import CFG, Killed, make_task

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = TrackingConfig()  # the presets' default: offline, project "longlive"


@pytest.fixture
def wandb_env(monkeypatch):
    """No WANDB_* setting of the developer's shell leaks in; runs stay offline."""
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_every_trainer_passes_the_preset_tracking_and_its_stage_config():
    """Each run_training call in the package (base's VAE and teacher, train_ar, train_dmd/train_qat,
    distill_decoder, and any trainer added later) hands over tracking settings and a config: a trainer that
    forgets them trains untracked, as base did."""
    calls = {}
    for path in sorted((ROOT / "longlive").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "run_training":
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                calls[where] = {k.arg for k in node.keywords}
                assert {"tracking", "run_config"} <= calls[where], f"{where} trains without tracking or its config"
    assert len(calls) >= 5, calls  # base x2, ar, dmd, light_decoder


def test_project_and_entity_come_from_the_environment_first(wandb_env, tmp_path):
    assert wandb_target(TrackingConfig(project="from-params")) == ("from-params", None)
    wandb_env.setenv("WANDB_PROJECT", "team-video")
    wandb_env.setenv("WANDB_ENTITY", "video-lab")
    assert wandb_target(TrackingConfig(project="from-params")) == ("team-video", "video-lab")

    tracker = start_tracking("probe", tmp_path, {"stage": "probe"}, TrackingConfig(project="from-params"))
    tracker.log({"x": 1.0}, step=0)
    tracker.finish()
    (run,) = offline_runs(tmp_path)
    assert (run.project, run.entity, run.name, run.job_type) == ("team-video", "video-lab", "probe", "probe")
    assert run.history[0]["x"] == 1.0


def test_disabled_starts_nothing(wandb_env, tmp_path):
    wandb_env.setenv("WANDB_MODE", "disabled")
    assert isinstance(start_tracking("off", tmp_path, {}, OFFLINE), NullTracker)
    assert not (tmp_path / "wandb").exists()
    wandb_env.setenv("WANDB_MODE", "onlin")
    with pytest.raises(ValueError, match="must be offline, online or disabled, got 'onlin'"):
        start_tracking("typo", tmp_path, {}, OFFLINE)


def test_resumed_run_continues_its_wandb_run_with_a_nested_config_and_unchanged_numbers(wandb_env, tiny_preset,
                                                                                      tmp_path):
    config = stage_config(tiny_preset, "train_ar", ("ar", "dit"), variant="t2v")
    kw = dict(seed=3, ckpt_every=4, tracking=OFFLINE, run_config=config,
              data_fingerprint='{"sentinel-xyz": "JSON, as ar.py builds it"}')
    model, loss_fn = make_task(kill_at=7)
    with pytest.raises(Killed):
        run_training("t", model, loss_fn, CFG, tmp_path / "run", **kw)
    model, loss_fn = make_task()
    hist = run_training("t", model, loss_fn, CFG, tmp_path / "run", **kw)

    first, resumed = offline_runs(tmp_path / "run")
    assert first.id == resumed.id, "the checkpoint carried the wandb run id"
    assert [r["_step"] for r in first.history] == list(range(7))
    assert [r["_step"] for r in resumed.history] == list(range(4, CFG.steps))  # from the step-4 checkpoint
    assert [r["loss"] for r in resumed.history] == [h["loss"] for h in hist[4:]]
    assert resumed.summary["final_loss"] == hist[-1]["loss"]

    c = resumed.config
    assert (c["preset"], c["stage"], c["variant"], resumed.job_type) == ("tiny", "train_ar", "t2v", "train_ar")
    assert c["ar"]["train"]["steps"] == tiny_preset.ar.train.steps and c["ar"]["variants"]["t2v"]["i2v"] is False
    assert c["dit"]["dim"] == tiny_preset.dit.dim and isinstance(c["dit"]["patch_size"], list)
    train = c["train"]  # the loop's own settings: numbers and dicts, the fingerprint only as a short digest
    assert (train["lr"], train["steps"], train["seed"], train["grad_accum"]) == (CFG.lr, CFG.steps, 3, 1)
    assert len(train["data_fingerprint"]) == 16 and "sentinel-xyz" not in json.dumps(c)

    ref, loss_fn = make_task()  # the same training untracked: the same bits
    ref_hist = run_training("t", ref, loss_fn, CFG, tmp_path / "ref", seed=3, ckpt_every=4)
    assert [h["loss"] for h in ref_hist] == [h["loss"] for h in hist]
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_base_stage_tracks_the_vae_and_the_teacher(wandb_env, tiny_preset, synth_dir, tmp_path):
    from longlive.train.base_models import build_base

    wandb_env.setenv("WANDB_PROJECT", "base-check")
    steps = TrainConfig(steps=2, batch_size=2, lr=1e-3, log_every=1)
    preset = tiny_preset.model_copy(update={"base": tiny_preset.base.model_copy(update={"vae": steps, "dit": steps})})
    work = tmp_path / "work"
    build_base(preset, synth_dir, tmp_path / "base", work, tmp_path / "plots")

    for model, plot in (("vae", "vae_loss.json"), ("teacher", "teacher_loss.json")):
        (run,) = offline_runs(work / model)
        assert (run.name, run.job_type, run.project) == (f"base-{model}", "base", "base-check")
        assert run.config["stage"] == "base" and run.config["model"] == model
        assert run.config["base"]["vae"]["steps"] == 2 and run.config["base"]["dit"]["lr"] == 1e-3
        assert run.config["vae"]["z_dim"] == preset.vae.z_dim and run.config["text"]["dim"] == preset.text.dim
        plotted = json.loads((tmp_path / "plots" / plot).read_text())
        assert [r["loss"] for r in run.history] == [r["loss"] for r in plotted]  # what DVC plots, step by step
        assert not list((work / model).glob("checkpoint.pt*")), "the resume state is removed after success"


def test_metrics_table_has_a_row_per_variant_and_gaps_where_a_metric_did_not_run(wandb_env, tmp_path):
    from longlive.eval.tracking import log_evaluation

    info = {"kind": "t2v", "quant": "none", "denoising_steps": "1000,500", "checkpoint": "models/ar/t2v"}
    metrics = {"ar_t2v": {"score": 0.5, "fps": 12.0, "vbench_temporal_flickering": 0.97, "info": info},
               "nvfp4": {"score": 0.25, "fps": 30.0, "info": {**info, "quant": "nvfp4"}}}
    run_id = log_evaluation(metrics, run_dir=tmp_path, cfg=OFFLINE, preset="tiny")
    (run,) = offline_runs(tmp_path)
    assert run.id == run_id and run.config["variants"]["nvfp4"]["quant"] == "nvfp4"
    columns, rows = run.table("metrics")
    assert columns == ["variant", "kind", "quant", "denoising_steps", "checkpoint", "device", "score", "fps",
                       "vbench_temporal_flickering"]
    assert rows == [["ar_t2v", "t2v", "none", "1000,500", "models/ar/t2v", None, 0.5, 12.0, 0.97],
                    ["nvfp4", "t2v", "nvfp4", "1000,500", "models/ar/t2v", None, 0.25, 30.0, None]]
    assert run.history[0]["nvfp4/fps"] == 30.0


def test_evaluate_stage_logs_sample_videos_and_the_metrics_table(wandb_env, tiny_preset, tmp_path):
    import stages.evaluate

    save_tiny_base(tiny_preset, tmp_path / "models/base")
    ev = tiny_preset.evaluate.model_copy(update={
        "variants": {"teacher": EvalVariantConfig(checkpoint="models/base", kind="t2v")},
        "num_prompts": 2, "num_multishot": 1, "num_drift": 1, "length_factor": 2, "samples": 1, "threads": None,
        "speed": tiny_preset.evaluate.speed.model_copy(update={"runs": 1, "warmup": 0, "length_factor": 1}),
        "vbench": tiny_preset.evaluate.vbench.model_copy(update={"dimensions": []}),
    })
    preset = tiny_preset.model_copy(update={"evaluate": ev})
    wandb_env.setattr(stages.evaluate, "setup", lambda stage: preset)
    wandb_env.chdir(tmp_path)
    wandb_env.setenv("WANDB_PROJECT", "eval-check")
    wandb_env.setenv("WANDB_ENTITY", "video-lab")
    stages.evaluate.main([])

    metrics = json.loads((tmp_path / "reports/evaluate/metrics/teacher.json").read_text())
    (run,) = offline_runs(tmp_path / ".work/evaluate")
    assert (run.project, run.entity, run.job_type) == ("eval-check", "video-lab", "evaluate")
    c = run.config
    assert c["evaluate"]["num_prompts"] == 2 and c["evaluate"]["speed"]["runs"] == 1 and c["inference"]
    assert c["variants"]["teacher"]["kind"] == "t2v" and c["variants"]["teacher"]["quant"] == "none"
    assert c["variants"]["teacher"]["inference"]["denoising_steps"] == preset.inference.denoising_steps
    (row,) = run.history
    assert row["teacher/score"] == metrics["score"] and row["teacher/fps"] == metrics["fps"]

    samples = sorted((tmp_path / "reports/evaluate/samples/teacher").glob("*.mp4"))
    assert {f"teacher/samples/{s.stem}" for s in samples} <= set(row) and samples
    for s in samples:
        video = row[f"teacher/samples/{s.stem}"]
        assert video["_type"] == "video-file" and run.media(video).read_bytes() == s.read_bytes()

    columns, rows = run.table("metrics")
    assert columns[:3] == ["variant", "kind", "quant"] and [r[0] for r in rows] == ["teacher"]
    table = dict(zip(columns, rows[0]))
    assert table["kind"] == "t2v" and table["score"] == metrics["score"] and table["fps"] == metrics["fps"]
    assert {k for k, v in metrics.items() if isinstance(v, float)} <= set(columns)


def test_evaluate_stage_checks_the_mode_first_and_a_failed_record_leaves_the_evaluation_standing(
        wandb_env, tiny_preset, tmp_path, caplog):
    import stages.evaluate

    wandb_env.setattr(stages.evaluate, "setup", lambda stage: tiny_preset)
    wandb_env.chdir(tmp_path)
    wandb_env.setattr(stages.evaluate, "run_evaluate", lambda *a, **k: pytest.fail("evaluated despite WANDB_MODE"))
    wandb_env.setenv("WANDB_MODE", "onlin")
    with pytest.raises(SystemExit, match="evaluate: WANDB_MODE / tracking.wandb_mode must be offline, online or "
                                         "disabled, got 'onlin'"):
        stages.evaluate.main([])

    wandb_env.setenv("WANDB_MODE", "online")
    wandb_env.setattr(stages.evaluate, "run_evaluate", lambda *a, **k: {})

    def network_down(*a, **k):
        raise ConnectionError("api.wandb.ai unreachable")

    wandb_env.setattr(stages.evaluate, "log_results", network_down)
    stages.evaluate.main([])  # no exception: the outputs are written, only the record is missing
    assert "wandb record of this evaluation failed (ConnectionError: api.wandb.ai unreachable)" in caplog.text
