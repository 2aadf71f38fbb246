"""``featstore encode``: plan → reader → mapper → writer, driven by ``encode``.

- plan (``featstore.plan``): walk the source's listing and the split's rows together in id order; only new or
  changed items are read, and they and the rows to change wait in spill files, so memory grows with neither
  the source nor the night's changes.
- reader: a torch DataLoader whose workers read, hash and preprocess images (bad files become failures).
- mapper: the model's ``encode_image`` (raw, unnormalised outputs).
- writer: buffers rows and commits shards on a background thread, then patches shards whose rows
  changed or vanished, each by an atomic replace, one shard's changes at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import heapq
import multiprocessing
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from featstore.compact import AUTO_KEEP, AUTO_RUNS, compact_split
from featstore.errors import FeatstoreError
from featstore.identity import describe, same_model
from featstore.models import DEFAULT_MODEL, ClipModel, load_model
from featstore.plan import CHANGED, REMOVED, RETOUCHED, InOrder, Plan, Spill, make_plan
from featstore.sources import Item, open_source
from featstore.store import DEFAULT_SHARD_ROWS, DTYPES, Store, check_split_name, id_range, shard_schema


# ---- reader -------------------------------------------------------------------------------------
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
            return i, None, None, f"{type(e).__name__}: {e}".splitlines()[0][:300]


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


# ---- writer -------------------------------------------------------------------------------------
@dataclass
class _ShardChanges:
    """What the patch does to one shard: ids whose old row goes, rows of the replacement spill that come in,
    and new (path, label, size, mtime_ns) of rows that stay."""

    drop: list[str] = field(default_factory=list)
    new_rows: list[tuple[pa.RecordBatch, list[int]]] = field(default_factory=list)  # spill batch, row numbers
    retouched: dict[str, tuple] = field(default_factory=dict)

    def add_new_row(self, batch: pa.RecordBatch, number: int) -> None:
        if self.new_rows and self.new_rows[-1][0] is batch:
            self.new_rows[-1][1].append(number)
        else:
            self.new_rows.append((batch, [number]))


class ShardWriter:
    """Turns encoded batches into committed shards, on one background thread so the model never waits
    for Parquet. Rows of changed items wait in a spill file and are patched into their old shard at the end
    (a reader never sees an id twice); the patch walks the plan's changes and that spill together in id order
    and rewrites each shard as soon as the walk has passed its last id, holding one shard's changes at a time
    (one per sorted run of shards)."""

    def __init__(self, store: Store, split: str, plan: Plan, label_ids: dict[str, int], shard_rows: int):
        self.store, self.split, self.plan, self.label_ids = store, split, plan, label_ids
        self.shard_rows = shard_rows
        self.schema = shard_schema(store.dim, store.manifest["dtype"], store.manifest["model"])
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.failures: dict[str, dict] = {}
        self.replacements = Spill(store.split_dir(split), "replace", self.schema)
        self._changed = InOrder(row for row in plan.changes if row[2] == CHANGED)  # in id order
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="featstore-writer")
        self.pending: list[concurrent.futures.Future] = []
        self.shards_written = 0
        self.encoded = 0

    def rows(self, items: list[Item], embeddings: np.ndarray, shas: list[str]) -> pa.Table:
        dtype = np.float16 if self.store.manifest["dtype"] == "float16" else np.float32
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=dtype).reshape(-1))
        now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
        return pa.table(
            {
                "id": [it.id for it in items],
                "path": [it.path for it in items],
                "label": pa.array([self.label_ids.get(it.label) if it.label is not None else None for it in items], pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, self.store.dim),
                "size": pa.array([it.size for it in items], pa.int64()),
                "mtime_ns": pa.array([it.mtime_ns for it in items], pa.int64()),
                "sha256": shas,
                "encoded_at": pa.array([now.value] * len(items), pa.timestamp("ms", tz="UTC")),
            },
            schema=self.schema,
        )

    def add(self, items: list[Item], embeddings: np.ndarray, shas: list[str], failures: list[tuple[Item, str]]) -> None:
        """Rows of encoded ITEMS, which come in id order (the plan's order)."""
        for item, reason in failures:
            self.failures[item.id] = {"path": item.path, "reason": reason, "size": item.size,
                                      "mtime_ns": item.mtime_ns, "sha256": item.sha256}
        if not items:
            return
        table = self.rows(items, embeddings, shas)
        self.encoded += len(items)
        moved = [self._changed.get(item.id) is not None for item in items]  # items replacing a stored row
        if any(moved):
            moved = pa.array(moved)
            self.replacements.write(table.filter(moved))
            table = table.filter(pc.invert(moved))
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.shard_rows:
            whole = pa.concat_tables(self.buffer)
            self._submit(whole.slice(0, self.shard_rows))
            rest = whole.slice(self.shard_rows)
            self.buffer, self.buffered = [rest], rest.num_rows

    def _submit(self, table: pa.Table) -> None:
        failures, self.failures = self.failures, {}
        for future in [f for f in self.pending if f.done()]:
            future.result()  # surface a writer error at once
            self.pending.remove(future)
        while len(self.pending) >= 2:  # bound memory: at most two shards waiting for the disk
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self._commit, table, failures))

    def _commit(self, table: pa.Table, failures: dict[str, dict]) -> None:
        failed = self.store.split_info(self.split)["failed"]
        failed.update(failures)
        for row_id in table.column("id").to_pylist():
            failed.pop(row_id, None)
        if table.num_rows:
            self.store.write_shard(self.split, table)
            self.shards_written += 1
        else:
            self.store.save()

    def close(self) -> None:
        """Commit what is buffered, then patch changed, re-fingerprinted and removed rows into place."""
        self._submit(pa.concat_tables(self.buffer) if self.buffer else self.schema.empty_table())
        self.buffer, self.buffered = [], 0
        for future in self.pending:
            future.result()
        self.pool.shutdown()
        try:
            self.replacements.close()
            self._patch()
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the replacement spill (the next writer's ``reconcile`` would, after a crash)."""
        self.replacements.discard()

    def _patch(self) -> None:
        if not len(self.plan.changes):
            return
        replacements = InOrder((row_id, batch, number) for batch in self.replacements.batches()  # in id order
                               for number, row_id in enumerate(batch.column(0).to_pylist()))
        folder = self.store.split_dir(self.split)
        pending: dict[str, _ShardChanges] = {}
        ends: list[tuple[str, str]] = []  # (highest id, shard) of the shards in PENDING, a heap
        for row_id, shard, change, *fields in self.plan.changes:
            while ends and ends[0][0] < row_id:  # no later change can be in that shard
                self._patch_shard(heapq.heappop(ends)[1], pending)
            if shard not in pending:
                pending[shard] = _ShardChanges()
                heapq.heappush(ends, (id_range(os.path.join(folder, shard))[1], shard))
            changes = pending[shard]
            changes.drop.append(row_id)
            if change == RETOUCHED:
                changes.retouched[row_id] = tuple(fields)
            elif change == CHANGED:
                replacement = replacements.get(row_id)
                if replacement is not None:  # else it failed to decode
                    changes.add_new_row(*replacement[1:])
        while ends:
            self._patch_shard(heapq.heappop(ends)[1], pending)
        self.store.save()

    def _patch_shard(self, shard: str, pending: dict[str, _ShardChanges]) -> None:
        changes = pending.pop(shard)
        table = pq.read_table(os.path.join(self.store.split_dir(self.split), shard)).cast(self.schema)
        keep = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(changes.drop, pa.string()))))
        new_rows = pa.Table.from_batches([batch.take(pa.array(numbers, pa.int64())) for batch, numbers in changes.new_rows],
                                         schema=self.schema)
        patched = pa.concat_tables([keep, new_rows, self._retouch(table, changes.retouched)])
        failed = self.store.split_info(self.split)["failed"]
        for row_id in new_rows.column("id").to_pylist():
            failed.pop(row_id, None)
        if patched.num_rows:
            self.store.write_shard(self.split, patched, name=shard)
        else:
            self.store.delete_shard(self.split, shard)

    def _retouch(self, table: pa.Table, retouched: dict[str, tuple]) -> pa.Table:
        """Old rows with the new path, label and fingerprint of files whose bytes did not change."""
        rows = table.filter(pc.is_in(table.column("id"), pa.array(list(retouched), pa.string())))
        values = zip(*(retouched[row_id] for row_id in rows.column("id").to_pylist()))
        for name, column in zip(("path", "label", "size", "mtime_ns"), values):
            index = self.schema.get_field_index(name)
            rows = rows.set_column(index, self.schema.field(index), pa.array(column, self.schema.field(index).type))
        return rows


