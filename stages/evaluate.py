"""`evaluate [VARIANT ...]`: speed, memory, prompt following, drift, VBench and samples of every checkpoint
in ``evaluate.variants`` (params.yaml), written under reports/evaluate/ (see longlive.eval.suite).

With ``parallel.nproc * parallel.nnodes > 1`` the stage re-runs itself under torchrun, one process per GPU
(``longlive.parallel.launch``); each rank generates the same videos with the DiT built sequence parallel over
the SP group (``longlive.inference.build.build_dit``'s last step) and rank 0 alone writes the outputs.

Rank 0 then records the run in wandb (``longlive.eval.tracking``): per-variant scalars, the metrics table, the
sample videos and the resolved settings as config; offline under ``.work/evaluate/wandb`` unless
``WANDB_MODE=online`` (``disabled``: no record).
"""

import functools
import logging
import os
import sys
from pathlib import Path

import torch

from longlive.eval.suite import SAMPLES_DIR, EvaluateError, run_evaluate
from longlive.eval.tracking import log_results
from longlive.tracking import wandb_mode
from stages._common import configure_logging, setup

OUT = Path("reports/evaluate")
WORK = Path(".work/evaluate")  # VBench's scratch and the offline wandb runs; outside DVC's outs


def _parallel(preset, names: list[str]):
    """(device, parallel state, is_main, close) of a multi-process run. Outside torchrun this process is replaced
    by torchrun running this stage (longlive.parallel.launch); the single-process path never imports
    longlive.parallel."""
    from longlive.parallel import init_parallel, shutdown
    from longlive.parallel.launch import torchrun_command
    from longlive.parallel.mesh import torchrun_env

    if torchrun_env() is None:
        cmd = torchrun_command(preset.parallel, "stages.evaluate", names)
        print("evaluate:", " ".join(cmd), file=sys.stderr, flush=True)
        os.execv(cmd[0], cmd)
    state = init_parallel(preset.parallel, device=preset.device)
    # every rank generates the same videos (SP splits each one's tokens); rank 0 alone writes
    return str(state.device), state, state.is_main, (lambda: shutdown(state))


def main(argv: list[str] | None = None) -> None:
    preset = setup("evaluate")
    names = sys.argv[1:] if argv is None else argv
    cfg = preset.evaluate
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        wandb_mode(preset.tracking)  # a bad WANDB_MODE fails now, not after the evaluation
    except ValueError as e:
        sys.exit(f"evaluate: {e}")
    device, parallel, is_main, close = None, None, True, lambda: None
    if preset.parallel.world_size > 1:
        device, parallel, is_main, close = _parallel(preset, names)
    try:
        results = run_evaluate(preset, out_dir=OUT, base_dir=Path("models/base"), names=names or None, device=device,
                               parallel=parallel, write=is_main, work_dir=WORK,
                               worker_init=functools.partial(configure_logging, "evaluate"))
    except EvaluateError as e:
        sys.exit(f"evaluate: {e}")
    finally:
        close()
    if is_main:
        for name, r in results.items():
            m = r.metrics
            print(f"{name}: score {m['score']:.3f} ± {m['score_sem']:.3f}, multi-shot {m['multishot_score']:.3f}, "
                  f"drift {m['drift_score']:.3f} (last {m['drift_last']:.3f}), {m['fps']:.1f} fps, first chunk "
                  f"{m['first_chunk_latency_s']:.3f} s, peak {m['peak_memory_mb']:.1f} MiB ({m['info']['memory_kind']})"
                  + (f"; whole evaluation: {m['eval_peak_allocated_mb']:.0f} MiB allocated, "
                     f"{m['eval_peak_reserved_mb']:.0f} MiB reserved on the GPU" if "eval_peak_reserved_mb" in m else ""))
        print(f"wrote {OUT}/metrics/*.json, {OUT}/report.md and samples")
        # after the outputs are written: the record reads them and draws no random numbers
        try:
            log_results(results, preset, samples_dir=OUT / SAMPLES_DIR, run_dir=WORK)
        except Exception as e:  # noqa: BLE001 - e.g. online and the network dropped: the evaluation itself stands
            logging.getLogger("evaluate").warning(
                "the wandb record of this evaluation failed (%s: %s); the outputs under %s are complete. "
                "Fix it, or set WANDB_MODE=offline, and rerun with `dvc repro -f evaluate`", type(e).__name__, e, OUT)


if __name__ == "__main__":
    main()
