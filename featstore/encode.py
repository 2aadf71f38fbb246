"""``featstore encode``: plan → reader → mapper → writer, driven by ``encode``.

- plan: walk the source's listing and the split's rows together in id order, comparing fingerprints; only
  new or changed items are read, and they wait in a spill file, so memory does not grow with the source.
- reader: a torch DataLoader whose workers read, hash and preprocess images (bad files become failures).
- mapper: the model's ``encode_image`` (raw, unnormalised outputs).
- writer: buffers rows and commits shards on a background thread, then patches shards whose rows
  changed or vanished, each by an atomic replace.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import select
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from featstore.errors import FeatstoreError
from featstore.identity import describe, same_model
from featstore.models import DEFAULT_MODEL, ClipModel, load_model
from featstore.sources import PLAN_BATCH, Item, open_source
from featstore.store import DTYPES, Store, check_split_name, shard_schema

DEFAULT_SHARD_ROWS = 50_000


# ---- plan ---------------------------------------------------------------------------------------
class SpilledItems:
    """The items a run must encode, spilled to an Arrow IPC file as the plan finds them and read back a
    batch at a time (in each process that reads them): a run holds a few batches of Items, not one per file.

    The file lives in the split's folder as ``.plan-*.tmp``, which plain Parquet readers skip and the next
    writer's ``reconcile`` removes if a crash left it."""

    SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.string()),
                        ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sha256", pa.string())])

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f".plan-{uuid.uuid4().hex[:8]}.tmp")
        self._sink = pa.ipc.new_file(self.path, self.SCHEMA)
        self._pending: list[Item] = []
        self._count = 0
        self._reader = self._pid = None
        self._cached: tuple[int, list[Item]] = (-1, [])

    def append(self, item: Item) -> None:
        self._pending.append(item)
        self._count += 1
        if len(self._pending) == PLAN_BATCH:
            self._flush()

    def _flush(self) -> None:
        columns = zip(*((it.id, it.path, it.label, it.size, it.mtime_ns, it.sha256) for it in self._pending))
        self._sink.write_batch(pa.record_batch(list(map(list, columns)), schema=self.SCHEMA))
        self._pending = []

    def close(self) -> None:
        """No more items: what follows reads."""
        if self._pending:
            self._flush()
        self._sink.close()

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> Item:
        number, offset = divmod(i, PLAN_BATCH)
        if self._cached[0] != number:
            if self._pid != os.getpid():  # a forked DataLoader worker opens its own reader
                self._reader, self._pid = pa.ipc.open_file(pa.OSFile(self.path)), os.getpid()
            rows = self._reader.get_batch(number).to_pydict()
            self._cached = (number, [Item(*row) for row in zip(*rows.values())])
        return self._cached[1][offset]

    def __getstate__(self) -> dict:  # spawned workers (not forked) get a reader of their own too
        return {**self.__dict__, "_sink": None, "_reader": None, "_pid": None, "_cached": (-1, [])}


@dataclass
class Plan:
    """What a run must do to make the split equal to the source."""

    to_encode: SpilledItems | list[Item] = field(default_factory=list)
    unchanged: int = 0
    kept_failures: int = 0
    old_shard: dict[str, str] = field(default_factory=dict)  # changed id -> shard holding its old row
    removed: dict[str, set[str]] = field(default_factory=dict)  # shard -> ids gone from the source
    retouched: dict[str, dict[str, Item]] = field(default_factory=dict)  # same bytes, new fingerprint

    def shards_to_patch(self) -> set[str]:
        return set(self.old_shard.values()) | set(self.removed) | set(self.retouched)


def stored_rows(store: Store, split: str, hashes: bool) -> Iterator[tuple]:
    """(id, shard, size, mtime_ns, sha256 or None without HASHES, label) of every stored row of the split,
    in id order, streamed from the shards (``Store.iter_rows``); the sha256 column is read only when the
    source lists hashes (archives)."""
    if hashes:
        return store.iter_rows(split, ["size", "mtime_ns", "sha256", "label"])
    return ((row_id, shard, size, mtime_ns, None, label)
            for row_id, shard, size, mtime_ns, label in store.iter_rows(split, ["size", "mtime_ns", "label"]))


