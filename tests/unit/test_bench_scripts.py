"""The benchmark scripts of ``benchmarks/`` and the harness they share (``longlive.bench.harness``,
``longlive.bench.train``), on the CPU.

The kernel scripts need CUDA for their measurements; here their reports are rebuilt from the committed
results (``benchmarks/results/*.json``): each script's markdown of a committed JSON must be the committed
markdown, so a change of a table's columns, a figure's format or a key the report reads fails here. The
parts that run on the CPU run: ``nvfp4_kv_attention.py`` in Triton's interpreter and ``sp_scaling.py`` on the
tiny preset, their JSON keys checked against the committed GPU results. Speed is measured on a GPU, never here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longlive.bench import harness
from longlive.bench.train import summarize_steps, teacher_forcing_inputs, teacher_forcing_loss, train_steps
from longlive.bench.variants import random_dit

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CUDA_ONLY_KEYS = {".environment.cuda", ".environment.gpu", ".environment.gpus_visible", ".environment.nccl",
                  ".environment.triton"}


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keys(obj, prefix: str = "") -> set[str]:
    """Every key path of a JSON document (``.a.b``, ``.rows[].c``); the autotuner's config names left out."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if prefix.endswith("triton_config_ms"):
                continue
            out |= {prefix + "." + k} | keys(v, prefix + "." + k)
    elif isinstance(obj, list):
        for v in obj:
            out |= keys(v, prefix + "[]")
    return out


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name, result", [("nvfp4_linear", "nvfp4_linear_h100"),
                                          ("nvfp4_kv_attention", "nvfp4_kv_attention_h100"),
                                          ("fp8_attention", "fp8_attention_h100"), ("fp8_attention", "fp8_attention_h200")])
def test_markdown_of_a_committed_result_is_the_committed_markdown(name, result):
    res = json.loads((RESULTS / f"{result}.json").read_text())
    assert script(name).markdown(res) == (RESULTS / f"{result}.md").read_text()


def test_sp_scaling_report_rebuilds_the_committed_result(tmp_path):
    sp = script("sp_scaling")
    committed = json.loads((RESULTS / "sp_scaling_h200_sp1.json").read_text())
    work = tmp_path / "work"
    work.mkdir()
    for part, result in committed["runs"].items():
        harness.write_json(work / f"{part}.json",
                           {"environment": committed["environment"], "shapes": committed["shapes"], "result": result})
    sp.report(work, tmp_path, committed["preset"], committed["notes"][len(sp.NOTES):], stem="again")
    assert json.loads((tmp_path / "again.json").read_text()) == committed
    assert (tmp_path / "again.md").read_text() == (RESULTS / "sp_scaling_h200_sp1.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine says")
