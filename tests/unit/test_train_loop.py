"""The shared training loop: exact resume after a kill (with EMA and grad accumulation too), stale
checkpoints are not resumed, NaN stops, EMA arithmetic, wandb offline under the run dir."""

import json

import pytest
import torch
from torch import nn

from longlive.config import TrackingConfig, TrainConfig
from longlive.train.ema import EMA
from longlive.train.loop import TrainingError, autocast_dtype, run_training, write_history

CFG = TrainConfig(steps=12, batch_size=4, lr=1e-2, log_every=1)


class Killed(Exception):
    pass


def make_task(kill_at: int | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    w_true = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))

    def loss_fn(step, g):
        if step == kill_at:
            raise Killed
        x = torch.randn(CFG.batch_size, 8, generator=g)
        return ((model(x) - x @ w_true) ** 2).mean(), {}

    return model, loss_fn


def test_killed_and_resumed_run_ends_with_identical_weights(tmp_path):
    ref, loss_fn = make_task()
    ref_hist = run_training("t", ref, loss_fn, CFG, tmp_path / "ref", seed=3, ckpt_every=4)

    model, loss_fn = make_task(kill_at=7)
    with pytest.raises(Killed):
        run_training("t", model, loss_fn, CFG, tmp_path / "run", seed=3, ckpt_every=4)
    model, loss_fn = make_task()  # a fresh process: new model, state comes from the checkpoint
    hist = run_training("t", model, loss_fn, CFG, tmp_path / "run", seed=3, ckpt_every=4)

    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]


def test_checkpoint_from_other_settings_is_not_resumed(tmp_path):
    model, loss_fn = make_task(kill_at=5)
    with pytest.raises(Killed):
        run_training("t", model, loss_fn, CFG, tmp_path, seed=3, ckpt_every=4)
    model, loss_fn = make_task()
    hist = run_training("t", model, loss_fn, CFG, tmp_path, seed=3, ckpt_every=4, data_fingerprint="other data")
    assert hist[0]["step"] == 0 and (tmp_path / "checkpoint.pt.stale").exists()


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    model = nn.Linear(2, 1)
    with pytest.raises(TrainingError, match="loss is nan at step 0; lower lr"):
        run_training("t", model, lambda s, g: (model(torch.full((1, 2), float("nan"))).sum(), {}), CFG, tmp_path, seed=0)


def test_killed_and_resumed_run_with_ema_and_accumulation_ends_identical(tmp_path):
    kw = dict(seed=3, ckpt_every=4, grad_accum=2)
    ref, loss_fn = make_task()
    ref_ema = EMA(ref, decay=0.8, start_step=3)
    run_training("t", ref, loss_fn, CFG, tmp_path / "ref", ema=ref_ema, **kw)

    model, loss_fn = make_task(kill_at=9)
    with pytest.raises(Killed):
        run_training("t", model, loss_fn, CFG, tmp_path / "run", ema=EMA(model, decay=0.8, start_step=3), **kw)
    model, loss_fn = make_task()
    ema = EMA(model, decay=0.8, start_step=3)
    run_training("t", model, loss_fn, CFG, tmp_path / "run", ema=ema, **kw)

    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    for k in ref_ema.shadow:
        assert torch.equal(ref_ema.shadow[k], ema.shadow[k]), k
    assert any(not torch.equal(ema.shadow[k], v) for k, v in model.state_dict().items()), "EMA is not a copy"


def test_ema_copies_before_start_then_averages():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5, start_step=2)
    for step, w in enumerate([1.0, 2.0, 4.0, 8.0]):
        model.weight.data.fill_(w)
        ema.update(step)
        expected = {0: 1.0, 1: 2.0, 2: 3.0, 3: 5.5}[step]  # copies at 0-1, then 0.5 * avg + 0.5 * w
        assert ema.shadow["weight"].item() == expected
    with ema.swapped():
        assert model.weight.item() == 5.5
    assert model.weight.item() == 8.0


def test_autocast_is_bf16_only_where_asked_or_on_cuda():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_wandb_offline_under_run_dir_and_history_for_dvc(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    model, loss_fn = make_task()
    hist = run_training("t", model, loss_fn, CFG, tmp_path, seed=0, tracking=TrackingConfig(), run_config={"x": 1})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["wandb_id"] in runs[0].name
    write_history(hist, tmp_path / "loss.json")
    rows = json.loads((tmp_path / "loss.json").read_text())
    assert [r["step"] for r in rows] == list(range(CFG.steps)) and set(rows[0]) == {"step", "loss"}


def test_adamw8bit_resumes_exactly_and_keeps_8bit_moments(tmp_path):
    # torchao quantizes the moments of tensors of >= 4096 elements: the first layer's (64 x 128) is one
    from torchao.optim.subclass_8bit import OptimState8bit

    def task(kill_at=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 1))

        def loss_fn(step, g):
            if step == kill_at:
                raise Killed
            x = torch.randn(CFG.batch_size, 64, generator=g)
            return (model(x) - x[:, :1]).pow(2).mean(), {}
        return model, loss_fn

    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, log_every=1)
    ref, loss_fn = task()
    ref_hist = run_training("t", ref, loss_fn, cfg, tmp_path / "ref", seed=3, ckpt_every=3, optimizer="adamw8bit")
    model, loss_fn = task(kill_at=4)
    with pytest.raises(Killed):
        run_training("t", model, loss_fn, cfg, tmp_path / "run", seed=3, ckpt_every=3, optimizer="adamw8bit")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert isinstance(state["optimizer"]["state"][0]["exp_avg"], OptimState8bit)
    assert state["fingerprint"]["optimizer"] == "adamw8bit"  # an adamw checkpoint is not resumed by it
    model, loss_fn = task()
    hist = run_training("t", model, loss_fn, cfg, tmp_path / "run", seed=3, ckpt_every=3, optimizer="adamw8bit")
    assert not (tmp_path / "run" / "checkpoint.pt.stale").exists()  # resumed, through load_state's weights_only path
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]
    assert not torch.equal(ref[0].weight, task()[0][0].weight)  # it trained


def test_unknown_optimizer_is_named(tmp_path):
    model, loss_fn = make_task()
    with pytest.raises(TrainingError, match="unknown optimizer 'sgd'"):
        run_training("t", model, loss_fn, CFG, tmp_path, seed=0, optimizer="sgd")
