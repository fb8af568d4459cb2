"""Sequence parallel, FSDP2 and sharded checkpoints on CPU: 2 gloo processes on 127.0.0.1 must give what
one process gives (fp32 tolerance), and a checkpoint written at one world size loads at the other.

The multi-process bodies live in ``_parallel_workers.py``; each process compares against a plain copy
of the same tiny model, so a failure is an assertion raised in a worker (its traceback is printed).
"""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import yaml

import _parallel_workers as w
from conftest import free_port, validate_into
from longlive.config import DEFAULT_PARAMS, ConfigError, ParallelConfig, load_preset
from longlive.models.attention import block_causal_mask, teacher_forcing_mask
from longlive.parallel import ParallelState, checkpoint as sharded, init_parallel, parallelize
from longlive.parallel.launch import torchrun_command
from longlive.parallel.mesh import ParallelError
from longlive.parallel.partition import (
    attention_flops, contiguous_partition, frame_units, imbalance, spatial_partition, zigzag_partition,
)
from longlive.parallel.sequence import check_heads


def spawn(body: str, *args, world: int = 2, sp: int = 2) -> None:
    mp.spawn(w.spawn_entry, args=(world, free_port(), sp, body, args), nprocs=world, join=True)


# ----------------------------------------------------------------------------- 2 processes


def test_sp2_inference_matches_one_process():
    """Ulysses and all-gather attention, spatial and whole-frame partitions: bidirectional with two
    prompts, block-causal, teacher forcing, KV cache write/read (each rank caching its heads), and the
    streaming pipeline (sink + window, prompt switch with re-cache)."""
    spawn("inference", [("ulysses", "spatial"), ("allgather", "zigzag"), ("ulysses", "contiguous")])


def test_sp2_training_step_matches_one_process():
    """Teacher-forcing loss and gradients: SP alone (averaged over the SP group) and FSDP2 + SP (whole
    gradients, and the weights after one AdamW step)."""
    spawn("training", [("ulysses", "spatial"), ("allgather", "zigzag")])


def test_sp2_nvfp4_layers_and_kv_cache(tmp_path):
    out = tmp_path / "nvfp4.txt"
    spawn("nvfp4", "ulysses", "spatial", str(out))
    figures = ast.literal_eval(out.read_text())
    assert figures["linear_sp_vs_one"] < figures["linear_nvfp4_error"]


def test_sharded_checkpoints_load_at_another_world_size(tmp_path):
    """DCP checkpoints of model, AdamW state and EMA: written by 1 process and loaded by 2 (FSDP2 + SP),
    written by 2 and loaded by 1; then run_training on 2 ranks stopped after 2 of 4 steps and resumed in
    one process from its checkpoint.dcp. One spawn serves all three (process start-up dominates)."""
    one, two, loop = tmp_path / "from_one", tmp_path / "from_two", tmp_path / "loop"
    # 1 -> 2: written here, loaded (and stepped) by the 2 ranks in checkpoint_from_one
    one.mkdir()
    model = w.tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    w.one_step(model, opt, seed=1)
    weights = copy.deepcopy(model.state_dict())
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    sharded.save(one / "ckpt", ParallelState(), model, opt, extra=ema, meta={"step": 1})
    w.one_step(model, opt, seed=2)
    torch.save({"weights": weights, "after": model.state_dict()}, one / "reference.pt")

    spawn("checkpoints", str(one), str(two), str(loop))

    # 2 -> 1: written by the 2 ranks (FSDP2 + SP, one step), loaded here into a model with other weights
    ref = torch.load(two / "reference.pt", weights_only=False)
    model = w.tiny_model(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    assert sharded.load(two / "ckpt", model, opt, extra=ema) == {"step": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref["weights"][k]), k
        assert torch.equal(ema[k], ref["weights"][k] * 0.5), k
    w.one_step(model, opt, seed=2)  # the optimizer state came back too: the same next step as 2 ranks took
    for k, v in model.state_dict().items():
        w.close(v, ref["after"][k], f"step after loading: {k}")

    # the training loop: 2 ranks for 2 steps, resumed here, against 4 uninterrupted one-process steps
    resumed, hist = w.loop_run(loop / "run", ParallelState())
    want, want_hist = w.loop_run(loop / "ref", ParallelState())
    assert [h["step"] for h in hist] == [h["step"] for h in want_hist] == [0, 1, 2, 3]
    for a, b in zip(hist, want_hist):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    for k, v in want.items():
        w.close(resumed[k], v, f"weights after resuming: {k}", atol=1e-4)


# ----------------------------------------------------------------------------- one process


def test_one_process_needs_no_process_group():
    state = init_parallel(ParallelConfig(), device="cpu")
    assert not state.distributed and state.mesh is None and state.is_main
    model = w.tiny_model()
    assert parallelize(model, state, training=True) is model
    assert all(type(b.attn1.core).__name__ == "AttentionCore" for b in model.blocks)


def test_asking_for_more_processes_than_started_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParallelError, match="python -m longlive.parallel.launch"):
        init_parallel(ParallelConfig(nproc=2, sp=2), device="cpu")


