"""Decoding and writing: block latents -> pixel frames (synchronously or in a worker thread) -> mp4.

:class:`BlockDecoder` owns a streaming decoder on ``vae_device``: the VAE's
:class:`~longlive.models.vae.StreamingDecoder` or the light decoder's
:class:`~longlive.models.light_decoder.LightStreamingDecoder` (``inference.decoder``). With
``async_decode`` a worker thread decodes block k while the caller denoises block k+1; blocks are decoded
strictly in order (the decoder's causal cache needs that), so the frames are the same as a synchronous
decode. On CUDA the worker runs on its own stream and waits for an event recorded when each block was
submitted, so the DiT's stream is never blocked by the VAE. Decoded frames reach the host through one
pinned buffer, reused block after block (a pageable device-to-host copy goes through the driver's
staging buffers in chunks, and pinning a fresh buffer per block would cost more than the copy).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from longlive.data.video_io import frames_uint8, tensor_to_frames
from longlive.inference.fast_vae import FastStreamingDecoder
from longlive.inference.fast_vae import supports as supports_fast
from longlive.models.light_decoder import LightDecoder
from longlive.models.vae import WanVAE


class Mp4Stream:
    """An H.264 mp4 written frame by frame; it appears at ``path`` only when closed without error."""

    def __init__(self, path: str | os.PathLike, fps: int, quality: int = 8) -> None:
        import imageio.v2 as iio

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # longlive.io.atomic_file's rule, by hand: the file outlives any with-block (close() renames it)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp-{uuid.uuid4().hex[:8]}{self.path.suffix}")
        self.frames = 0
        self._writer = iio.get_writer(
            self.tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
            pixelformat="yuv420p", macro_block_size=2, ffmpeg_log_level="error",
        )

    def append(self, frames: np.ndarray) -> None:
        """uint8 (T, H, W, 3) frames."""
        for frame in frames:
            self._writer.append_data(frame)
        self.frames += len(frames)

    def close(self, ok: bool = True) -> None:
        """``ok``: finish the file and move it to ``path``; otherwise (an error, Ctrl-C) discard it, so a
        partial video never sits at ``path`` looking complete."""
        try:
            try:
                self._writer.close()  # waits for ffmpeg to finish the file
            except Exception:
                if ok:
                    raise
                # discarding anyway: ffmpeg may already be gone; the caller's error is the one to report
            if ok:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


class BlockDecoder:
    """Decode blocks of normalised latents in order and hand uint8 (T, H, W, 3) frames to ``on_frames``.

    On CUDA the frames handed over are a view of the pinned host buffer, valid until ``on_frames``
    returns (the next block reuses it): write them out, or copy them to keep them.

    ``submit(index, latents)`` queues (1, C, n, h, w) latents; ``close()`` waits for the rest and
    returns ``timings``: one ``{"block", "decode_s", "done_at"}`` per block (``done_at`` from
    ``time.perf_counter()``). A failure in the worker is raised by the next ``submit`` or ``close``.
    """

    def __init__(
        self,
        vae: WanVAE | LightDecoder,
        on_frames: Callable[[int, np.ndarray], None],
        *,
        device: torch.device | str | None = None,
        async_decode: bool = True,
        max_pending: int = 4,
        frames_per_call: int = 1,
        fast: bool = False,
    ) -> None:
        """``vae``: the full VAE or the distilled light decoder; both decode in order with a carried causal state.
        ``frames_per_call``: latent frames per VAE decoder call after the first (see
        :class:`~longlive.models.vae.StreamingDecoder`); the light decoder takes each block in one call. ``fast``:
        the channels-last decoder (:mod:`longlive.inference.fast_vae`, ``inference.vae_decoder: fast``) where the
        VAE has its layout."""
        self.device = torch.device(device) if device is not None else next(vae.parameters()).device
        if isinstance(vae, LightDecoder):
            self.decoder = vae.streaming_decoder()
        elif fast and supports_fast(vae):
            self.decoder = FastStreamingDecoder(vae, frames_per_call=frames_per_call)
        else:
            self.decoder = vae.streaming_decoder(frames_per_call=frames_per_call)
        self.on_frames, self.async_decode = on_frames, async_decode
        self.timings: list[dict] = []
        self._error: BaseException | None = None
        self._cancelled = False  # set by close(cancel=True): queued blocks are dropped, not decoded
        self._host: torch.Tensor | None = None  # pinned uint8 frames of the last block (CUDA)
        self._stream = torch.cuda.Stream(self.device) if async_decode and self.device.type == "cuda" else None
        if async_decode:
            self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
            self._thread = threading.Thread(target=self._work, name="vae-decode", daemon=True)
            self._thread.start()

    def _decode(self, index: int, latents: Tensor) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            video = self.decoder.decode(latents.to(self.device))
        if self.device.type == "cuda":
            frames = self._to_host(frames_uint8(video[0]))
        else:
            frames = tensor_to_frames(video[0])
        self.timings.append({"block": index, "decode_s": time.perf_counter() - t0, "done_at": time.perf_counter()})
        self.on_frames(index, frames)

    def _to_host(self, frames: Tensor) -> np.ndarray:
        if self._host is None or self._host.shape != frames.shape:
            self._host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
        self._host.copy_(frames, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()  # this (decode) stream only
        return self._host.numpy()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            index, latents, event = item
            if self._error is not None or self._cancelled:
                continue  # drain: the error is raised in the caller
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        if event is not None:
                            self._stream.wait_event(event)
                        self._decode(index, latents)
                else:
                    self._decode(index, latents)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            del item, latents, event  # not held while waiting for the next block

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError("VAE decoding failed") from self._error

    def submit(self, index: int, latents: Tensor) -> None:
        self._raise()
        if not self.async_decode:
            self._decode(index, latents)
            return
        event = None
        if latents.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(latents.device))
            if self._stream is not None and latents.device == self.device:
                latents.record_stream(self._stream)  # keep its memory alive for the worker's stream
        self._queue.put((index, latents, event))

    def close(self, cancel: bool = False) -> list[dict]:
        """Wait for the queued blocks (``cancel``: drop them; the caller failed or was interrupted) and return
        the timings."""
        self._cancelled = cancel
        if self.async_decode and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()
        return self.timings