def make_plan(store: Store, split: str, items: Iterator[Item], source, label_ids: dict[str, int]) -> Plan:
    """Walk the source's items and the split's stored rows together, both in id order, sorting each item
    into new, changed, re-fingerprinted or unchanged, and each row no item matched into removed. Files whose
    size or mtime changed are hashed after the walk, against their shard's stored sha256."""
    plan = Plan(to_encode=SpilledItems(store.split_dir(split)))
    failed = store.split_info(split)["failed"]
    listed_failures = set()
    suspects: dict[str, dict[str, Item]] = {}  # shard -> items whose fingerprint changed
    previous = None
    try:
        rows = stored_rows(store, split, source.lists_hashes)
        row = next(rows, None)
        for item in items:
            if previous is not None and item.id <= previous:
                raise FeatstoreError(f"source {source.spec} lists {item.id!r} " + ("twice" if item.id == previous else "out of order"))
            previous = item.id
            while row is not None and row[0] < item.id:
                plan.removed.setdefault(row[1], set()).add(row[0])
                row = next(rows, None)
            if item.id in failed:
                listed_failures.add(item.id)
            if row is None or row[0] != item.id:
                record = failed.get(item.id)
                if record and (record["size"], record["mtime_ns"], record.get("sha256")) == (item.size, item.mtime_ns, item.sha256):
                    plan.kept_failures += 1  # retried only once the file changes
                else:
                    plan.to_encode.append(item)
                continue
            (_, shard, size, mtime_ns, sha, old_label), row = row, next(rows, None)
            if item.sha256 is None and (size, mtime_ns) != (item.size, item.mtime_ns):
                suspects.setdefault(shard, {})[item.id] = item
                continue
            same = item.sha256 == sha if item.sha256 is not None else True
            label = label_ids.get(item.label) if item.label is not None else None
            _sort_matched(plan, item, shard, same_bytes=same, same_fingerprint=same, same_label=label == old_label)
        while row is not None:
            plan.removed.setdefault(row[1], set()).add(row[0])
            row = next(rows, None)
        for shard, group in suspects.items():
            stored = pq.read_table(os.path.join(store.split_dir(split), shard), columns=["id", "sha256"])
            for row_id, sha in zip(*(column.to_pylist() for column in stored.columns)):
                if row_id in group:
                    item = group[row_id]
                    same = _file_sha256(source, item) == sha
                    _sort_matched(plan, item, shard, same_bytes=same, same_fingerprint=False, same_label=True)
        for row_id in [r for r in failed if r not in listed_failures]:
            del failed[row_id]
    except BaseException:
        plan.to_encode.close()
        plan.to_encode.discard()
        raise
    plan.to_encode.close()
    return plan


def _sort_matched(plan: Plan, item: Item, shard: str, same_bytes: bool, same_fingerprint: bool, same_label: bool) -> None:
    """An item that has a stored row: re-encode it, update the row's metadata, or leave it."""
    if not same_bytes:
        plan.to_encode.append(item)
        plan.old_shard[item.id] = shard
    elif not same_fingerprint or not same_label:
        plan.retouched.setdefault(shard, {})[item.id] = item
    else:
        plan.unchanged += 1


