"""The local runner: drives reader -> mapper (the model's ``encode_image``) -> writer over the plan's items
with a torch DataLoader on this machine. A runner for a cluster plugs in beside it (same items in, same
writer out)."""

from __future__ import annotations

import contextlib
import ctypes
import sys

import numpy as np
import torch

from featstore.encode.reader import ModelBusy, WorkerDied, batches
from featstore.encode.writer import ShardWriter
from featstore.models import ClipModel


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit systems
TRIM_EVERY = 1024  # images between heap trims: a trim costs the next forward 12-25k page faults (10-80 ms)


def _steady_heap():
    """Set glibc's malloc up for a loop of same-sized forwards; return its ``malloc_trim`` (or a no-op).

    - glibc adapts its mmap threshold to the blocks freed, and some processes settle where a fp32 forward's
      large blocks are unmapped or trimmed from the heap's top after each use: ~105k page faults (410 MiB
      zeroed) per batch-16 ViT-B/32 forward, up to 15 % slower, in 4 of 11 processes measured. A fixed 32 MiB
      threshold (glibc's ceiling) and no automatic trimming keep those blocks mapped and reused: no faults
      in any process. The settings are process-wide and stay after encode returns.
    - Freed pages between live small blocks stay resident, so without trims encode's RSS grew with the
      number of batches (~3-5 KiB per image); the caller trims every TRIM_EVERY images, and before it forks
      decode workers: after a fork the runner's first writes to the freed pages it shares with them are
      copied, and the next forward took +130-210 ms against +50-100 ms with a trim first."""
    try:
        libc = ctypes.CDLL(None)
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (AttributeError, OSError):
        return lambda: None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def _forward(model: ClipModel, pixels: torch.Tensor, model_busy: ModelBusy | None) -> np.ndarray:
    """The mapper; MODEL_BUSY, when there is one, is raised while it runs."""
    with model_busy or contextlib.nullcontext():
        return model.encode_images(pixels).numpy()


def run_pipeline(model: ClipModel, source, items, writer: ShardWriter, batch_size: int, workers: int,
                 progress: bool) -> None:
    """Drive reader -> mapper -> writer over ITEMS (a sequence). If a worker dies, the rest is read again by
    fresh workers; the items right after a death are read one at a time, so a file that kills its decoder is
    found and recorded as failed instead of killing every later attempt. One at a time means one item in
    flight: a worker's queue sends results from a background thread, so results of items before the one that
    killed it can die with it, and with more in flight an innocent file would be blamed."""
    from tqdm import tqdm

    trim_heap, untrimmed = _steady_heap(), 0
    # with CPU workers, decoding fills the model's pauses instead of competing with its threads (see ItemDataset)
    model_busy = ModelBusy() if model.device.type == "cpu" and workers else None
    window = batch_size * max(1, workers) * 4  # what was in flight when a worker died
    done = isolate_until = 0  # batches arrive in order, so items[:done] are written or recorded as failed
    closing = contextlib.closing(model_busy) if model_busy is not None else contextlib.nullcontext()
    with closing, tqdm(total=len(items), unit="img", desc="encode", disable=not progress, file=sys.stderr) as bar:
        while done < len(items):
            start, isolating = done, done < isolate_until
            trim_heap()  # before the loader forks its workers
            loader = batches(model, source, items, start, 1 if isolating else batch_size,
                              min(workers, 1) if isolating else workers, 1 if isolating else 4, model_busy)
            try:
                for pixels, indices, shas, failures in loader:
                    embeddings = _forward(model, pixels, model_busy) if pixels is not None else None
                    writer.add([items[start + i] for i in indices], embeddings, shas,
                               [(items[start + i], why) for i, why in failures])
                    finished = len(indices) + len(failures)
                    done += finished
                    bar.update(finished)
                    untrimmed += finished
                    if untrimmed >= TRIM_EVERY:
                        trim_heap()
                        untrimmed = 0
                    if isolating and done >= isolate_until:
                        break  # past the suspects: back to full batches and all workers
            except WorkerDied as e:
                if isolating:  # the one item in flight is the one its worker died on
                    writer.add([], None, [], [(items[done], f"decoder process died ({e})"[:300])])
                    done += 1
                    bar.update(1)
                else:
                    isolate_until = done + window
                print(f"featstore: warning: {str(e).splitlines()[0]}; continuing with fresh workers", file=sys.stderr)
            finally:
                loader.close()
