"""Run a module under torchrun when the preset asks for more than one process, plainly otherwise.

    python -m longlive.parallel.launch stages.train_ar t2v

reads ``parallel`` of the preset params.yaml records and

* ``nproc * nnodes == 1`` (the tiny preset): runs ``python -m stages.train_ar t2v`` in this process;
* otherwise: replaces this process with ``torchrun --nproc_per_node N [--nnodes M --rdzv-...] -m
  stages.train_ar t2v``; each worker then finds torchrun's variables and
  :func:`longlive.parallel.init_parallel` builds the process groups.

A process already started by torchrun runs the module plainly (no nesting). Multi-node runs read the
rendezvous endpoint from ``LONGLIVE_RDZV_ENDPOINT`` (``host:port``, the same on every node) and
``LONGLIVE_RDZV_ID`` (a job id; default ``longlive``); the same command then runs on each node.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys

from longlive.config import ConfigError, ParallelConfig, load_preset


def torchrun_command(cfg: ParallelConfig, module: str, args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The torchrun command line that starts ``module`` with ``cfg``'s processes."""
    env = os.environ if env is None else env
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    cmd += [f"--nproc_per_node={cfg.nproc}"]
    if cfg.nnodes == 1:
        cmd += ["--standalone"]  # a local rendezvous on a free port: no MASTER_ADDR to configure
    else:
        endpoint = env.get("LONGLIVE_RDZV_ENDPOINT")
        if not endpoint:
            raise ConfigError(
                f"parallel.nnodes is {cfg.nnodes}: set LONGLIVE_RDZV_ENDPOINT=host:port (a node all of them "
                f"reach) and run the same command on every node"
            )
        cmd += [f"--nnodes={cfg.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={env.get('LONGLIVE_RDZV_ID', 'longlive')}"]
    return cmd + ["-m", module, *args]


def run_module(module: str, args: list[str]) -> None:
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: python -m longlive.parallel.launch MODULE [ARGS...]  (e.g. stages.train_ar t2v)", file=sys.stderr)
        return 2
    module, args = argv[0], argv[1:]
    try:
        cfg = load_preset().parallel
    except ConfigError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    if cfg.world_size == 1 or "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        run_module(module, args)
        return 0
    try:
        cmd = torchrun_command(cfg, module, args)
    except ConfigError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    print("launch:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)  # torchrun's exit status becomes the stage's


if __name__ == "__main__":
    sys.exit(main())
