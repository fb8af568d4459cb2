"""Streaming FPS at LongLive 2.0's real shapes on one GPU, random weights (issue 6): ``longlive bench`` with this
script's defaults.

The code lives in ``longlive/bench/`` (see its docstring for the stages). Defaults here: the wan22-5b preset
(Wan2.2-TI2V-5B DiT, 30 layers, dim 3072, 24 heads, ffn 14336) at its 704x1280 (latent 44x80, 880 tokens per
latent frame), blocks of 8 latent frames (= 32 video frames), a window of 24 cached + 8 new latent frames,
context 512; every variant (bf16 plain, bf16 fast, fp8, + compile, compile kernels off, nvfp4, nvfp4 + nvfp4
KV) at 4 and 2 steps, plus 2 steps with the cache written by the last step; a 520 s budget; machine kind
nvidia-h100-x1. Every other ``longlive bench`` flag passes through (``--resolution 704x1280 480x832``, ...).

    python benchmarks/fps.py --out-dir benchmarks/results            # writes fps_<gpu>.{json,md}
    python benchmarks/fps.py --smoke                                  # tiny shapes, any device: the code paths
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longlive.bench.args import add_arguments  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny preset shapes on any device (the code paths, not speed)")
    ap.set_defaults(out_dir="benchmarks/results", machine_kind="nvidia-h100-x1", budget_s=520.0, variants=["all"],
                    last_step_cache=[2])
    args = ap.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.smoke else "wan22-5b")
    if args.name is None:  # fps_<gpu>, as before
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        args.name = "fps_smoke" if args.smoke else "fps_" + "".join(c if c.isalnum() else "_" for c in device.lower())
    from longlive.bench.run import run

    argv = sys.argv[1:] if argv is None else argv
    return run(args, command=shlex.join(["python", "benchmarks/fps.py", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
