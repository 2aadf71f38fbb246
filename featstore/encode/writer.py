"""The writer: turns encoded batches into committed shards and applies the plan's changes where it made them.

The only code that lays rows out on disk (with ``featstore.store``'s atomic shard commits): new rows are
buffered into shards of ``shard_rows``; rows of changed items wait in a spill file and are patched into their
old shard at the end, one shard at a time, so a plain Parquet reader never sees an id twice.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featstore.encode.plan import CHANGED, RETOUCHED, Plan, Spill, failure
from featstore.sources import Item
from featstore.store import Failure, Store, id_range, read_shard, shard_schema
from featstore.store.merge import InOrder


@dataclass
class _ShardChanges:
    """What the patch does to one shard: ids whose old row goes, rows of the replacement spill that come in,
    and new (path, label, size, mtime_ns) of rows that stay. A changed file whose new bytes failed is none of
    these: its old row stays as it is."""

    drop: list[str] = field(default_factory=list)
    new_rows: list[tuple[pa.RecordBatch, list[int]]] = field(default_factory=list)  # spill batch, row numbers
    retouched: dict[str, tuple] = field(default_factory=dict)

    def add_new_row(self, batch: pa.RecordBatch, number: int) -> None:
        if self.new_rows and self.new_rows[-1][0] is batch:
            self.new_rows[-1][1].append(number)
        else:
            self.new_rows.append((batch, [number]))


NOT_FINITE = "the model's embedding is not finite (NaN or inf in the stored type)"


class ShardWriter:
    """Turns encoded batches into committed shards, on one background thread so the model never waits
    for Parquet. Rows of changed items wait in a spill file and are patched into their old shard at the end
    (a reader never sees an id twice); the patch walks the plan's changes and that spill together in id order
    and rewrites each shard as soon as the walk has passed its last id, holding one shard's changes at a time
    (one per sorted run of shards)."""

    def __init__(self, store: Store, split: str, plan: Plan, label_ids: dict[str, int], shard_rows: int):
        self.store, self.split, self.plan, self.label_ids = store, split, plan, label_ids
        self.shard_rows = shard_rows
        self.schema = shard_schema(store.dim, store.manifest.dtype, store.manifest.model)
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.failures: dict[str, Failure] = {}
        self.replacements = Spill(store.split_dir(split), "replace", self.schema)
        self._changed = InOrder(row for row in plan.changes if row[2] == CHANGED)  # in id order
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="featstore-writer")
        self.pending: list[concurrent.futures.Future] = []
        self.shards_written = 0
        self.encoded = 0
        self.stale = 0  # changed files whose new bytes failed: their old rows were kept

    @property
    def dtype(self) -> type:
        return np.float16 if self.store.manifest.dtype == "float16" else np.float32

    def rows(self, items: list[Item], embeddings: np.ndarray, shas: list[str]) -> pa.Table:
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=self.dtype).reshape(-1))
        now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
        table = pa.table(
            {
                "id": [it.id for it in items],
                "path": [it.path for it in items],
                "label": pa.array([self.label_ids.get(it.label) if it.label is not None else None for it in items], pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, self.store.dim),
                "size": pa.array([it.size for it in items], pa.int64()),
                "mtime_ns": pa.array([it.mtime_ns for it in items], pa.int64()),
                "sha256": shas,
                "encoded_at": pa.array([now.value] * len(items), pa.timestamp("ms", tz="UTC")),
                "caption": [it.caption for it in items],
                "key": pa.nulls(len(items), pa.int64()),
            },
            schema=self.schema,
        )
        return self.store.give_keys(self.split, table)

    def add(self, items: list[Item], embeddings: np.ndarray, shas: list[str], failures: list[tuple[Item, str]]) -> None:
        """Rows of encoded ITEMS, which come in id order (the plan's order)."""
        for item, reason in failures:
            self.failures[item.id] = failure(item, reason)
        if not items:
            return
        with np.errstate(over="ignore"):  # a value past float16's range becomes inf, refused just below
            finite = np.isfinite(np.asarray(embeddings, dtype=self.dtype)).all(axis=1)  # in the stored type
        if not finite.all():  # a reader would refuse the shard: the image fails instead
            for item in (item for item, ok in zip(items, finite) if not ok):
                self.failures[item.id] = failure(item, NOT_FINITE)
            keep = np.flatnonzero(finite)
            items, embeddings, shas = [items[i] for i in keep], embeddings[keep], [shas[i] for i in keep]
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

    def _commit(self, table: pa.Table, failures: dict[str, Failure]) -> None:
        failed = self.store.split_info(self.split).failed
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
            replacement = replacements.get(row_id) if change == CHANGED else None
            if change == CHANGED and replacement is None:
                # its new bytes failed to read or decode: the old row stays, stale, beside its failure record,
                # and the next run tries the file again (its fingerprint is not the row's)
                self.stale += 1
                continue
            if shard not in pending:
                pending[shard] = _ShardChanges()
                heapq.heappush(ends, (id_range(os.path.join(folder, shard))[1], shard))
            changes = pending[shard]
            changes.drop.append(row_id)
            if change == RETOUCHED:
                changes.retouched[row_id] = tuple(fields)
            elif replacement is not None:
                changes.add_new_row(*replacement[1:])
        while ends:
            self._patch_shard(heapq.heappop(ends)[1], pending)
        self.store.save()

    def _patch_shard(self, shard: str, pending: dict[str, _ShardChanges]) -> None:
        changes = pending.pop(shard)
        table = read_shard(os.path.join(self.store.split_dir(self.split), shard), schema=self.schema)
        keep = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(changes.drop, pa.string()))))
        new_rows = pa.Table.from_batches([batch.take(pa.array(numbers, pa.int64())) for batch, numbers in changes.new_rows],
                                         schema=self.schema)
        patched = self.store.give_keys(self.split, pa.concat_tables([keep, new_rows, self._retouch(table, changes.retouched)]))
        failed = self.store.split_info(self.split).failed
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
        for name, column in zip(("path", "label", "size", "mtime_ns", "caption"), values):
            index = self.schema.get_field_index(name)
            rows = rows.set_column(index, self.schema.field(index), pa.array(column, self.schema.field(index).type))
        return rows
