"""Reading a split's rows: whole (``read_split``, in id order), streamed in id order (``iter_rows``), or its
embeddings streamed into a matrix (``fill_embeddings``). Every shard is checked to be the file the manifest
recorded (``Store.unchanged``) and its rows finite before any is served."""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from featstore.errors import FeatstoreError
from featstore.store.merge import merge_sorted
from featstore.store.shards import embedding_matrix, fill_embeddings, read_shard, run_rows, sort_by_id

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

    # ---- reports --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What ``featstore info`` shows; reads the manifest only."""
        splits = {}
        for name, info in sorted(self.manifest.splits.items()):
            shards = [r for r in info.shards.values() if r.committed]
            splits[name] = {"rows": sum(r.rows for r in shards), "failed": len(info.failed),
                            "shards": len(shards), "source": info.source}
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
