"""cuDNN's FP8 flash attention on Hopper and later, through NVIDIA's cudnn-frontend (reference:
``kernels/fp8_sdpa_ref.py``).

Why a library and not ours: at Wan2.2-5B's streaming shape self-attention is half of a block's GPU time, and
PyTorch's SDPA has no FP8 path. Our Triton 8-bit kernel (``kernels/fp8_attention.py``) reaches bf16 cuDNN's
speed but not beyond it (the softmax's per-logit ALU work is not overlapped with the tensor cores without warp
specialisation). cuDNN's ``sdpa_fp8`` is NVIDIA's warp-specialised FP8 forward, the one TransformerEngine
calls; the frontend's Python graph API (``pip install nvidia-cudnn-frontend``, the ``hopper`` extra) reaches
it without a CUDA build, on the cuDNN that PyTorch already loads.

One call: q, k, v (B, S, H, D) in bf16/fp16 -> each quantized per tensor to E4M3 by the Triton kernel
``kernels/fp8_quant.quantize_tensor`` (its scale stays on the device) -> one cuDNN graph execution, built once
per shape and cached, writing the output in q's dtype (B, Sq, H, D). Where this cuDNN cannot write a 16-bit
output from FP8 inputs, the output is E4M3 with the scale ``1 / descale_v`` (an attention output is a convex
combination of v's rows, so it never exceeds max |v|) and is dequantized here. No host syncs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from longlive_kernels.fp8_quant import quantize_tensor
from longlive_kernels.fp8_sdpa_ref import SCALE_S

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'nvidia-cudnn-frontend==1.16.0' (the project's `hopper` extra)"


@functools.cache
def _cudnn():
    try:
        import cudnn
    except ImportError as e:
        raise RuntimeError(f"cuDNN FP8 attention needs NVIDIA's cudnn-frontend Python package: {INSTALL_HINT}") from e
    return cudnn


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when :func:`fp8_sdpa` can run on ``device``, else why not (for a clear error at set-up time)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return f"{torch.cuda.get_device_name(device)} is not Hopper or newer (FP8 attention needs compute capability 9.0)"
    try:
        _cudnn()
    except RuntimeError as e:
        return str(e)
    return None


@functools.cache
def _handle(device_index: int):
    with torch.cuda.device(device_index):
        return _cudnn().create_handle()


@functools.cache
def _scalar(value: float, device_index: int) -> torch.Tensor:
    return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=f"cuda:{device_index}")


@dataclass
class _Graph:
    graph: object
    tensors: dict  # name -> cudnn tensor
    workspace: torch.Tensor
    out_fp8: bool
    amax: torch.Tensor  # scratch for the amax outputs cuDNN writes


# tried in order: a 16-bit output, then an E4M3 one; each with and without the S-amax output declared (cuDNN
# releases differ in which of these an FP8 engine accepts)
_VARIANTS = ((False, True), (False, False), (True, True), (True, False))


@functools.cache
def _graph(B: int, H: int, Sq: int, Sk: int, D: int, dtype: torch.dtype, device_index: int) -> _Graph:
    errors = []
    for out_fp8, amax_s in _VARIANTS:
        try:
            g = _build(B, H, Sq, Sk, D, dtype, device_index, out_fp8=out_fp8, declare_amax_s=amax_s)
        except Exception as e:  # noqa: BLE001 -- cuDNN raises several types; all are "try the next variant"
            errors.append(f"{'E4M3' if out_fp8 else dtype} output, S amax {'declared' if amax_s else 'not declared'}: "
                          f"{str(e).splitlines()[0][:300]}")
            continue
        log.info("cuDNN FP8 attention graph for B=%d H=%d Sq=%d Sk=%d D=%d: %s output", B, H, Sq, Sk, D,
                 "E4M3" if out_fp8 else dtype)
        return g
    cudnn = _cudnn()
    raise RuntimeError(f"cuDNN {cudnn.backend_version_string()} has no FP8 attention engine for B={B}, heads={H}, "
                       f"Sq={Sq}, Sk={Sk}, head_dim={D}: " + "; ".join(errors)
                       + ". Use inference.fp8_attention: triton or off")


def _build(B, H, Sq, Sk, D, dtype, device_index, *, out_fp8: bool, declare_amax_s: bool) -> _Graph:
    cudnn = _cudnn()
    handle = _handle(device_index)
    fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    out_type = fp8 if out_fp8 else {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]
    g = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

    def bshd(S):  # (B, H, S, D) dims over a (B, S, H, D) buffer
        return dict(dim=[B, H, S, D], stride=[S * H * D, D, H * D, 1])

    t = {name: g.tensor(name=name, data_type=fp8, **bshd(S)) for name, S in (("q", Sq), ("k", Sk), ("v", Sk))}
    for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[name] = g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
    o, _stats, amax_s, amax_o = g.sdpa_fp8(
        q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"], descale_v=t["descale_v"],
        descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"], generate_stats=False,
        attn_scale=D**-0.5, use_causal_mask=False, name="fp8_sdpa")
    o.set_output(True).set_dim(bshd(Sq)["dim"]).set_stride(bshd(Sq)["stride"]).set_data_type(out_type)
    t["o"] = o
    amaxes = [("amax_o", amax_o)] + ([("amax_s", amax_s)] if declare_amax_s else [])
    for name, a in amaxes:
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        t[name] = a
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    device = torch.device("cuda", device_index)
    workspace = torch.empty(max(1, g.get_workspace_size()), dtype=torch.uint8, device=device)
    return _Graph(g, t, workspace, out_fp8, torch.empty(2, 1, 1, 1, 1, dtype=torch.float32, device=device))


def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, Sq, H, D) q over (B, Sk, H, D) k, v through cuDNN's FP8 engine; (B, Sq, H, D)
    in q's dtype. No mask (the steady streaming block: every query sees the whole window)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if k.shape != (B, Sk, H, D) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need (B, S, H, D) with "
                         "the same B, H, D and k, v of one shape")
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"cuDNN FP8 attention takes bf16/fp16 CUDA tensors, got {q.dtype} on {q.device}")
    if D % 16 or D > 256:
        raise ValueError(f"head_dim {D}: cuDNN's FP8 attention needs a multiple of 16 up to 256")
    if Sk == 0:
        raise ValueError("attention needs at least one key")
    if Sq == 0:
        return torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
    return attention_codes(*quantize_tensor(q), *quantize_tensor(k), *quantize_tensor(v), q.dtype)


def attention_codes(qc: torch.Tensor, dq: torch.Tensor, kc: torch.Tensor, dk: torch.Tensor, vc: torch.Tensor,
                    dv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The cuDNN launch on per-tensor E4M3 codes (B, S, H, D), contiguous, and their (1,) scales, as
    ``quantize_tensor`` returns them; (B, Sq, H, D) in ``dtype``. ``benchmarks/fp8_attention.py`` times it alone."""
    B, Sq, H, D = qc.shape
    Sk = kc.shape[1]
    index = qc.device.index if qc.device.index is not None else torch.cuda.current_device()
    gr = _graph(B, H, Sq, Sk, D, dtype, index)
    t = gr.tensors
    out = torch.empty(B, Sq, H, D, dtype=dtype, device=qc.device)
    o = torch.empty(B, Sq, H, D, dtype=torch.float8_e4m3fn, device=qc.device) if gr.out_fp8 else out
    pack = {t["q"]: qc, t["k"]: kc, t["v"]: vc, t["descale_q"]: dq, t["descale_k"]: dk, t["descale_v"]: dv,
            t["descale_s"]: _scalar(1.0 / SCALE_S, index), t["scale_s"]: _scalar(SCALE_S, index),
            t["scale_o"]: (1.0 / dv) if gr.out_fp8 else _scalar(1.0, index), t["o"]: o, t["amax_o"]: gr.amax[0]}
    if "amax_s" in t:
        pack[t["amax_s"]] = gr.amax[1]
    cudnn = _cudnn()
    handle = _handle(index)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(qc.device).cuda_stream)
    gr.graph.execute(pack, gr.workspace, handle=handle)
    if gr.out_fp8:  # E4M3 codes of out * 448 / max|v|
        out.copy_(o.float() * dv)
    return out


__all__ = ["fp8_sdpa", "attention_codes", "unavailable_reason", "INSTALL_HINT"]
