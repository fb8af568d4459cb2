"""``longlive bench``: streaming FPS of any preset with random weights (nothing downloads).

:mod:`longlive.bench.args` is the command line, :func:`longlive.bench.run.run` the body. What every benchmark
shares, ``longlive bench`` and the scripts in ``benchmarks/`` alike (timing, errors, provenance, paired
comparison, result files), is :mod:`longlive.bench.harness`; what the prompt-following benchmarks of the tiny
students share, :mod:`longlive.bench.quality`.

Builds the preset's DiT (and its VAE, through diffusers) with random weights and, at each ``--resolution``,
runs in order -- each stage appending to the JSON and markdown as it finishes, so a timeout keeps what
finished:

1. kernel checks (CUDA): each Triton kernel of ``kernels/`` against its PyTorch reference at the first
   resolution's sizes (errors, both timed); the FP8 GEMM path against its float32 emulation
   (:mod:`longlive.bench.kernels`);
2. the ceiling: one layer's GEMMs + attention at a full window timed alone (bf16, and with FP8 GEMMs where
   ``torch._scaled_mm`` runs), x layers x passes (:func:`~longlive.bench.kernels.ceiling`);
3. the VAE decoder decoding blocks alone, three ways (frames per call, fused norms); on CUDA a profile by
   kernel family (:mod:`longlive.bench.vae`);
4. the variants (``bf16-plain``, ``bf16-fast``, ``fp8``, ``bf16-compile``, ``bf16-compile-nokernels``, ``nvfp4``,
   ``nvfp4-kv``), each streamed through ``StreamingPipeline`` for ``--blocks`` blocks per step count with the
   VAE decoding every block: one row each with steady FPS (DiT + decode), first-block latency, DiT / cache
   pass / VAE / other per block, peak memory and the ceiling for the same shape
   (:mod:`longlive.bench.variants`); on CUDA a torch.profiler breakdown of a steady ``bf16-fast`` block;
5. end to end with the VAE in its worker thread (its own CUDA stream), as ``longlive generate`` runs it.

On the CPU every time is wall-clock time, FP8 and NVFP4 run their emulated paths, and what needs CUDA
(kernel checks, the FP8 ceiling, profiles, host-sync counting) is skipped and listed under ``skipped``.

    longlive bench --preset wan22-5b --resolution 704x1280 480x832 --steps 4 2 --out-dir benchmarks/results --name fps_h100
    longlive bench --preset tiny --blocks 3          # any machine: the code paths in seconds
"""
