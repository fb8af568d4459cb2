"""The training loop every trainer shares: AdamW, warm-up + cosine LR, grad clipping, optional EMA,
gradient accumulation and bf16 autocast, atomic checkpoints, exact resume, wandb and a progress bar.

A trainer supplies ``loss_fn(step, generator) -> (loss, metrics)``. All randomness of a step must
come from the generator it is handed, which is seeded from ``(seed, step)``; so a run killed and
resumed from a checkpoint replays exactly the batches and noise an uninterrupted run would have.
With ``grad_accum = n`` the loss function is called n times per step with the *same* generator
(each call draws the next micro-batch from it), so accumulation keeps that property. The
checkpoint holds the model, optimizer, scheduler, EMA, loss history and the wandb run id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from longlive.config import TrackingConfig, TrainConfig
from longlive.io import atomic_file, load_state, write_text_atomic
from longlive.train.ema import EMA
from longlive.tracking import NullTracker, Tracker, start_tracking

if TYPE_CHECKING:
    from longlive.parallel.mesh import ParallelState

log = logging.getLogger(__name__)

LossFn = Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


class TrainingError(RuntimeError):
    pass


def step_generator(seed: int, step: int, replica: int = 0) -> torch.Generator:
    """The generator of one step; data-parallel ``replica`` r > 0 draws its own batches (SP ranks of one
    replica share its generator, so they see the same sample)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + replica * 1_000_000_007)


