"""Shard files: plain Parquet, sorted by id, page checksums on; written whole and fsynced, read back checked.

A shard that cannot be read (truncated, a failed page checksum, vanished), whose footer is not the one written
(``check_footer``) or that holds a null, NaN or inf embedding is refused as ``damaged``, with a line naming the
remedy; no reader serves its rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError
from featstore.store.files import sha256_file
from featstore.store.manifest import ShardStats

DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
ID_ORDER = [pq.SortingColumn(0)]  # every shard is sorted by id (column 0) and says so in its footer
# Columns with few distinct values get a dictionary; ids, paths, hashes, sizes, mtimes and embeddings are
# (nearly) all distinct, and a dictionary there (pyarrow's default) made a 50,000-row shard's writes 1.5x and
# its embedding reads 3.7x slower, for a file 5 % smaller (bench/shard_bench.py).
DICTIONARY_COLUMNS = ["label", "encoded_at"]
ROW_GROUP_ROWS = 8192  # pyarrow's default row group is the whole shard, whose column buffers a write holds at once
READ_ROWS = 4096  # rows per record batch when streaming embeddings (8 MiB of float32 at 512 dimensions)
WALK_ROWS = 1024  # rows per batch of a sorted run in ``run_rows``, held as Python objects (~0.2 KiB a row)
DEFAULT_SHARD_ROWS = 50_000
CAST_BY_TORCH = 1 << 16  # float16 values from which ``embedding_matrix`` casts with torch (``cast_rows``), when loaded


def write_parquet(table: pa.Table, path: str) -> ShardStats:
    """Write TABLE sorted by id (declared in the footer) and fsynced; what the manifest records of it."""
    table = sort_by_id(table)
    pq.write_table(table, path, sorting_columns=ID_ORDER, use_dictionary=DICTIONARY_COLUMNS,
                   row_group_size=ROW_GROUP_ROWS, write_page_checksum=True)  # CRCs that readers verify
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return ShardStats(table.num_rows, os.path.getsize(path), sha256_file(path), footer_sha256(path))


def footer_sha256(path: str) -> str | None:
    """The sha256 of a Parquet file's footer: its metadata (schema, row counts, page offsets, statistics),
    which page checksums do not cover, with the 8-byte trailer that gives its length. A few KB whatever the
    shard's size. None when the file is too short to hold the footer its trailer claims."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < 12:  # "PAR1" at each end and the footer's length
            return None
        f.seek(size - 8)
        length = int.from_bytes(f.read(4), "little")
        if length > size - 12:
            return None
        f.seek(size - 8 - length)
        return hashlib.sha256(f.read(length + 8)).hexdigest()


def shard_schema(dim: int, dtype: str, model: dict[str, Any]) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("path", pa.string()),
            pa.field("label", pa.int32()),
            pa.field("embedding", pa.list_(DTYPES[dtype], dim)),
            pa.field("size", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("sha256", pa.string()),
            pa.field("encoded_at", pa.timestamp("ms", tz="UTC")),
            pa.field("caption", pa.string()),  # webdataset .txt; shards written before it lack it (``conform``)
            pa.field("key", pa.int64()),  # the row's stable key (``Store.give_keys``); null in shards written before
        ],
        metadata={"featstore.model": json.dumps(model, sort_keys=True)},
    )


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """TABLE in SCHEMA's columns and types; a column a shard written before it existed lacks is all null."""
    for missing in [f for f in schema if f.name not in table.column_names]:
        table = table.append_column(missing.name, pa.nulls(table.num_rows, missing.type))
    return table.select(schema.names).cast(schema)


def embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A fixed_size_list column as a float32 (rows, dim) matrix, without per-row Python."""
    values = stored_matrix(column, dim)
    if values.dtype == np.float16 and values.size >= CAST_BY_TORCH and "torch" in sys.modules:
        import torch  # numpy's half cast takes ~20x torch's, but importing torch only for it costs ~0.5 GiB RSS

        out = np.empty(values.shape, np.float32)
        cast_rows(values, torch.from_numpy(out))
        return out
    return values.astype(np.float32, copy=False)


def stored_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A fixed_size_list column as a (rows, dim) matrix of its stored type (float16 in most stores), not cast:
    read-only, on Arrow's memory where it can be."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def cast_rows(values: np.ndarray, out) -> None:
    """VALUES (a ``stored_matrix``) into OUT, a float32 torch tensor of their shape, cast by torch (numpy's half
    cast took 3.5 ms a 4,096 x 512 block, torch's 0.2). A read-only matrix is copied first (~0.3 ms): torch warns
    of read-only memory, and silencing that (catch_warnings) would change every thread's warning filters."""
    import torch

    out.copy_(torch.from_numpy(np.require(values, requirements="W")))


class DamagedShard(FeatstoreError):
    """A shard that is not what the manifest recorded, or holds rows no reader may serve."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def damaged(path: str, why: str) -> DamagedShard:
    """The one-line refusal for shard PATH (``STORE/images/split=NAME/part-*.parquet``), naming the remedy."""
    folder = os.path.dirname(path)
    root, split = os.path.dirname(os.path.dirname(folder)), os.path.basename(folder).removeprefix("split=")
    why = " ".join(why.split())[:300]  # pyarrow's messages can span lines
    return DamagedShard(f"shard {os.path.relpath(path, root)} is damaged ({why}): run featstore verify {root}, "
                        f"then featstore encode into split {split} to repair it", why)


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """A shard that cannot be read (truncated, a failed page checksum, vanished) becomes ``damaged``."""
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        raise damaged(path, str(e)) from None


# Columns a shard written before they existed lacks (``conform`` fills them with nulls)
LATER_COLUMNS = {"caption", "key"}


def check_footer(path: str, rows: int | None, footer: str | None, schema: pa.Schema) -> None:
    """Refuse shard PATH (``damaged``) unless its footer is the one written: the recorded FOOTER sha256, or,
    for a shard recorded before footers were hashed, a footer declaring ROWS rows and SCHEMA's columns and
    types. Size and mtime, which readers trust, survive a byte flipped in place."""
    with reading(path):
        if footer is not None:
            if footer_sha256(path) != footer:
                raise damaged(path, "footer checksum mismatch")
            return
        meta = pq.read_metadata(path)
        found = {field.name: field.type for field in meta.schema.to_arrow_schema()}
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if meta.num_rows != rows or sum(groups) != rows:
        raise damaged(path, f"footer says {meta.num_rows} rows, {sum(groups)} in row groups, manifest says {rows}")
    expected = {field.name: field.type for field in schema}
    missing = expected.keys() - found.keys() - LATER_COLUMNS
    if missing or any(expected.get(name) != kind for name, kind in found.items()):
        raise damaged(path, "footer schema is not a shard's")


def check_embeddings(column: pa.ChunkedArray | pa.Array, path: str) -> None:
    """Refuse shard PATH when COLUMN has a null embedding or a NaN/inf value: such rows are never served."""
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        values = chunk.flatten()
        if chunk.null_count or values.null_count or not _finite(values.to_numpy()):
            raise damaged(path, "NaN, inf or null embeddings")


def _finite(values: np.ndarray) -> bool:
    """Whether every value is finite, from the exponent bits (all ones: inf or NaN). On float16, which numpy
    emulates, np.isfinite took 3.8 ms per 4,096 x 512 batch, as long as the cast to float32; this takes 0.2."""
    bits, exponent = {"float16": (np.uint16, 0x7C00), "float32": (np.uint32, 0x7F800000)}.get(values.dtype.name, (None, 0))
    if bits is None:
        return bool(np.isfinite(values).all())
    return not len(values) or int(np.bitwise_and(values.view(bits), exponent).max()) < exponent


def read_shard(path: str, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """A whole shard (COLUMNS of it, read as SCHEMA), its page checksums verified and its embeddings checked."""
    with reading(path):
        table = pq.read_table(path, columns=columns, schema=schema, page_checksum_verification=True)
    if "embedding" in table.column_names:
        check_embeddings(table.column("embedding"), path)
    return table


def sort_by_id(table: pa.Table) -> pa.Table:
    """TABLE's rows in id order (the order of shards, of ``read_split`` and of a source's listing); a table
    already in order is returned as it is, not copied."""
    order = pc.sort_indices(table, sort_keys=[("id", "ascending")])
    if order.equals(pa.array(np.arange(table.num_rows), order.type)):
        return table
    return table.take(order)


def id_range(path: str) -> tuple[str, str]:
    """The lowest and highest id in a shard, from its footer's statistics (or its id column without them)."""
    meta = pq.read_metadata(path)
    stats = [meta.row_group(i).column(0).statistics for i in range(meta.num_row_groups)]
    if all(s is not None and s.has_min_max for s in stats):
        return (min(s.min for s in stats), max(s.max for s in stats)) if stats else ("", "")
    ids = pq.read_table(path, columns=["id"]).column("id")
    bounds = pc.min_max(ids)
    return bounds["min"].as_py() or "", bounds["max"].as_py() or ""


