"""Reading a split's rows: whole (``read_split``, in id order), streamed in id order (``iter_rows``), or its
embeddings streamed into a matrix (``fill_embeddings``). Every shard is checked to be the file the manifest
recorded (``Store.unchanged``) and its rows finite before any is served."""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featstore.errors import FeatstoreError
from featstore.store.merge import merge_sorted
from featstore.store.shards import (check_embeddings, embedding_matrix, fill_embeddings, read_shard, reading,
                                    run_batches, run_rows, sort_by_id, streaming_reader)

LABELS = "labels"  # the folder of the label index and class table (``featstore labels``)


class Reads:
    """The read side of ``Store`` (which provides ``root``, ``shard_paths``, ``sorted_runs``, ``shard_schema``,
    ``dim`` and ``manifest``): rows, and the reports ``featstore info`` prints from the manifest."""

    def read_split(self, split: str, columns: list[str] | None = None, locate: bool = False) -> pa.Table:
        """All rows of a split, in id order (so results do not depend on shard layout).

        With LOCATE, two more columns say where each row lives (``shard``, ``row``), for ``fill_embeddings``.
        """
        paths = self.shard_paths(split)
        schema = self.shard_schema()
        cols = columns if columns is None or "id" in columns else ["id", *columns]
        tables = [schema.empty_table().select(cols or schema.names)]
        tables += [read_shard(path, cols, schema) for path in paths]
        if locate:  # a row's shard number in shard_paths order (tables[0] is the empty one that fixes the
            # schema, hence number - 1) and its row number there
            tables = [table.append_column("shard", pa.array(np.full(table.num_rows, number - 1, np.int32)))
                      .append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
                      for number, table in enumerate(tables)]
        table = sort_by_id(pa.concat_tables(tables))
        if locate:
            return table.select([*(columns or schema.names), "shard", "row"])
        return table.select(columns) if columns else table

    def iter_rows(self, split: str, columns: list[str]) -> Iterator[tuple]:
        """(id, shard name, *COLUMNS) for every row of a split, in id order, without holding the split.

        Shards whose id ranges (from their footers) follow one another, such as one encode's new shards, are
        read one after another as one sorted run, and the runs are merged: memory grows with the number of
        runs (one per encode that added ids among the stored ones) times a batch, not with the rows. A shard
        written before shards were sorted is sorted in memory when its turn comes.
        """
        return merge_sorted(run_rows(run, columns) for run in self.sorted_runs(split))

    def fill_embeddings(self, split: str, shard: np.ndarray, row: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = `` the embedding at (``shard[i]``, ``row[i]``) as located by ``read_split(locate=True)``,
        streamed (``shards.fill_embeddings``)."""
        if not fill_embeddings(self.shard_paths(split), self.dim, shard, row, out):
            raise FeatstoreError(f"split {split!r} changed while it was read: run the command again")

    def features(self, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, float32 embeddings, int labels with -1 for unlabelled) of a split."""
        table = self.read_split(split, ["id", "label", "embedding"])
        labels = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
        return table.column("id").to_pylist(), embedding_matrix(table.column("embedding"), self.dim), labels

    # ---- rows by key (the image index) ---------------------------------------------------------------
    def row_count(self, split: str) -> int:
        """The split's rows, from the manifest's shard records."""
        return sum(record.rows for record in self.shards(split).values())

    def key_batches(self, split: str) -> "KeyBatches":
        """The split's (int64 keys, float32 embeddings), a batch at a time, re-read on each iteration."""
        return KeyBatches(self, split)

    def live_keys(self, split: str) -> np.ndarray:
        """The keys of the split's rows, sorted; a row without one (written before keys) is an error."""
        keys = [_keys(read_shard(path, ["key"], pa.schema([self.shard_schema().field("key")]))["key"], path)
                for path in self.shard_paths(split)]
        return np.sort(np.concatenate([np.empty(0, np.int64), *keys]))

    def rows_by_key(self, split: str, keys: np.ndarray, columns: list[str]) -> pa.Table:
        """COLUMNS (and ``key``) of the split's rows whose key is in KEYS, in no particular order; keys no row
        has are absent. Reads each shard's key column, then only the row groups holding a wanted row."""
        wanted = pa.array(np.unique(np.asarray(keys, np.int64)), pa.int64())
        schema = self.shard_schema()
        columns = list(dict.fromkeys([*columns, "key"]))
        found = [schema.empty_table().select(columns)]
        for path in self.shard_paths(split):
            with reading(path):
                shard = streaming_reader(path)
                if "key" not in shard.schema_arrow.names:
                    continue
                groups = [shard.read_row_group(g, columns=["key"]).column(0) for g in range(shard.num_row_groups)]
                hit = [g for g, column in enumerate(groups) if pc.any(pc.is_in(column, wanted)).as_py()]
                for g in hit:
                    table = shard.read_row_group(g, columns=columns)
                    found.append(table.filter(pc.is_in(table.column("key"), wanted)))
                    if "embedding" in columns:
                        check_embeddings(found[-1].column("embedding"), path)
        return pa.concat_tables(found)

    def embeddings_by_key(self, split: str, keys: np.ndarray) -> np.ndarray:
        """The float32 embeddings of the rows with KEYS, in that order; a NaN row for a key no row has (what
        ``featstore.index.search``'s rerank expects)."""
        keys = np.asarray(keys, np.int64)
        found = self.rows_by_key(split, keys, ["embedding"])
        out = np.full((len(keys), self.dim), np.nan, np.float32)
        stored = found.column("key").to_numpy()
        order = np.argsort(stored)
        at = np.searchsorted(stored[order], keys)
        hit = at < len(stored)
        hit[hit] = stored[order][at[hit]] == keys[hit]
        out[hit] = embedding_matrix(found.column("embedding"), self.dim)[order[at[hit]]]
        return out

    # ---- reports --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What ``featstore info`` shows; reads the manifest only."""
        splits = {}
        for name, info in sorted(self.manifest.splits.items()):
            shards = [r for r in info.shards.values() if r.committed]
            splits[name] = {"rows": sum(r.rows for r in shards), "failed": len(info.failed),
                            "shards": len(shards), "source": info.source}
            if info.index:  # the split's image index (featstore index)
                splits[name]["index"] = _index_summary(info.index, splits[name]["rows"], info.next_key)
        labels = self.manifest.labels
        return {
            "store": self.root,
            "model": self.manifest.model,
            "dim": self.dim,
            "dtype": self.manifest.dtype,
            "classes": self.classes,
            "label_index": bool(labels),
            "templates": len(labels.templates) if labels else 0,
            "splits": splits,
        }

    def failures(self) -> list[dict[str, Any]]:
        return [
            {"split": split, "id": row_id, "path": rec.path, "reason": rec.reason}
            for split, info in sorted(self.manifest.splits.items())
            for row_id, rec in sorted(info.failed.items())
        ]

    def label_paths(self) -> tuple[str, str]:
        """The label index and class table the manifest names (``featstore labels`` writes them under new
        names each time, then commits the manifest); stores made before: ``index.faiss``, ``classes.parquet``."""
        labels = self.manifest.labels
        folder = os.path.join(self.root, LABELS)
        return (os.path.join(folder, labels.index_file if labels and labels.index_file else "index.faiss"),
                os.path.join(folder, labels.classes_file if labels and labels.classes_file else "classes.parquet"))


def index_current(index, rows: int, next_key: int) -> bool:
    """Whether image index record INDEX holds the split's live rows: as many as the split (ROWS), made current
    when the split's key counter was NEXT_KEY (a changed file's new row moves it without changing ROWS)."""
    return index.rows == rows and index.next_key in (None, next_key)


def _index_summary(index, rows: int, next_key: int) -> dict[str, Any]:
    """A split's image index as ``info`` shows it (``current``: see ``index_current``)."""
    return {"kind": index.kind, "rows": index.rows, "recall_at_10": index.recall_at_10, "bytes": index.bytes,
            "current": index_current(index, rows, next_key), "params": index.params, "built_at": index.built_at,
            "updated_at": index.updated_at}


def _keys(column: pa.ChunkedArray, path: str) -> np.ndarray:
    if column.null_count:
        raise FeatstoreError(f"shard {os.path.basename(path)} has rows without keys (written before row keys): "
                             "featstore index gives them keys")
    return column.to_numpy().astype(np.int64, copy=False)


class KeyBatches:
    """(keys, float32 embeddings) of a split's rows, shard by shard in READ_ROWS batches; each iteration
    re-reads the shards (``featstore.index.build`` makes two passes), checked as every reader checks them."""

    def __init__(self, store: "Reads", split: str):
        self.store, self.split = store, split

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for path in self.store.shard_paths(self.split):
            for _, batch in run_batches([path], ["key", "embedding"]):
                if "key" not in batch.schema.names:  # pyarrow leaves out a column the file lacks
                    raise FeatstoreError(f"shard {os.path.basename(path)} of split {self.split!r} was written "
                                         "before row keys: featstore index gives them keys")
                yield _keys(batch.column("key"), path), embedding_matrix(batch.column("embedding"), self.store.dim)