def lr_factor(step: int, total: int, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak: the short CPU runs converge
    noticeably better with the decay than at a constant rate."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for ``bf16``, and for ``auto`` on a CUDA device that has it; None (fp32) otherwise."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of :func:`autocast_dtype` (a disabled one for fp32)."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _full(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (a norm over FSDP-sharded gradients) as a plain tensor; others unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


OPTIMIZERS = ("adamw", "adamw8bit")


def build_optimizer(param_groups: list[dict], kind: str, lr: float, device: torch.device
                    ) -> tuple[torch.optim.Optimizer, tuple]:
    """The trainers' AdamW (betas 0.9/0.99, no weight decay) and the classes its saved state may hold.

    * ``adamw`` -- ``torch.optim.AdamW``, its fused kernel on CUDA (one launch for every tensor); on the CPU the
      default implementation, so CPU runs stay bit-identical to earlier ones. State: 8 bytes per parameter.
    * ``adamw8bit`` -- torchao's ``AdamW8bit``: both moments block-wise quantized to 8 bits, 2 bytes per parameter
      instead of 8. With float32 master weights and gradients that is 10 bytes per parameter instead of 16, what
      lets the 5B DiT (5.0e9 parameters: 50 GB instead of 80) train on one 80 GB GPU. torchao is a dependency
      already (NVFP4); its optimizer is what we would otherwise write by hand.
    """
    kw = dict(lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    if kind == "adamw":
        return torch.optim.AdamW(param_groups, **kw, fused=True if device.type == "cuda" else None), ()
    if kind == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
            from torchao.optim.subclass_8bit import OptimState8bit
        except ImportError as e:
            raise TrainingError(f"optimizer adamw8bit needs torchao ({e}); install it (pip install 'torchao>=0.18') "
                                "or set the stage's optimizer: adamw") from None
        return AdamW8bit(param_groups, **kw), (OptimState8bit,)
    raise TrainingError(f"unknown optimizer {kind!r}; use one of {OPTIMIZERS}")


def clip_grad_norms(groups: list[dict], max_norm: float, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each group's gradients to ``max_norm``; returns ``({name: norm}, total norm)``, every norm on ``device``.

    A group without gradients this step (DMD's generator on a critic-only step) has norm 0: clip_grad_norm_
    would return a CPU scalar for it, which cannot be stacked with the CUDA norms of the other groups."""
    norms = {}
    for g in groups:
        params = [p for p in g["params"] if p.grad is not None]
        norms[g["name"]] = (_full(torch.nn.utils.clip_grad_norm_(params, max_norm)).to(device) if params
                            else torch.zeros((), device=device))
    return norms, torch.stack(list(norms.values())).norm()


def _any_rank(flag: bool, parallel) -> bool:
    if parallel is None:
        return flag
    from longlive.parallel.mesh import any_true

    return any_true(flag, parallel)


def _mean_over_ranks(value: float, parallel) -> float:
    if parallel is None:
        return value
    from longlive.parallel.mesh import all_mean

    return all_mean(value, parallel)


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
    ema: EMA | None = None,
    grad_accum: int = 1,
    precision: str = "fp32",
    tracking: TrackingConfig | None = None,
    run_config: dict | None = None,
    run_name: str | None = None,
    param_groups: list[dict] | None = None,
    parallel: "ParallelState | None" = None,
    optimizer: str = "adamw",
) -> list[dict]:
    """Train ``model`` for ``cfg.steps`` steps, resuming from ``run_dir/checkpoint.pt`` if present.

    A checkpoint is resumed only if it was written with the same settings and data
    (``data_fingerprint``); otherwise it is set aside as ``checkpoint.pt.stale`` and training starts
    over. Callers delete the checkpoint once the result is saved elsewhere, so a finished checkpoint
    is never mistaken for the result of changed code.

    ema: updated after every optimizer step and saved/restored with the checkpoint; the caller
    exports ``ema.shadow``. grad_accum: micro-batches (loss_fn calls) per optimizer step.
    precision: ``fp32``, ``bf16`` or ``auto`` (bf16 autocast of loss_fn on CUDA, fp32 elsewhere);
    the weights and optimizer state stay fp32. tracking: wandb settings (None: no wandb); its files
    go under ``run_dir/wandb``. The run's config is ``run_config`` (the stage's resolved settings,
    :func:`longlive.tracking.stage_config`) plus this loop's own under ``train``; ``run_name``
    names the wandb run (default ``name``).
    param_groups: ``[{"name", "params", "lr"?}]`` for models trained side by side (DMD's generator and
    critic): one AdamW with a learning rate per group, gradients clipped per group (``grad_norm_{name}``
    is logged). Parameters without a gradient in a step (a group whose loss was not computed) are left
    untouched by AdamW. Default: every trainable parameter of ``model`` in one group at ``cfg.lr``.

    parallel: the process layout (:func:`longlive.parallel.init_parallel`) when the model was wrapped by
    :func:`longlive.parallel.parallelize`. The checkpoint is then a DCP directory ``checkpoint.dcp``
    (sharded; it resumes at any world size, one process included); data-parallel replicas draw their own
    batches; only the main rank logs, tracks and shows progress. None: one process, ``checkpoint.pt``.

    optimizer: ``adamw`` or ``adamw8bit`` (:func:`build_optimizer`).

    Returns the full loss history (one dict per logged step), also kept in the checkpoint.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / ("checkpoint.dcp" if parallel is not None else "checkpoint.pt")
    main = parallel is None or parallel.is_main
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"{name}: the model has no trainable parameters")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise TrainingError(f"{name}: the trainable parameters sit on {sorted(map(str, devices))}; move the whole "
                            "model to one device (the preset's, longlive.device.resolve_device) before training")
    device = params[0].device
    amp_dtype = autocast_dtype(precision, device)
    groups = [{"name": "model", "params": params}] if param_groups is None else [
        {**g, "params": [p for p in g["params"] if p.requires_grad]} for g in param_groups]
    if param_groups is not None and {id(p) for g in groups for p in g["params"]} != {id(p) for p in params}:
        raise TrainingError(f"{name}: param_groups must cover exactly the model's trainable parameters")
    opt, state_classes = build_optimizer([{"params": g["params"], "lr": g.get("lr", cfg.lr)} for g in groups],
                                         optimizer, cfg.lr, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps))
    fingerprint = {"name": name, "seed": seed, "data": data_fingerprint, **cfg.model_dump()}
    # Only settings that differ from the plain loop enter the fingerprint, so older checkpoints still resume.
    if ema is not None:
        fingerprint["ema"] = [ema.decay, ema.start_step]
    if grad_accum != 1:
        fingerprint["grad_accum"] = grad_accum
    if grad_clip != 1.0:
        fingerprint["grad_clip"] = grad_clip
    if amp_dtype is not None:
        fingerprint["autocast"] = str(amp_dtype)
    if optimizer != "adamw":
        fingerprint["optimizer"] = optimizer

    start, history, run_id = 0, [], None
    if parallel is not None:
        from longlive.parallel import checkpoint as sharded

        if sharded.exists(ckpt_path):
            meta = sharded.read_meta(ckpt_path)
            if meta.get("fingerprint") == fingerprint:
                sharded.load(ckpt_path, model, opt, extra=ema.shadow if ema is not None else None)
                sched.load_state_dict(meta["scheduler"])
                start, history, run_id = meta["step"], meta["history"], meta.get("wandb_id")
                log.info("%s: resuming from step %d (%s)", name, start, ckpt_path)
            else:
                parallel.barrier()  # every rank has read the old fingerprint before it moves
                if main:
                    stale = ckpt_path.with_name("checkpoint.dcp.stale")
                    shutil.rmtree(stale, ignore_errors=True)
                    os.replace(ckpt_path, stale)
                    log.warning("%s: %s was written with other settings or data; starting over", name, ckpt_path)
                parallel.barrier()
    elif ckpt_path.exists():
        state = load_state(ckpt_path, allowed=state_classes)  # weights_only: a planted checkpoint.pt must not run code
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            start, history, run_id = state["step"], state["history"], state.get("wandb_id")
            log.info("%s: resuming from step %d (%s)", name, start, ckpt_path)
        else:
            os.replace(ckpt_path, ckpt_path.with_name("checkpoint.pt.stale"))
            log.warning("%s: %s was written with other settings or data; starting over", name, ckpt_path)

    tracker: Tracker = NullTracker()
    if tracking is not None and main:
        settings = {**cfg.model_dump(), "seed": seed, "grad_clip": grad_clip, "grad_accum": grad_accum,
                    "ckpt_every": ckpt_every, "precision": precision, "autocast": str(amp_dtype or torch.float32),
                    "ema": {"decay": ema.decay, "start_step": ema.start_step} if ema is not None else None}
        if param_groups is not None:
            settings["group_lr"] = {g["name"]: g.get("lr", cfg.lr) for g in groups}
        # The data fingerprint is whatever string the trainer compares (often JSON): a short digest identifies it
        settings["data_fingerprint"] = hashlib.sha256(data_fingerprint.encode()).hexdigest()[:16]
        tracker = start_tracking(run_name or name, run_dir, {**(run_config or {}), "train": settings}, tracking,
                                 run_id=run_id)

    def save(step: int) -> None:
        if parallel is not None:
            meta = {"fingerprint": fingerprint, "step": step, "scheduler": sched.state_dict(), "history": history,
                    "wandb_id": tracker.run_id}
            sharded.save(ckpt_path, parallel, model, opt, extra=ema.shadow if ema is not None else None, meta=meta)
            return
        with atomic_file(ckpt_path) as tmp:
            torch.save({"fingerprint": fingerprint, "step": step, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                        "ema": ema.state_dict() if ema is not None else None, "wandb_id": tracker.run_id}, tmp)

    model.train()
    # In a log (dvc repro, Prefect, CI) every redraw is a new line: update a few times a minute there.
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15.0, disable=not main)
    try:
        for step in bar:
            g = step_generator(seed, step, parallel.dp_rank if parallel is not None else 0)
            opt.zero_grad(set_to_none=True)
            loss_sum, metric_sums = 0.0, {}
            for _ in range(grad_accum):
                with autocast(precision, device):
                    loss, metrics = loss_fn(step, g)
                if _any_rank(not bool(torch.isfinite(loss)), parallel):  # every rank stops together
                    save(step)  # keep the last good state for inspection
                    raise TrainingError(
                        f"{name}: loss is {loss.item()} at step {step}; lower lr (now {cfg.lr}) or check the data. "
                        f"The last good state is in {ckpt_path}"
                    )
                (loss / grad_accum).backward()
                loss_sum += loss.item()
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
            norms, grad_norm = clip_grad_norms(groups, grad_clip, device)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(step)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                loss_sum = _mean_over_ranks(loss_sum, parallel)  # data-parallel replicas see other batches
                rec = {"step": step, "loss": loss_sum / grad_accum, "grad_norm": float(grad_norm), "lr": lr,
                       **{k: v / grad_accum for k, v in metric_sums.items()}}
                if len(groups) > 1:
                    rec.update({f"grad_norm_{k}": float(v) for k, v in norms.items()})
                history.append(rec)
                tracker.log({k: v for k, v in rec.items() if k != "step"}, step=step)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
            if (step + 1) % ckpt_every == 0 and step + 1 < cfg.steps:
                save(step + 1)
        save(cfg.steps)
    finally:
        bar.close()
        tracker.finish({"final_loss": history[-1]["loss"]} if history else None)
    model.eval()
    return history


def write_history(history: list[dict], path: str | os.PathLike, key: str = "loss") -> None:
    """One JSON list of ``{step, <key>}`` rows, the shape ``dvc plots`` reads."""
    rows = [{"step": h["step"], key: h[key]} for h in history if math.isfinite(h[key])]
    write_text_atomic(path, json.dumps(rows, indent=1))
