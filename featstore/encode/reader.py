"""The reader: a torch Dataset over a source's items whose DataLoader workers read, hash and preprocess
images; a bad file becomes a failure reason (words, not object reprs) instead of a tensor."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import re
import select
import signal
import time

import torch
from torch.utils.data import DataLoader, Dataset

from featstore.sources.base import BadFile
from featstore.sources.folder import os_reason


class ModelBusy:
    """Raised by the runner around each CPU forward; decode workers wait while it is up.

    A shared flag says whether the model runs, and an eventfd is readable while it does not, so a waiting
    worker wakes the moment a forward ends (a 20 ms poll cost ~10 ms of every pause, and polling faster
    slowed the forward). Neither is a lock, so a worker killed while waiting leaves nothing held. Where
    the eventfd cannot be had (no ``os.eventfd``, or workers that did not inherit it) workers poll.
    """

    POLL = 0.02

    def __init__(self):
        self.flag = multiprocessing.RawValue(ctypes.c_bool, False)
        self.idle = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if hasattr(os, "eventfd") else None

    def __enter__(self):
        self.flag.value = True
        if self.idle is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.idle)  # no longer readable: waiting workers sleep
        return self

    def __exit__(self, *exc):
        self.flag.value = False
        if self.idle is not None:
            os.eventfd_write(self.idle, 1)  # readable: waiting workers wake

    @property
    def up(self) -> bool:
        return self.flag.value

    def wait(self, timeout: float) -> None:
        """Until the flag may be down, or TIMEOUT seconds (the caller checks again either way)."""
        if self.idle is None:
            time.sleep(self.POLL)
            return
        try:
            select.select([self.idle], [], [], timeout)
        except (OSError, ValueError):  # the descriptor is not this process's: poll instead
            self.idle = None

    def close(self) -> None:
        if self.idle is not None:
            os.close(self.idle)
            self.idle = None

    def __getstate__(self) -> dict:  # a spawned worker does not have the descriptor: it polls
        return {**self.__dict__, "idle": None}


def failure_reason(e: Exception) -> str:
    """Why an image could not be read, in words: no object reprs, and read errors as the listing words them."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if isinstance(e, Image.DecompressionBombError):  # PIL's own, past twice the limit, gives the pixel count
        pixels = re.match(r"Image size \((\d+) pixels\)", str(e))
        return f"too many pixels ({pixels[1]} > {Image.MAX_IMAGE_PIXELS})" if pixels else str(e)
    if isinstance(e, BadFile) or (isinstance(e, OSError) and e.strerror):
        return os_reason(e)
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__
    return f"truncated image ({text})" if "truncated" in text.lower() else f"cannot decode image ({text})"


class ItemDataset(Dataset):
    """Reads, hashes and preprocesses ``items[start + i]``; a bad file yields its error instead of a tensor.

    With MODEL_BUSY (a shared flag the runner raises during each CPU forward) a worker starts an item only
    while the model is idle: a decoder running beside the model's threads slowed the forward by 8-10 %
    (32x32 PNGs, two cores), more than the decoding itself costs."""

    def __init__(self, source, items, preprocess, start: int = 0, model_busy=None):
        self.source, self.items, self.preprocess, self.start = source, items, preprocess, start
        self.model_busy, self.runner = model_busy, os.getpid()

    def __len__(self) -> int:
        return len(self.items) - self.start

    def _wait_for_the_model(self) -> None:
        while self.model_busy.up:
            if os.getpid() != self.runner and os.getppid() != self.runner:
                os._exit(0)  # a worker whose run was killed: do not outlive it
            self.model_busy.wait(0.1)

    def __getitem__(self, i: int):
        if self.model_busy is not None:
            self._wait_for_the_model()
        try:
            sha, image = self.source.open(self.items[self.start + i])
            return i, self.preprocess(image), sha, None
        except Exception as e:  # any decoder error is a property of the file, not of the run
            return i, None, None, failure_reason(e).splitlines()[0][:300]


def collate(samples):
    ok = [s for s in samples if s[1] is not None]
    pixels = torch.stack([s[1] for s in ok]) if ok else None
    return pixels, [s[0] for s in ok], [s[2] for s in ok], [(s[0], s[3]) for s in samples if s[1] is None]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model for every core


def default_batch_size(device: torch.device) -> int:
    """Small batches are faster on CPU (ViT-B/32 here: ~20 img/s at 16 vs ~16 img/s at 100); GPUs want big ones."""
    return 256 if device.type == "cuda" else 16


def default_workers(device: torch.device) -> int:
    """On CPU workers decode only while the model is idle (see ItemDataset), so one per core (up to 4)
    shortens those pauses without taking cores from the model."""
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type == "cuda" else min(4, cores)


class WorkerDied(Exception):
    """A DataLoader worker process vanished (OOM kill, a crashing decoder)."""


def batches(model, source, items, start: int, batch_size: int, workers: int, prefetch: int, model_busy):
    loader = DataLoader(
        ItemDataset(source, items, model.preprocess, start, model_busy),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=model.device.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=prefetch if workers else None,
    )
    try:
        batches = iter(loader)
        if workers:
            # torch's SIGCHLD handler raises "worker killed" wherever the main thread happens to be (even
            # inside the writer); without it a dead worker is reported here, by the iterator, within seconds.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        yield from batches
    except RuntimeError as e:
        if "DataLoader worker" in str(e):
            raise WorkerDied(str(e)) from None
        raise
    except (ConnectionError, EOFError) as e:  # the worker died while sending a batch
        raise WorkerDied(f"DataLoader worker died mid-transfer ({type(e).__name__})") from None
