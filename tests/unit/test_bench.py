"""``longlive bench`` on the tiny preset, on the CPU: one row per resolution x variant x step count with its
steady FPS, first-block latency and per-block parts that add up; the ceiling; the CUDA-only parts reported
as not run; a resolution that does not divide into tokens refused with the rule.

Speed itself is measured on a GPU (``longlive bench --preset wan22-5b``), never here.
"""

import json

import pytest

from longlive import cli
from longlive.bench.args import DEFAULT_VARIANTS
from longlive.bench.shapes import bench_shape
from longlive.config import ConfigError, load_preset

RESOLUTIONS = ("64x64", "32x48")
STEPS = (4, 2)
BLOCKS = 3  # tiny: sink 1 + window 3 fill after 2 blocks of 2 frames, so block 2 is the steady one
# The per-block parts (the pipeline's host-time marks for DiT and cache pass, the decode's wall time) and
# `other` (the rest of the block's wall time) must add up to the block's wall time; the blocks' wall times
# must add up to the stream's own clock (time of the last decoded frame since the stream started) within
# 5% or 5 ms: the only gaps are the loop's bookkeeping between blocks.
TOLERANCE_REL, TOLERANCE_S = 0.05, 0.005


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["bench", "--preset", "tiny", "--blocks", str(BLOCKS), "--resolution", *RESOLUTIONS,
                   "--out-dir", str(out), "--name", "tiny"])
    assert rc == 0
    return json.loads((out / "tiny.json").read_text()), (out / "tiny.md").read_text()


def test_one_row_per_resolution_variant_and_steps(bench):
    res, _ = bench
    got = sorted((r["resolution"], r["variant_id"], r["steps"]) for r in res["rows"])
    assert got == sorted((x, v, s) for x in RESOLUTIONS for v in DEFAULT_VARIANTS for s in STEPS)
    assert res["resolutions"] == list(RESOLUTIONS) and not res["errors"]
    for r in res["rows"]:
        assert r["variant"] and r["cache_pass"] and r["finite"]
        assert r["blocks"] == BLOCKS and r["steady_from_block"] == 2 and r["window_full"]
        assert r["steady_fps"] > 0 and r["dit_fps"] > r["steady_fps"]  # decoding costs something
        assert r["first_block_latency_s"] > 0
        assert r["peak_mem_kind"] and r["host_syncs_per_block"] is None  # counted on CUDA only


def test_vae_options_count_their_work_and_end_to_end_rows_give_their_share_of_the_ceiling(bench):
    res, md = bench
    for opts in res["vae_options"].values():
        assert {o["fast"] for o in opts} == {False, True}  # diffusers' modules and the channels-last decoder
        assert all(o["block_tflop"] > 0 and o["tflops"] > 0 for o in opts)
    assert "channels-last decoder (fast_vae)" in md
    assert res["end_to_end"] and md.count("of the DiT-only ceiling") == len(res["end_to_end"])


def test_parts_are_positive_and_add_up(bench):
    res, _ = bench
    for r in res["rows"]:
        parts = [r["dit_ms"], r["cache_pass_ms"], r["vae_ms"], r["other_ms"]]
        assert all(p > 0 for p in parts), r
        assert sum(parts) == pytest.approx(r["total_ms"], rel=1e-9)
        assert r["block_ms"] == pytest.approx(r["dit_ms"] + r["cache_pass_ms"], rel=1e-9)
        frames = res["shapes"][r["resolution"]]["pixel_frames_per_block"]
        assert r["steady_fps"] == pytest.approx(frames / (r["total_ms"] / 1e3), rel=1e-9)
    for stream in res["variants"].values():
        blocks = stream["blocks"]
        for b in blocks:
            assert b["denoise_s"] + b["cache_s"] + b["vae_s"] <= b["total_s"]
        walls, clock = sum(b["total_s"] for b in blocks), blocks[-1]["done_at_s"]
        assert walls <= clock + 1e-9
        assert clock - walls <= max(TOLERANCE_REL * clock, TOLERANCE_S)
        assert blocks[0]["done_at_s"] == pytest.approx(blocks[0]["total_s"], abs=TOLERANCE_S)


def test_ceiling_for_each_shape(bench):
    res, md = bench
    for x in RESOLUTIONS:
        c = res["ceiling"][x]["bf16"]
        assert c["resolution"] == x and c["layer_ms"] > 0
        for s in STEPS:
            assert c[f"fps_{s}step_with_cache_pass"] < c[f"fps_{s}step_no_cache_pass"]
    assert "ceiling fp8" in res["skipped"]  # torch._scaled_mm needs CUDA
    assert f"Ceiling at {RESOLUTIONS[1]}" in md