# ---- runner -------------------------------------------------------------------------------------
class WorkerDied(Exception):
    """A DataLoader worker process vanished (OOM kill, a crashing decoder)."""


def _batches(model: ClipModel, source, items, start: int, batch_size: int, workers: int, prefetch: int, model_busy):
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
            loader = _batches(model, source, items, start, 1 if isolating else batch_size,
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


def encode(source: str, store_dir: str, split: str, model: str = DEFAULT_MODEL, batch_size: int | None = None,
           workers: int | None = None, device: str = "auto", precision: str | None = None,
           dtype: str | None = None, shard_rows: int = DEFAULT_SHARD_ROWS, progress: bool = True) -> dict[str, Any]:
    """Make split SPLIT of the store at STORE_DIR hold exactly the embeddings of SOURCE's images."""
    check_split_name(split)
    if batch_size is not None and batch_size < 1:
        raise FeatstoreError("--batch-size must be at least 1")
    if shard_rows < 1:
        raise FeatstoreError("--shard-rows must be at least 1")
    if workers is not None and workers < 0:
        raise FeatstoreError("--workers must be 0 or more")
    if dtype is not None and dtype not in DTYPES:
        raise FeatstoreError(f"unknown --dtype {dtype!r}: use float16 or float32")
    store = Store(store_dir)
    store.check_unlocked()  # fail at once, before loading a model, when another writer runs
    if store.exists and dtype is not None and dtype != store.manifest["dtype"]:
        raise FeatstoreError(f"store {store.root} holds {store.manifest['dtype']} embeddings, not {dtype}")
    src = open_source(source, split)
    clip_model = load_model(model, device, precision)
    if store.exists and not same_model(store.manifest["model"], clip_model.identity):
        raise FeatstoreError(
            f"store {store.root} holds embeddings of {describe(store.manifest['model'])}; "
            f"this run would use {describe(clip_model.identity)}: use another --store"
        )
    started = time.perf_counter()
    with store.lock("featstore encode"):
        if not store.exists:
            store.create(clip_model.identity, dtype or "float16")
        repairs = store.reconcile(split)
        store.split_info(split)["source"] = src.spec
        label_ids = store.class_ids(src.classes())
        from tqdm import tqdm

        with tqdm(src.iter_items(), unit=" files", desc="plan", disable=not progress, file=sys.stderr) as listing:
            plan = make_plan(store, split, listing, src, label_ids)  # long on reruns of many millions of files
        with contextlib.ExitStack() as cleanup:  # spill files go however the run ends
            cleanup.callback(plan.discard)
            writer = ShardWriter(store, split, plan, label_ids, shard_rows)
            cleanup.callback(writer.discard)
            workers = default_workers(clip_model.device) if workers is None else workers
            batch_size = batch_size or default_batch_size(clip_model.device)
            run_pipeline(clip_model, src, plan.to_encode, writer, batch_size, workers, progress)
            writer.close()
        compacted = 0
        if writer.shards_written:  # new shards may have added a sorted run; patches never do
            compacted = compact_split(store, split, AUTO_KEEP, shard_rows, progress, when_over=AUTO_RUNS)["rows_rewritten"]
    seconds = time.perf_counter() - started
    info = store.split_info(split)
    encoded = writer.encoded
    return {
        "split": split,
        "store": store.root,
        "model": describe(store.manifest["model"]),
        "random_weights": bool(store.manifest["model"].get("random_weights")),
        "rows": sum(r["rows"] for r in info["shards"].values()),
        "encoded": encoded,
        "replaced": plan.counts[CHANGED],
        "unchanged": plan.unchanged,
        "removed": plan.counts[REMOVED],
        "failed": len(info["failed"]),
        "new_failures": len(plan.to_encode) - encoded,
        "shards": len(info["shards"]),
        "shards_written": writer.shards_written,
        "compacted": compacted,
        "seconds": round(seconds, 3),
        "img_per_s": round(len(plan.to_encode) / seconds, 2) if seconds > 0 else None,
        "repairs": repairs,
    }
