"""Bad input to the ``longlive`` command: one line on stderr naming the problem and the fix, exit 2, no
traceback, and for ``generate`` before any model loads. Ctrl-C is one line and exit 130; ``--debug`` and bugs
keep their traceback; credentials in a refused argument are not echoed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from longlive.cli import main
from longlive.config import load_preset
from longlive.errors import UsageError

from _tiny_models import save_tiny_base

ROOT = Path(__file__).resolve().parents[2]


class ModelLoadReached(AssertionError):
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_base(load_preset("tiny"), tmp_path_factory.mktemp("cli") / "base")


@pytest.fixture
def no_model_load(monkeypatch):
    """Stands in for longlive.inference.generate (torch, diffusers, the models): reaching it fails the test, and
    the real module is never imported by these tests. Yields the requests that reached it, when allowed."""
    reached = []

    def run_request(request):
        if not fake.allow:
            raise ModelLoadReached("generate loaded its models for an input that should have been refused")
        reached.append(request)
        return 0

    fake = types.SimpleNamespace(run_request=run_request, allow=False, reached=reached)
    monkeypatch.setitem(sys.modules, "longlive.inference.generate", fake)
    return fake


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    Image.fromarray(rgb).save(tmp_path / "ok.jpg", quality=90)
    for name in ("ok.png", "ok.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"truncated{Path(name).suffix}").write_bytes(data[: len(data) // 2])
    png = bytearray((tmp_path / "ok.png").read_bytes())  # zeroed bytes inside the pixel data: a CRC mismatch
    at = png.index(b"IDAT") + 40
    png[at : at + 8] = bytes(8)
    (tmp_path / "corrupt.png").write_bytes(bytes(png))
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "ckpt_without_config").mkdir()
    schedules = {
        "unordered": "- {start: 0, prompt: a}\n- {start: 4, prompt: b}\n- {start: 2, prompt: c}\n",
        "duplicate": "- {start: 0, prompt: a}\n- {start: 1, prompt: b}\n- {start: 1, prompt: c}\n",
        "frames": "- {frame: 0, prompt: a}\n- {frame: 9, prompt: b}\n- {frame: 9, prompt: c}\n",
        "mixed": "- {start: 0, prompt: a}\n- {start: 2, prompt: b}\n- {frame: 10, prompt: c}\n",  # 2 s = frame 16
        "late_first": "- {start: 1, prompt: a}\n",
        "empty_prompt": "- {start: 0, prompt: a}\n- {start: 1, prompt: ''}\n",
        "not_yaml": "- {start: 0, prompt: a\n",
        "nan": "- {start: 0, prompt: a}\n- {start: .nan, prompt: b}\n",
    }
    for name, text in schedules.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return {p.name: p for p in tmp_path.iterdir()}


def generate_args(base: Path, tmp: Path, *extra: str, prompt: str | None = "a red circle moves left",
                  seconds: str = "1") -> list[str]:
    args = ["generate", "--seconds", seconds, "--out", str(tmp / "out" / "video.mp4"), "--base", str(base),
            "--preset", "tiny"]
    return args + (["--prompt", prompt] if prompt is not None and "--prompt-schedule" not in extra else []) + list(extra)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# (id, arguments after the valid defaults, substrings the one line must hold)
BAD_GENERATE = [
    ("seconds-zero", dict(seconds="0"), ["--seconds 0", "> 0"]),
    ("seconds-negative", dict(seconds="-5"), ["--seconds -5", "> 0"]),
    ("seconds-nan", dict(seconds="nan"), ["--seconds nan", "> 0"]),
    ("seconds-inf", dict(seconds="inf"), ["--seconds inf", "> 0"]),
    ("seconds-absurd", dict(seconds="1e9"), ["max_seconds (3600 s)", "--set max_seconds="]),
    ("seconds-not-a-number", dict(seconds="ten"), ["--seconds", "'ten'", "--help"]),
    ("prompt-empty", dict(prompt=""), ["--prompt is empty"]),
    ("prompt-blank", dict(prompt="   "), ["--prompt is empty"]),
    ("base-missing", dict(extra=["--base", "{tmp}/no_base"]), ["no_base not found", "dvc repro base"]),
    ("checkpoint-missing", dict(extra=["--checkpoint", "{tmp}/no_ckpt"]), ["checkpoint", "no_ckpt not found"]),
    ("checkpoint-not-a-dit", dict(extra=["--checkpoint", "{tmp}/ckpt_without_config"]), ["no config.json"]),
    ("device-unknown", dict(extra=["--device", "tpu9"]), ["--device", "'tpu9'", "cpu"]),
    ("out-is-directory", dict(extra=["--out", "{tmp}"]), ["is a directory", "video.mp4"]),
    ("out-under-a-file", dict(extra=["--out", "{tmp}/a_file/video.mp4"]), ["a_file is a file"]),
    ("out-not-a-video", dict(extra=["--out", "{tmp}/video.json"]), ["ending in .mp4"]),
    ("image-missing", dict(extra=["--image", "{tmp}/missing.png"]), ["missing.png does not exist"]),
    ("image-not-an-image", dict(extra=["--image", "{tmp}/text.png"]), ["text.png is not an image"]),
    ("image-corrupt-png", dict(extra=["--image", "{tmp}/corrupt.png"]), ["corrupt.png is corrupt or truncated"]),
    ("image-truncated-png", dict(extra=["--image", "{tmp}/truncated.png"]), ["truncated.png is corrupt or truncated"]),
    ("image-truncated-jpeg", dict(extra=["--image", "{tmp}/truncated.jpg"]), ["truncated.jpg is corrupt or truncated"]),
    ("image-directory", dict(extra=["--image", "{tmp}"]), ["is a directory"]),
    ("set-unknown-key", dict(extra=["--set", "sinks=2"]), ["--set 'sinks=2'", "sink_frames"]),
    ("set-bad-value", dict(extra=["--set", "block_frames=two"]), ["block_frames", "valid integer"]),
    ("set-out-of-range", dict(extra=["--set", "sink_frames=-1"]), ["sink_frames", "greater than or equal to 0"]),
    ("set-no-equals", dict(extra=["--set", "guidance_scale"]), ["KEY=VALUE"]),
    ("set-vae-device", dict(extra=["--set", "vae_device=tpu9"]), ["inference.vae_device", "'tpu9'"]),
    ("schedule-missing", dict(prompt=None, extra=["--prompt-schedule", "{tmp}/nope.yaml"]), ["nope.yaml not found"]),
    ("schedule-unordered", dict(prompt=None, extra=["--prompt-schedule", "{tmp}/unordered.yaml"]),
     ["unordered.yaml", "entry 2 (start 2 s", "entry 1 (start 4 s", "strictly increase"]),
    ("schedule-duplicate", dict(prompt=None, extra=["--prompt-schedule", "{tmp}/duplicate.yaml"]),
     ["entry 2 (start 1 s", "strictly increase"]),
    ("schedule-duplicate-frames", dict(prompt=None, extra=["--prompt-schedule", "{tmp}/frames.yaml"]),
     ["entry 2 (frame 9)", "entry 1 (frame 9)"]),
    ("schedule-mixed-units", dict(prompt=None, extra=["--prompt-schedule", "{tmp}/mixed.yaml"]),
     ["entry 2 (frame 10)", "start 2 s = pixel frame 16", "at 8 fps"]),
    ("schedule-first-not-at-0", dict(prompt=None, extra=["--prompt-schedule", "{tmp}/late_first.yaml"]),
     ["entry 0 has start 1 s", "must start at 0"]),
    ("schedule-empty-prompt", dict(prompt=None, extra=["--prompt-schedule", "{tmp}/empty_prompt.yaml"]),
     ["entry 1: empty prompt"]),
    ("schedule-not-yaml", dict(prompt=None, extra=["--prompt-schedule", "{tmp}/not_yaml.yaml"]), ["not valid JSON/YAML"]),
    ("schedule-nan-start", dict(prompt=None, extra=["--prompt-schedule", "{tmp}/nan.yaml"]), ["entry 1: start nan"]),
]


@pytest.mark.parametrize("case", [c[1:] for c in BAD_GENERATE], ids=[c[0] for c in BAD_GENERATE])
def test_generate_refuses_bad_input_in_one_line(case, base, files, tmp_path, no_model_load, capsys):
    spec, expected = case
    extra = [a.format(tmp=tmp_path) for a in spec.get("extra", [])]
    args = generate_args(base, tmp_path, *extra, prompt=spec.get("prompt", "a red circle moves left"),
                         seconds=spec.get("seconds", "1"))
    rc = main(args)  # reaching the model load raises ModelLoadReached (no_model_load): these are checks only
    line = one_line(capsys)
    assert rc == 2 and line.startswith("longlive generate: "), line
    for text in expected:
        assert text in line, (text, line)
    assert "pip install" not in line  # a bad file is not a missing package


def test_generate_valid_input_reaches_the_models(base, files, tmp_path, no_model_load, capsys):
    """The control for the cases above: the same defaults pass every check, with no warning."""
    no_model_load.allow = True
    assert main(generate_args(base, tmp_path)) == 0
    assert capsys.readouterr().err == ""
    (request,) = no_model_load.reached
    assert request.seconds == 1 and request.out == tmp_path / "out" / "video.mp4" and request.image is None


def test_image_on_a_t2v_checkpoint_warns_and_goes_on(base, files, tmp_path, no_model_load, capsys):
    no_model_load.allow = True
    assert main(generate_args(base, tmp_path, "--image", str(files["ok.jpg"]))) == 0
    line = one_line(capsys)
    assert line.startswith("longlive generate: warning: --image with a T2V checkpoint") and "no ar_config.json" in line
    (request,) = no_model_load.reached
    assert request.image.shape == (64, 64, 3) and request.image.dtype == np.uint8  # read by PIL


def test_schedule_entry_past_the_end_warns(base, files, tmp_path, no_model_load, capsys):
    no_model_load.allow = True
    (tmp_path / "late.yaml").write_text("- {start: 0, prompt: a}\n- {start: 0.5, prompt: b}\n- {start: 30, prompt: c}\n")
    assert main(generate_args(base, tmp_path, "--prompt-schedule", str(tmp_path / "late.yaml"), seconds="2")) == 0
    line = one_line(capsys)
    assert "warning: schedule entry 2 (start 30 s = pixel frame 240) starts after the video's last frame" in line
    assert no_model_load.reached[0].schedule.prompts == ["a", "b", "c"]


def test_ctrl_c_is_one_line_and_exit_130(base, tmp_path, no_model_load, capsys, monkeypatch):
    def interrupted(request):
        raise KeyboardInterrupt

    monkeypatch.setattr(no_model_load, "run_request", interrupted)
    assert main(generate_args(base, tmp_path)) == 130
    assert one_line(capsys) == "longlive generate: interrupted"


def test_debug_keeps_the_traceback(base, tmp_path, no_model_load, monkeypatch):
    with pytest.raises(UsageError, match="--seconds 0"):
        main(["--debug", *generate_args(base, tmp_path, seconds="0")])
    with pytest.raises(UsageError, match="--seconds 0"):
        main([*generate_args(base, tmp_path, seconds="0"), "--debug"])
    monkeypatch.setenv("LONGLIVE_DEBUG", "1")
    with pytest.raises(UsageError, match="--seconds 0"):
        main(generate_args(base, tmp_path, seconds="0"))


def test_a_bug_keeps_its_traceback(base, tmp_path, no_model_load, monkeypatch):
    def bug(request):
        raise ValueError("an internal invariant broke")  # not a refusal of input: must not become one line

    monkeypatch.setattr(no_model_load, "run_request", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(generate_args(base, tmp_path))


def test_refusals_do_not_echo_credentials(base, tmp_path, no_model_load, capsys):
    assert main(generate_args(base, tmp_path, "--set", "token=hunter2secret")) == 2
    line = one_line(capsys)
    assert "hunter2secret" not in line and "token=***" in line
    assert main(["generate", "--prompt", "x", "--out", "v.mp4", "--seconds", "password=hunter2secret"]) == 2
    line = one_line(capsys)
    assert "hunter2secret" not in line and "--seconds" in line


def test_other_subcommands_refuse_in_one_line(tmp_path, capsys):
    assert main(["pull", str(tmp_path / "no_release"), "--dest", str(tmp_path / "dest"), "--quiet"]) == 2
    assert one_line(capsys).startswith("longlive pull: no release at")
    assert main(["stage", "no_such_stage"]) == 2  # argparse's refusals are returned, not raised
    assert "invalid choice" in one_line(capsys)


# ----------------------------------------------------------------------------- end to end, in a fresh process


def run_cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "longlive.cli", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_exit_code_and_one_line_end_to_end(base, tmp_path):
    r = run_cli(*generate_args(base, tmp_path, seconds="nan"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "longlive generate: --seconds nan: give the video length as a number of seconds > 0, e.g. --seconds 10"]


def test_refusal_imports_neither_torch_models_nor_the_generator(base, tmp_path):
    """A refused generate never imports longlive.inference.generate or diffusers (seconds of imports, and their
    warnings on stderr), even for the last check before the models (the device)."""
    code = ("import json, sys; from longlive.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps([rc, sorted(m for m in ('diffusers', 'longlive.inference.generate', 'prefect', 'dvc', "
            "'great_expectations', 'wandb') if m in sys.modules)]))")
    r = run_cli(*generate_args(base, tmp_path, "--device", "tpu9"), code=code)
    assert json.loads(r.stdout.splitlines()[-1]) == [2, []], r.stderr
    assert len(r.stderr.splitlines()) == 1 and "tpu9" in r.stderr


def test_ctrl_c_mid_generation_leaves_no_video(base, tmp_path):
    """SIGINT while blocks are being encoded: one line, exit 130, and nothing at --out (the mp4 is written under a
    hidden temporary name beside it and renamed only when complete; the timings JSON is written after it)."""
    out = tmp_path / "out" / "video.mp4"
    args = generate_args(base, tmp_path, seconds="600")  # far longer than the test waits: still running when hit
    # SIGINT back to its default in the child: a runner that starts jobs in the background (nohup, `cmd &` in a
    # script) passes SIGINT ignored, and Python then never raises KeyboardInterrupt (seen: exit 0 after the signal)
    proc = subprocess.Popen([sys.executable, "-m", "longlive.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240  # a hang guard, not a speed check
        while not list(out.parent.glob(".video.tmp-*")):  # ffmpeg's file exists once the first block is decoded
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "generate never began writing its video"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ours = [line for line in stderr.splitlines() if line.startswith("longlive")]
    assert proc.returncode == 130, stderr
    assert ours == ["longlive generate: interrupted"] and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == "longlive generate: interrupted"
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no video, no timings, no temporary file
