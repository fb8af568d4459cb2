"""Training batches built ahead of the step, on ``DataLoader`` workers, so the GPU does not wait on data.

A trainer's batch is a pure function of its step: the step's generator (:func:`~longlive.train.loop.step_generator`)
draws the clips and the noise. So ``make(step, g)`` can run in a worker process, ahead of time, and return exactly
what the step would have built itself, plus the generator's state after the draws; the step takes the batch and
restores that state into its own generator, so every later draw matches too. Runs stay bit-identical for any
number of workers, and exact resume holds (a resumed run starts the loader at its first step).

torch's ``DataLoader`` is the engine (worker processes, ``prefetch_factor`` batches per worker in flight, pinned
memory for asynchronous host-to-device copies); this module only maps steps to items and measures how long the
training thread waited for each one (``wait_s``), which the trainers report.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

MakeFn = Callable[[int, torch.Generator], Any]


class _Steps(Dataset):
    def __init__(self, make: MakeFn, seed: int, replica: int, steps: range) -> None:
        self.make, self.seed, self.replica, self.steps = make, seed, replica, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> tuple[int, Any, torch.Tensor]:
        from longlive.train.loop import step_generator

        step = self.steps[i]
        g = step_generator(self.seed, step, self.replica)
        item = self.make(step, g)
        return step, item, g.get_state()


class StepPrefetcher:
    """``get(step, g)`` -> ``make(step, g')`` for a fresh step generator ``g'``, built ``workers`` processes ahead;
    ``g`` (the loop's generator of that step) is left in the state ``g'`` reached.

    ``workers=0`` builds in the training thread when asked (what trainers did before; nothing runs ahead).
    Steps are asked in order; asking out of order (a resume) restarts the loader at that step.
    """

    def __init__(self, make: MakeFn, total_steps: int, *, seed: int, replica: int = 0, workers: int = 0,
                 prefetch: int = 2, pin_memory: bool = False) -> None:
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {workers} and {prefetch}")
        self.make, self.total, self.seed, self.replica = make, total_steps, seed, replica
        self.workers, self.prefetch, self.pin_memory = workers, prefetch, pin_memory
        self.wait_s, self.waits = 0.0, 0
        self._it, self._next = None, None

    def _start(self, step: int) -> None:
        kw = dict(num_workers=self.workers, batch_size=None, pin_memory=self.pin_memory, collate_fn=_identity)
        if self.workers:
            # fork: the workers inherit the dataset (clips in memory, open filesystems) instead of unpickling it;
            # they never touch CUDA, so a parent that initialised it is fine
            kw.update(prefetch_factor=self.prefetch, persistent_workers=False, multiprocessing_context="fork",
                      worker_init_fn=_one_thread)  # workers build batches; the training thread keeps the cores
        self._it = iter(DataLoader(_Steps(self.make, self.seed, self.replica, range(step, self.total)), **kw))
        self._next = step

    def get(self, step: int, g: torch.Generator) -> Any:
        if self._it is None or step != self._next:
            self._start(step)
        t0 = time.perf_counter()
        got, item, state = next(self._it)
        self.wait_s += time.perf_counter() - t0
        self.waits += 1
        if got != step:
            raise RuntimeError(f"prefetcher handed step {got} for step {step}")
        self._next = step + 1
        g.set_state(state)
        return item

    @property
    def mean_wait_ms(self) -> float:
        return 1000 * self.wait_s / max(self.waits, 1)


def _identity(x):
    return x


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


__all__ = ["StepPrefetcher"]
