"""The Wan2.2 DiT: diffusers ``WanTransformer3DModel`` numerics (TI2V-5B variant), per-frame timesteps,
block-causal attention and a KV cache (keys stored before RoPE) for streaming.

A plain model, readable top to bottom: parallelism, quantization, LoRA and training loops wrap it
from elsewhere. Parameter names follow diffusers except where diffusers nests for its own reasons
(``condition_embedder.``, ``to_out.0``, ``ffn.net.0.proj``); ``wan_adapter`` maps between them.

Shapes: B batch, F latent frames, f = F / patch_t frames after patching, S = f * h * w tokens,
D = dim. Timesteps (in [0, 1000]) are one per sample or one per post-patch frame; modulation is
computed per frame and broadcast over that frame's tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longlive.config import DiTConfig
from longlive.models.attention import FrameMask, KVCache, attention, block_causal
from longlive.models.rope import apply_rope, rope_freqs


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(N,) -> (N, dim) as diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (diffusers ``FP32LayerNorm``); returns float32."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in its weight's dtype, returned in the input's. Under bf16 autocast an fp32 model's
    q and k arrive in bf16, and torch's fused RMSNorm needs input and weight of one dtype: otherwise it warns and
    takes a slower composite path. Same module, parameters and state-dict keys otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.weight.dtype if self.weight is not None else x.dtype
        return F.rms_norm(x.to(dtype), self.normalized_shape, self.weight, self.eps).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int, act: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, hidden)
        self.act = act
        self.linear_2 = nn.Linear(hidden, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Attention(nn.Module):
    """Multi-head attention with RMSNorm on q and k across all heads (Wan's ``rms_norm_across_heads``)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=eps)
        self.norm_k = RMSNorm(dim, eps=eps)
        # The attention proper is a parameter-free child module (no state-dict keys), so a wrapper can
        # replace it per layer from outside: sequence parallel (``longlive.parallel``) swaps in one that
        # moves tokens and heads between ranks around it; the model itself stays parallelism-free.
        self.core = AttentionCore()

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        key_rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | FrameMask | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """Self-attention when ``context`` is None, else cross-attention to it.

        ``rope`` rotates the queries; ``key_rope`` (default ``rope``) the keys, which with a cache are
        the cached keys (stored un-rotated) followed by the new ones.
        """
        kv_in = x if context is None else context
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.to_k(kv_in)).unflatten(-1, (self.num_heads, -1))
        v = self.to_v(kv_in).unflatten(-1, (self.num_heads, -1))
        out = self.core(q, k, v, rope=rope, key_rope=key_rope, mask=mask, kv_cache=kv_cache, layer=layer)
        return self.to_out(out.flatten(2))


