"""The training loop every trainer shares: AdamW, grad clipping, atomic checkpoints, exact resume.

A trainer supplies ``loss_fn(step, generator) -> (loss, metrics)``. All randomness of a step must
come from the generator it is handed, which is seeded from ``(seed, step)``; so a run killed and
resumed from a checkpoint replays exactly the batches and noise an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from longlive.config import TrainConfig

log = logging.getLogger(__name__)

LossFn = Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


class TrainingError(RuntimeError):
    pass


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lr_factor(step: int, total: int, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak: the short CPU runs converge
    noticeably better with the decay than at a constant rate."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_training(
    name: str,
    model: nn.Module,
    loss_fn: LossFn,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    seed: int,
    grad_clip: float = 1.0,
    ckpt_every: int = 50,
    data_fingerprint: str = "",
) -> list[dict]:
    """Train ``model`` for ``cfg.steps`` steps, resuming from ``run_dir/checkpoint.pt`` if present.

    A checkpoint is resumed only if it was written with the same settings and data
    (``data_fingerprint``); otherwise it is set aside as ``checkpoint.pt.stale`` and training starts
    over. Callers delete ``run_dir`` once the result is saved elsewhere, so a finished checkpoint is
    never mistaken for the result of changed code.
    Returns the full loss history (one dict per logged step), also kept in the checkpoint.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"{name}: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps))
    fingerprint = {"name": name, "seed": seed, "data": data_fingerprint, **cfg.model_dump()}

    start, history = 0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start, history = state["step"], state["history"]
            log.info("%s: resuming from step %d (%s)", name, start, ckpt_path)
        else:
            os.replace(ckpt_path, ckpt_path.with_name("checkpoint.pt.stale"))
            log.warning("%s: %s was written with other settings or data; starting over", name, ckpt_path)

    def save(step: int) -> None:
        atomic_torch_save(
            {"fingerprint": fingerprint, "step": step, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history},
            ckpt_path,
        )

    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name, dynamic_ncols=True)
    for step in bar:
        loss, metrics = loss_fn(step, step_generator(seed, step))
        if not torch.isfinite(loss):
            save(step)  # keep the last good state for inspection
            raise TrainingError(
                f"{name}: loss is {loss.item()} at step {step}; lower lr (now {cfg.lr}) or check the data. "
                f"The last good state is in {ckpt_path}"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), **metrics}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if (step + 1) % ckpt_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    save(cfg.steps)
    model.eval()
    return history


def write_history(history: list[dict], path: str | os.PathLike, key: str = "loss") -> None:
    """One JSON list of ``{step, <key>}`` rows, the shape ``dvc plots`` reads."""
    rows = [{"step": h["step"], key: h[key]} for h in history if math.isfinite(h[key])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)