def test_heads_must_divide_by_sp():
    check_heads(24, 4, "ulysses")
    check_heads(24, 5, "allgather")  # all-gather K/V keeps every head on every rank
    with pytest.raises(ValueError, match="num_heads = 24 does not divide by 5.*allgather"):
        check_heads(24, 5, "ulysses")
    p = load_preset("tiny")
    with pytest.raises(ValueError, match="parallel.sp 3 must divide dit.num_heads 4"):
        p.model_validate({**p.model_dump(by_alias=True), "parallel": {"nproc": 3, "sp": 3}})


def test_preset_parallel_section():
    assert load_preset("tiny").parallel.world_size == 1
    with pytest.raises(ValueError, match="sp 2 must divide nproc"):
        ParallelConfig(nproc=3, sp=2)
    assert ParallelConfig(nproc=4, nnodes=2, sp=2).dp_shard == 4


def test_launcher_command(monkeypatch):
    cmd = torchrun_command(ParallelConfig(nproc=2, sp=2), "stages.train_ar", ["t2v"], env={})
    assert cmd[-4:] == ["--standalone", "-m", "stages.train_ar", "t2v"] and "--nproc_per_node=2" in cmd
    multi = torchrun_command(ParallelConfig(nproc=8, nnodes=2, sp=4), "stages.train_ar", ["t2v"],
                             env={"LONGLIVE_RDZV_ENDPOINT": "node0:29500"})
    assert "--nnodes=2" in multi and "--rdzv-endpoint=node0:29500" in multi
    with pytest.raises(ConfigError, match="LONGLIVE_RDZV_ENDPOINT"):
        torchrun_command(ParallelConfig(nproc=8, nnodes=2, sp=4), "stages.train_ar", [], env={})


# ----------------------------------------------------------------------------- partitions and balance


def test_partitions_cover_every_token_once():
    for p in (spatial_partition(5, 16, 2), contiguous_partition(5, 16, 2),
              zigzag_partition(teacher_forcing_mask(8, 1, 2), 16, 2, halves=2)):
        idx = torch.cat([p.token_index(r) for r in range(p.ranks)])
        assert sorted(idx.tolist()) == list(range(p.num_frames * 16))
    with pytest.raises(ValueError, match="does not divide"):
        spatial_partition(5, 15, 2)


def test_zigzag_pairs_clean_and_noisy_blocks():
    mask = teacher_forcing_mask(8, 1, 2)  # 4 blocks of 2 frames, [clean 0..7 | noisy 8..15]
    assert frame_units(mask, halves=2) == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    p = zigzag_partition(mask, 16, 2, halves=2)
    assert p.frames == ((0, 1, 6, 7, 8, 9, 14, 15), (2, 3, 4, 5, 10, 11, 12, 13))  # blocks {0, 3} and {1, 2}


