"""``train_dmd``: distil an AR student into a few-step student with DMD (see :mod:`longlive.diffusion.dmd`).

One run distils one AR variant (t2v or i2v) into one student (a step list such as 4 or 2 steps):

* generator: the AR export ``models/ar/{variant}`` (weights and block layout), trained in full or
  through LoRA adapters (``dmd.lora``), its EMA exported;
* real score: the frozen base teacher (``models/base/dit``), in bf16 on CUDA (``frozen_dtype``);
* fake score: a critic initialised from the same teacher, trained alongside.

A loop step is one critic update on a fresh self-forcing rollout; every ``critic_updates``-th step
also updates the generator through the DMD gradient of that rollout (one AdamW, one parameter group
per model, see ``run_training``). With ``tf_weight`` > 0 a generator step also adds the AR teacher-forcing
loss on real clips at the student's step list: DMD moves samples toward the teacher's distribution, so
where the teacher is weaker than the AR student (the tiny teacher's motion) a data term keeps what AR
training learned. Prompts of the DMD term come from the prompt corpus ``dmd.prompts`` (:class:`PromptDraw`,
:mod:`longlive.data.prompts`), single prompts: the teacher was trained on single-shot clips, and a batch shares
one cache layout; without one, from the dataset's first-shot captions. I2V rollouts start from a clip's clean
first latent frame, which is left out of both losses.

Export ``out_dir``: ``dit/`` (the EMA generator; with LoRA the frozen AR weights, and the adapters in
``lora.safetensors`` beside ``dit/`` -- merge them with ``longlive.models.lora`` or let inference do it)
and ``ar_config.json`` with the student's step list, so ``longlive generate`` runs it as trained.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from longlive.config import DMDConfig, Preset
from longlive.data.prompts import PromptCorpus, PromptError, embed_prompts, read_corpus
from longlive.device import resolve_device
from longlive.io import file_stamp
from longlive.diffusion import dmd, flow
from longlive.inference.build import build_dit
from longlive.models.checkpoint import AR_CONFIG_NAME, CRITIC_DIR, DIT_DIR, Checkpoint, write_trained
from longlive.models.dit import WanDiT
from longlive.models.lora import has_lora, save_adapter
from longlive.quant.convert import remove_qat
from longlive.models.text import load_text_encoder
from longlive.models.wan_adapter import save_dit
from longlive.train.ar import (
    Clip, ClipMasks, ShardClips, build_batch, collate, masked_flow_loss, tf_forward,
)
from longlive.train.ema import EMA
from longlive.train.loop import run_training, write_history
from longlive.tracking import stage_config

log = logging.getLogger(__name__)


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "bf16" or (name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def first_shot_batch(clips: list[Clip]) -> tuple[Tensor, Tensor]:
    """x0 (B, C, F, h, w) float32 and each clip's first caption (B, L, D) float32."""
    return torch.stack([c.latents for c in clips]).float(), torch.stack([c.text[0] for c in clips]).float()


