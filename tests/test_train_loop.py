"""The shared training loop: exact resume after a kill, stale checkpoints are not resumed, NaN stops."""

import pytest
import torch
from torch import nn

from longlive.config import TrainConfig
from longlive.train.loop import TrainingError, run_training

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