def test_balanced_partition_evens_attention_flops():
    """Block-causal attention (the plain causal training / inference mask): a contiguous split loads the
    last rank; zigzag is even; spatial is exactly even. Under Ulysses every partition is even."""
    heads, d = 24, 128
    causal = block_causal_mask(32, 1, 8)  # 4 blocks of 8 frames
    before = attention_flops(causal, contiguous_partition(32, 880, 2), heads, d)
    after = attention_flops(causal, zigzag_partition(causal, 880, 2), heads, d)
    spatial = attention_flops(causal, spatial_partition(32, 880, 2), heads, d)
    assert sum(before) == sum(after) == sum(spatial)
    assert imbalance(before) == pytest.approx(1.4)  # blocks 1+2 vs 3+4 of a 1:2:3:4 staircase
    assert imbalance(after) == 1.0 and imbalance(spatial) == 1.0
    assert len(set(attention_flops(causal, contiguous_partition(32, 880, 2), heads, d, mode="ulysses"))) == 1
    # teacher forcing, 8 blocks on 4 ranks: contiguous gives ranks 1 and 3 the late clean / noisy blocks
    tf = teacher_forcing_mask(32, 1, 4)
    before = attention_flops(tf, contiguous_partition(64, 880, 4), heads, d)
    after = attention_flops(tf, zigzag_partition(tf, 880, 4, halves=2), heads, d)
    assert imbalance(before) > 1.3 and imbalance(after) == 1.0


# ----------------------------------------------------------------------------- train_ar


@pytest.fixture(scope="module")
def ar_setup(synth_dir, fake_encoders, tiny_preset, tmp_path_factory):
    from longlive.data.encode import encode_dataset
    from longlive.models.wan_adapter import save_dit

    root = tmp_path_factory.mktemp("ar_parallel")
    shards = str(root / "shards")
    encode_dataset(synth_dir, shards, encode_video=fake_encoders[0], encode_text=fake_encoders[1], samples_per_shard=4)
    validate_into(shards, tiny_preset, root / "validate")  # run_train_ar reads root/validate/report.json
    preset = w.ar_preset()
    torch.manual_seed(0)
    base = w.WanDiT(preset.dit, in_channels=preset.vae.z_dim, text_dim=preset.text.dim)
    base.init_weights(0)
    save_dit(base, root / "base" / "dit")
    return root, shards


def test_train_ar_on_2_ranks_exports_what_one_process_does(ar_setup, monkeypatch):
    """The train_ar stage body with parallel: SP 2 + FSDP2 on 2 gloo ranks (I2V, EMA export, DCP
    checkpoints) against one process: the same loss history and exported EMA weights."""
    from longlive.models.wan_adapter import load_dit

    monkeypatch.setenv("WANDB_MODE", "disabled")
    root, shards = ar_setup
    spawn("train_ar_two_ranks", str(root), shards)
    one = w.run_train_ar(root, shards, "one", ParallelState())
    two = torch.load(root / "two" / "metrics.pt", weights_only=False)
    assert abs(one.metrics["final_loss"] - two["final_loss"]) < 1e-5 and one.metrics["params"] == two["params"]
    a, b = load_dit(root / "one" / "model" / "dit"), load_dit(root / "two" / "model" / "dit")
    for k, v in a.state_dict().items():
        w.close(b.state_dict()[k], v, f"exported {k}", atol=1e-4)
    for out in ("one", "two"):  # the sharded resume state is removed after success
        assert not (root / out / "work" / "checkpoint.dcp").exists()


def test_launcher_runs_a_module_under_torchrun_when_the_preset_asks(tmp_path):
    """``python -m longlive.parallel.launch MODULE``: 2 processes for parallel.nproc 2, 1 plainly for 1."""
    (tmp_path / "probe_launch.py").write_text(
        "import json, os\n"
        "from longlive.config import load_preset\n"
        "from longlive.parallel import parallel_session\n"
        "with parallel_session(load_preset().parallel, device='cpu') as s:\n"
        "    out = {'rank': s.rank, 'world': s.world_size, 'sp': s.sp, 'dp': s.dp}\n"
        "    open(f'rank{s.rank}.json', 'w').write(json.dumps(out))\n"
    )
    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    for nproc in (2, 1):
        params["presets"]["tiny"]["parallel"] = {"nproc": nproc, "sp": nproc}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "LONGLIVE_PARAMS": str(tmp_path / "params.yaml"), "LONGLIVE_PRESET": "tiny",
               "OMP_NUM_THREADS": "1"}
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
            env.pop(k, None)
        proc = subprocess.run([sys.executable, "-m", "longlive.parallel.launch", "probe_launch"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = sorted(json.loads(p.read_text())["rank"] for p in tmp_path.glob("rank*.json"))
        assert got == list(range(nproc)), (nproc, got, proc.stderr[-2000:])
        for p in tmp_path.glob("rank*.json"):
            assert json.loads(p.read_text())["world"] == nproc
            p.unlink()
