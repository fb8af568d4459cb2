"""encode at GPU speed (issue 17): the loader, the caption cache, data-parallel parts, the stage under torchrun and
the benchmark -- each checked against what a plain loop or one process writes, bit for bit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

import _encode_workers as workers
from conftest import free_port
from longlive.config import ConfigError, EncodeConfig, params_document
from longlive.data.encode import (
    CaptionCache, EncodeTimings, encode_dataset, make_sample, rank_rows, text_encoder, video_encoder,
)
from longlive.data.shards import (
    ShardError, ShardWriter, iter_samples, merge_parts, part_name, prepare_layout, read_manifest, shard_files,
)
from longlive.data.synth import load_frames, read_index
from longlive.data.video_io import frames_to_tensor
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_dir(tiny_preset, tmp_path_factory):
    """Random tiny VAE and text encoder in the base stage's layout."""
    out = tmp_path_factory.mktemp("encode") / "base"
    torch.manual_seed(0)
    WanVAE(tiny_preset.vae).save_pretrained(out / "vae")
    TinyTextEncoder(tiny_preset.text, seed=0).save(out / "text")
    return out


@pytest.fixture(scope="module")
def models(base_dir):
    """(video, text) encoders as the stage makes them, from ``base_dir``."""
    return workers.encoders(str(base_dir))


def digests(url: str) -> dict[str, tuple[bytes, bytes, str]]:
    """key -> (latents bytes, text bytes, json) of every sample of the dataset at ``url``."""
    return {s["__key__"]: (s["latents.npy"].tobytes(), s["text.npy"].tobytes(), json.dumps(s["json"], sort_keys=True))
            for s in iter_samples(url)}


def plain_encode(videos_dir, url: str, encode_video, encode_text, samples_per_shard: int, batch_size: int) -> dict:
    """The encode loop before issue 17: frames stacked on the CPU, every caption of a batch embedded together."""
    rows = read_index(videos_dir)
    with ShardWriter(url, samples_per_shard) as writer:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            frames = np.stack([load_frames(videos_dir, r["key"]) for r in batch])
            captions = [c for r in batch for c in r["captions"]]
            with torch.inference_mode():
                latents = encode_video(frames_to_tensor(frames)).float().numpy().astype("float16")
                text = encode_text(captions).float().numpy().astype(np.float16)
            offset = 0
            for row, lat in zip(batch, latents):
                writer.write(make_sample(row, lat, text[offset : offset + len(row["captions"])]))
                offset += len(row["captions"])
    return read_manifest(url)


# ----------------------------------------------------------------------------- bits


def test_a_tiny_caption_embeds_alone_as_in_any_batch(tiny_preset, synth_dir):
    """What the caption cache relies on for the tiny preset's bits: an embedding does not depend on the other
    captions of the call (fixed padding; row-wise kernels on this CPU)."""
    text = TinyTextEncoder(tiny_preset.text, seed=0)
    captions = [c for r in read_index(synth_dir) for c in r["captions"]]
    with torch.inference_mode():
        together = text.encode(captions)[0]
        assert all(torch.equal(text.encode([c])[0][0], together[i]) for i, c in enumerate(captions))
        assert torch.equal(text.encode(captions[3:7])[0], together[3:7])


def test_encode_writes_the_shards_of_the_plain_loop_bit_for_bit(synth_dir, models, tmp_path):
    """The tiny preset's invariant: reader processes, the caption cache and the writer thread change no byte."""
    want = plain_encode(synth_dir, str(tmp_path / "plain"), *models, samples_per_shard=5, batch_size=4)
    for n_workers in (0, 2):
        timings = EncodeTimings()
        stats = encode_dataset(synth_dir, str(tmp_path / f"w{n_workers}"), encode_video=models[0],
                               encode_text=models[1], samples_per_shard=5, batch_size=4, workers=n_workers,
                               timings=timings)
        got = read_manifest(str(tmp_path / f"w{n_workers}"))
        assert got["shards"] == want["shards"], f"workers={n_workers}: the shards' bytes changed"
        assert stats == {"samples": 12, "encoded": 12, "skipped": 0, "shards": 3}
        captions = [c for r in read_index(synth_dir) for c in r["captions"]]
        assert (timings.clips, timings.batches, timings.captions_used) == (12, 3, len(captions))
        assert timings.captions_computed == len(set(captions))
        assert 0 < timings.vae_s <= timings.wall_s and 0 < timings.vae_share <= 1


