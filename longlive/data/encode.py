"""The encode stage's logic: clips (synth's or ingest's) -> VAE latents + text embeddings in webdataset shards.

Decoupled from the models: the caller passes ``encode_video`` and ``encode_text`` callables (:func:`video_encoder`
and :func:`text_encoder` make them from a VAE and a text encoder), so this module and its tests need no weights.

Feeding a GPU: a torch DataLoader reads the clips (``workers`` processes, ``prefetch`` batches ahead each, into
pinned memory on CUDA) as uint8, a quarter of float32's bytes; each batch is copied to the device without blocking
and scaled to [-1, 1] there. Each distinct caption is embedded once per process (:class:`CaptionCache`) and
reused. A background thread writes the shards while the next batch is encoded. :class:`EncodeTimings` records
where the time went (``benchmarks/encode_bench.py`` reports it).

Data parallel (torchrun): rank ``r`` of ``W`` encodes a contiguous block of whole batches of the index -- the
batches one process would form, so the latents are those of a single-process run -- into its own shards under
``url/part-RRRRR-of-WWWWW/``; after a barrier rank 0 writes one ``manifest.json`` listing the parts' shards in
index order (:mod:`longlive.data.shards`, "Several writers"). One process writes at ``url`` itself.

Resumable: keys already in completed shards (of this process's part) are skipped, and an interrupted run leaves
only whole, recorded shards behind (see :mod:`longlive.data.shards`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from longlive.data.shards import ShardWriter, merge_parts, part_name, prepare_layout
from longlive.data.synth import load_frames, read_index
from longlive.data.video_io import frames_to_tensor

VideoEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], torch.Tensor]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PENDING_WRITES = 2  # batches handed to the writer thread and not yet written: bounds the host memory they hold
SHM = "/dev/shm"
log = logging.getLogger(__name__)


def encode_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``encode.dtype`` on ``device``: ``auto`` is bf16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"encode dtype {name!r}: expected auto, {' or '.join(DTYPES)}")
    return DTYPES[name]


def video_encoder(vae) -> VideoEncoder:
    """The normalised posterior mean of a :class:`~longlive.models.vae.WanVAE`, computed in the VAE's own dtype and
    device (it casts its input): what the stage and the benchmark hand to :func:`encode_dataset`."""

    def encode(video: torch.Tensor) -> torch.Tensor:
        return vae.encode(video)

    return encode


def text_encoder(text) -> TextEncoder:
    """The embeddings (N, L, D) of a text encoder (``longlive.models.text``: tiny or UMT5), masks dropped."""

    def encode(captions: list[str]) -> torch.Tensor:
        return text.encode(captions)[0]

    return encode


def make_sample(row: dict, latents: np.ndarray, text: np.ndarray) -> dict:
    """One shard sample: latents (C, F, h, w), text (num_shots, L, D) float16, json = index row + shapes."""
    meta = dict(row)
    meta["latent_shape"] = list(latents.shape)
    meta["text_shape"] = list(text.shape)
    meta["shot_start_latent_frames"] = [s["start_latent_frame"] for s in row["shots"]]
    return {"__key__": row["key"], "latents.npy": latents, "text.npy": text, "json": meta}


# ---------------------------------------------------------------------------------------------
# Loading


class ClipFrames(Dataset):
    """``(position, uint8 frames (T, H, W, 3))`` of each row, read from the clip folder (synth's or ingest's)."""

    def __init__(self, videos_dir: str | os.PathLike, rows: list[dict]):
        self.videos_dir, self.rows = videos_dir, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        row = self.rows[i]
        frames = load_frames(self.videos_dir, row["key"])
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"clip {row['key']} in {self.videos_dir}: expected uint8 frames (T, H, W, 3), got "
                             f"{frames.dtype} {frames.shape}; rerun the stage that wrote the clips (synth or ingest)")
        return i, torch.from_numpy(frames)


def clip_loader(videos_dir: str | os.PathLike, rows: list[dict], *, batch_size: int, workers: int = 0,
                prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """Batches ``(positions, uint8 frames (B, T, H, W, 3))`` of ``rows`` in order: ``workers`` processes read ahead
    (``prefetch`` batches each) while the device encodes, into pinned memory with ``pin_memory`` (CUDA), so the
    copy to the device can overlap."""
    if workers > 0 and rows and all(k in rows[0] for k in ("num_frames", "height", "width")):
        r = rows[0]
        workers = workers_that_fit(workers, prefetch, batch_size * r["num_frames"] * r["height"] * r["width"] * 3)
    extra = {"prefetch_factor": prefetch} if workers > 0 else {}
    return DataLoader(ClipFrames(videos_dir, rows), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, **extra)


def workers_that_fit(workers: int, prefetch: int, batch_bytes: int, shm: str = SHM) -> int:
    """Reader processes whose batches in flight fit in shared memory: they hand batches over through ``/dev/shm``,
    and a container's default (64 MB in Docker) would kill them with a bus error at the first 338 MB clip."""
    try:
        free = shutil.disk_usage(shm).free
    except OSError:  # no /dev/shm (not Linux): torch shares memory its own way there
        return workers
    fit = min(workers, int(0.9 * free) // (prefetch * batch_bytes + 1))
    if fit < workers:
        log.warning("%s has %.2f GiB free; %d reader processes x %d batches of %.2f GiB need %.2f: reading with %d. "
                    "Give the container more shared memory (docker run --shm-size 16g) or lower encode.workers / "
                    "encode.prefetch", shm, free / 2**30, workers, prefetch, batch_bytes / 2**30,
                    workers * prefetch * batch_bytes / 2**30, fit)
    return fit


# ---------------------------------------------------------------------------------------------
# Captions


class CaptionCache:
    """Each distinct caption's embedding, computed once and kept until the last batch that uses it.

    ``rows`` are the clips in the order they will be encoded, ``batch_size`` at a time: knowing every caption's
    last batch up front bounds the cache by the captions still to come (clips of one video, which share
    captions, sit together in ingest's index) instead of every caption of the run.

    An embedding does not depend on the other captions of the encoder's call (padding is to a fixed
    ``max_tokens``; tests/unit/test_encode.py checks the tiny encoder row by row), so embedding only the new captions of
    a batch gives the bits that embedding all of them did.
    """

    def __init__(self, encode_text: TextEncoder, rows: list[dict], batch_size: int):
        self.encode_text = encode_text
        self.last_batch = {c: i // batch_size for i, r in enumerate(rows) for c in r["captions"]}
        self.cache: dict[str, np.ndarray] = {}
        self.computed = 0  # captions embedded so far (the cache's misses)

    def embed(self, batch: list[dict], index: int) -> list[np.ndarray]:
        """Float16 embeddings (num_shots, L, D) of each clip of batch number ``index``."""
        new = list(dict.fromkeys(c for r in batch for c in r["captions"] if c not in self.cache))
        if new:
            text = self.encode_text(new)
            if text.ndim != 3 or text.shape[0] != len(new):
                raise ValueError(f"encode_text must return (N={len(new)}, L, D) for {len(new)} captions, "
                                 f"got {tuple(text.shape)}")
            self.cache.update(zip(new, text.detach().float().cpu().numpy().astype(np.float16)))
            self.computed += len(new)
        out = [np.stack([self.cache[c] for c in r["captions"]]) for r in batch]
        for c in {c for r in batch for c in r["captions"]}:
            if self.last_batch[c] <= index:
                del self.cache[c]
        return out


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class EncodeTimings:
    """Where one process's encode loop spent its time, in seconds (filled by :func:`encode_dataset`).

    ``vae_s`` and ``text_s`` are device time on CUDA -- the span between CUDA events recorded on the stream right
    before and after each ``encode_video`` / ``encode_text`` call, gaps inside the call included -- and wall time
    elsewhere. ``wall_s`` runs from asking the loader for the first batch to the last shard written, so
    ``vae_s / wall_s`` is the share of the run the device spent on the VAE: whatever else the device waited
    for (reading clips, copies, captions, writing, Python) is the rest.
    """

    clips: int = 0
    batches: int = 0
    wall_s: float = 0.0
    vae_s: float = 0.0
    text_s: float = 0.0
    load_wait_s: float = 0.0   # the loop waiting for the loader's next batch
    first_load_s: float = 0.0  # of which for the first batch: the reader processes start, nothing is read ahead yet
    write_wait_s: float = 0.0  # the loop waiting for the writer thread (more than PENDING_WRITES batches behind)
    captions_computed: int = 0
    captions_used: int = 0
    _spans: list = field(default_factory=list, repr=False)

    @property
    def vae_share(self) -> float:
        return self.vae_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_vae_share(self) -> float:
        """The share once the first batch has arrived: a long run's, where the start-up is amortised."""
        return self.vae_s / (self.wall_s - self.first_load_s) if self.wall_s > self.first_load_s else 0.0

    def as_dict(self) -> dict:
        return {"clips": self.clips, "batches": self.batches, "wall_s": self.wall_s, "vae_s": self.vae_s,
                "text_s": self.text_s, "load_wait_s": self.load_wait_s, "first_load_s": self.first_load_s,
                "write_wait_s": self.write_wait_s, "captions_computed": self.captions_computed,
                "captions_used": self.captions_used, "vae_share": self.vae_share,
                "steady_vae_share": self.steady_vae_share}


class _Span:
    """Times a block: CUDA events on ``device`` (read once at the end, no sync per block), else the wall clock."""

    def __init__(self, timings: EncodeTimings, name: str, device: torch.device):
        self.timings, self.name, self.cuda = timings, name, device.type == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.timings._spans.append((self.name, self.start, end))
        else:
            setattr(self.timings, self.name, getattr(self.timings, self.name) + time.perf_counter() - self.t0)


def _collect_spans(timings: EncodeTimings) -> None:
    if timings._spans:
        torch.cuda.synchronize()
        for name, start, end in timings._spans:
            setattr(timings, name, getattr(timings, name) + start.elapsed_time(end) / 1e3)
        timings._spans.clear()


# ---------------------------------------------------------------------------------------------
# The loop


def rank_rows(rows: list[dict], batch_size: int, rank: int, world_size: int) -> list[dict]:
    """Rank ``rank``'s contiguous block of whole batches of ``rows`` (block sizes differ by one batch at most)."""
    batches = -(-len(rows) // batch_size)
    lo, hi = rank * batches // world_size, (rank + 1) * batches // world_size
    return rows[lo * batch_size : hi * batch_size]


def encode_dataset(
    videos_dir: str | os.PathLike,
    url: str,
    *,
    encode_video: VideoEncoder,
    encode_text: TextEncoder,
    samples_per_shard: int,
    batch_size: int = 4,
    workers: int = 0,
    prefetch: int = 2,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    storage_options: dict | None = None,
    latent_dtype: str = "float16",
    resume: bool = True,
    fingerprint: str | None = None,
    timings: EncodeTimings | None = None,
) -> dict:
    """Encode every clip of ``videos_dir`` into shards at ``url``; return stats.

    ``encode_video``: float (B, 3, T, H, W) in [-1, 1] on ``device`` -> latents (B, C, F, h, w).
    ``encode_text``: list of N captions -> embeddings (N, L, D); called once per batch with the batch's captions
    that no earlier batch embedded (:class:`CaptionCache`).
    ``batch_size`` clips go to ``encode_video`` at once; ``workers`` / ``prefetch``: see :func:`clip_loader`.
    ``rank`` / ``world_size``: this process's place among data-parallel writers; with ``world_size > 1`` the
    default process group must be initialised (torchrun), and every rank gets the merged stats.
    ``fingerprint`` (of the inputs, e.g. clips + encoder weights + settings) is stored with the shards: a
    run given another one removes the previous run's shards (by name, see :class:`ShardWriter`) instead of
    resuming from them.
    ``timings``: filled with this process's :class:`EncodeTimings`.
    Returns ``{"samples", "encoded", "skipped", "shards"}`` (numbers only: DVC metrics): samples in the finished dataset,
    encoded by this run, skipped because an earlier run had stored them, and shard count.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0 or prefetch < 1:
        raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {workers} and {prefetch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size {world_size} needs the default process group: start the processes with "
                           "torchrun (torchrun --nproc-per-node N -m stages.encode, or encode.nproc), or pass "
                           "world_size=1")
    device = torch.device(device)
    rows = read_index(videos_dir)
    kw = dict(encode_video=encode_video, encode_text=encode_text, samples_per_shard=samples_per_shard,
              batch_size=batch_size, workers=workers, prefetch=prefetch, device=device, storage_options=storage_options,
              latent_dtype=latent_dtype, resume=resume, fingerprint=fingerprint, timings=timings)
    if world_size == 1:
        prepare_layout(url, 1, storage_options)  # parts of an earlier multi-process run go first
        return _encode_rows(videos_dir, rows, url, **kw)

    parts = prepare_layout(url, world_size, storage_options) if rank == 0 else None
    dist.barrier()  # no part is written before rank 0 has cleared the previous layout and recorded this one
    parts = parts or [part_name(r, world_size) for r in range(world_size)]
    part_url = f"{url.rstrip('/')}/{parts[rank]}"
    stats = _encode_rows(videos_dir, rank_rows(rows, batch_size, rank, world_size), part_url, **kw)
    every = [None] * world_size
    dist.all_gather_object(every, stats)  # also the barrier: every part's manifest exists once it returns
    if rank == 0:
        merge_parts(url, parts, samples_per_shard, fingerprint, storage_options)
    dist.barrier()  # the dataset is complete when any rank returns
    return {k: sum(s[k] for s in every) for k in ("samples", "encoded", "skipped", "shards")}


def _encode_rows(videos_dir, rows: list[dict], url: str, *, encode_video: VideoEncoder, encode_text: TextEncoder,
                 samples_per_shard: int, batch_size: int, workers: int, prefetch: int, device: torch.device,
                 storage_options: dict | None, latent_dtype: str, resume: bool, fingerprint: str | None,
                 timings: EncodeTimings | None) -> dict:
    """One writer's loop: ``rows`` into shards at ``url``."""
    timings = timings if timings is not None else EncodeTimings()
    cuda = device.type == "cuda"
    with ShardWriter(url, samples_per_shard, resume=resume, storage_options=storage_options,
                     fingerprint=fingerprint) as writer:
        done = writer.done_keys
        todo = [r for r in rows if r["key"] not in done]
        skipped = len(rows) - len(todo)
        captions = CaptionCache(encode_text, todo, batch_size)
        loader = clip_loader(videos_dir, todo, batch_size=batch_size, workers=workers, prefetch=prefetch,
                             pin_memory=cuda)
        pending: deque[Future] = deque()
        # cuDNN picks the fastest conv algorithms for the first batch's shapes and keeps them: every clip has the same
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = benchmark or cuda
        t_start = time.perf_counter()
        try:
            with (tqdm(total=len(rows), initial=skipped, desc="encode", unit="clip", disable=None) as bar,
                  ThreadPoolExecutor(1, thread_name_prefix="encode-write") as pool):
                batches = iter(loader) if todo else iter(())  # no reader processes for nothing to read
                for index in range(len(loader)):
                    t0 = time.perf_counter()
                    positions, frames = next(batches)
                    timings.load_wait_s += time.perf_counter() - t0
                    if index == 0:
                        timings.first_load_s += time.perf_counter() - t0
                    batch = [todo[i] for i in positions.tolist()]
                    video = frames_to_tensor(frames.to(device, non_blocking=True))
                    with (_Span(timings, "vae_s", device), torch.profiler.record_function("encode.vae"),
                          torch.inference_mode()):
                        latents = encode_video(video)
                    if latents.ndim != 5 or latents.shape[0] != len(batch):
                        # fail at the batch that broke, naming the contract, rather than writing malformed shards
                        raise ValueError(f"encode_video must return (B={len(batch)}, C, F, h, w), "
                                         f"got {tuple(latents.shape)}")
                    with (_Span(timings, "text_s", device), torch.profiler.record_function("encode.text"),
                          torch.inference_mode()):
                        texts = captions.embed(batch, index)
                    latents = latents.detach().float().cpu()  # waits for the device; the next batch is already read
                    t0 = time.perf_counter()
                    while len(pending) >= PENDING_WRITES:
                        pending.popleft().result()  # a failed write stops the run here
                    timings.write_wait_s += time.perf_counter() - t0
                    pending.append(pool.submit(_write_batch, writer, batch, latents, texts, latent_dtype))
                    timings.clips += len(batch)
                    timings.batches += 1
                    timings.captions_used += sum(len(r["captions"]) for r in batch)
                    bar.update(len(batch))
                t0 = time.perf_counter()
                while pending:
                    pending.popleft().result()
                timings.write_wait_s += time.perf_counter() - t0
        finally:
            torch.backends.cudnn.benchmark = benchmark
        manifest = writer.close()
    timings.wall_s += time.perf_counter() - t_start
    timings.captions_computed += captions.computed
    _collect_spans(timings)
    return {
        "samples": manifest["total_samples"],
        "encoded": len(todo),
        "skipped": skipped,
        "shards": manifest["num_shards"],
    }


def _write_batch(writer: ShardWriter, batch: list[dict], latents: torch.Tensor, texts: list[np.ndarray],
                 latent_dtype: str) -> None:
    """The writer thread's part: the samples of one batch, in order (one thread: the writer sees them in order)."""
    latents_np = latents.numpy().astype(latent_dtype)
    for row, lat, text in zip(batch, latents_np, texts):
        writer.write(make_sample(row, lat, text))
