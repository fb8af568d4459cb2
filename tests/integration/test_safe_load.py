"""Resume state never runs code: a planted pickle in ``checkpoint.pt``, in a DCP checkpoint's ``meta.pt``,
``.metadata`` or one of its non-tensor entries is refused with one line naming the file, before anything in
it executes; the state the loop writes itself still loads (exact resume: tests/unit/test_train_loop.py,
tests/unit/test_parallel.py). The train_ar stage itself, given the planted ``meta.pt`` of issue 15, exits in one line."""

import builtins
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from longlive.config import TrainConfig
from longlive.io import UnsafeStateError, load_state
from longlive.parallel import checkpoint as sharded
from longlive.parallel.mesh import ParallelState
from longlive.train.loop import run_training

from _tiny_models import save_tiny_base
from tests.integration.test_data_safety import stage_project, validated_project  # noqa: F401 - fixtures

CFG = TrainConfig(steps=4, batch_size=2, lr=1e-2, log_every=1)


class Planted:
    """Unpickling this creates ``marker``: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def make_task():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)

    def loss_fn(step, g):
        x = torch.randn(CFG.batch_size, 4, generator=g)
        return model(x).pow(2).mean(), {}

    return model, loss_fn


def assert_refused(err: pytest.ExceptionInfo, marker: Path, names: str) -> None:
    msg = str(err.value)
    assert not marker.exists(), "the planted pickle ran"
    assert "\n" not in msg and names in msg and "delete" in msg.lower(), msg


def test_the_plant_would_run_under_a_full_unpickle(tmp_path):
    # guards the other tests: they prove something only if the payload really executes when unpickled
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Planted(marker)))
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_planted_single_process_checkpoint_is_refused(tmp_path, how):
    marker, run = tmp_path / "ran", tmp_path / "run"
    run.mkdir()
    state = {"fingerprint": {}, "step": 1, "model": {}, "history": [Planted(marker)]}
    if how == "torch.save":
        torch.save(state, run / "checkpoint.pt")
    else:
        (run / "checkpoint.pt").write_bytes(pickle.dumps(state, protocol=2))
    model, loss_fn = make_task()
    with pytest.raises(UnsafeStateError) as e:
        run_training("t", model, loss_fn, CFG, run, seed=0, ckpt_every=2)
    assert_refused(e, marker, str(run / "checkpoint.pt"))


def test_the_loops_own_checkpoint_loads_safely(tmp_path):
    model, loss_fn = make_task()
    run_training("t", model, loss_fn, CFG, tmp_path, seed=0, ckpt_every=2)
    state = load_state(tmp_path / "checkpoint.pt")  # weights_only: everything the loop saves is plain
    assert state["step"] == CFG.steps and set(state) >= {"model", "optimizer", "scheduler", "history", "fingerprint"}


@pytest.fixture
def dcp_checkpoint(tmp_path) -> Path:
    """A real sharded checkpoint of run_training (one process, checkpoint.dcp) to plant files into."""
    model, loss_fn = make_task()
    run_training("t", model, loss_fn, CFG, tmp_path / "run", seed=0, ckpt_every=2, parallel=ParallelState())
    path = tmp_path / "run" / "checkpoint.dcp"
    assert sharded.exists(path) and sharded.read_meta(path)["step"] == CFG.steps
    return path


def test_planted_dcp_meta_is_refused_at_resume(dcp_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"fingerprint": Planted(marker)}, dcp_checkpoint / sharded.META_NAME)
    model, loss_fn = make_task()
    with pytest.raises(UnsafeStateError) as e:
        run_training("t", model, loss_fn, CFG, dcp_checkpoint.parent, seed=0, ckpt_every=2, parallel=ParallelState())
    assert_refused(e, marker, str(dcp_checkpoint / sharded.META_NAME))
    assert str(dcp_checkpoint) in str(e.value)  # what to delete: the whole checkpoint


def test_planted_dcp_metadata_is_refused(dcp_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    (dcp_checkpoint / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    model, _ = make_task()
    with pytest.raises(UnsafeStateError) as e:
        sharded.load(dcp_checkpoint, model, torch.optim.AdamW(model.parameters()))
    assert_refused(e, marker, str(dcp_checkpoint / ".metadata"))


def test_planted_dcp_entry_is_refused(tmp_path):
    # DCP stores non-tensor state (optimizer hyperparameters) as pickled entries of its data files
    marker = tmp_path / "ran"
    model, _ = make_task()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    opt.param_groups[0]["lr"] = Planted(marker)
    sharded.save(tmp_path / "ckpt", ParallelState(), model, opt, meta={"step": 1})
    assert not marker.exists()
    fresh, _ = make_task()
    with pytest.raises(UnsafeStateError) as e:
        sharded.load(tmp_path / "ckpt", fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert_refused(e, marker, "optimizer.param_groups.0.lr")


def test_a_clean_dcp_checkpoint_still_loads(dcp_checkpoint, tmp_path):
    copy = tmp_path / "copy.dcp"
    shutil.copytree(dcp_checkpoint, copy)
    model, _ = make_task()
    with torch.no_grad():
        model.weight.zero_()
    meta = sharded.load(copy, model, torch.optim.AdamW(model.parameters()))
    assert meta["step"] == CFG.steps and model.weight.abs().sum() > 0


def test_the_train_ar_stage_refuses_a_planted_meta_in_one_line(validated_project, tiny_preset, tmp_path):
    """The probe as a user meets it: a planted ``.work/train_ar/t2v/checkpoint.dcp/meta.pt`` at the next
    ``train_ar`` (validated shards, real tiny models) runs nothing and stops the stage in one line."""
    import stages.train_ar

    proj = validated_project
    save_tiny_base(tiny_preset, proj / "models" / "base")
    ckpt = Path(".work/train_ar/t2v/checkpoint.dcp")  # the stage's own work dir, relative to the project
    (proj / ckpt).mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"fingerprint": Planted(marker), "step": 1}, proj / ckpt / sharded.META_NAME)
    with pytest.raises(SystemExit) as exit_:
        stages.train_ar.main(["t2v"])
    message = str(exit_.value.code)
    assert not marker.exists(), "the planted pickle ran"
    assert message.startswith("train_ar: ") and "\n" not in message, message
    assert str(ckpt / sharded.META_NAME) in message and f"Delete {ckpt} " in message
    assert not (proj / "models" / "ar" / "t2v").exists()