def test_each_caption_is_embedded_once_and_dropped_after_its_last_batch():
    calls = []

    def embed(captions):
        calls.append(list(captions))
        return torch.stack([torch.full((3, 2), float(len(c))) for c in captions])

    rows = [{"captions": caps} for caps in (["a", "bb"], ["a"], ["ccc"], ["bb", "a"], ["dddd"], ["ccc"])]
    cache = CaptionCache(embed, rows, batch_size=2)
    sizes = []
    for index in range(3):
        out = cache.embed(rows[2 * index : 2 * index + 2], index)
        for row, emb in zip(rows[2 * index : 2 * index + 2], out):
            assert emb.dtype == np.float16 and emb.shape == (len(row["captions"]), 3, 2)
            assert [e[0, 0] for e in emb] == [len(c) for c in row["captions"]]
        sizes.append(sorted(cache.cache))
    assert calls == [["a", "bb"], ["ccc"], ["dddd"]] and cache.computed == 4
    assert sizes == [["a", "bb"], ["ccc"], []]  # "a" and "bb" come back in batch 1, "ccc" in batch 2


def test_encode_text_must_return_one_embedding_per_new_caption():
    cache = CaptionCache(lambda caps: torch.zeros(1, 3, 2), [{"captions": ["a", "b"]}], batch_size=1)
    with pytest.raises(ValueError, match=r"encode_text must return \(N=2, L, D\)"):
        cache.embed([{"captions": ["a", "b"]}], 0)


# ----------------------------------------------------------------------------- several processes


