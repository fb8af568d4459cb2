"""The real-time inference path (``longlive.inference.optimize``, ``DenseKVStorage``, the sync-free chunk loop,
FP8 linears, writing the cache from the last step) against the plain path, on the tiny preset.

Speed is measured by ``benchmarks/fps.py`` on a GPU, never here. On the CPU the kernel-backed modules
run their references, so the fast path must give *identical* latents; inside ``interpret_on_cpu`` they
run the Triton kernels in the interpreter and must stay within float32 rounding of the reference.
"""

import copy
import os

import pytest
import torch

from longlive.config import load_preset
from longlive.inference import optimize
from longlive.inference.build import build_dit
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import PromptSchedule, stream_block_sizes
from longlive.kernels_dispatch import ENV, interpret_on_cpu, kernels_enabled, use_kernel
from longlive.models.attention import DenseKVStorage, KVCache
from longlive.models.dit import WanDiT
from longlive.quant.fp8 import FP8Linear, convert_to_fp8


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


def make_dit(preset) -> WanDiT:
    torch.manual_seed(0)
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    with torch.no_grad():  # a non-zero head, so the latents depend on everything upstream
        torch.nn.init.normal_(dit.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    return dit.eval()


def stream(dit, preset, *, latent_frames=12, prompts=("a red circle moves left",), storage="pipeline", **cfg):
    """Latents of a streamed video (sink 1 + window 3 + blocks of 2: eviction from the third block on)."""
    icfg = preset.inference.model_copy(update=cfg)
    pipe = StreamingPipeline(build_dit(dit, preset, inference=icfg), icfg)  # the build sets up the inference path
    if storage == "list":  # the reference: KVCache's own per-layer tensors, concatenated per step
        pipe.cache.storage = None
    entries = [{"frame": 4 * i * 3, "prompt": p} for i, p in enumerate(prompts)]
    plans = PromptSchedule.from_list(entries).plan(stream_block_sizes(latent_frames, icfg.block_frames), 8, 4)
    contexts = [torch.randn(1, preset.text.max_tokens, preset.text.dim, generator=torch.Generator().manual_seed(i))
                for i in range(len(prompts))]
    C, _, h, w = preset.latent_shape
    blocks = list(pipe.stream(plans, contexts, (C, h, w), generator=torch.Generator().manual_seed(3)))
    return torch.cat([b.latents for b in blocks], dim=2), pipe, blocks


# ----------------------------------------------------------------------------- the dense in-place KV cache


def test_dense_storage_equals_the_concatenating_cache(preset):
    """Same latents bit for bit, with a prompt switch (re-cache) and eviction; buffers allocated once."""
    dit = make_dit(preset)
    prompts = ("a red circle moves left", "a blue square moves up")
    ref, _, _ = stream(dit, preset, prompts=prompts, storage="list", kernels=False)
    got, pipe, blocks = stream(dit, preset, prompts=prompts, kernels=False)
    assert isinstance(pipe.cache.storage, DenseKVStorage)
    assert torch.equal(got, ref)
    # first write + the one reservation of sink + window + block frames, per layer; nothing after that
    assert pipe.cache.storage.reallocations == 2 * len(dit.blocks)
    assert all(b.timings["cache_bytes"] == blocks[-1].timings["cache_bytes"] for b in blocks[2:])  # full from block 2


def test_dense_storage_keeps_frames_in_place():
    """Eviction with a sink moves the window down without overlapping copies; values follow their frames."""
    storage = DenseKVStorage(1, max_frames=8)
    cache = KVCache(1, storage)
    tokens = 3
    for first in range(0, 12, 2):  # write frames two at a time, keep the sink (frame 0) + the 3 latest
        kv = torch.arange(first, first + 2).float().repeat_interleave(tokens).view(1, 2 * tokens, 1, 1)
        with cache.writing():
            cache.update(0, kv, kv.clone())
            cache.advance(torch.arange(cache.num_frames, cache.num_frames + 2))
        held = [int(v) for v in cache.held(0)[0][0, ::tokens, 0, 0]]
        keep = [0] + list(range(max(1, len(held) - 3), len(held)))
        cache.keep(keep)
        assert [int(v) for v in cache.held(0)[0][0, ::tokens, 0, 0]] == [held[i] for i in keep]
        assert torch.equal(cache.held(0)[0], cache.held(0)[1])
    assert [int(v) for v in cache.held(0)[0][0, ::tokens, 0, 0]] == [0, 9, 10, 11]
    with pytest.raises(ValueError, match="reset it first"):
        cache.update(0, torch.zeros(1, 2, 2, 1), torch.zeros(1, 2, 2, 1))


def test_dense_storage_reads_are_views_of_one_buffer():
    storage = DenseKVStorage(1, max_frames=4)
    k = torch.randn(2, 6, 3, 4)
    storage.update(0, k, k, write=True)
    storage.frames_written(2)
    new = torch.randn(2, 3, 3, 4)
    got_k, _ = storage.update(0, new, new, write=False)
    assert got_k.data_ptr() == storage.k[0].data_ptr() and torch.equal(got_k, torch.cat((k, new), 1))
    assert storage.length[0] == 6  # a read does not advance


# ----------------------------------------------------------------------------- kernels, switch, memo, compile


def test_fast_path_on_cpu_equals_the_plain_path(preset):
    plain, _, _ = stream(make_dit(preset), preset, kernels=False)
    dit = make_dit(preset)
    got, _, _ = stream(dit, preset, kernels=True)
    assert isinstance(dit.blocks[0].modulate, optimize.FusedModulate)
    assert torch.equal(got, plain)  # on the CPU the fused modules run their references


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="runs the kernels on CPU tensors in Triton's interpreter")
def test_fused_kernels_in_the_model_match_the_reference(preset):
    dit = make_dit(preset)
    C, _, h, w = preset.latent_shape
    x = torch.randn(1, C, 2, h, w, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([[700.0, 300.0]])
    ctx = torch.randn(1, preset.text.max_tokens, preset.text.dim, generator=torch.Generator().manual_seed(6))
    cache = KVCache(len(dit.blocks), DenseKVStorage(len(dit.blocks), 4))
    with torch.no_grad():
        with cache.writing():
            dit(x, torch.zeros(1, 2), ctx, kv_cache=cache, frame_positions=torch.tensor([0, 1]))
        ref = dit(x, t, ctx, kv_cache=cache, frame_positions=torch.tensor([2, 3]))
        optimize.apply_kernels(dit)
        with interpret_on_cpu():
            got = dit(x, t, ctx, kv_cache=cache, frame_positions=torch.tensor([2, 3]))
        optimize.remove_kernels(dit)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_one_switch_turns_every_kernel_off(monkeypatch):
    from longlive.quant.linear import resolve_backend, triton_available

    x = torch.zeros(2)
    with interpret_on_cpu():
        assert use_kernel(x) == (os.environ.get("TRITON_INTERPRET") == "1")
        monkeypatch.setenv(ENV, "0")
        assert not kernels_enabled() and not use_kernel(x)
    assert not triton_available("cpu") and resolve_backend("auto", "cpu") == "emulated"
    with pytest.raises(RuntimeError, match="LONGLIVE_KERNELS"):
        resolve_backend("triton", "cpu")


def test_context_memo_runs_the_text_projections_once_per_prompt(preset):
    dit = make_dit(preset)
    optimize.apply_context_memo(dit)
    calls = []
    dit.blocks[0].attn2.to_k.register_forward_hook(lambda m, i, o: calls.append(o))
    C, _, h, w = preset.latent_shape
    x = torch.randn(1, C, 2, h, w)
    a, b = (torch.randn(1, preset.text.max_tokens, preset.text.dim) for _ in range(2))
    with torch.no_grad():
        out_a = dit(x, torch.tensor([500.0]), a)
        dit(x, torch.tensor([250.0]), a)
        out_b = dit(x, torch.tensor([500.0]), b)
        optimize.remove_context_memo(dit)
        assert torch.equal(out_a, dit(x, torch.tensor([500.0]), a)) and torch.equal(out_b, dit(x, torch.tensor([500.0]), b))
    assert calls[0] is calls[1] and calls[2] is not calls[0]  # the same prompt: the memoised output
    assert set(dit.state_dict()) == set(make_dit(preset).state_dict())


def test_compile_keeps_results_and_does_not_recompile_per_layer(preset):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref, _, _ = stream(make_dit(preset), preset, kernels=False)
    dit = make_dit(preset)
    optimize.compile_blocks(dit, backend="eager")  # dynamo's capture only: no compiler needed on the CPU
    got, _, _ = stream(dit, preset, kernels=False)
    assert torch.equal(got, ref)
    assert "Dynamo recompile limit exceeded" not in str(dict(counters["unimplemented"]))
    assert counters["stats"]["unique_graphs"] <= 8  # one per module class and input layout, whatever the depth


# ----------------------------------------------------------------------------- FP8


def test_fp8_linear_emulation_is_close_to_bf16():
    lin = torch.nn.Linear(96, 48)
    layer = FP8Linear.from_linear(lin)
    x = torch.randn(37, 96)
    with torch.no_grad():
        y, ref = layer(x), lin(x)
    assert y.dtype == x.dtype
    assert float((y - ref).norm() / ref.norm()) < 0.05  # E4M3 row-wise: ~2-3% on Gaussian data
    with interpret_on_cpu():  # the Triton activation quantizer gives the same codes
        if os.environ.get("TRITON_INTERPRET") == "1":
            assert torch.equal(layer(x), y)
    with pytest.raises(ValueError, match="divisible by 16"):
        FP8Linear(24, 16)


def test_convert_to_fp8_keeps_the_embedders(preset):
    dit = make_dit(preset)
    ref = copy.deepcopy(dit)
    names = convert_to_fp8(dit)
    assert names and all(isinstance(dit.get_submodule(n), FP8Linear) for n in names)
    assert not any(n.startswith(("time_embedder", "text_embedder", "time_proj", "proj_out")) for n in names)
    C, _, h, w = preset.latent_shape
    x, ctx = torch.randn(1, C, 2, h, w), torch.randn(1, preset.text.max_tokens, preset.text.dim)
    with torch.no_grad():
        y, y_ref = dit(x, torch.tensor([500.0]), ctx), ref(x, torch.tensor([500.0]), ctx)
    assert float((y - y_ref).norm() / y_ref.norm()) < 0.1


# ----------------------------------------------------------------------------- the cache from the last step


def test_cache_from_last_step_saves_one_forward_per_block(preset):
    dit = make_dit(preset)
    calls = []
    dit.register_forward_pre_hook(lambda m, a: calls.append(1))
    base, _, _ = stream(dit, preset, latent_frames=8)
    n_base = len(calls)
    calls.clear()
    got, pipe, blocks = stream(dit, preset, latent_frames=8, cache_from_last_step=True)
    blocks_n, steps = len(blocks), len(preset.inference.denoising_steps)
    assert n_base == blocks_n * (steps + 1) and len(calls) == blocks_n * steps
    assert pipe.cache.held_frames() == [0, 5, 6, 7] and torch.isfinite(got).all()
    # the first block sees no cache either way; later blocks see the K/V of a noisy input instead
    assert torch.equal(got[:, :, :2], base[:, :, :2]) and not torch.equal(got, base)


# ----------------------------------------------------------------------------- the VAE decoder's fused norm


def test_vae_kernels_keep_the_decode(preset):
    from longlive.inference.optimize_vae import FusedWanRMSNorm, apply_vae_kernels, remove_vae_kernels
    from longlive.models.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(preset.vae).eval()
    keys = set(vae.state_dict())
    C, _, h, w = preset.latent_shape
    z = torch.randn(1, C, 2, h, w, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = vae.decode(z)
        assert apply_vae_kernels(vae) > 0 and set(vae.state_dict()) == keys
        assert any(isinstance(m, FusedWanRMSNorm) for m in vae.model.decoder.modules())
        assert torch.equal(vae.decode(z), ref)  # off CUDA: exactly diffusers' norm, then F.silu
        if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
            with interpret_on_cpu():
                got = vae.decode(z)
            assert float((got - ref).abs().max()) < 1e-4
        remove_vae_kernels(vae)
        assert torch.equal(vae.decode(z), ref)
        assert not any(isinstance(m, FusedWanRMSNorm) for m in vae.model.modules())
