"""StepPrefetcher: batches built on DataLoader workers equal the ones the step builds itself, generator state
included, in order and after a restart at another step (a resume)."""

import pytest
import torch

from longlive.train.loop import step_generator
from longlive.train.prefetch import StepPrefetcher


def make(step, g):
    idx = torch.randint(0, 100, (3,), generator=g)
    return {"step": step, "idx": idx, "noise": torch.randn(4, 5, generator=g)}


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetched_batches_and_generator_state_equal_the_inline_ones(workers):
    p = StepPrefetcher(make, 7, seed=11, replica=1, workers=workers, prefetch=2)
    for step in [0, 1, 2, 5, 6]:  # 2 -> 5 restarts the loader, as a resumed run does
        g = step_generator(11, step, 1)
        got = p.get(step, g)
        ref_g = step_generator(11, step, 1)
        ref = make(step, ref_g)
        assert got["step"] == step and torch.equal(got["idx"], ref["idx"]) and torch.equal(got["noise"], ref["noise"])
        assert torch.equal(g.get_state(), ref_g.get_state())  # later draws of the step match too
    assert p.waits == 5 and p.wait_s >= 0 and p.mean_wait_ms >= 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="workers must be >= 0"):
        StepPrefetcher(make, 3, seed=0, workers=-1)
