"""The real-time path of a built :class:`~longlive.models.dit.WanDiT`, applied from outside the model.

:func:`optimize` sets a model up for streaming inference, in place, without touching its weights' values
or the model file (the swapped modules are the parameter-free children ``Block.modulate``,
``Block.residual`` and ``Attention.core``, made for this):

* **kernels** (``kernels=True``): each block's LayerNorm + adaLN modulation, gated residuals and RoPE run
  as fused Triton kernels (``kernels/adaln.py``, ``kernels/rope.py``; with ``nvfp4_attention=True`` also
  self-attention over an NVFP4 KV cache, ``kernels/nvfp4_attention.py``), when their tensors are on a CUDA
  device; elsewhere -- and everywhere while ``LONGLIVE_KERNELS=0`` -- the same modules run the PyTorch
  reference (``longlive.kernels_dispatch``). A sequence-parallel wrapper around ``attn1.core`` is kept: the
  fused core goes inside it.
* **fp8** (``fp8=True``): the linears ``convert_to_nvfp4`` would quantize become row-wise FP8
  (``longlive.quant.fp8``; Hopper's speed path, as LongLive's torchao float8 recipe).
* **fp8_attention** (``"triton"`` or ``"cudnn"``, with the kernels): unmasked self-attention runs through 8
  bits -- ``triton``: our kernel, INT8 q.k and FP8 E4M3 P.v (``kernels/fp8_attention.py``); ``cudnn``: cuDNN's
  FP8 flash attention with per-tensor E4M3 q, k, v (``kernels/fp8_sdpa.py``). On the CPU each one's reference
  emulates the same numbers, so the tiny preset measures their quality cost.
* **context memo** (always): the text embedder and each cross-attention's K/V projections return their
  previous output while called with the very same context tensor, so a prompt's text embedding and its
  cross-attention K/V are computed once per prompt instead of once per forward.
* **compile** (``compile=True``): ``torch.compile`` of each block's per-token compute (FFN, modulations,
  residuals, q/k norms, cross-attention); the self-attention core with its KV cache stays eager.

The dense KV cache's preallocated in-place storage and the sync-free chunk loop live in
``longlive.models.attention.DenseKVStorage`` and ``longlive.inference.pipeline``.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import Tensor, nn

from longlive.kernels_dispatch import use_kernel
from longlive.models.dit import AttentionCore, GatedResidual, LayerNorm32, Modulate, WanDiT

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- kernel-backed modules


class FusedModulate(Modulate):
    """:class:`Modulate` through ``kernels/adaln.py`` (LayerNorm32 norms; anything else: the reference)."""

    def forward(self, norm: nn.Module, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        affine_ok = (norm.weight is None) == (norm.bias is None) if isinstance(norm, LayerNorm32) else False
        if affine_ok and use_kernel(x):
            from longlive_kernels.adaln import layernorm_modulate

            return layernorm_modulate(x, scale, shift, weight=norm.weight, bias=norm.bias, eps=norm.eps)
        return super().forward(norm, x, scale, shift)


class FusedGatedResidual(GatedResidual):
    """:class:`GatedResidual` through ``kernels/adaln.py``."""

    def forward(self, x: Tensor, h: Tensor, gate: Tensor) -> Tensor:
        if use_kernel(x, h):
            from longlive_kernels.adaln import gated_residual

            return gated_residual(x, h, gate)
        return super().forward(x, h, gate)


class FusedAttentionCore(AttentionCore):
    """:class:`AttentionCore` whose RoPE is the one-pass kernel ``kernels/rope.py``.

    With ``nvfp4_attention`` (off by default), self-attention over an NVFP4 KV cache (a storage with
    ``update_packed``) with no mask is one Triton kernel (``kernels/nvfp4_attention.py``) that reads the cache
    packed and dequantizes, rotates and attends in registers, instead of dequantize + cat + RoPE + SDPA; the
    storage stores the new K/V exactly as :meth:`AttentionCore.forward` would. Off by default because on an
    H100 at Wan2.2-5B's shape it is ~6x slower than the path it replaces (36 vs 6.1 ms per layer call;
    ``benchmarks/results/nvfp4_kv_attention_h100.md``); what it saves is ~0.9 GiB of temporaries per call (41 vs 971 MiB).

    With ``fp8_attention`` (``"off"`` by default; self-attention only), an unmasked call attends through 8 bits
    after the cache update and RoPE: ``"triton"`` (``kernels/fp8_attention.py``: INT8 q.k, FP8 P.v) or
    ``"cudnn"`` (``kernels/fp8_sdpa.py``: cuDNN's FP8 flash attention, per-tensor E4M3); on tensors the kernels
    don't take, each one's reference (``kernels/fp8_attention_ref.py``, ``kernels/fp8_sdpa_ref.py``) computes
    the same numbers in float32. ``True`` / ``False`` mean ``"triton"`` / ``"off"``.
    """

    def __init__(self, nvfp4_attention: bool = False, fp8_attention: bool | str = "off") -> None:
        super().__init__()
        self.nvfp4_attention = nvfp4_attention
        self.fp8_attention = _fp8_attention_mode(fp8_attention)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, rope=None, key_rope=None, mask=None, kv_cache=None,
                layer: int = 0) -> Tensor:
        update_packed = getattr(getattr(kv_cache, "storage", None), "update_packed", None)
        if self.nvfp4_attention and update_packed is not None and mask is None and rope is not None and use_kernel(q, k, v):
            from longlive_kernels.nvfp4_attention import nvfp4_attention

            k_held, v_held = update_packed(layer, k, v, write=kv_cache.write) or (None, None)
            return nvfp4_attention(self.rotate(q, *rope), k_held, v_held, k, v, *(key_rope or rope))
        if self.fp8_attention != "off" and mask is None:
            if kv_cache is not None:
                k, v = kv_cache.update(layer, k, v)
            if rope is not None:
                q, k = self.rotate(q, *rope), self.rotate(k, *(key_rope or rope))
            if self.fp8_attention == "cudnn":
                if q.is_cuda and use_kernel(q, k, v):
                    from longlive_kernels.fp8_sdpa import fp8_sdpa
                else:
                    from longlive_kernels.fp8_sdpa_ref import fp8_sdpa
                return fp8_sdpa(q, k, v)
            if use_kernel(q, k, v):
                from longlive_kernels.fp8_attention import fp8_attention
            else:
                from longlive_kernels.fp8_attention_ref import fp8_attention
            return fp8_attention(q, k, v)
        return super().forward(q, k, v, rope=rope, key_rope=key_rope, mask=mask, kv_cache=kv_cache, layer=layer)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if use_kernel(x, cos):
            from longlive_kernels.rope import apply_rope

            return apply_rope(x, cos, sin)
        return super().rotate(x, cos, sin)


FP8_ATTENTION_MODES = ("off", "triton", "cudnn")


def _fp8_attention_mode(value: bool | str) -> str:
    mode = ("triton" if value else "off") if isinstance(value, bool) else value
    if mode not in FP8_ATTENTION_MODES:
        raise ValueError(f"fp8_attention must be one of {FP8_ATTENTION_MODES} (or a bool), got {value!r}")
    return mode


def _swap_core(attn: nn.Module, make) -> None:
    """Replace the innermost :class:`AttentionCore` of ``attn`` (inside wrappers that keep it as ``inner``)."""
    owner, name = attn, "core"
    while not isinstance(getattr(owner, name), AttentionCore):
        owner, name = getattr(owner, name), "inner"
        if not hasattr(owner, name):
            raise TypeError(f"cannot find the AttentionCore inside {type(getattr(attn, 'core')).__name__}")
    setattr(owner, name, make())


def apply_kernels(dit: WanDiT, *, nvfp4_attention: bool = False, fp8_attention: bool | str = "off") -> None:
    """Kernel-backed ``modulate``, ``residual`` and attention cores in every block (idempotent);
    ``nvfp4_attention`` / ``fp8_attention`` (self-attention): see :class:`FusedAttentionCore`."""
    for block in dit.blocks:
        block.modulate, block.residual = FusedModulate(), FusedGatedResidual()
        _swap_core(block.attn1, lambda: FusedAttentionCore(nvfp4_attention, fp8_attention))
        _swap_core(block.attn2, FusedAttentionCore)


def remove_kernels(dit: WanDiT) -> None:
    for block in dit.blocks:
        block.modulate, block.residual = Modulate(), GatedResidual()
        for attn in (block.attn1, block.attn2):
            _swap_core(attn, AttentionCore)


# ----------------------------------------------------------------------------- per-prompt context work


class _Memo:
    """The last (input, output) of a module's forward; the input is held, so its identity cannot be reused
    by another tensor while memoised."""

    def __init__(self) -> None:
        self.input: Tensor | None = None
        self.key: tuple | None = None
        self.output: Tensor | None = None


def _memo_forward(self: nn.Module, x: Tensor) -> Tensor:
    memo: _Memo = self._context_memo
    key = (x._version, torch.is_grad_enabled())
    if x is not memo.input or key != memo.key:
        memo.input, memo.key, memo.output = x, key, type(self).forward(self, x)
    return memo.output


def _memoise(module: nn.Module) -> None:
    """Make ``module`` return its previous output while called with the very same tensor (same object,
    unmodified). An instance-level ``forward``: the module's type, children and state-dict keys stay."""
    if "_context_memo" not in module.__dict__:
        module._context_memo = _Memo()
        module.forward = types.MethodType(_memo_forward, module)


def _unmemoise(module: nn.Module) -> None:
    if "_context_memo" in module.__dict__:
        del module.__dict__["_context_memo"], module.__dict__["forward"]


def context_modules(dit: WanDiT) -> list[nn.Module]:
    """The modules :func:`apply_context_memo` memoises: the text embedder, then each block's cross-attention K and V."""
    return [dit.text_embedder] + [getattr(b.attn2, n) for b in dit.blocks for n in ("to_k", "to_v")]


def apply_context_memo(dit: WanDiT) -> None:
    """Memoise the text embedder and the cross-attention K/V projections (idempotent): within a prompt the
    pipeline passes the same context tensor to every forward, so they run once per prompt. Apply after any
    conversion of the linears (FP8, NVFP4), which replaces these modules."""
    for m in context_modules(dit):
        _memoise(m)


def remove_context_memo(dit: WanDiT) -> None:
    for m in context_modules(dit):
        _unmemoise(m)


# ----------------------------------------------------------------------------- torch.compile


def compile_blocks(dit: WanDiT, **compile_kwargs) -> None:
    """``torch.compile`` the per-token compute of every block, in place (``nn.Module.compile``: same modules,
    same state-dict keys): the FFN, the adaLN modulations and gated residuals, the q/k RMSNorms, and the
    whole cross-attention. The self-attention core stays eager: its KV-cache bookkeeping is Python state,
    and a graph around it would guard on the layer index (one recompilation per layer) and on the cache
    length. Each module class compiles once and serves every block (its parameters are graph inputs).
    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode``, ``backend``)."""
    compile_kwargs.setdefault("dynamic", False)
    for block in dit.blocks:
        for m in (block.ffn, block.modulate, block.residual, block.attn1.norm_q, block.attn1.norm_k, block.attn2):
            if getattr(m, "_compiled_call_impl", None) is None:
                m.compile(**compile_kwargs)


# ----------------------------------------------------------------------------- all together


def optimize(dit: WanDiT, *, kernels: bool = True, compile: bool = False, fp8: bool = False,
             keep_high_precision: list[str] | None = None, nvfp4_attention: bool = False,
             fp8_attention: bool | str = "off") -> dict:
    """Set ``dit`` up for streaming inference in place (see the module docstring); returns what was applied.
    The attention options are kernel-backed modules: with ``kernels=False`` they are off (and logged so)."""
    fp8_attention = _fp8_attention_mode(fp8_attention)
    applied = {"kernels": kernels, "compile": compile, "fp8": False, "nvfp4_attention": kernels and nvfp4_attention,
               "fp8_attention": fp8_attention if kernels else "off"}
    if fp8_attention != "off" and not kernels:
        log.warning("fp8_attention needs the kernel-backed attention core (kernels=True): left off")
    if kernels and fp8_attention == "cudnn":
        device = next(dit.parameters()).device
        if device.type == "cuda" and use_kernel(torch.empty(0, device=device)):
            from longlive_kernels.fp8_sdpa import unavailable_reason

            reason = unavailable_reason(device)
            if reason is not None:
                raise RuntimeError(f"inference.fp8_attention: cudnn cannot run here: {reason}. "
                                   "Use fp8_attention: triton or off")
    if fp8:
        from longlive.quant.fp8 import convert_to_fp8

        applied["fp8"] = len(convert_to_fp8(dit, keep_high_precision))
    if kernels:
        apply_kernels(dit, nvfp4_attention=nvfp4_attention, fp8_attention=fp8_attention)
    apply_context_memo(dit)
    if compile:
        compile_blocks(dit)
    log.info("inference path: %s", applied)
    return applied