def test_rank_blocks_are_whole_batches_that_cover_the_index_once():
    rows = [{"key": str(i)} for i in range(11)]
    for world in (1, 2, 3, 5, 13):
        blocks = [rank_rows(rows, 3, r, world) for r in range(world)]
        assert [row for b in blocks for row in b] == rows
        assert all(len(b) % 3 == 0 for b in blocks[:-1] if b)  # batches one process would form
        sizes = sorted(-(-len(b) // 3) for b in blocks)
        assert sizes[-1] - sizes[0] <= 1


def test_two_ranks_write_the_samples_of_one_process_and_resume(synth_dir, base_dir, models, tmp_path):
    """mp.spawn + gloo, the real tiny VAE: the merged dataset holds one process's latents, byte for byte, in index
    order; a second run resumes with nothing to encode; validate's shard listing sees exactly the listed shards."""
    one, two, out = str(tmp_path / "one"), str(tmp_path / "two"), tmp_path / "stats.json"
    encode_dataset(synth_dir, one, encode_video=models[0], encode_text=models[1], samples_per_shard=4, batch_size=2)
    args = (str(synth_dir), str(base_dir), two, str(out), 2, 4)
    mp.spawn(workers.spawn_entry, args=(2, free_port(), args), nprocs=2, join=True)
    first, again = json.loads(out.read_text())
    assert first == {"samples": 12, "encoded": 12, "skipped": 0, "shards": 4}  # 6 clips a part: 4 + 2, twice
    assert again == {"samples": 12, "encoded": 0, "skipped": 12, "shards": 4}
    manifest = read_manifest(two)
    parts = [part_name(r, 2) for r in range(2)]
    assert manifest["parts"] == parts and manifest["fingerprint"] == "inputs"
    assert [k for s in manifest["shards"] for k in s["keys"]] == [r["key"] for r in read_index(synth_dir)]
    assert shard_files(two) == {s["name"] for s in manifest["shards"]} and all(
        s["name"].startswith(f"{p}/shard-") for s, p in zip(manifest["shards"], [parts[0]] * 2 + [parts[1]] * 2))
    assert digests(two) == digests(one)


def test_a_run_with_another_number_of_writers_removes_the_previous_layout(tmp_path):
    """One writer -> parts -> other parts -> one writer: each run removes what the previous one wrote (by its
    records), never what it did not write."""
    url = tmp_path / "shards"
    samples = [{"__key__": f"k{i}", "latents.npy": np.full((2, 1, 1, 1), i, np.float16),
                "text.npy": np.zeros((1, 2, 2), np.float16), "json": {"i": i}} for i in range(6)]
    url.mkdir()
    (url / "notes.txt").write_text("someone else's")
    with ShardWriter(str(url), 2) as w:
        for s in samples:
            w.write(s)
    assert prepare_layout(str(url), 1) == []  # the single writer resumes: nothing removed
    assert (url / "manifest.json").is_file() and (url / "shard-000000.tar").is_file()

    def write_parts(world: int) -> list[str]:
        parts = prepare_layout(str(url), world)
        for r, part in enumerate(parts):
            with ShardWriter(f"{url}/{part}", 2) as w:
                for s in samples[r * len(samples) // world : (r + 1) * len(samples) // world]:
                    w.write(s)
        merge_parts(str(url), parts, 2)
        return parts

    parts2 = write_parts(2)
    assert sorted(p.name for p in url.iterdir()) == ["_parts.json", "manifest.json", "notes.txt", *parts2]
    assert [s["__key__"] for s in iter_samples(str(url))] == [s["__key__"] for s in samples]
    parts3 = write_parts(3)
    assert sorted(p.name for p in url.iterdir()) == ["_parts.json", "manifest.json", "notes.txt", *parts3]
    assert len(shard_files(str(url))) == read_manifest(str(url))["num_shards"] == 3
    assert prepare_layout(str(url), 1) == []
    assert sorted(p.name for p in url.iterdir()) == ["notes.txt"]


def test_merging_parts_refuses_a_key_in_two_of_them(tmp_path):
    url = tmp_path / "shards"
    parts = prepare_layout(str(url), 2)
    for part in parts:
        with ShardWriter(f"{url}/{part}", 2) as w:
            w.write({"__key__": "same", "latents.npy": np.zeros(2, np.float16), "json": {}})
    with pytest.raises(ShardError, match="'same' is in both part-00000-of-00002 and part-00001-of-00002"):
        merge_parts(str(url), parts, 2)


def test_several_ranks_need_a_process_group(synth_dir, fake_encoders, tmp_path):
    with pytest.raises(RuntimeError, match="needs the default process group: start the processes with torchrun"):
        encode_dataset(synth_dir, str(tmp_path), encode_video=fake_encoders[0], encode_text=fake_encoders[1],
                       samples_per_shard=4, rank=1, world_size=2)


def test_encode_stage_runs_itself_under_torchrun_when_nproc_asks(tiny_preset, synth_dir, base_dir, models, tmp_path):
    """``encode.nproc: 2``: ``python -m stages.encode`` becomes torchrun with two gloo processes (this machine has no
    GPU); rank 0 writes the merged manifest, prompts and metrics; the samples are one process's."""
    raw = tiny_preset.model_dump(by_alias=True, exclude={"name"})
    raw["encode"].update(nproc=2)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_document("tiny", raw), sort_keys=False))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synth").symlink_to(synth_dir)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(base_dir)
    env = {**os.environ, "LONGLIVE_PARAMS": str(params), "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "stages.encode"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node=2 -m stages.encode" in proc.stderr
    manifest = json.loads((tmp_path / "data/encoded/manifest.json").read_text())
    assert manifest["parts"] == [part_name(0, 2), part_name(1, 2)]
    metrics = json.loads((tmp_path / "reports/encode/metrics.json").read_text())
    assert metrics == {"samples": 12, "encoded": 12, "skipped": 0, "shards": 2}  # parts of 4 and 8 clips, a shard each
    prompts = [json.loads(line)["clip"] for line in (tmp_path / "data/encoded/prompts.jsonl").read_text().splitlines()]
    assert prompts == [r["key"] for r in read_index(synth_dir)]
    one = str(tmp_path / "one")
    encode_dataset(synth_dir, one, encode_video=models[0], encode_text=models[1], samples_per_shard=32, batch_size=4)
    assert digests(str(tmp_path / "data/encoded/shards")) == digests(one)


def test_reader_processes_are_cut_to_what_shared_memory_holds(tmp_path, monkeypatch, caplog):
    from collections import namedtuple

    from longlive.data import encode as enc

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(enc.shutil, "disk_usage", lambda path: usage(64 << 20, 0, 64 << 20))  # Docker's default
    rows = [{"key": "a", "num_frames": 125, "height": 704, "width": 1280}]
    with caplog.at_level("WARNING", logger="longlive.data.encode"):
        assert enc.clip_loader(tmp_path, rows, batch_size=1, workers=4, prefetch=2).num_workers == 0
    assert "--shm-size" in caplog.text and "reading with 0" in caplog.text
    monkeypatch.setattr(enc.shutil, "disk_usage", lambda path: usage(8 << 30, 0, 8 << 30))
    assert enc.clip_loader(tmp_path, rows, batch_size=1, workers=4, prefetch=2).num_workers == 4  # 8 x 338 MB fit
    assert enc.workers_that_fit(4, 2, 1 << 30) == 3


# ----------------------------------------------------------------------------- settings and the benchmark


def test_encode_settings_are_checked():
    EncodeConfig(url="x", samples_per_shard=1, nproc="auto")
    for bad in ({"nproc": 0}, {"nproc": "all"}, {"batch_size": 0}, {"dtype": "fp16"}, {"workers": -1}):
        with pytest.raises(ValueError):
            EncodeConfig(url="x", samples_per_shard=1, **bad)


def test_the_stages_models_encode_in_the_dtype_asked_for(tiny_preset):
    from longlive.data.encode import encode_dtype

    assert encode_dtype("auto", "cpu") == torch.float32 and encode_dtype("auto", "cuda") == torch.bfloat16
    assert encode_dtype("bf16", "cpu") == torch.bfloat16 and encode_dtype("fp32", "cuda") == torch.float32
    vae = WanVAE(tiny_preset.vae).to(torch.bfloat16)
    v = tiny_preset.video
    video = torch.zeros(1, 3, v.num_frames, v.height, v.width)
    assert video_encoder(vae)(video).dtype == torch.bfloat16  # the VAE casts the float32 frames it is handed
    assert text_encoder(TinyTextEncoder(tiny_preset.text))(["a red circle"]).shape == (1, 16, 64)


def test_benchmark_runs_the_encode_path_at_tiny_size(tmp_path):
    spec = importlib.util.spec_from_file_location("encode_bench", ROOT / "benchmarks" / "encode_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--preset", "tiny", "--clips", "8", "--device", "cpu", "--out-dir", str(tmp_path / "out"),
                       "--tmp-dir", str(tmp_path), "--name", "smoke"]) == 0
    res = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert res["clips"] == 8 and res["batch_size"] == 4 and res["dtype"] == "float32"
    assert res["clip"] == {"frames": 33, "height": 64, "width": 64, "mb": 33 * 64 * 64 * 3 / 1e6,
                           "latent_shape": [16, 9, 8, 8]}
    assert 0 < res["vae_share"] <= 1 and res["clips_per_s"] > 0 and res["timings"]["captions_computed"] == 8
    assert "| 8 | 4 | 0 | float32 |" in (tmp_path / "out" / "smoke.md").read_text()
    assert res["vae_share"] <= res["timings"]["steady_vae_share"] <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the clips and shards are gone


def test_config_error_names_the_key(tmp_path):
    from longlive.config import load_preset

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["presets"]["tiny"]["encode"]["nproc"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="presets.tiny.encode.nproc"):
        load_preset(path=tmp_path / "params.yaml")
