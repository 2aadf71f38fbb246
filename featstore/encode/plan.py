"""What an encode must do: walk the source's listing and the split's rows together in id order.

Each listed item is new, changed (re-encode it and replace its row), re-fingerprinted (same bytes, new size,
mtime or label: update the row) or unchanged; each stored row no item matched is removed. The items to encode
and the rows to change are spilled to files as the walk finds them, both in id order, so memory grows with
neither the source nor the night's changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa

from featstore.errors import FeatstoreError
from featstore.sources import PLAN_BATCH, Item
from featstore.sources.folder import os_reason
from featstore.store import Failure, Store
from featstore.store.merge import InOrder

# a plan removing more than this share of a split's rows, and more than this many, needs allow_removals
MASS_REMOVAL_SHARE, MASS_REMOVAL_ROWS = 0.25, 100
REMOVED, CHANGED, RETOUCHED = 0, 1, 2  # what happens to a stored row (``Spill`` of ``CHANGES``)
CHANGES = pa.schema([("id", pa.string()), ("shard", pa.string()), ("change", pa.int8()),
                     ("path", pa.string()), ("label", pa.int32()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                     ("caption", pa.string())])


class Spill:
    """Rows appended one at a time, kept in an Arrow IPC file and read back a batch at a time: a run holds a
    few batches of them, not one row per file.

    The file lives in the split's folder as ``.NAME-*.tmp``, which plain Parquet readers skip and the next
    writer's ``reconcile`` removes if a crash left it."""

    def __init__(self, folder: str, name: str, schema: pa.Schema):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f".{name}-{uuid.uuid4().hex[:8]}.tmp")
        self.schema = schema
        self._sink = pa.ipc.new_file(self.path, schema)
        self._pending: list[tuple] = []
        self._count = 0

    def append(self, row: tuple) -> None:
        self._pending.append(row)
        self._count += 1
        if len(self._pending) == PLAN_BATCH:
            self._flush()

    def write(self, table: pa.Table) -> None:
        """Append a table's rows (in the spill's schema) at once."""
        self._flush()
        self._sink.write_table(table)
        self._count += table.num_rows

    def _flush(self) -> None:
        if self._pending:
            columns = [list(column) for column in zip(*self._pending)]
            self._sink.write_batch(pa.record_batch(columns, schema=self.schema))
            self._pending = []

    def close(self) -> None:
        """No more rows: what follows reads."""
        if self._sink is not None:
            self._flush()
            self._sink.close()
            self._sink = None

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __len__(self) -> int:
        return self._count

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The rows a record batch at a time, in the order they were appended (after ``close``). Read, not
        memory-mapped, so pages already passed do not stay resident."""
        with pa.OSFile(self.path) as file:
            reader = pa.ipc.open_file(file)
            for number in range(reader.num_record_batches):
                yield reader.get_batch(number)

    def __iter__(self) -> Iterator[tuple]:
        """The rows as tuples."""
        for batch in self.batches():
            yield from zip(*(column.to_pylist() for column in batch.columns))


class SpilledItems(Spill):
    """The items a run must encode, in id order, indexable in every process that reads them (the DataLoader's
    workers open readers of their own)."""

    SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.string()),
                        ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sha256", pa.string()),
                        ("caption", pa.string())])  # Item's fields by name (any order)

    def __init__(self, folder: str):
        super().__init__(folder, "plan", self.SCHEMA)
        self._reader = self._pid = None
        self._cached: tuple[int, list[Item]] = (-1, [])

    def append(self, item: Item) -> None:
        super().append(tuple(getattr(item, name) for name in self.SCHEMA.names))

    def __getitem__(self, i: int) -> Item:
        number, offset = divmod(i, PLAN_BATCH)
        if self._cached[0] != number:
            if self._pid != os.getpid():  # a forked DataLoader worker opens its own reader
                self._reader, self._pid = pa.ipc.open_file(pa.OSFile(self.path)), os.getpid()
            rows = self._reader.get_batch(number).to_pydict()
            self._cached = (number, [Item(**dict(zip(rows, row))) for row in zip(*rows.values())])
        return self._cached[1][offset]

    def __getstate__(self) -> dict:  # spawned workers (not forked) get a reader of their own too
        return {**self.__dict__, "_sink": None, "_reader": None, "_pid": None, "_cached": (-1, [])}


@dataclass
class Plan:
    """What a run must do to make the split equal to the source. ``changes`` holds a row per stored row to
    change, in id order: (id, shard, REMOVED | CHANGED | RETOUCHED, and for RETOUCHED its new path, label id,
    size, mtime_ns and caption)."""

    to_encode: SpilledItems | list[Item] = field(default_factory=list)
    changes: Spill | list[tuple] = field(default_factory=list)
    unchanged: int = 0
    kept_failures: int = 0
    new_failures: int = 0  # items the listing or hashing could not read, recorded as failures not recorded before
    counts: dict[int, int] = field(default_factory=lambda: {REMOVED: 0, CHANGED: 0, RETOUCHED: 0})

    def change(self, row_id: str, shard: str, change: int, item: Item | None = None, label: int | None = None) -> None:
        fields = (item.path, label, item.size, item.mtime_ns, item.caption) if change == RETOUCHED else (None,) * 5
        self.changes.append((row_id, shard, change, *fields))
        self.counts[change] += 1

    def discard(self) -> None:
        """Remove the spill files."""
        for spill in (self.to_encode, self.changes):
            if isinstance(spill, Spill):
                spill.discard()


def _stored_rows(store: Store, split: str, hashes: bool) -> Iterator[tuple]:
    """(id, shard, size, mtime_ns, sha256 or None without HASHES, label) of every stored row of the split,
    in id order, streamed from the shards (``Store.iter_rows``); the sha256 column is read only when the
    source lists hashes (archives)."""
    if hashes:
        return store.iter_rows(split, ["size", "mtime_ns", "sha256", "label"])
    return ((row_id, shard, size, mtime_ns, None, label)
            for row_id, shard, size, mtime_ns, label in store.iter_rows(split, ["size", "mtime_ns", "label"]))


def make_plan(store: Store, split: str, items: Iterator[Item], source, label_ids: dict[str, int],
              allow_removals: bool = False) -> Plan:
    """Walk the source's ITEMS and the split's stored rows together, both in id order. A file whose size or
    mtime changed is hashed as the walk meets it, against the stored sha256.

    Rows are never removed because a file or folder could not be read: an item with ``error`` (a folder's id
    ends with "/") and a changed file that cannot be hashed are recorded as failures and their rows kept.
    Without ALLOW_REMOVALS a plan that would empty the split from an empty listing, or remove more than
    ``MASS_REMOVAL_SHARE`` of its rows and more than ``MASS_REMOVAL_ROWS``, is refused before anything is
    written (see ``_check_removals``)."""
    folder = store.split_dir(split)
    plan = Plan(to_encode=SpilledItems(folder), changes=Spill(folder, "changes", CHANGES))
    failed = store.split_info(split).failed
    listed_failures = set()
    stored_hashes = InOrder(store.iter_rows(split, ["sha256"]))  # read only once a fingerprint changed
    previous = None
    try:
        rows = _stored_rows(store, split, source.lists_hashes)
        row = next(rows, None)
        for item in items:
            if previous is not None and item.id <= previous:
                raise FeatstoreError(f"source {source.spec} lists {item.id!r} " + ("twice" if item.id == previous else "out of order"))
            previous = item.id
            while row is not None and row[0] < item.id:
                plan.change(row[0], row[1], REMOVED)
                row = next(rows, None)
            if item.id in failed:
                listed_failures.add(item.id)
            if item.error is not None:  # recorded; the stored rows it may hide (a folder's: "id/...") are kept
                plan.new_failures += _record_failure(failed, item, item.error)
                listed_failures.add(item.id)
                while row is not None and (row[0] == item.id or (item.id.endswith("/") and row[0].startswith(item.id))):
                    plan.unchanged += 1
                    row = next(rows, None)
                continue
            if row is None or row[0] != item.id:
                record = failed.get(item.id)
                if record and (record.size, record.mtime_ns, record.sha256) == (item.size, item.mtime_ns, item.sha256):
                    plan.kept_failures += 1  # retried only once the file changes
                else:
                    plan.to_encode.append(item)
                continue
            (_, shard, size, mtime_ns, sha, old_label), row = row, next(rows, None)
            failed.pop(item.id, None)  # listed whole again: a failure recorded while its row was kept is over
            label = label_ids.get(item.label) if item.label is not None else None
            if item.sha256 is not None:
                same_bytes = same_fingerprint = item.sha256 == sha
            elif (size, mtime_ns) == (item.size, item.mtime_ns):
                same_bytes = same_fingerprint = True
            else:
                stored = stored_hashes.get(item.id)
                try:
                    digest = hashlib.sha256(source.read(item)).hexdigest()
                except OSError as e:  # unreadable now, not gone: the row stays
                    plan.unchanged += 1
                    plan.new_failures += _record_failure(failed, item, os_reason(e))
                    listed_failures.add(item.id)
                    continue
                same_bytes, same_fingerprint = digest == (stored[2] if stored else None), False
            if not same_bytes:
                plan.to_encode.append(item)
                plan.change(item.id, shard, CHANGED)
            elif not same_fingerprint or label != old_label:
                plan.change(item.id, shard, RETOUCHED, item, label)
            else:
                plan.unchanged += 1
        while row is not None:
            plan.change(row[0], row[1], REMOVED)
            row = next(rows, None)
        if not allow_removals:
            _check_removals(plan, source, split, listed=previous is not None)
        for row_id in [r for r in failed if r not in listed_failures]:
            del failed[row_id]
    except BaseException:
        plan.discard()
        raise
    plan.to_encode.close()
    plan.changes.close()
    return plan


def failure(item: Item, reason: str) -> Failure:
    """The failure record of ITEM, with its fingerprint (it is retried once the file changes)."""
    return Failure(item.path, reason, item.size, item.mtime_ns, item.sha256)


def _record_failure(failed: dict[str, Failure], item: Item, reason: str) -> bool:
    """Record ITEM's failure; whether it is new (no record with this reason before)."""
    old = failed.get(item.id)
    failed[item.id] = failure(item, reason)
    return old is None or old.reason != reason


def _check_removals(plan: Plan, source, split: str, listed: bool) -> None:
    """Refuse a plan that looks like a source gone missing rather than files deleted: a listing with no item
    at all on a split with rows, or removals of more than MASS_REMOVAL_SHARE of the split's rows and more
    than MASS_REMOVAL_ROWS rows. Nothing has been written yet; the caller discards the plan."""
    removed = plan.counts[REMOVED]
    rows = sum(plan.counts.values()) + plan.unchanged  # every stored row is removed, changed or kept
    if removed and not listed:
        raise FeatstoreError(f"source {source.spec} lists no images, and split {split!r} holds {rows} rows: refused, "
                             f"nothing was changed (an empty or unmounted source? --allow-removals empties the split)")
    if removed > MASS_REMOVAL_ROWS and removed > MASS_REMOVAL_SHARE * rows:
        raise FeatstoreError(f"this run would remove {removed} of the {rows} rows of split {split!r} (more than "
                             f"{MASS_REMOVAL_SHARE:.0%}): refused, nothing was changed (is part of source {source.spec} "
                             f"missing or unmounted? --allow-removals removes them)")