def test_cpu_says_what_it_did_not_run(bench):
    res, md = bench
    assert set(res["skipped"]) >= {"kernels", "profile"}
    assert "wall-clock" in res["timing"] and "wall-clock" in md
    assert {e["resolution"] for e in res["end_to_end"]} == set(RESOLUTIONS)
    assert all(v["resolution"] in RESOLUTIONS for opts in res["vae_options"].values() for v in opts)
    assert "(emulated)" in " ".join(r["variant"] for r in res["rows"])  # FP8 and NVFP4 say they were emulated
    assert res["command"].startswith("longlive bench --preset tiny --resolution 64x64 32x48")


def test_resolution_must_divide_into_tokens(capsys, tmp_path):
    rc = cli.main(["bench", "--preset", "tiny", "--resolution", "65x64", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "height 65 is not a multiple of 16 (VAE spatial compression 8 x DiT patch 2)" in err
    assert "64 or 80" in err
    assert not list(tmp_path.iterdir())
    # argparse's own refusal: one line and exit 2 returned (not raised) like every other refusal
    assert cli.main(["bench", "--preset", "tiny", "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert "HEIGHTxWIDTH" in err and len(err.strip().splitlines()) == 1, err


def test_wan22_shapes():
    """LongLive 2.0's settings: 880 tokens per latent frame at 704x1280, 390 at 480x832."""
    preset = load_preset("wan22-5b")
    big, small = bench_shape(preset), bench_shape(preset, (480, 832))
    assert (big.lat_h, big.lat_w, big.frame_tokens) == (44, 80, 880)
    assert (small.lat_h, small.lat_w, small.frame_tokens) == (30, 52, 390)
    assert (big.block_frames, big.cached_frames, big.warm_blocks, big.pixel_frames_per_block) == (8, 24, 3, 32)
    assert bench_shape(preset, (480, 832), block_frames=4, window_frames=12).warm_blocks == 3
    with pytest.raises(ConfigError, match="width 830 is not a multiple of 32"):
        bench_shape(preset, (480, 830))


def test_light_decoder_rows(tmp_path):
    """--decoder light: the preset's light decoder (random weights) decodes every block; same frame counts."""
    rc = cli.main(["bench", "--preset", "tiny", "--blocks", str(BLOCKS), "--variants", "bf16-fast", "--steps", "2",
                   "--decoder", "light", "--out-dir", str(tmp_path), "--name", "light"])
    assert rc == 0
    res = json.loads((tmp_path / "light.json").read_text())
    assert "light causal decoder" in res["vae"]
    (row,) = res["rows"]
    assert row["vae_ms"] > 0 and row["steady_fps"] > 0
    vae_frames = res["shapes"][row["resolution"]]["pixel_frames_per_block"]
    assert row["steady_fps"] == pytest.approx(vae_frames / (row["total_ms"] / 1e3), rel=1e-9)


def test_vae_decode_flops_on_meta_equal_the_real_decode_and_leave_the_decoder_alone():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from longlive.bench.vae import build_decoder, decode_tflop

    preset = load_preset("tiny")
    vae, _ = build_decoder(preset, torch.device("cpu"))
    shape = bench_shape(preset)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    dec = vae.streaming_decoder()
    z = torch.randn(1, shape.z_dim, 1 + shape.block_frames, shape.lat_h, shape.lat_w)
    with torch.no_grad():
        dec.decode(z[:, :, :1])
        with FlopCounterMode(display=False) as counter:
            dec.decode(z[:, :, 1:])
    # 1e-3: the mid block's attention is counted through another SDPA kernel on meta than on the CPU
    assert decode_tflop(vae, shape) == pytest.approx(counter.get_total_flops() / 1e12, rel=1e-3)
    assert counter.get_total_flops() > 0
    assert all(p.device.type == "cpu" for p in vae.parameters())
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    # the Wan2.2 decoder's work per 32-frame block at 704x1280, which bounds its decode time from below
    wan = load_preset("wan22-5b")
    with torch.device("meta"):
        big, _ = build_decoder(wan, torch.device("meta"))
    assert decode_tflop(big, bench_shape(wan, (704, 1280))) == pytest.approx(530.8, rel=1e-3)
