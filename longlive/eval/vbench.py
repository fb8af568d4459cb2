"""VBench adapter: the ``vbench`` package's dimensions on our videos, with weights from a local directory.

:func:`evaluate_vbench` returns one entry per requested dimension, always with a ``status``:

* ``computed``: ``score`` (VBench's raw score, higher is better), ``source`` (``vbench`` or ``builtin``)
  and ``per_video``;
* ``skipped``: ``reason`` says what is missing (the package, the weights directory, which weight files);
* ``failed``: the package ran and raised; ``reason`` holds the error.

A dimension is never reported as 0 because it could not run.

**Nothing downloads.** VBench 0.1.5 fetches missing weights with ``wget``/``git clone`` on first use; we
check every file it would fetch (:data:`WEIGHT_FILES`, VBench's cache layout) before calling it and skip
the dimension when one is missing, point ``VBENCH_CACHE_DIR`` at ``weights`` and set the Hugging Face
offline switches. Build the directory once on a connected machine (VBench's ``~/.cache/vbench``).

**Where it runs.** VBench pins ``transformers==4.33.2`` and ``numpy<2``, which this project's environment
cannot hold, so the package runs in a subprocess of ``python`` (an interpreter of its own environment;
default: this one): this file doubles as that subprocess's script and imports nothing but the standard
library at module level for that reason. Custom videos are passed in VBench's ``custom_input`` mode with
their prompts; the dimensions that need VBench's own prompt suite (object class, colour, ...) are refused
at config time.

**Weight-free dimensions** (:data:`WEIGHT_FREE`: temporal flickering) are always computed: by the package
when it is importable, else by :func:`temporal_flickering` below, a direct implementation of its formula.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Files (relative to VBench's cache directory) that vbench 0.1.5's ``init_submodules(..., local=True)``
# and the dimension modules load; a missing one would be downloaded, so its dimension is skipped instead.
WEIGHT_FILES: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("dino_model/facebookresearch_dino_main/hubconf.py", "dino_model/dino_vitbase16_pretrain.pth"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "human_action": ("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",),
    "temporal_style": ("ViCLIP/ViClip-InternVid-10M-FLT.pth",),
    "overall_consistency": ("ViCLIP/ViClip-InternVid-10M-FLT.pth",),
    "temporal_flickering": (),
}
WEIGHT_FREE = tuple(d for d, files in WEIGHT_FILES.items() if not files)
RESULT_NAME = "longlive"


def check_dimensions(dimensions: list[str]) -> None:
    """Raise ValueError naming any dimension this adapter cannot run on custom videos (the config's rule:
    :class:`longlive.config.EvalVBenchConfig` checks the same at load)."""
    from longlive.config import EvalVBenchConfig

    try:
        EvalVBenchConfig(dimensions=list(dimensions))
    except Exception as e:  # pydantic's ValidationError: keep only our message
        errors = getattr(e, "errors", None)
        raise ValueError(errors()[0]["msg"].removeprefix("Value error, ") if errors else str(e)) from None


# ----------------------------------------------------------------------------- weight-free dimensions


def temporal_flickering_frames(frames) -> float:
    """VBench's temporal flickering of one uint8 (T, H, W, C) video: ``(255 - mean_t MAE(f_t, f_t+1)) / 255``.

    The formula of ``vbench/temporal_flickering.py`` (``cal_score``: mean over consecutive frame pairs of
    the mean absolute pixel difference in float32, over all channels), written out so the dimension is
    computed without the package. 1.0 is a still video."""
    import numpy as np

    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) < 2:
        raise ValueError(f"temporal flickering needs a (T >= 2, H, W, C) video, got shape {frames.shape}")
    f = frames.astype(np.float32)
    mae = np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))
    return float((255.0 - mae.mean()) / 255.0)


def temporal_flickering(paths: list[str | os.PathLike]) -> tuple[float, list[dict]]:
    """(mean score, per video) over mp4 files, as VBench reports it (videos it cannot read are left out,
    as VBench does)."""
    import numpy as np

    from longlive.data.video_io import read_mp4  # the project's ffmpeg reader; VBench reads with OpenCV's

    per_video = []
    for path in paths:
        frames = read_mp4(path)
        if len(frames) < 2:
            continue
        per_video.append({"video_path": str(path), "video_results": temporal_flickering_frames(frames)})
    if not per_video:
        raise ValueError("no readable video with two or more frames")
    return float(np.mean([v["video_results"] for v in per_video])), per_video


BUILTIN = {"temporal_flickering": temporal_flickering}


# ----------------------------------------------------------------------------- the adapter


def _probe_package(python: str) -> str | None:
    """None when ``python`` imports vbench, else why not."""
    try:
        proc = subprocess.run([python, "-c", "import vbench"], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {python}: {e}"
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return (f"the vbench package is not importable by {python} ({last}); install it there "
                f"(pip install vbench, in its own environment) or set evaluate.vbench.python")
    return None


def missing_weights(dimension: str, weights: str | os.PathLike) -> list[str]:
    return [str(Path(weights) / f) for f in WEIGHT_FILES[dimension] if not (Path(weights) / f).is_file()]


def evaluate_vbench(
    videos: list[tuple[str | os.PathLike, str]], dimensions: list[str], *, weights: str | os.PathLike | None = None,
    python: str | None = None, device: str = "cpu", work_dir: str | os.PathLike | None = None,
) -> dict:
    """Score ``videos`` (mp4 path, prompt) on ``dimensions``; see the module doc for the result."""
    check_dimensions(dimensions)
    if not videos:
        raise ValueError("evaluate_vbench needs at least one video")
    python = python or sys.executable
    no_package = _probe_package(python)
    result: dict = {"videos": len(videos), "python": python, "weights": str(weights) if weights else None,
                    "package": "importable" if no_package is None else no_package, "dimensions": {}}
    runnable = []
    for dim in dimensions:
        if dim in WEIGHT_FREE and no_package is not None:
            score, per_video = BUILTIN[dim]([p for p, _ in videos])
            result["dimensions"][dim] = {"status": "computed", "source": "builtin", "score": score, "per_video": per_video}
        elif no_package is not None:
            result["dimensions"][dim] = {"status": "skipped", "reason": f"the vbench package is not importable by {python} "
                                         "(the report's `package` says why and how to install it)"}
        elif WEIGHT_FILES[dim] and not weights:
            result["dimensions"][dim] = {"status": "skipped", "reason": "needs model weights and evaluate.vbench.weights "
                                         "is not set (a local directory in VBench's cache layout)"}
        elif WEIGHT_FILES[dim] and missing_weights(dim, weights):
            result["dimensions"][dim] = {"status": "skipped",
                                         "reason": "missing weights (nothing downloads): " + ", ".join(missing_weights(dim, weights))}
        else:
            runnable.append(dim)
    if runnable:
        result["dimensions"].update(_run_package(videos, runnable, weights=weights, python=python, device=device,
                                                 work_dir=work_dir))
    result["dimensions"] = {d: result["dimensions"][d] for d in dimensions}  # the requested order
    return result


def _run_package(videos, dimensions, *, weights, python, device, work_dir) -> dict:
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        (tmp / "videos").mkdir()
        prompts = {}
        for i, (path, prompt) in enumerate(videos):
            name = f"{i:04d}.mp4"  # VBench maps prompts by file name; ours are not filename-safe
            os.symlink(Path(path).resolve(), tmp / "videos" / name)
            prompts[name] = prompt
        spec = {"videos": str(tmp / "videos"), "prompts": prompts, "dimensions": dimensions, "device": device,
                "weights": str(Path(weights).resolve()) if weights else None, "out": str(tmp / "out"),
                "result": str(tmp / "result.json")}
        (tmp / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run([python, str(Path(__file__).resolve()), str(tmp / "spec.json")],
                              capture_output=True, text=True)
        if proc.returncode or not (tmp / "result.json").is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            return {d: {"status": "failed", "reason": f"vbench subprocess exited {proc.returncode}: {tail}"} for d in dimensions}
        return json.loads((tmp / "result.json").read_text())


# ----------------------------------------------------------------------------- the subprocess (stdlib + vbench only)


def _plain(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (list, tuple)):
        return [_plain(x) for x in o]
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    return o


def _subprocess_main(spec_path: str) -> int:
    import importlib
    import traceback

    # Run as a script, this file's folder is sys.path[0], where `import vbench` would find this very file.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    spec = json.loads(Path(spec_path).read_text())
    if spec["weights"]:
        os.environ["VBENCH_CACHE_DIR"] = spec["weights"]  # read by vbench.utils at import time
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    utils = importlib.import_module("vbench.utils")
    if spec["weights"]:
        utils.CACHE_DIR = spec["weights"]  # in case vbench was imported before the variable was set
    from vbench import VBench

    info = str(Path(importlib.import_module("vbench").__file__).parent / "VBench_full_info.json")
    out = {}
    for dim in spec["dimensions"]:  # one call per dimension, so one failure does not sink the others
        try:
            bench = VBench(spec["device"], info, spec["out"])
            bench.evaluate(videos_path=spec["videos"], name=f"{RESULT_NAME}_{dim}", prompt_list=spec["prompts"],
                           dimension_list=[dim], local=True, mode="custom_input")
            res = json.loads((Path(spec["out"]) / f"{RESULT_NAME}_{dim}_eval_results.json").read_text())[dim]
            out[dim] = {"status": "computed", "source": "vbench", "score": float(_plain(res[0])),
                        "per_video": _plain(res[1])}
        except Exception as e:  # noqa: BLE001 - reported per dimension, never as a score
            out[dim] = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-2000:]}
    # by hand, not longlive.io: this runs in VBench's interpreter, where longlive need not import
    tmp = Path(spec["result"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, spec["result"])
    return 0


if __name__ == "__main__":
    sys.exit(_subprocess_main(sys.argv[1]))