class PromptDraw:
    """What one DMD step draws: B prompt embeddings (B, L, D) float32 and a clip for each (the I2V first frame,
    the teacher-forcing data term, the latent shape).

    ``corpus`` None: B training clips (``ShardClips.sample``) with their first-shot captions. Otherwise B lines
    of the corpus, uniformly: a line naming a clip brings it, and when its prompt is that clip's first-shot
    caption, the embedding encode stored with it (so the training captions as a corpus, in the shards' order,
    draw exactly what ``corpus`` None draws); other prompts take ``embeddings`` and a clip drawn from the shards.
    An I2V rollout continues a clip's first frame, which must fit its prompt: I2V draws only the lines that
    name a clip, and with a corpus that has none (a plain prompt list), the training clips and their captions.
    """

    def __init__(self, data: ShardClips, corpus: PromptCorpus | None, embeddings: dict[str, Tensor] | None = None,
                 *, image: bool = False) -> None:
        self.data, self.corpus, self.embeddings = data, corpus, embeddings or {}
        self.lines: list[int] | None = None
        if corpus is not None:
            self.lines = [i for i, k in enumerate(corpus.clips) if k is not None or not image]
            unknown = [(i, k) for i, k in enumerate(corpus.clips) if k is not None and not data.has(k)]
            if unknown:
                raise PromptError(f"dmd.prompts {corpus.source}: prompt {unknown[0][0] + 1} names clip {unknown[0][1]!r} "
                                 f"({len(unknown)} lines in all) that the shards do not hold; drop the \"clip\" or "
                                 "re-run encode (dvc repro encode)")
            if not self.lines:
                log.info("dmd.prompts %s names no clips: I2V rollouts start from training clips, with their "
                         "captions", corpus.source)
                self.lines = None

    def to_embed(self) -> list[str]:
        """The prompts whose embedding is not in the shards (all, when the shards are streamed: their captions
        are not at hand before a shard is read)."""
        if self.lines is None:
            return []
        c = self.corpus
        return [c.prompts[i] for i in self.lines
                if c.clips[i] is None or self.data.streaming or self.data.by_key(c.clips[i]).captions[:1] != (c.prompts[i],)]

    def __call__(self, batch: int, g: torch.Generator) -> tuple[list[Clip], Tensor]:
        if self.lines is None:
            clips = self.data.sample(batch, g)
            return clips, first_shot_batch(clips)[1]
        c = self.corpus
        rows = [self.lines[int(i)] for i in torch.randint(0, len(self.lines), (batch,), generator=g)]
        unpaired = sum(c.clips[r] is None for r in rows)
        drawn = iter(self.data.sample(unpaired, g) if unpaired else ())
        clips = [self.data.by_key(c.clips[r]) if c.clips[r] is not None else next(drawn) for r in rows]
        context = torch.stack([
            clip.text[0] if clip.captions[:1] == (c.prompts[r],) and c.clips[r] is not None
            else self.embeddings[c.prompts[r]] for r, clip in zip(rows, clips)
        ]).float()
        return clips, context


def layout_from_ar_config(ar_config: dict, denoising_steps: list[int], shift: float) -> dmd.RolloutLayout:
    return dmd.RolloutLayout(
        block_sizes=list(ar_config["train_block_sizes"]),
        sigmas=flow.step_list_sigmas(denoising_steps, shift),
        sink_frames=int(ar_config.get("sink_frames") or 0),
        window_frames=ar_config.get("window_frames"),
        max_block_position=ar_config.get("max_block_position"),
        image_first=bool(ar_config["i2v"] and ar_config["independent_first_frame"]),
    )


class DMDModels(torch.nn.Module):
    """The two trained models in one module, so the shared loop checkpoints and resumes both."""

    def __init__(self, generator: WanDiT, critic: WanDiT) -> None:
        super().__init__()
        self.generator, self.critic = generator, critic


def dmd_step_losses(
    models: DMDModels, teacher: WanDiT, layout: dmd.RolloutLayout, cfg: DMDConfig, x_data: Tensor,
    context: Tensor, null_context: Tensor, g: torch.Generator, *, update_generator: bool,
) -> tuple[Tensor, dict[str, float]]:
    """One DMD step's loss (critic, plus the generator's when ``update_generator``) and its metrics."""
    B, _, F = x_data.shape[:3]
    device = x_data.device
    frame_mask = torch.ones(B, F, device=device)
    image = None
    if layout.image_first:
        image, frame_mask[:, 0] = x_data[:, :, :1], 0.0
    exit_step = int(torch.randint(0, len(layout.sigmas), (1,), generator=g))
    x = dmd.rollout(models.generator, tuple(x_data.shape), context, layout, g, exit_step=exit_step, image=image,
                    grad=update_generator, device=device)
    metrics: dict[str, float] = {"exit_step": float(exit_step)}
    loss = torch.zeros((), device=device)
    if update_generator:
        sigma = dmd.sample_dmd_sigma(B, cfg.timestep_shift, cfg.min_timestep, cfg.max_timestep, g).to(device)
        x_t = flow.add_noise(x.detach(), torch.randn(x.shape, generator=g).to(device), sigma)
        with torch.no_grad():
            x0_real = dmd.score_x0(teacher, x_t, sigma, context, null_context=null_context,
                                   guidance_scale=cfg.guidance_scale)
            x0_fake = dmd.score_x0(models.critic, x_t, sigma, context)
        grad = dmd.dmd_gradient(x.detach(), x0_real, x0_fake, frame_mask)
        g_loss = dmd.generator_loss(x, grad)
        loss = loss + g_loss
        metrics.update(generator_loss=g_loss.item(), dmd_grad_abs=grad.abs().mean().item())
    x = x.detach()
    sigma = dmd.sample_dmd_sigma(B, cfg.timestep_shift, cfg.min_timestep, cfg.max_timestep, g).to(device)
    eps = torch.randn(x.shape, generator=g).to(device)
    v = models.critic(flow.add_noise(x, eps, sigma), flow.timestep(sigma), context)
    c_loss = dmd.critic_loss(v, x, eps, frame_mask)
    metrics["critic_loss"] = c_loss.item()
    return loss + c_loss, metrics


