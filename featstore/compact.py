"""``featstore compact``: merge a split's sorted runs of shards into fewer, so reruns hold fewer read batches.

Each encode that adds ids among the stored ones leaves its new shards as one more sorted run (shards whose id
ranges follow one another). A rerun walks the split in id order by merging its runs, holding a Parquet reader
and a batch for each (0.4 MiB: bench/runs_bench.py), so a split that gains a run every night would hold a year
of them. Compaction rewrites the smallest runs' rows as one run, in id order, and swaps them in with the
split's folder (``Store.rewrite_shards``: one atomic exchange, so plain Parquet readers never see a row
twice); the largest runs' shards are kept as they are (hard-linked). ``encode`` compacts on its own once a
split has more than ``AUTO_RUNS`` runs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterator

import pyarrow as pa

from featstore.errors import FeatstoreError
from featstore.store import DEFAULT_SHARD_ROWS, Store, conform, run_batches, shard_schema
from featstore.store.merge import merge_sorted

AUTO_RUNS = 16  # encode compacts a split that has more runs than this...
AUTO_KEEP = 8  # ...down to this many (merging the smallest: a row is rewritten a few times in its life, not nightly)
FAN_IN = 32  # runs merged in one pass, each holding a reader and a batch; more runs take more passes
MERGE_ROWS = 4096  # rows of read batches across the merged runs (a list column's reader holds ~5x its batch)


def compact(store_dir: str, split: str | None = None, max_runs: int = 1, shard_rows: int = DEFAULT_SHARD_ROWS,
            progress: bool = True) -> dict[str, Any]:
    """Leave every split of the store (or SPLIT) with at most MAX_RUNS sorted runs of shards."""
    if max_runs < 1:
        raise FeatstoreError("--max-runs must be at least 1")
    if shard_rows < 1:
        raise FeatstoreError("--shard-rows must be at least 1")
    store = Store.open(store_dir)
    started = time.perf_counter()
    with store.lock("featstore compact"):
        splits = [split] if split is not None else sorted(store.manifest.splits)
        for name in splits:
            store.split_info(name)  # an unknown split is refused before any work
        results = {}
        for name in splits:
            repairs = store.reconcile(name)
            results[name] = {**compact_split(store, name, max_runs, shard_rows, progress), "repairs": repairs}
    return {"store": store.root, "splits": results, "seconds": round(time.perf_counter() - started, 3)}


def compact_split(store: Store, split: str, max_runs: int, shard_rows: int, progress: bool = False,
                  when_over: int = 0) -> dict[str, Any]:
    """Merge the split's smallest sorted runs until at most MAX_RUNS remain, if it has more than WHEN_OVER
    (writers only, under the lock)."""
    runs = store.sorted_runs(split)
    before, rewritten = len(runs), 0
    while before > when_over and len(runs) > max_runs:
        shards = store.shards(split)
        rows = [sum(shards[os.path.basename(path)].rows for path in run) for run in runs]
        order = sorted(range(len(runs)), key=rows.__getitem__)
        smallest = [runs[number] for number in order[:min(FAN_IN, len(runs) - max_runs + 1)]]
        rewritten += _merge(store, split, smallest, shard_rows, progress)
        runs = store.sorted_runs(split)
    return {"runs_before": before, "runs": len(runs), "rows_rewritten": rewritten, "shards": len(store.shards(split))}


def _merge(store: Store, split: str, runs: list[list[str]], shard_rows: int, progress: bool) -> int:
    """Rewrite the rows of RUNS as one sorted run of SHARD_ROWS-row shards; returns the rows rewritten."""
    from tqdm import tqdm

    schema = shard_schema(store.dim, store.manifest.dtype, store.manifest.model)
    dropped = {os.path.basename(path) for run in runs for path in run}
    total = sum(store.shards(split)[name].rows for name in dropped)
    with store.rewrite_shards(split, dropped) as write, \
            tqdm(total=total, unit=" rows", desc="compact", disable=not progress, file=sys.stderr) as bar:
        for table in _merged(runs, max(64, MERGE_ROWS // len(runs)), shard_rows, schema):
            write(store.give_keys(split, table))  # rows of shards written before keys get theirs here
            bar.update(table.num_rows)
            del table
            pa.default_memory_pool().release_unused()  # else the allocator keeps every shard's pages
    return total


def _merged(runs: list[list[str]], batch_rows: int, shard_rows: int, schema: pa.Schema) -> Iterator[pa.Table]:
    """The rows of RUNS in id order, SHARD_ROWS at a time. A merge of their ids picks the rows; each read batch's
    picked rows are taken with one ``take`` once the merge has left the batch (or the shard is full), so a
    merge holds one batch per run and the shard being filled (``write_parquet`` sorts the taken pieces)."""

    def keyed(number: int, run: list[str]) -> Iterator[tuple[str, int, pa.RecordBatch, int]]:
        for _, batch in run_batches(run, None, batch_rows):
            yield from ((row_id, number, batch, row) for row, row_id in enumerate(batch.column(0).to_pylist()))

    pieces: list[pa.Table] = []  # rows taken for the shard being filled
    picked: dict[int, tuple[pa.RecordBatch, list[int]]] = {}  # run -> (its current batch, rows picked from it)

    def take(run: int) -> None:
        batch, rows = picked.pop(run)
        pieces.append(conform(pa.Table.from_batches([batch.take(pa.array(rows, pa.int64()))]), schema))

    count = 0
    for _, run, batch, row in merge_sorted(keyed(n, run) for n, run in enumerate(runs)):
        if run in picked and picked[run][0] is not batch:
            take(run)  # the merge has left that batch for good
        picked.setdefault(run, (batch, []))[1].append(row)
        count += 1
        if count == shard_rows:
            for held in list(picked):
                take(held)
            yield pa.concat_tables(pieces)
            pieces, count = [], 0
    for held in list(picked):
        take(held)
    if pieces:
        yield pa.concat_tables(pieces)
