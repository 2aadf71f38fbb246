"""A manifest file (Parquet or CSV) listing image paths and optional labels."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from featstore.errors import FeatstoreError
from featstore.sources import base
from featstore.sources.base import Item
from featstore.sources.folder import FolderSource, os_reason
from featstore.store import sort_by_id, streaming_reader
from featstore.store.merge import merge_sorted


class ManifestSource(FolderSource):
    """A Parquet or CSV file with a ``path`` column (relative to the file's folder, or absolute) and an
    optional ``label`` column of class names.

    Read in batches and sorted by id in runs of ``SORT_ROWS`` rows; a manifest longer than one run spills its
    sorted runs to temporary Arrow files (in ``$TMPDIR``, unlinked as soon as they are open, so nothing is
    left behind even by a kill) and the listing merges them, so memory does not grow with the manifest."""

    SORT_ROWS = 1 << 20  # ~0.1 GiB of (id, label) rows
    READ_ROWS, READ_BYTES = 1 << 16, 1 << 22  # a batch read from a Parquet manifest, a block of a CSV one

    def __init__(self, manifest: str):
        if not os.path.isfile(manifest):
            raise FeatstoreError(f"manifest {manifest} does not exist")
        self.manifest = os.path.abspath(manifest)
        self.root = os.path.dirname(self.manifest)
        self.spec = f"manifest:{self.manifest}"
        self.runs: list = []  # sorted (id, label) runs: a table, or a reader of a spilled one
        labels: set[str] = set()
        chunk, rows = [], 0
        for table in self._read_batches():
            labels.update(pc.unique(table.column("label")).to_pylist())
            chunk.append(table)
            rows += table.num_rows
            if rows >= self.SORT_ROWS:
                self.runs.append(self._spill(self._sorted_run(chunk)))
                chunk, rows = [], 0
                pa.default_memory_pool().release_unused()  # else the allocator keeps every run's sort
        if chunk or not self.runs:
            self.runs.append(self._sorted_run(chunk))
        labels.discard(None)
        self._classes = sorted(labels)

    def _sorted_run(self, tables: list[pa.Table]) -> pa.Table:
        """TABLES' rows sorted by id; a path listed twice within them is refused here, before any work (the
        merge of several runs finds one listed in two)."""
        run = sort_by_id(pa.concat_tables(tables or [self._empty()]))
        if run.num_rows > 1:
            ids = run.column("id")
            same = pc.equal(ids.slice(1), ids.slice(0, run.num_rows - 1))
            if pc.any(same).as_py():
                self._listed_twice(ids[pc.index(same, True).as_py()].as_py())
        return run

    def _listed_twice(self, row_id: str):
        raise FeatstoreError(f"manifest {self.manifest} lists {row_id} more than once")

    @staticmethod
    def _empty() -> pa.Table:
        return pa.table({"id": pa.array([], pa.string()), "label": pa.array([], pa.string())})

    def _read_batches(self) -> Iterator[pa.Table]:
        """The manifest's (id, label) rows in file order, a batch at a time."""
        try:
            if self.manifest.endswith(".parquet"):
                reader = streaming_reader(self.manifest, 1 << 20)
                names = reader.schema_arrow.names
                batches = reader.iter_batches(batch_size=self.READ_ROWS, columns=[n for n in ("path", "label") if n in names])
            else:
                import pyarrow.csv as pacsv

                batches = pacsv.open_csv(self.manifest, read_options=pacsv.ReadOptions(block_size=self.READ_BYTES),
                                         convert_options=pacsv.ConvertOptions(column_types={"path": pa.string(), "label": pa.string()}))
                names = batches.schema.names
            if "path" not in names:
                raise FeatstoreError(f"manifest {self.manifest} has no 'path' column")
            for batch in batches:
                yield self._rows(batch)
        except (OSError, pa.ArrowException) as e:
            raise FeatstoreError(f"cannot read manifest {self.manifest}: {e}".splitlines()[0]) from None

    def _rows(self, batch: pa.RecordBatch) -> pa.Table:
        paths = batch.column("path").cast(pa.string())
        if paths.null_count:
            raise FeatstoreError(f"manifest {self.manifest} has rows without a path")
        names = batch.schema.names
        labels = batch.column("label").cast(pa.string()) if "label" in names else pa.nulls(len(paths), pa.string())
        labels = pc.if_else(pc.equal(labels, ""), pa.scalar(None, pa.string()), labels)
        return pa.table({"id": pa.array([self._id(p) for p in paths.to_pylist()], pa.string()), "label": labels})

    @staticmethod
    def _spill(table: pa.Table):
        """TABLE in a temporary Arrow file, returned as an open reader of it; the file's name is already gone."""
        with tempfile.NamedTemporaryFile(prefix="featstore-manifest-", suffix=".arrow", delete=False) as f:
            path = f.name
        try:
            with pa.ipc.new_file(path, table.schema) as sink:
                sink.write_table(table, max_chunksize=base.PLAN_BATCH)
            return pa.ipc.open_file(pa.OSFile(path))  # read, not mapped: merged pages do not stay resident
        finally:
            os.unlink(path)

    def _id(self, path: str) -> str:
        """A path's id: normalised as text (``a/./b``, ``a//b``, ``a/c/../b`` and ``./a/b`` are ``a/b``; links
        are not resolved), relative to the manifest's folder. An absolute path inside that folder gets the id
        of the same relative path; other absolute paths stay absolute, normalised the same way."""
        if os.path.isabs(path):
            normal = "/" + os.path.normpath(path).lstrip("/")  # normpath keeps a leading "//"
            inside = normal.startswith(self.root.rstrip("/") + "/")
            return normal[len(self.root.rstrip("/")) + 1:] if inside else normal
        normal = os.path.normpath(path)  # what relpath gives for a path inside the folder, at a fifth of its cost
        if normal != os.pardir and not normal.startswith(os.pardir + os.sep):
            return normal.replace(os.sep, "/")
        return os.path.relpath(os.path.join(self.root, path), self.root).replace(os.sep, "/")

    def classes(self) -> list[str]:
        return self._classes

    def skip(self, folder: str) -> None:
        """Nothing to skip: a manifest names its files, no folder is walked."""

    def _sorted_rows(self) -> Iterator[tuple[str, str | None]]:
        def run_rows(run):
            batches = run.to_batches(base.PLAN_BATCH) if isinstance(run, pa.Table) else (
                run.get_batch(i) for i in range(run.num_record_batches))
            for batch in batches:
                yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())

        return merge_sorted(map(run_rows, self.runs), duplicate=self._listed_twice)

    def iter_items(self) -> Iterator[Item]:
        for rel, label in self._sorted_rows():
            try:
                st = os.stat(os.path.join(self.root, rel))  # REL when absolute
                base.check_regular(st.st_mode)
            except OSError as e:  # missing, unreadable, or a FIFO, device or folder: a failure, never opened
                yield self._failure(rel, os_reason(e))
                continue
            yield Item(rel, rel, sys.intern(label) if label is not None else None, st.st_size, st.st_mtime_ns)

    @classmethod
    def from_spec(cls, rest: str, split: str) -> "ManifestSource":
        return cls(rest)
