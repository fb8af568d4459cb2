"""Exponential moving average of a model's weights, kept in float32 beside the model.

``ema.update(step)`` after each optimizer step: before ``start_step`` the average is a plain copy of
the weights (the early, fast-moving weights are not worth averaging), from then on
``avg = decay * avg + (1 - decay) * weights``. Buffers are copied, not averaged. The state is a
plain dict of tensors, so the training loop saves it in its checkpoint and exact resume covers it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model, self.decay, self.start_step = model, decay, start_step
        self.shadow: dict[str, Tensor] = {
            k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }
        # the parameters by their state-dict names: a checkpoint wrapper's hook strips its prefix from those, not
        # from named_parameters(), which would leave every wrapped parameter un-averaged
        self._params = {k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (0-based)."""
        for k, v in self.model.state_dict().items():
            if k in self._params and step >= self.start_step and v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v.detach())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model (keys differ: {sorted(missing)[:5]})")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Load the averaged weights into ``model`` (default: the tracked model), in its dtypes."""
        (model or self.model).load_state_dict(self.shadow)

    @contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Temporarily put the averaged weights into the tracked model (evaluation, export)."""
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.copy_to()
        try:
            yield self.model
        finally:
            self.model.load_state_dict(backup)
