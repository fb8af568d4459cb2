"""The ``longlive bench`` command line and the variant table: no torch import, so building the ``longlive``
parser stays fast."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One way to run the same DiT. ``name`` may hold ``{backend}`` (the NVFP4 backend, resolved at run time)."""

    id: str
    name: str
    help: str
    plain: bool = False  # the reference path: per-layer torch.cat KV cache, PyTorch elementwise ops, no context memo
    kernels: bool = True
    compile: bool = False
    weights: str = "bf16"  # bf16, fp8 (row-wise, reversible) or nvfp4 (converted in place: runs last)
    kv_cache: str = "dense"
    fp8_attention: str = "off"  # self-attention in 8 bits: triton (kernels/fp8_attention.py) or cudnn (kernels/fp8_sdpa.py)
    min_left: float = 30.0  # seconds of the time budget a stage of this variant needs to start
    cuda_graphs: bool = True  # inference.cuda_graphs (CUDA only)


# In the order they run: FP8 is undone after its rows, NVFP4 replaces the bf16 weights for good.
VARIANTS = (
    Variant("bf16-plain", "bf16 plain", "reference path: torch.cat KV cache, PyTorch elementwise ops",
            plain=True, kernels=False),
    Variant("bf16-fast", "bf16 fast", "in-place KV cache, fused kernels, per-prompt context"),
    Variant("bf16-eager", "bf16 fast, no CUDA graphs", "bf16 fast with every kernel launched from Python "
            "(inference.cuda_graphs: false)", cuda_graphs=False),
    Variant("fp8", "fp8 fast", "bf16 fast with row-wise FP8 (E4M3) linears", weights="fp8"),
    Variant("fp8-attn8", "fp8 fast + 8-bit attention", "fp8 with self-attention in INT8 q.k / E4M3 P.v",
            weights="fp8", fp8_attention="triton"),
    Variant("fp8-cudnn", "fp8 fast + cuDNN FP8 attention", "fp8 with self-attention in cuDNN's FP8 flash attention "
            "(per-tensor E4M3 q, k, v, P)", weights="fp8", fp8_attention="cudnn"),
    Variant("fp8-cudnn-eager", "fp8 fast + cuDNN FP8 attention, no CUDA graphs", "fp8-cudnn with every kernel "
            "launched from Python", weights="fp8", fp8_attention="cudnn", cuda_graphs=False),
    Variant("bf16-cudnn8", "bf16 fast + cuDNN FP8 attention", "bf16 linears with self-attention in cuDNN's FP8 flash "
            "attention", fp8_attention="cudnn"),
    Variant("bf16-compile", "bf16 fast + compile", "bf16 fast with torch.compile of each block", compile=True,
            min_left=200),
    Variant("bf16-compile-nokernels", "bf16 compile, kernels off", "torch.compile instead of the fused kernels",
            kernels=False, compile=True, min_left=200),
    Variant("nvfp4", "nvfp4 ({backend})", "NVFP4 W4A4 linears", weights="nvfp4", min_left=80),
    Variant("nvfp4-kv", "nvfp4 ({backend}) + nvfp4 KV", "NVFP4 linears and an NVFP4 KV cache", weights="nvfp4",
            kv_cache="nvfp4", min_left=50),
)
VARIANT_IDS = tuple(v.id for v in VARIANTS)
DEFAULT_VARIANTS = ("bf16-fast", "fp8", "fp8-attn8", "fp8-cudnn", "nvfp4")
STAGES = ("kernels", "ceiling", "vae", "profile", "end_to_end")


def parse_resolution(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. ``704x1280``) -> (height, width); an argparse ``type``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m[1]) == 0 or int(m[2]) == 0:
        raise argparse.ArgumentTypeError(f"resolution {text!r} must be HEIGHTxWIDTH in pixels, e.g. 704x1280")
    return int(m[1]), int(m[2])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="preset whose sizes to build (default: params.yaml's `preset`)")
    p.add_argument("--params", help="path to params.yaml")
    p.add_argument("--resolution", nargs="+", action="extend", type=parse_resolution, metavar="HxW",
                   help="video sizes in pixels, e.g. 704x1280 480x832 (default: the preset's video size)")
    p.add_argument("--variants", nargs="+", choices=VARIANT_IDS + ("all",), metavar="ID",
                   help="variants to stream, in any order (they run in a fixed one): all, or of "
                   + "; ".join(f"{v.id} ({v.help})" for v in VARIANTS) + f" (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--steps", nargs="+", type=int, default=[4, 2], metavar="N",
                   help="denoising step counts (default: 4 2)")
    p.add_argument("--last-step-cache", nargs="*", type=int, default=[], metavar="N",
                   help="also stream these step counts with inference.cache_from_last_step (no t=0 cache pass)")
    p.add_argument("--blocks", type=int, help="blocks streamed per row (default: the blocks that fill the window + 4: two capture the CUDA graphs, two are steady)")
    p.add_argument("--block-frames", type=int, help="latent frames per block (default: inference.block_frames)")
    p.add_argument("--window-frames", type=int,
                   help="cached latent frames besides the sink (default: inference.window_frames)")
    p.add_argument("--context-tokens", type=int, help="text context length (default: text.max_tokens)")
    p.add_argument("--decoder", choices=("vae", "light"), default="vae",
                   help="what decodes the blocks: the preset's VAE, or the light decoder (inference.decoder: light; "
                   "the preset's light_decoder sizes)")
    p.add_argument("--device", help="default: the preset's (auto = cuda if available)")
    p.add_argument("--nvfp4-backend", default="auto",
                   choices=("auto", "emulated", "triton", "native", "transformer_engine"),
                   help="NVFP4 linears (default auto: native on FP4 tensor cores, triton on other GPUs, emulated on the "
                   "CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the preset's cpu_threads)")
    p.add_argument("--out-dir", default="reports/bench", help="where NAME.json and NAME.md go")
    p.add_argument("--name", help="file stem (default: bench_<preset>_<device>)")
    p.add_argument("--machine-kind", default="-", help="recorded in the report, e.g. nvidia-h100-x1")
    p.add_argument("--budget-s", type=float, help="skip the remaining optional stages after this many seconds")
    p.add_argument("--skip", nargs="*", default=[], metavar="STAGE",
                   help=f"stages ({', '.join(STAGES)}) or variant ids to leave out (nvfp4: both NVFP4 variants)")
