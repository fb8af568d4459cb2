"""Bodies of the multi-process tests in test_parallel.py: each runs in every spawned gloo process,
builds the same tiny model on every rank, and compares the sequence-parallel / FSDP result with a
plain one-process copy of the model computed in the same process (so nothing is shipped back)."""

from __future__ import annotations

import copy
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from longlive.config import InferenceConfig, ParallelConfig, load_preset
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import PromptSchedule, stream_block_sizes
from longlive.models.attention import FrameMask, KVCache, teacher_forcing_mask
from longlive.models.dit import WanDiT
from longlive.parallel import init_parallel, parallelize, shutdown
from longlive.parallel import checkpoint as dcp_ckpt
from longlive.parallel.sequence import apply_sequence_parallel

ATOL = 2e-5  # fp32: SP changes only the order of floating-point operations (all-to-all, sums over ranks)


def spawn_entry(rank: int, world: int, port: int, sp: int, body: str, args: tuple) -> None:
    """torch.multiprocessing.spawn target: torchrun's environment, then ``body(state, *args)``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    state = init_parallel(ParallelConfig(nproc=world, sp=sp), device="cpu")
    try:
        globals()[body](state, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        shutdown(state)


def tiny_model(seed: int = 0, heads: int | None = None) -> WanDiT:
    preset = load_preset("tiny")
    cfg = preset.dit if heads is None else preset.dit.model_copy(update={"num_heads": heads})
    torch.manual_seed(seed)
    m = WanDiT(cfg, in_channels=preset.vae.z_dim, text_dim=preset.text.dim)
    m.init_weights(seed)
    with torch.no_grad():  # a non-zero head, so outputs (and gradients) depend on every layer
        torch.nn.init.normal_(m.proj_out.weight, generator=torch.Generator().manual_seed(seed + 1), std=0.05)
    return m


def inputs(frames: int = 5, batch: int = 2, prompts: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, 8, 8, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    context = torch.randn(batch, prompts, 16, 64, generator=g)
    index = torch.randint(0, prompts, (batch, frames), generator=g)
    cmask = torch.rand(batch, prompts, 16, generator=g) > 0.2
    return x, t, context, index, cmask


def close(a, b, what: str, atol: float = ATOL) -> None:
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"{what}: max abs diff {err:.3g} > {atol}"


# ---------------------------------------------------------------------------------------------
# inference


def inference(state, modes: list[tuple[str, str]]) -> None:
    for i, (attention, partition) in enumerate(modes):
        inference_mode(state, attention, partition, pipeline=i == 0)


def inference_mode(state, attention: str, partition: str, pipeline: bool) -> None:
    heads, sp = 4, state.sp
    ref = tiny_model(heads=heads).eval()
    model = apply_sp(copy.deepcopy(ref), state, attention, partition)
    x, t, context, index, cmask = inputs()
    tokens = 16
    with torch.no_grad():
        # bidirectional, per-frame timesteps, two prompts with a per-frame prompt index and padding mask
        kw = dict(context_index=index, context_mask=cmask)
        close(model(x, t, context, **kw), ref(x, t, context, **kw), "bidirectional multi-prompt")
        # block-causal (blocks of 2 over 5 frames: [2, 2, 1])
        close(model(x, t, context[:, 0], block_frames=2), ref(x, t, context[:, 0], block_frames=2), "block-causal")
        # teacher forcing [clean | noisy], a noisy frame at its clean copy's RoPE position
        xt = torch.cat((x, x.flip(0)), dim=2)
        tt = torch.cat((torch.zeros_like(t), t), dim=1)
        mask = teacher_forcing_mask(5, tokens, 2)
        kw = dict(attn_mask=mask, frame_positions=torch.arange(5).repeat(2), context_index=index.repeat(1, 2))
        want = ref(xt, tt, context, **kw)
        close(model(xt, tt, context, **kw), want, "teacher forcing")
        # the same layout as a FrameMask: each rank's rows of it (allgather), dense and block-sparse (flex)
        frames = mask[::tokens, ::tokens]
        for backend in ("dense", "flex"):
            kw["attn_mask"] = FrameMask(frames, tokens, backend=backend)
            close(model(xt, tt, context, **kw), want, f"teacher forcing, FrameMask {backend}")

        # KV cache: write two blocks, then a read pass; each rank caches its own heads (ulysses)
        caches = KVCache(len(ref.blocks)), KVCache(len(ref.blocks))
        for start, n in ((0, 2), (2, 2)):
            xb, tb = x[:1, :, start:start + n], torch.zeros(1, n)
            pos = torch.arange(start, start + n)
            with caches[0].writing(), caches[1].writing():
                close(model(xb, tb, context[:1, 0], kv_cache=caches[0], frame_positions=pos),
                      ref(xb, tb, context[:1, 0], kv_cache=caches[1], frame_positions=pos), f"cache write {start}")
        pos = torch.arange(4, 5)
        close(model(x[:1, :, 4:], t[:1, 4:], context[:1, 0], kv_cache=caches[0], frame_positions=pos),
              ref(x[:1, :, 4:], t[:1, 4:], context[:1, 0], kv_cache=caches[1], frame_positions=pos), "cache read")
        r, h = state.sp_rank, heads // sp
        for layer in range(len(ref.blocks)):
            want_k = caches[1].k[layer][:, :, r * h:(r + 1) * h] if attention == "ulysses" else caches[1].k[layer]
            close(caches[0].k[layer], want_k, f"cached keys of layer {layer}")
        if attention == "ulysses":
            assert caches[0].cache_bytes() * sp == caches[1].cache_bytes()

    if not pipeline:
        return
    # the streaming pipeline: sink + window eviction, a prompt switch with re-cache, relative RoPE
    cfg = InferenceConfig(block_frames=2, denoising_steps=[1000, 500], timestep_shift=3.0, sink_frames=1,
                          window_frames=3, recache_on_switch=True)
    schedule = PromptSchedule.from_list([{"start": 0, "prompt": "a"}, {"frame": 17, "prompt": "b"}])
    plans = schedule.plan(stream_block_sizes(8, 2), fps=8, temporal_compression=4)
    ctx = [c[None] for c in context[0]]
    outs = []
    for m in (model, ref):
        pipe = StreamingPipeline(m, cfg, torch.device("cpu"))
        blocks = pipe.stream(plans, ctx, (16, 8, 8), generator=torch.Generator().manual_seed(0))
        outs.append(torch.cat([b.latents for b in blocks], dim=2))
    close(outs[0], outs[1], "streaming pipeline", atol=1e-4)


def apply_sp(model: WanDiT, state, attention: str, partition: str) -> WanDiT:
    handle = apply_sequence_parallel(model, state.sp_group, attention=attention, partition=partition)
    assert handle is not None
    return model


# ---------------------------------------------------------------------------------------------
# training


def tf_loss(model: WanDiT, seed: int = 0) -> torch.Tensor:
    x, t, context, index, _ = inputs(seed=seed)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    xt = torch.cat((x, noise), dim=2)
    tt = torch.cat((torch.zeros_like(t), t), dim=1)
    mask = FrameMask(teacher_forcing_mask(5, 1, 2), 16)  # the frame table; dense on the CPU (flex has no backward)
    out = model(xt, tt, context, attn_mask=mask, frame_positions=torch.arange(5).repeat(2),
                context_index=index.repeat(1, 2))
    return (out[:, :, 5:] - x).pow(2).mean()


def grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for n, p in model.named_parameters()}


def training(state, modes: list[tuple[str, str]]) -> None:
    for attention, partition in modes:
        training_mode(state, attention, partition)


def training_mode(state, attention: str, partition: str) -> None:
    sp = state.sp
    ref = tiny_model()
    loss_ref = tf_loss(ref)
    loss_ref.backward()
    want = grads(ref)

    # SP alone: the SP group's average of the gradients is the one-process gradient
    model = apply_sp(copy.deepcopy(tiny_model()), state, attention, partition)
    loss = tf_loss(model)
    close(loss, loss_ref, "loss")
    loss.backward()
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad, group=state.sp_group)
        close(p.grad / sp, want[n], f"SP gradient of {n}")

    # FSDP2 over dp x sp with SP: gradients (as whole tensors) and one AdamW step
    state.sp_attention, state.sp_partition = attention, partition
    model = parallelize(tiny_model(), state, training=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = tf_loss(model)
    loss.backward()
    got = grads(model)
    for n in want:
        close(got[n], want[n], f"FSDP+SP gradient of {n}")
    opt.step()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt_ref.step()
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    for k, v in ref.state_dict().items():
        close(full[k], v, f"weights after a step: {k}")


# ---------------------------------------------------------------------------------------------
# sharded checkpoints at another world size


def one_step(model, opt, seed: int) -> None:
    opt.zero_grad()
    tf_loss(model, seed).backward()
    opt.step()


def checkpoint_to_one(state, out: str) -> None:
    """2 ranks: FSDP+SP, one step, save (DCP); the whole weights and optimizer state also as a plain file."""
    model = parallelize(tiny_model(), state, training=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    one_step(model, opt, seed=1)
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    dcp_ckpt.save(Path(out) / "ckpt", state, model, opt, extra=ema, meta={"step": 1})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full_opt = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    # one more step from here, to compare with the resumed one-process run
    one_step(model, opt, seed=2)
    after = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if state.is_main:
        torch.save({"weights": full, "optimizer": full_opt, "after": after}, Path(out) / "reference.pt")


def checkpoint_from_one(state, out: str) -> None:
    """2 ranks load a checkpoint written by one process into FSDP+SP, then take the same step."""
    ref = torch.load(Path(out) / "reference.pt", weights_only=False)
    model = parallelize(tiny_model(seed=5), state, training=True)  # other weights: the load must replace them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    meta = dcp_ckpt.load(Path(out) / "ckpt", model, opt, extra=ema)
    assert meta == {"step": 1}, meta
    for k, v in model.state_dict().items():
        close(v.full_tensor(), ref["weights"][k], f"loaded {k}", atol=0)
        close(ema[k].full_tensor(), ref["weights"][k] * 0.5, f"loaded EMA {k}", atol=0)
    one_step(model, opt, seed=2)
    for k, v in model.state_dict().items():
        close(v.full_tensor(), ref["after"][k], f"step after loading: {k}")


# ---------------------------------------------------------------------------------------------
# NVFP4 layers and KV cache under sequence parallel


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def nvfp4(state, attention: str, partition: str, result_path: str | None = None) -> None:
    """NVFP4 linears (emulated W4A4) and the NVFP4 KV cache, converted before sequence parallel.

    Weights quantize identically on every rank, but NVFP4 activations get one global scale per tensor
    (amax / (6 * 448)) and the NVFP4 cache one per token over its heads: a rank's tensor holds only its
    tokens (its heads, in the cache), so SP changes those scales and hence which E4M3 block scales and
    E2M1 codes come out -- another draw of the quantization noise, measured here at about 0.65x NVFP4's
    own error. A layout bug (tokens or heads in the wrong place) would be an O(1) relative error."""
    from longlive.quant.convert import convert_to_nvfp4
    from longlive.quant.kv_cache import make_kv_storage

    full = tiny_model().eval()
    ref = copy.deepcopy(full)
    convert_to_nvfp4(ref, backend="emulated")
    model = apply_sp(copy.deepcopy(ref), state, attention, partition)
    x, t, context, index, _ = inputs()
    out = {}
    with torch.no_grad():
        for name, m in (("sp", model), ("one", ref), ("full", full)):
            out[name] = m(x, t, context[:, 0], block_frames=2)
        kv = {}
        for name, m in (("sp", model), ("one", ref), ("full", full)):
            cache = KVCache(len(m.blocks), storage=make_kv_storage("nvfp4", len(m.blocks)) if name != "full" else None)
            with cache.writing():
                m(x[:1, :, :4], torch.zeros(1, 4), context[:1, 0], kv_cache=cache, block_frames=2)
            kv[name] = m(x[:1, :, 4:], t[:1, 4:], context[:1, 0], kv_cache=cache, frame_positions=torch.arange(4, 5))
    figures = {
        "linear_nvfp4_error": rel(out["one"], out["full"]), "linear_sp_vs_one": rel(out["sp"], out["one"]),
        "kv_nvfp4_error": rel(kv["one"], kv["full"]), "kv_sp_vs_one": rel(kv["sp"], kv["one"]),
    }
    if result_path and state.is_main:
        Path(result_path).write_text(repr(figures))
    assert figures["linear_sp_vs_one"] < figures["linear_nvfp4_error"] < 0.1, figures
    assert figures["kv_sp_vs_one"] < figures["kv_nvfp4_error"] < 0.1, figures


# ---------------------------------------------------------------------------------------------
# the shared training loop, distributed


def loop_run(run_dir, state, steps: int = 4, stop_after: int | None = None):
    """run_training of the tiny DiT on teacher-forcing batches drawn from the step generator."""
    from longlive.config import TrainConfig
    from longlive.train.ema import EMA
    from longlive.train.loop import run_training

    model = parallelize(tiny_model(), state, training=True)
    ema = EMA(model, decay=0.5)

    def loss_fn(step, g):
        if stop_after is not None and step >= stop_after:
            raise KeyboardInterrupt  # killed mid-run: the last checkpoint is what a resume starts from
        return tf_loss(model, seed=int(torch.randint(0, 1000, (1,), generator=g))), {}

    cfg = TrainConfig(steps=steps, batch_size=1, lr=1e-3, log_every=1)
    try:
        hist = run_training("t", model, loss_fn, cfg, run_dir, seed=0, ckpt_every=2, ema=ema, parallel=state)
    except KeyboardInterrupt:
        return None, None
    from longlive.parallel import full_state_dict

    weights = full_state_dict(model)
    ema.copy_to(model)
    return {**weights, **{f"ema.{k}": v for k, v in full_state_dict(model).items()}}, hist


def loop_two_ranks(state, out: str) -> None:
    loop_run(Path(out) / "run", state, stop_after=2)


# ---------------------------------------------------------------------------------------------
# train_ar itself on 2 ranks


def ar_preset():
    p = load_preset("tiny")
    return p.model_copy(update={"ar": p.ar.model_copy(update={
        "train": p.ar.train.model_copy(update={"steps": 3, "batch_size": 2, "log_every": 1}),
        "ema": p.ar.ema.model_copy(update={"decay": 0.5, "start_step": 1}), "ckpt_every": 2,
    })})


def run_train_ar(root: Path, shards: str, out: str, state):
    from longlive.train.ar import train_ar

    preset = ar_preset()
    null = torch.zeros(preset.text.max_tokens, preset.text.dim)
    return train_ar(preset, "i2v", shards_url=shards, base_dir=root / "base", out_dir=root / out / "model",
                    work_dir=root / out / "work", plots_dir=root / out / "plots", null_context=null, parallel=state,
                    validation_report=root / "validate" / "report.json")


def train_ar_two_ranks(state, root: str, shards: str) -> None:
    os.environ["WANDB_MODE"] = "disabled"
    result = run_train_ar(Path(root), shards, "two", state)
    if state.is_main:
        torch.save(result.metrics, Path(root) / "two" / "metrics.pt")


def checkpoints(state, from_one: str, from_two: str, loop: str) -> None:
    """The 2-rank half of test_sharded_checkpoints_load_at_another_world_size."""
    checkpoint_from_one(state, from_one)
    Path(from_two).mkdir(exist_ok=True)
    checkpoint_to_one(state, from_two)
    loop_two_ranks(state, loop)