def _file_sha256(source, item: Item) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(source.read(item)).hexdigest()
    except OSError:
        return None


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
class ShardWriter:
    """Turns encoded batches into committed shards, on one background thread so the model never waits
    for Parquet; rows of changed items wait in a spill file and are patched into their old shard at the end
    (a reader never sees an id twice), so a night that changes every file holds no embedding per file."""

    def __init__(self, store: Store, split: str, plan: Plan, label_ids: dict[str, int], shard_rows: int):
        self.store, self.split, self.plan, self.label_ids = store, split, plan, label_ids
        self.shard_rows = shard_rows
        self.schema = shard_schema(store.dim, store.manifest["dtype"], store.manifest["model"])
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.failures: dict[str, dict] = {}
        self.replacement_spill = os.path.join(store.split_dir(split), f".replace-{uuid.uuid4().hex[:8]}.tmp")
        self._replacement_sink = None  # an Arrow IPC file, opened at the first changed item
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
        for item, reason in failures:
            self.failures[item.id] = {"path": item.path, "reason": reason, "size": item.size,
                                      "mtime_ns": item.mtime_ns, "sha256": item.sha256}
        if not items:
            return
        table = self.rows(items, embeddings, shas)
        self.encoded += len(items)
        moved = pa.array([it.id in self.plan.old_shard for it in items])
        if self.plan.old_shard and pc.any(moved).as_py():
            if self._replacement_sink is None:
                self._replacement_sink = pa.ipc.new_file(self.replacement_spill, self.schema)
            self._replacement_sink.write_table(table.filter(moved))
        fresh = table.filter(pc.invert(moved))
        self.buffer.append(fresh)
        self.buffered += fresh.num_rows
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
            self._patch()
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the replacement spill (the next writer's ``reconcile`` would, after a crash)."""
        if self._replacement_sink is not None:
            self._replacement_sink.close()
            self._replacement_sink = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.replacement_spill)

    def _spilled_replacements(self) -> pa.Table:
        """The changed items' new rows, memory-mapped from the spill (read a shard's worth at a time)."""
        if self._replacement_sink is None:
            return self.schema.empty_table()
        self._replacement_sink.close()
        self._replacement_sink = None
        return pa.ipc.open_file(pa.memory_map(self.replacement_spill)).read_all()

    def _patch(self) -> None:
        replacements = self._spilled_replacements()
        new_rows_of: dict[str, list[int]] = {}  # old shard -> its replacement rows' numbers in the spill
        number = 0
        for batch in replacements.to_batches():
            for row_id in batch.column(0).to_pylist():
                new_rows_of.setdefault(self.plan.old_shard[row_id], []).append(number)
                number += 1
        changed: dict[str, set[str]] = {}  # shard -> ids whose old row it holds
        for row_id, shard in self.plan.old_shard.items():
            changed.setdefault(shard, set()).add(row_id)
        failed = self.store.split_info(self.split)["failed"]
        for shard in sorted(self.plan.shards_to_patch()):
            path = os.path.join(self.store.split_dir(self.split), shard)
            table = pq.read_table(path).cast(self.schema)
            retouched = self.plan.retouched.get(shard, {})
            drop = self.plan.removed.get(shard, set()) | changed.get(shard, set()) | set(retouched)
            keep = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(sorted(drop), pa.string()))))
            new_rows = replacements.take(pa.array(new_rows_of.get(shard, []), pa.int64()))
            touched = self._retouch(table, retouched)
            patched = pa.concat_tables([keep, new_rows, touched])
            for row_id in new_rows.column("id").to_pylist():
                failed.pop(row_id, None)
            if patched.num_rows:
                self.store.write_shard(self.split, patched, name=shard)
            else:
                self.store.delete_shard(self.split, shard)
        self.store.save()

    def _retouch(self, table: pa.Table, items: dict[str, Item]) -> pa.Table:
        """Old rows with the new fingerprint and label of files whose bytes did not change."""
        if not items:
            return self.schema.empty_table()
        rows = table.filter(pc.is_in(table.column("id"), pa.array(sorted(items), pa.string()))).to_pylist()
        for row in rows:
            item = items[row["id"]]
            row.update(size=item.size, mtime_ns=item.mtime_ns, path=item.path,
                       label=self.label_ids.get(item.label) if item.label is not None else None)
        return pa.Table.from_pylist(rows, schema=self.schema)


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


def _heap_trimmer():
    """glibc's malloc_trim, or a no-op where there is none.

    glibc raises its mmap threshold to the size of the first large block freed, so every later batch's
    tensors come from the heap, and freed heap pages between live small blocks stay resident: without a trim
    encode's RSS grew with the number of batches (measured ~3-5 KiB per image) instead of staying bounded."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


TRIM_EVERY = 8  # batches between heap trims (a trim and the page faults after it cost ~ms; a batch ~0.5 s)


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

    trim_heap, batches = _heap_trimmer(), 0
    # with CPU workers, decoding fills the model's pauses instead of competing with its threads (see ItemDataset)
    model_busy = ModelBusy() if model.device.type == "cpu" and workers else None
    window = batch_size * max(1, workers) * 4  # what was in flight when a worker died
    done = isolate_until = 0  # batches arrive in order, so items[:done] are written or recorded as failed
    closing = contextlib.closing(model_busy) if model_busy is not None else contextlib.nullcontext()
    with closing, tqdm(total=len(items), unit="img", desc="encode", disable=not progress, file=sys.stderr) as bar:
        while done < len(items):
            start, isolating = done, done < isolate_until
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
                    batches += 1
                    if batches % TRIM_EVERY == 0:
                        trim_heap()
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
        writer = ShardWriter(store, split, plan, label_ids, shard_rows)
        try:
            workers = default_workers(clip_model.device) if workers is None else workers
            batch_size = batch_size or default_batch_size(clip_model.device)
            run_pipeline(clip_model, src, plan.to_encode, writer, batch_size, workers, progress)
            writer.close()
        finally:
            plan.to_encode.discard()
            writer.discard()
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
        "replaced": len(plan.old_shard),
        "unchanged": plan.unchanged,
        "removed": sum(len(v) for v in plan.removed.values()),
        "failed": len(info["failed"]),
        "new_failures": len(plan.to_encode) - encoded,
        "shards": len(info["shards"]),
        "shards_written": writer.shards_written,
        "seconds": round(seconds, 3),
        "img_per_s": round(len(plan.to_encode) / seconds, 2) if seconds > 0 else None,
        "repairs": repairs,
    }
