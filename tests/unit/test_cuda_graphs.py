"""CUDA graphs of the chunk loop (longlive.inference.cuda_graphs): a stream with graphs gives the eager stream's
latents, over everything that changes a forward's signature (cache filling up, eviction, prompt switches with a
re-cache, a new shot, I2V, CFG, the last step writing the cache).

On the CPU a stand-in graph re-runs the captured function at each replay, which checks the bookkeeping (signatures,
static inputs, the cache's host state, fallbacks); on a GPU the real graphs run (bitwise against eager)."""

import logging

import pytest
import torch

from longlive.config import load_preset
from longlive.inference.cuda_graphs import GraphedForward
from longlive.inference.optimize import apply_context_memo, apply_kernels
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import PromptSchedule, stream_block_sizes
from longlive.models.dit import WanDiT

PROMPTS = [[0, "a red circle moves left"], [1.5, "a blue square stays still"], {"start": 3.0, "prompt": "a green "
           "triangle grows", "shot": True}]


class RerunGraph:
    """A graph whose replay re-runs the captured function (with the cache in the captured call's state)."""

    captures = 0

    def capture(self, fn, pool):
        RerunGraph.captures += 1
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self):
        self.out.copy_(self.fn())

    def pool(self):
        return None


class FailingGraph(RerunGraph):
    def capture(self, fn, pool):
        fn()  # the forward's host side effects happen, as in a capture that fails at its end
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


def tiny_dit(preset, device="cpu", dtype=torch.float32) -> WanDiT:
    torch.manual_seed(0)
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    with torch.no_grad():  # a non-zero head, so the latents depend on everything upstream
        torch.nn.init.normal_(dit.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.05)
    dit = dit.to(device, dtype).eval()
    apply_context_memo(dit)
    return dit


def stream(preset, dit, device="cpu", *, graph_factory=None, blocks=9, image=False, **update):
    cfg = preset.inference.model_copy(update={"cuda_graphs": graph_factory is not None or device != "cpu", **update})
    pipe = StreamingPipeline(dit, cfg, device)
    if graph_factory is not None:
        pipe.graphs = GraphedForward(dit, graph_factory=graph_factory)
    C, _, h, w = preset.latent_shape
    g = torch.Generator().manual_seed(5)
    schedule = PromptSchedule.from_list(PROMPTS)
    plans = schedule.plan(stream_block_sizes(blocks * cfg.block_frames, cfg.block_frames), 8, 4)
    contexts = [torch.randn(1, 6, preset.text.dim, generator=g).to(device, dit.text_embedder.linear_1.weight.dtype)
                for _ in schedule.prompts]
    null = torch.zeros_like(contexts[0])
    image_latent = torch.randn(1, C, 1, h, w, generator=g) if image else None
    out = [b.latents.cpu() for b in pipe.stream(plans, contexts, (C, h, w), null_context=null, image_latent=image_latent,
                                                generator=torch.Generator().manual_seed(0))]
    return torch.cat(out, dim=2), pipe


@pytest.mark.parametrize("update", [
    {},
    {"cache_from_last_step": True},
    {"guidance_scale": 3.0},
    {"recache_on_switch": False, "denoising_steps": [1000, 500]},
], ids=["default", "last-step-writes", "cfg", "no-recache-2step"])
def test_graphed_stream_equals_eager(preset, update):
    dit = tiny_dit(preset)
    eager, _ = stream(preset, dit, **update)
    graphed, pipe = stream(preset, dit, graph_factory=RerunGraph, **update)
    assert torch.equal(graphed, eager)
    counts = pipe.graphs.counts
    assert counts["captured"] >= 2 and counts["replayed"] > counts["captured"], counts
    # the steady block's steps and its cache pass (or last step) are each one signature, replayed block after block
    assert counts["replayed"] > counts["eager"], counts


def test_graphed_i2v_equals_eager(preset):
    dit = tiny_dit(preset)
    eager, _ = stream(preset, dit, image=True)
    graphed, pipe = stream(preset, dit, graph_factory=RerunGraph, image=True)
    assert torch.equal(graphed, eager) and pipe.graphs.counts["replayed"] > 0


def test_capture_failure_runs_eagerly(preset, caplog):
    dit = tiny_dit(preset)
    eager, _ = stream(preset, dit, blocks=6)
    with caplog.at_level(logging.WARNING, logger="longlive.inference.cuda_graphs"):
        graphed, pipe = stream(preset, dit, graph_factory=FailingGraph, blocks=6)
    assert torch.equal(graphed, eager)
    assert pipe.graphs.counts["replayed"] == 0 and pipe.graphs.counts["captured"] == 0
    assert sum("could not be captured" in r.message for r in caplog.records) == 1  # once, not per call


def test_no_graphs_without_context_memo_or_in_place_cache(preset, caplog):
    dit = tiny_dit(preset)
    from longlive.inference.optimize import remove_context_memo

    remove_context_memo(dit)
    with caplog.at_level(logging.WARNING, logger="longlive.inference.cuda_graphs"):
        _, pipe = stream(preset, dit, graph_factory=RerunGraph, blocks=5)
    assert pipe.graphs.counts["captured"] == 0 and pipe.graphs.counts["eager"] > 0
    assert any("no context memo" in r.message for r in caplog.records)

    dit = tiny_dit(preset)
    cfg = preset.inference.model_copy(update={"cuda_graphs": True})
    pipe = StreamingPipeline(dit, cfg, "cpu")
    pipe.cache.storage = None  # the list-of-tensors cache (the bench's plain path)
    graphs = pipe.graphs = GraphedForward(dit, graph_factory=RerunGraph)
    C, _, h, w = preset.latent_shape
    plans = PromptSchedule.single("x").plan(stream_block_sizes(5 * cfg.block_frames, cfg.block_frames), 8, 4)
    list(pipe.stream(plans, [torch.randn(1, 6, preset.text.dim)], (C, h, w)))
    assert graphs.counts["captured"] == 0


def test_graphs_only_on_cuda(preset):
    dit = tiny_dit(preset)
    assert StreamingPipeline(dit, preset.inference, "cpu").graphs is None
    off = preset.inference.model_copy(update={"cuda_graphs": False})
    assert StreamingPipeline(dit, off, "cpu").graphs is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("kernels", [False, True], ids=["pytorch", "kernels"])
@pytest.mark.parametrize("update", [{}, {"cache_from_last_step": True, "denoising_steps": [1000, 500]},
                                    {"guidance_scale": 3.0}], ids=["default", "2-step-last-writes", "cfg"])
def test_cuda_graphs_equal_eager_on_gpu(preset, kernels, update):
    dit = tiny_dit(preset, "cuda", torch.bfloat16)
    if kernels:
        apply_kernels(dit)
    eager, _ = stream(preset, dit, "cuda", **{**update, "cuda_graphs": False})
    graphed, pipe = stream(preset, dit, "cuda", **update)
    counts = pipe.graphs.counts
    assert counts["captured"] >= 2 and counts["replayed"] > counts["eager"], counts
    assert torch.equal(graphed, eager), (graphed - eager).abs().max()