@pytest.mark.parametrize("name, args", [
    ("nvfp4_linear", ["--name", "x"]),
    ("fp8_attention", ["--shapes", "480x832", "--impls", "sdpa", "cudnn", "--no-sweep", "--name", "x"]),
    ("nvfp4_kv_attention", ["--device", "cuda", "--reps", "5", "--name", "x"]),
])
def test_cuda_scripts_refuse_the_cpu_in_one_line(name, args, tmp_path):
    """Their flags parse (argparse would print a usage and an error: two lines), then one line says what to run."""
    p = run_script(str(ROOT / "benchmarks" / f"{name}.py"), *args, "--out-dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and ("CUDA" in p.stderr or "GPU" in p.stderr)
    assert list(tmp_path.iterdir()) == []


def test_nvfp4_kv_attention_in_the_interpreter_writes_the_gpu_results_keys(tmp_path):
    p = run_script(str(ROOT / "benchmarks" / "nvfp4_kv_attention.py"), "--device", "cpu", "--small",
                   "--out-dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    got = json.loads((tmp_path / "nvfp4_kv_attention_cpu_small.json").read_text())
    assert keys(got) == keys(json.loads((RESULTS / "nvfp4_kv_attention_h100.json").read_text()))
    r = got["run"]
    # the fused kernel reads the same packed cache as the dequantizing path: rounding apart, the same attention
    assert r["max_rel_fused_vs_dequant"] < 1e-4 and r["max_abs_fused_vs_fp32"] < 1e-4 * r["output_scale"]
    assert r["fused_peak_extra_mib"] is None  # measured on CUDA only
    md = (tmp_path / "nvfp4_kv_attention_cpu_small.md").read_text()
    assert "| iii. fused NVFP4 attention kernel |" in md and "host clock" in md


def test_sp_scaling_on_the_tiny_preset_writes_the_gpu_results_keys(tmp_path):
    p = run_script(str(ROOT / "benchmarks" / "sp_scaling.py"), "--preset", "tiny", "--parts", "infer,train",
                   "--device", "cpu", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    got = json.loads((tmp_path / "sp_scaling.json").read_text())
    committed = keys(json.loads((RESULTS / "sp_scaling_h200_sp1.json").read_text()))
    cuda_only = CUDA_ONLY_KEYS | {k for k in committed if k.endswith(("].peak_alloc_gib", "].peak_reserved_gib"))}
    assert keys(got) == committed - cuda_only
    train = got["training"][0]
    assert train["finite"] and train["timed_steps"] == 1 and len(train["steps"]) == 2
    assert "| SP | GPUs | FSDP2 |" in (tmp_path / "sp_scaling.md").read_text()


# ----------------------------------------------------------------------------- the harness


def test_md_table_from_cells_and_from_column_specs():
    assert harness.md_table(("a", "b"), [(1, "x")]) == ["| a | b |", "|---|---|", "| 1 | x |"]
    cols = {"K x N": "{K} x {N}", "ms": "{ms:.2f}", "ok": lambda r: "yes" if r["ok"] else "NO"}
    assert harness.md_table(cols, [{"K": 2, "N": 3, "ms": 0.125, "ok": False}])[2] == "| 2 x 3 | 0.12 | NO |"


def test_bit_exact_compares_bits():
    a = torch.tensor([0.0, 1.5, float("nan")])
    assert harness.bit_exact((a, a.clone()), (torch.tensor(2.0), torch.tensor(2.0)))  # a scalar too
    assert not harness.bit_exact((torch.tensor([0.0]), torch.tensor([-0.0])))
    assert not harness.bit_exact((a, a.double()))
    assert not harness.bit_exact((a[:2], a))


def test_errors_and_rates():
    ref = torch.tensor([1.0, -2.0, 4.0])
    e = harness.errors(ref + torch.tensor([0.0, 0.5, 0.0]), ref)
    assert e == {"max_abs_err": 0.5, "max_abs_ref": 4.0, "max_rel_err": 0.125, "rel_l2_err": pytest.approx(0.5 / 21**0.5)}
    assert harness.max_abs(ref, ref.flip(0)) == 3.0
    assert harness.tflops(2e12, 500) == 4.0 and harness.gbps(3e9, 1000) == 3.0


def test_gpu_names_and_provenance():
    assert harness.gpu_short("NVIDIA H100 80GB HBM3") == "h100" and harness.gpu_short("NVIDIA H200") == "h200"
    assert harness.gpu_short("Some Card") == "some_card"
    p = harness.provenance("triton")
    assert set(p) == {"date", "torch", "triton", "python"} and len(p["date"]) == 10


def test_train_steps_time_each_step_and_summarize_the_timed_ones(tiny_preset):
    class Alone:  # one process: no collectives
        distributed, world_size, device = False, 1, torch.device("cpu")

    model = random_dit(tiny_preset, torch.device("cpu"), torch.float32, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch, mask = teacher_forcing_inputs(tiny_preset, 3, torch.device("cpu"), seed=1)
    logged = []
    steps = train_steps(model, opt, lambda: teacher_forcing_loss(model, batch, mask, torch.device("cpu")), 3,
                        torch.device("cpu"), grad_clip=1.0, log=logged.append)
    assert [s["step"] for s in steps] == [0, 1, 2] and logged == steps
    for s in steps:
        assert s["step_s"] == pytest.approx(s["fwd_bwd_s"] + s["optim_s"]) and s["fwd_bwd_s"] > 0
    summary = summarize_steps(steps, Alone())
    assert summary["timed_steps"] == 2 and summary["finite"] and summary["memory_per_rank"] == [{}]
    assert summary["step_s"] == pytest.approx((steps[1]["step_s"] + steps[2]["step_s"]) / 2)