class AttentionCore(nn.Module):
    """KV cache, RoPE and SDPA on (B, S, heads, head_dim) q, k, v (after the projections and q/k norms).

    Per head and token-order agnostic: a wrapper may hand it a subset of the heads over the whole
    sequence (Ulysses) and get the same per-head result.
    """

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        key_rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | FrameMask | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if rope is not None:
            q, k = self.rotate(q, *rope), self.rotate(k, *(key_rope or rope))
        return attention(q, k, v, mask)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE of q or k (a fused kernel overrides this, ``longlive.inference.optimize``)."""
        return apply_rope(x, cos, sin)


def _frames(x: Tensor, f: int) -> Tensor:
    """(B, S, D) -> (B, f, S / f, D), so per-frame (B, f, 1, D) modulation broadcasts over tokens."""
    return x.unflatten(1, (f, -1))


class Modulate(nn.Module):
    """``norm(x) * (1 + scale) + shift`` per frame (adaLN), or ``norm(x)`` alone, in ``x``'s dtype.

    Parameter-free (the norm is an argument), like :class:`AttentionCore`, so a fused kernel can replace
    it per block from outside (``longlive.inference.optimize``) without touching weights or state-dict keys.
    ``scale`` / ``shift``: (B, f, 1, D), one row per frame of ``x`` (B, S, D).
    """

    def forward(self, norm: nn.Module, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        if scale is None:
            return norm(x).type_as(x)
        return (_frames(norm(x), scale.shape[1]) * (1 + scale) + shift).flatten(1, 2).type_as(x)


class GatedResidual(nn.Module):
    """``x + h * gate`` per frame in float32, in ``x``'s dtype. Parameter-free, replaceable (see :class:`Modulate`)."""

    def forward(self, x: Tensor, h: Tensor, gate: Tensor) -> Tensor:
        f = gate.shape[1]
        return (_frames(x.float(), f) + _frames(h.float(), f) * gate).flatten(1, 2).type_as(x)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm32(d, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm32(d, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.attn2 = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm32(d, cfg.eps, elementwise_affine=False)
        self.ffn = MLP(d, cfg.ffn_dim, d, nn.GELU(approximate="tanh"))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.modulate, self.residual = Modulate(), GatedResidual()  # parameter-free: kernels swap them

    def forward(
        self, x, context, e, rope, *, key_rope=None, mask=None, context_mask=None, kv_cache=None, layer=0
    ) -> Tensor:
        """``e``: (B, f or 1, 6, D) timestep projection of each frame (or of the whole sample)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table + e.float()).unsqueeze(3).unbind(2)

        h = self.modulate(self.norm1, x, scale1, shift1)
        h = self.attn1(h, rope=rope, key_rope=key_rope, mask=mask, kv_cache=kv_cache, layer=layer)
        x = self.residual(x, h, gate1)

        x = x + self.attn2(self.modulate(self.norm2, x), context, mask=context_mask)

        h = self.ffn(self.modulate(self.norm3, x, scale2, shift2))
        return self.residual(x, h, gate2)


class WanDiT(nn.Module):
    # kept in float32 when loading in a lower precision, as diffusers does
    keep_in_fp32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

    def __init__(self, cfg: DiTConfig, in_channels: int, text_dim: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.cfg, self.in_channels, self.text_dim = cfg, in_channels, text_dim
        self.out_channels = out_channels or in_channels
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_embedder = MLP(cfg.freq_dim, d, d, nn.SiLU())
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_embedder = MLP(text_dim, d, d, nn.GELU(approximate="tanh"))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm_out = LayerNorm32(d, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(d, self.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        *,
        block_frames: int | None = None,
        kv_cache: KVCache | None = None,
        frame_offset: int = 0,
        context_mask: Tensor | None = None,
        attn_mask: FrameMask | Tensor | None = None,
        frame_positions: Tensor | None = None,
        context_index: Tensor | None = None,
    ) -> Tensor:
        """Predict (B, out_channels, F, H, W) from latents ``x`` (B, C, F, H, W).

        timestep: (B,) or (B, f) per post-patch frame. context: (B, L, text_dim), zero-padded as Wan
        does; ``context_mask`` (B, L) bool, True for real tokens, optionally hides the padding.
        Multi-prompt: context (B, N, L, text_dim) with ``context_index`` (B, f) giving each frame's
        prompt in 0..N-1; a frame's tokens cross-attend to its own prompt only (context_mask (B, N, L)).
        block_frames: None for bidirectional attention, k for block-causal blocks of k frames.
        kv_cache: read always, written while ``kv_cache.write`` (see :class:`KVCache`); its keys are
            rotated by ``kv_cache.positions``, the new frames' by their own positions.
        frame_offset: absolute (post-patch) frame index of x's first frame, for RoPE.
        frame_positions: explicit RoPE position of each post-patch frame, (f,) or (B, f); overrides
            ``frame_offset`` (teacher forcing gives a noisy frame the position of its clean copy).
        attn_mask: the self-attention mask, a :class:`FrameMask` (block-sparse where the device allows) or a
            boolean tensor broadcasting to (B, heads, S_q, S_k); overrides ``block_frames``.
        """
        B, _, nf, nh, nw = x.shape
        pt, ph, pw = self.cfg.patch_size
        f, h, w = nf // pt, nh // ph, nw // pw
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2).contiguous()

        if frame_positions is None:
            frame_positions = frame_offset + torch.arange(f)
        elif frame_positions.shape[-1] != f or frame_positions.ndim not in (1, 2):
            raise ValueError(f"frame_positions must be ({f},) or (B, {f}), got {tuple(frame_positions.shape)}")
        rope, key_rope = self.rope_tables(frame_positions, kv_cache, h, w, x.device)
        context, context_mask = self.prompt_context(context, context_mask, context_index, f, h * w)
        temb, e = self.embed_timestep(timestep, f, dtype=context.dtype)
        cached = kv_cache.num_frames if kv_cache is not None else 0
        if attn_mask is None and block_frames is not None:
            attn_mask = block_causal(f, h * w, block_frames, cached_frames=cached)

        if (getattr(self, "compiled_blocks", False) and isinstance(attn_mask, FrameMask)
                and attn_mask.use_flex(x.device)):
            # compiled blocks (longlive.parallel.training) take the BlockMask itself instead of tracing FrameMask's
            # cache; everything else (sequence parallel cuts the FrameMask to its rows) keeps the FrameMask
            attn_mask = attn_mask.block_mask(x.device)
        for i, block in enumerate(self.blocks):
            # ``layer`` only with a cache: compiled blocks would specialise (and recompile) on each block's index
            cache_args = {"kv_cache": kv_cache, "layer": i} if kv_cache is not None else {}
            x = block(x, context, e, rope, key_rope=key_rope, mask=attn_mask, context_mask=context_mask, **cache_args)
        if kv_cache is not None:
            kv_cache.advance(frame_positions)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(2)).unsqueeze(3).unbind(2)
        x = (_frames(self.norm_out(x), temb.shape[1]) * (1 + scale) + shift).flatten(1, 2).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(B, f, h, w, pt, ph, pw, self.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, self.out_channels, f * pt, h * ph, w * pw)

    def rope_tables(self, frame_positions: Tensor, kv_cache: KVCache | None, h: int, w: int, device: torch.device
                    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """RoPE tables of the queries (``frame_positions``) and, with a non-empty cache, of the keys (the held
        frames' positions followed by the new ones); memoised per positions (:func:`rope_freqs`)."""
        rope = rope_freqs(self.cfg.head_dim, frame_positions, h, w, device=device)
        if kv_cache is None or not kv_cache.num_frames:
            return rope, None
        if frame_positions.ndim != 1:
            raise ValueError("with a kv_cache, frame_positions must be (f,): the cache holds one position per frame")
        key_positions = torch.cat((kv_cache.positions, frame_positions.cpu().long()))
        return rope, rope_freqs(self.cfg.head_dim, key_positions, h, w, device=device)

    def prompt_context(
        self, context: Tensor, context_mask: Tensor | None, context_index: Tensor | None, frames: int, frame_tokens: int
    ) -> tuple[Tensor, Tensor | None]:
        """Embedded text (B, L', D) and the cross-attention mask (broadcasting to (B, heads, S, L')).

        One prompt: (B, L, text_dim) and an optional (B, L) padding mask. Several: (B, N, L, text_dim)
        are flattened to N * L keys and each frame's queries are masked to the L keys of prompt
        ``context_index[b, frame]``, which is exactly one-prompt attention to that prompt.
        """
        if context.ndim == 4:
            Bc, N, L, _ = context.shape
            if context_index is None:
                if N != 1:
                    raise ValueError(f"context has {N} prompts: pass context_index (B, {frames})")
                context_index = torch.zeros(Bc, frames, dtype=torch.long, device=context.device)
            if context_index.shape[-1] != frames:
                raise ValueError(f"context_index must be (B, {frames}), got {tuple(context_index.shape)}")
            context_index = context_index.to(context.device).long().expand(Bc, frames)
            if bool((context_index < 0).any() or (context_index >= N).any()):
                raise ValueError(f"context_index values must lie in 0..{N - 1}")
            prompt_of_key = torch.arange(N, device=context.device).repeat_interleave(L)  # (N * L,)
            allowed = context_index[:, :, None] == prompt_of_key  # (B, f, N * L)
            if context_mask is not None:
                allowed = allowed & context_mask.bool().reshape(Bc, 1, N * L)
            context_mask = allowed.repeat_interleave(frame_tokens, dim=1)[:, None]  # (B, 1, S, N * L)
            context = context.flatten(1, 2)
        elif context_index is not None:
            raise ValueError("context_index needs a (B, N, L, text_dim) context")
        elif context_mask is not None:
            context_mask = context_mask.bool()[:, None, None, :]
        return self.text_embedder(context.to(self.text_embedder.linear_1.weight.dtype)), context_mask

    def embed_timestep(self, timestep: Tensor, frames: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """timestep (B,) or (B, frames) -> temb (B, T, D) and block modulation (B, T, 6, D), T = 1 or frames."""
        t = timestep.reshape(-1, 1) if timestep.ndim == 1 else timestep
        if t.ndim != 2 or t.shape[1] not in (1, frames):
            raise ValueError(
                f"timestep must be (B,) or (B, {frames}) (one per post-patch frame), got {tuple(timestep.shape)}"
            )
        t_freq = sinusoidal_embedding(t.flatten(), self.cfg.freq_dim).unflatten(0, t.shape)
        temb = self.time_embedder(t_freq.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Wan's from-scratch init: xavier linears, zero biases, N(0, 0.02) embedders, zero output head.

        Construction alone gives PyTorch/diffusers default init; call this to train from scratch.
        """
        cuda = sorted({p.device.index for p in self.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
            nn.init.zeros_(self.patch_embedding.bias)
            for m in (self.text_embedder, self.time_embedder):
                nn.init.normal_(m.linear_1.weight, std=0.02)
                nn.init.normal_(m.linear_2.weight, std=0.02)
            for p in [self.scale_shift_table] + [b.scale_shift_table for b in self.blocks]:
                p.copy_(torch.randn(p.shape) / self.cfg.dim**0.5)
            nn.init.zeros_(self.proj_out.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one post-patch frame for latents of ``height`` x ``width``."""
        return (height // self.cfg.patch_size[1]) * (width // self.cfg.patch_size[2])
