"""The training-step benchmark (benchmarks/bench_train.py) on the tiny preset, and its FLOP count at 5B scale."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from longlive.bench.train_step import FlopCounter, classify
from longlive.config import load_preset
from longlive.models.attention import FrameMask
from longlive.models.dit import WanDiT
from longlive.train.ar import attention_frames

ROOT = Path(__file__).resolve().parents[2]


def bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_training_steps_on_cpu(tmp_path, capsys):
    result = bench().main(["--preset", "tiny", "--frames", "5", "--steps", "1", "--out-dir", str(tmp_path),
                           "--name", "smoke"])
    out = capsys.readouterr().out
    assert "useful FLOP per forward = 2 * P * S" in out, "the formula is printed"
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"], default=str))
    assert "| teacher forcing |" in (tmp_path / "smoke.md").read_text()
    tf, gen, critic = result["rows"]
    assert [r["part"] for r in result["rows"]] == ["teacher forcing", "DMD generator + critic", "DMD critic"]
    for r in result["rows"]:
        assert 0 < r["mfu"] < 1 and r["step_s"] > 0 and r["peak_rss_gib"] > 0
        assert r["time_ms"]["linear"] > 0 and r["time_ms"]["attention"] > 0
    assert tf["attention"] == "dense" and [p["grad"] for p in tf["passes"]] == [True]
    assert tf["tokens"] == 2 * 5 * 16  # [clean | noisy] x 16 tokens per 8x8 latent frame (patch 2x2)
    # DMD: the generator's exit step of each of the 3 blocks [2, 2, 1] and the critic's pass build graphs
    assert sum(p["grad"] for p in gen["passes"]) == 3 + 1 and sum(p["grad"] for p in critic["passes"]) == 1
    assert gen["useful_tflop"] > critic["useful_tflop"]


def test_flex_on_cpu_is_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="no backward on the CPU"):
        bench().main(["--preset", "tiny", "--attention", "flex", "--out-dir", str(tmp_path)])


def test_5b_teacher_forcing_flops_match_issue_20():
    """2 x 5e9 x 56,320 linears + ~17,600 keys per query, x3: about 2.8e15 FLOP per step (issue 20)."""
    preset = load_preset("wan22-5b")
    with torch.device("meta"):
        model = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    C, F, h, w = preset.latent_shape
    mask = FrameMask(attention_frames(F, preset.ar.block_frames), model.tokens_per_frame(h, w))
    counter = FlopCounter(model)
    x = torch.empty(1, C, 2 * F, h, w, device="meta")
    context = torch.empty(1, 1, preset.text.max_tokens, preset.text.dim, device="meta")
    with counter.counting(), torch.enable_grad():
        counter._hook(model, (x, None, context), {"attn_mask": mask})
    assert counter.passes == [{"tokens": 56_320, "pairs": 56_320 * 17_600, "grad": True}]
    assert counter.flops == pytest.approx(2.8e15, rel=0.05)


def test_kernel_names_fall_into_attention_linear_other():
    assert classify("pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert classify("triton_tem_fused_0") == "attention"  # compiled FlexAttention
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "linear"
    assert classify("nvjet_tst_128x256_64x4") == "linear"
    assert classify("aten::addmm") == "linear"
    assert classify("triton_poi_fused_add_mul_0") == "other"