def streaming_reader(path: str, buffer_size: int = 1 << 16) -> pq.ParquetFile:
    """A Parquet reader that streams pages through a BUFFER_SIZE buffer. pyarrow's default (``pre_buffer``)
    reads a row group's whole column chunks first: a 50,000-row shard's embeddings, ~50 MiB, per reader.
    Pages written with a checksum (every shard since checksums were written) are verified as they are read."""
    return pq.ParquetFile(path, buffer_size=buffer_size, pre_buffer=False, page_checksum_verification=True)


def run_batches(paths: list[str], columns: list[str] | None, batch_rows: int = READ_ROWS) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(shard name, record batch) of a sorted run's shards, in id order (COLUMNS after ``id``; all when None),
    BATCH_ROWS at a time. A shard written before shards were sorted is sorted in memory when its
    turn comes. Embeddings read are checked finite (``check_embeddings``); a shard that fails that or a page
    checksum is refused (``damaged``)."""
    for path in paths:
        name = os.path.basename(path)
        with reading(path):
            reader = streaming_reader(path)
            declared = all(reader.metadata.row_group(i).sorting_columns == tuple(ID_ORDER)
                           for i in range(reader.metadata.num_row_groups))
            wanted = None if columns is None else ["id", *columns]
            if declared:
                batches = reader.iter_batches(batch_size=batch_rows, columns=wanted)
            else:
                batches = sort_by_id(reader.read(columns=wanted)).to_batches(batch_rows)
            for batch in batches:
                if "embedding" in batch.schema.names:
                    check_embeddings(batch.column("embedding"), path)
                yield name, batch


def run_rows(paths: list[str], columns: list[str]) -> Iterator[tuple]:
    """(id, shard name, *COLUMNS) of a sorted run's rows, in id order."""
    for name, batch in run_batches(paths, columns, WALK_ROWS):
        row_ids, *values = (column.to_pylist() for column in batch.columns)
        yield from zip(row_ids, [name] * len(row_ids), *values)


def fill_embeddings(paths: list[str], dim: int, shard: np.ndarray, row: np.ndarray, out: np.ndarray) -> bool:
    """``out[i] = `` the embedding at row ``row[i]`` of ``paths[shard[i]]``; False when a shard has fewer rows
    than asked for (it changed since it was located).

    Streams record batches of ``READ_ROWS`` rows through a 1 MiB read buffer (not the whole column chunk),
    and copies a batch whose rows are all wanted straight into OUT, so peak memory is OUT plus about two
    batches; a whole table would hold the split twice (Arrow table and matrix).
    """
    by_shard = np.argsort(shard, kind="stable")
    bounds = np.searchsorted(shard[by_shard], np.arange(len(paths) + 1))
    for number, path in enumerate(paths):
        dest = by_shard[bounds[number]:bounds[number + 1]]
        dest = dest[np.argsort(row[dest], kind="stable")]
        src = row[dest]
        start = 0
        with reading(path):
            reader = streaming_reader(path, 1 << 20)
            for batch in reader.iter_batches(batch_size=READ_ROWS, columns=["embedding"]):
                check_embeddings(batch.column(0), path)
                stop = start + batch.num_rows
                lo, hi = np.searchsorted(src, [start, stop])
                block, wanted = embedding_matrix(batch.column(0), dim), src[lo:hi] - start
                out[dest[lo:hi]] = block if np.array_equal(wanted, np.arange(batch.num_rows)) else block[wanted]
                start = stop
        if len(src) and src[-1] >= start:
            return False
        pa.default_memory_pool().release_unused()  # else the allocator keeps every shard's pages
    return True