def train_dmd(
    preset: Preset, variant: str, student: str, *, ar_dir: str | os.PathLike, base_dir: str | os.PathLike,
    out_dir: str | os.PathLike, work_dir: str | os.PathLike, plots_dir: str | os.PathLike,
    validation_report: str | os.PathLike, shards_url: str | None = None, null_context: Tensor | None = None,
    qat_from: str | os.PathLike | None = None, prompt_cache: str | os.PathLike | None = None,
) -> dict:
    """Distil ``ar_dir`` (a train_ar export) into the ``student`` step list; returns the metrics.

    The data term reads the shards only if ``validation_report`` (the validate stage's ``report.json``)
    passed them (see :class:`~longlive.train.ar.ShardClips`). Prompts come from ``dmd.prompts``
    (:class:`PromptDraw`); the embeddings the shards do not hold are computed once and kept in ``prompt_cache``
    (default: ``prompts/`` beside ``work_dir``, shared by every train_dmd run).

    ``qat_from``: a train_dmd export of the same student to fine-tune for NVFP4 instead (QAT): its
    generator (LoRA merged) with NVFP4 fake quantization of weights and activations (``quant`` in params,
    straight-through gradients) and its critic, for ``dmd.qat_steps`` steps; the export is plain weights.
    """
    cfg = preset.dmd
    if cfg is None:
        raise ValueError(f"preset {preset.name} has no dmd section in params.yaml")
    if student not in cfg.students:
        raise KeyError(f"unknown student {student!r}; dmd.students has {sorted(cfg.students)}")
    ar_dir, base_dir, out_dir, work_dir, plots_dir = map(Path, (ar_dir, base_dir, out_dir, work_dir, plots_dir))
    ar_export = Checkpoint.open(ar_dir)
    if ar_export.trained is None:
        raise FileNotFoundError(f"{ar_dir / AR_CONFIG_NAME} not found: train_dmd starts from a train_ar export; "
                                f"run `dvc repro train_ar@{variant}` first")
    ar_config = ar_export.trained
    steps = cfg.students[student]
    layout = layout_from_ar_config(ar_config, steps, cfg.timestep_shift)
    device = resolve_device(preset.device)

    data = ShardClips(shards_url or preset.encode.url, preset.ar.shards_in_memory, validation_report=validation_report)
    corpus = read_corpus(cfg.prompts, preset.data.storage_options or None) if cfg.prompts else None
    variant_cfg = preset.ar.variants[variant]
    draw = PromptDraw(data, corpus, image=variant_cfg.i2v)
    to_embed = draw.to_embed()
    if null_context is None or to_embed:
        text_path = preset.text.path if preset.text.kind == "umt5" else base_dir / "text"
        encoder = load_text_encoder(preset.text, text_path)
        if null_context is None:
            with torch.no_grad():
                null_context = encoder.encode([""])[0][0].float().cpu()
        if to_embed:
            encoder_id = f"{preset.text.model_dump_json()}:{file_stamp(Path(text_path))}"
            draw.embeddings = embed_prompts(to_embed, lambda p: encoder.to(device).encode(p)[0],
                                            Path(prompt_cache or work_dir.parent / "prompts"), encoder_id)
        del encoder  # UMT5 is large: only its embeddings stay
    null_context = null_context.to(device)

    teacher = build_dit(base_dir / DIT_DIR, preset, device=device, dtype=frozen_dtype(cfg.frozen_dtype, device),
                        frozen=True)
    # The critic's forward is a plain bidirectional pass: whole blocks recompute. The generator's differentiated
    # step reads the rollout's KV cache, which later blocks change before backward, so only its sublayers that
    # never read the cache (cross-attention, FFN) recompute; the rollout keeps one forward per block for backward.
    critic_wrappers = {"checkpointing": cfg.activation_checkpointing, "compile_blocks": cfg.compile}
    generator_checkpointing = "cache_free" if cfg.activation_checkpointing else False
    if qat_from is None:
        generator = build_dit(ar_export, preset, device=device, dtype=torch.float32, training=True, lora=cfg.lora,
                              checkpointing=generator_checkpointing)
        critic = build_dit(base_dir / DIT_DIR, preset, device=device, dtype=torch.float32, training=True,
                           **critic_wrappers)
    else:
        qat_from = Path(qat_from)
        init = Checkpoint.open(qat_from)
        if not init.critic().exists:
            raise FileNotFoundError(f"{qat_from}/{CRITIC_DIR} not found: QAT fine-tunes a train_dmd export "
                                    f"(run `dvc repro train_dmd@{variant}-{student}` first)")
        # QAT trains the merged weights (the adapter beside dit/ merged at load) the quantizer will see
        generator = build_dit(init, preset, device=device, dtype=torch.float32, training=True, quant="qat",
                              checkpointing=generator_checkpointing)
        critic = build_dit(init.critic(), preset, device=device, dtype=torch.float32, training=True, **critic_wrappers)
        cfg = cfg.model_copy(update={"lora": None, "train": cfg.train.model_copy(update={"steps": cfg.qat_steps}),
                                     "ema": cfg.ema.model_copy(update={"start_step": 0})})
    models = DMDModels(generator, critic)
    ema = EMA(generator, cfg.ema.decay, cfg.ema.start_step)
    groups = [{"name": "generator", "params": list(generator.parameters()), "lr": cfg.train.lr},
              {"name": "critic", "params": list(critic.parameters()), "lr": cfg.critic_lr or cfg.train.lr}]

    tf_cfg = preset.ar.model_copy(update={"denoising_steps": steps, "timestep_shift": cfg.timestep_shift})
    C, F, h, w = data.first().latents.shape
    masks = ClipMasks(preset.ar, variant_cfg, F, generator.tokens_per_frame(h, w))

    def loss_fn(step: int, g: torch.Generator):
        clips, context = draw(cfg.train.batch_size, g)
        x_data = torch.stack([c.latents for c in clips]).float()
        update_generator = step % cfg.critic_updates == 0
        loss, metrics = dmd_step_losses(models, teacher, layout, cfg, x_data.to(device), context.to(device),
                                        null_context, g, update_generator=update_generator)
        if update_generator and cfg.tf_weight > 0:  # the data term: AR teacher forcing at the student's steps
            batch = build_batch(*collate(clips), null_context.cpu(), tf_cfg, variant_cfg, g).to(device)
            tf = masked_flow_loss(tf_forward(models.generator, batch, masks(clips)), batch)
            loss = loss + cfg.tf_weight * tf
            metrics["tf_loss"] = tf.item()
        return loss, metrics

    fingerprint = json.dumps({"data": data.fingerprint, "prompts": corpus.sha256 if corpus else None,
                              "qat_from": str(qat_from) if qat_from else None,
                              "init": file_stamp((qat_from or ar_dir) / DIT_DIR),
                              "base": file_stamp(base_dir / DIT_DIR), "student": steps,
                              "dmd": cfg.model_dump(exclude={"train", "ckpt_every", "activation_checkpointing", "compile", "optimizer"})}, sort_keys=True, default=str)
    t0 = time.time()
    history = run_training(
        f"train_dmd-{variant}-{student}", models, loss_fn, cfg.train, work_dir, seed=preset.seed,
        grad_clip=cfg.grad_clip, ckpt_every=cfg.ckpt_every, data_fingerprint=fingerprint, ema=ema,
        precision=cfg.precision, tracking=preset.tracking, param_groups=groups,
        # ``dmd`` as this run resolved it (QAT: its own steps, no LoRA); train_qat is its own DVC stage
        run_config=stage_config(
            preset, "train_qat" if qat_from else "train_dmd", ("dit",) + (("quant",) if qat_from else ()), dmd=cfg,
            variant=variant, student=student, denoising_steps=steps, ar={"variant": variant_cfg, "ar_config": ar_config}),
        run_name=f"train_dmd-{variant}-{student}" + ("-qat" if qat_from else ""), optimizer=cfg.optimizer,
    )
    wall = time.time() - t0

    ema.copy_to(generator)
    if qat_from is not None:
        remove_qat(generator)  # same parameters in plain linears: the quantize stage converts them
    export(generator, cfg, ar_config, steps, out_dir, critic=critic, qat=qat_from is not None)
    critic_hist = [{"step": r["step"], "loss": r["critic_loss"]} for r in history if math.isfinite(r.get("critic_loss", math.nan))]
    gen_hist = [{"step": r["step"], "loss": r["dmd_grad_abs"]} for r in history if math.isfinite(r.get("dmd_grad_abs", math.nan))]
    write_history(critic_hist, plots_dir / "critic_loss.json")
    write_history(gen_hist, plots_dir / "dmd_grad.json")
    tail = max(1, len(critic_hist) // 10)
    metrics = {
        "steps": cfg.train.steps,
        "denoising_steps": len(steps),
        "critic_loss_first": float(np.mean([r["loss"] for r in critic_hist[:tail]])) if critic_hist else math.nan,
        "critic_loss_final": float(np.mean([r["loss"] for r in critic_hist[-tail:]])) if critic_hist else math.nan,
        "dmd_grad_final": float(np.mean([r["loss"] for r in gen_hist[-max(1, len(gen_hist) // 10):]])) if gen_hist else math.nan,
        "wall_time_s": round(wall, 2),
        "lora": cfg.lora is not None,
    }
    log.info("train_dmd %s %s on %s: %s", variant, student, device, metrics)
    for name in ("checkpoint.pt", "checkpoint.pt.stale"):
        (work_dir / name).unlink(missing_ok=True)
    return metrics


def export(generator: WanDiT, cfg: DMDConfig, ar_config: dict, steps: list[int], out_dir: Path, *,
           critic: WanDiT | None = None, qat: bool = False) -> None:
    """``out_dir/dit`` (+ ``lora.safetensors``), ``ar_config.json`` with the student's step list, and the
    critic (``critic/``, so a QAT fine-tune continues with a critic that knows the student)."""
    plain = copy.deepcopy(generator)
    if has_lora(plain):
        from longlive.models.lora import LoRALinear, _set

        for name, m in list(plain.named_modules()):  # the frozen base weights, adapters saved apart
            if isinstance(m, LoRALinear):
                _set(plain, name, m.base)
    save_dit(plain, out_dir / DIT_DIR)
    if has_lora(generator):
        save_adapter(generator, cfg.lora, out_dir)
    if critic is not None:
        save_dit(critic, out_dir / CRITIC_DIR)  # the checkpoint wrapper's state-dict hooks keep the plain names
    student_config = {**ar_config, "denoising_steps": list(steps), "timestep_shift": cfg.timestep_shift,
                      "denoising_sigmas": [round(s, 6) for s in flow.step_list_sigmas(steps, cfg.timestep_shift).tolist()],
                      "distilled": "dmd", "ar_denoising_steps": ar_config["denoising_steps"], "qat": qat}
    write_trained(out_dir, student_config)


__all__ = ["train_dmd", "dmd_step_losses", "DMDModels", "PromptDraw", "layout_from_ar_config", "first_shot_batch",
           "export"]
