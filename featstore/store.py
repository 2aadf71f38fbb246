"""The on-disk store: plain Parquet shards plus one JSON manifest, both committed atomically.

Layout::

    DIR/featstore.json                     manifest: model identity, classes, shards (rows, sha256), failures
    DIR/images/split=NAME/part-*.parquet   one file per shard, rows sorted by id; every file there holds only live rows
    DIR/labels/classes.parquet             text embeddings per class (``featstore labels``)
    DIR/labels/index.faiss                 IndexFlatIP over the normalised class embeddings
    DIR/.lock                              locked (lockf) by the one writer

A shard becomes visible by an atomic rename of a fully written, fsynced file; rows are replaced or removed
by atomically replacing the shard file under the same name, and rows move between shards (``compact``) only
by exchanging the split's whole folder for a rewritten copy, so a plain Parquet reader never sees a
duplicate or a tombstone. The manifest is rewritten (temp file, fsync, rename) after each commit; a commit
cut short by a crash is finished or rolled back by the next writer.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import hashlib
import heapq
import json
import os
import re
import shutil
import time
import uuid
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError, StoreLocked

MANIFEST = "featstore.json"
FORMAT = 1
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SHARD_NAME = re.compile(r"^part-[0-9]{6}-[0-9a-f]{8}\.parquet$")
DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
ID_ORDER = [pq.SortingColumn(0)]  # every shard is sorted by id (column 0) and says so in its footer
# Columns with few distinct values get a dictionary; ids, paths, hashes, sizes, mtimes and embeddings are
# (nearly) all distinct, and a dictionary there (pyarrow's default) made a 50,000-row shard's writes 1.5x and
# its embedding reads 3.7x slower, for a file 5 % smaller (bench/shard_bench.py).
DICTIONARY_COLUMNS = ["label", "encoded_at"]
ROW_GROUP_ROWS = 8192  # pyarrow's default row group is the whole shard, whose column buffers a write holds at once
READ_ROWS = 4096  # rows per record batch when streaming embeddings (8 MiB of float32 at 512 dimensions)
WALK_ROWS = 1024  # rows per batch of a sorted run in ``iter_rows``, held as Python objects (~0.2 KiB a row)
DEFAULT_SHARD_ROWS = 50_000
EXCHANGE = "exchange"  # a split's record of a folder exchange in progress (``Store.rewrite_shards``)
RENAME_EXCHANGE = 2  # renameat2's flag: swap two paths atomically (Linux 3.15+; ext4, xfs, btrfs, tmpfs)


def check_split_name(split: str) -> str:
    if not SPLIT_NAME.match(split) or ".." in split:
        raise FeatstoreError(f"bad split name {split!r}: use letters, digits, '_', '-' and '.'")
    return split


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no bytes copied), or a copy with the same mtime where links are not allowed."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Write via ``write(tmp_path)``, fsync, rename over PATH, fsync the folder: all or nothing."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(folder)


def exchange_folders(a: str, b: str) -> None:
    """Swap folders A and B in one atomic step (Linux's ``renameat2(RENAME_EXCHANGE)``)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_cwd = -100
    if renameat2 is None or renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno() if renameat2 is not None else errno.ENOSYS
        raise FeatstoreError(f"cannot swap {b} for its rewritten copy: {os.strerror(code)} (compaction needs a "
                             "Linux filesystem with atomic folder exchange: ext4, xfs, btrfs or tmpfs)")


def write_parquet(table: pa.Table, path: str) -> dict[str, Any]:
    """Write TABLE sorted by id (declared in the footer) and fsynced; its manifest record (rows, bytes, sha256)."""
    table = sort_by_id(table)
    pq.write_table(table, path, sorting_columns=ID_ORDER, use_dictionary=DICTIONARY_COLUMNS,
                   row_group_size=ROW_GROUP_ROWS)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"rows": table.num_rows, "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


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
        ],
        metadata={"featstore.model": json.dumps(model, sort_keys=True)},
    )


def embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A fixed_size_list column as a float32 (rows, dim) matrix, without per-row Python."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, dim)


@contextlib.contextmanager
def _reading(split: str) -> Iterator[None]:
    """A shard that cannot be read (damaged, vanished) becomes one clear error naming the remedy."""
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        raise FeatstoreError(f"cannot read split {split!r}: {e} (run featstore verify)") from None


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


def _sorted_runs(shards: list[tuple[str, str, str]]) -> list[list[str]]:
    """(low id, high id, path) of shards chained into the fewest runs of shards whose id ranges follow one
    another. Taken by lowest id, a shard joins the run that ended last below it, so the shards one encode
    wrote stay one run (which ``compact`` can then weigh and merge as such)."""
    runs: list[list[str]] = []
    ends: list[tuple[str, int]] = []  # (highest id so far, run number), sorted
    for low, high, path in sorted(shards):
        place = bisect.bisect_left(ends, (low,)) - 1  # the last run ending below LOW
        if place >= 0:
            number = ends.pop(place)[1]
        else:
            number = len(runs)
            runs.append([])
        runs[number].append(path)
        bisect.insort(ends, (high, number))
    return runs


def streaming_reader(path: str, buffer_size: int = 1 << 16) -> pq.ParquetFile:
    """A Parquet reader that streams pages through a BUFFER_SIZE buffer. pyarrow's default (``pre_buffer``)
    reads a row group's whole column chunks first: a 50,000-row shard's embeddings, ~50 MiB, per reader."""
    return pq.ParquetFile(path, buffer_size=buffer_size, pre_buffer=False)


def run_batches(paths: list[str], columns: list[str] | None, batch_rows: int = READ_ROWS) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(shard name, record batch) of a sorted run's shards, in id order (COLUMNS after ``id``; all when None).
    A shard written before shards were sorted is sorted in memory when its turn comes."""
    for path in paths:
        name = os.path.basename(path)
        reader = streaming_reader(path)
        declared = all(reader.metadata.row_group(i).sorting_columns == tuple(ID_ORDER)
                       for i in range(reader.metadata.num_row_groups))
        wanted = None if columns is None else ["id", *columns]
        if declared:
            batches = reader.iter_batches(batch_size=batch_rows, columns=wanted)
        else:
            batches = sort_by_id(reader.read(columns=wanted)).to_batches(batch_rows)
        for batch in batches:
            yield name, batch


def _run_rows(paths: list[str], columns: list[str]) -> Iterator[tuple]:
    for name, batch in run_batches(paths, columns, WALK_ROWS):
        row_ids, *values = (column.to_pylist() for column in batch.columns)
        yield from zip(row_ids, [name] * len(row_ids), *values)


class Store:
    """A featstore directory. Reads need no lock; every writer holds ``lock()``."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.manifest_path = os.path.join(self.root, MANIFEST)
        self.manifest: dict[str, Any] = {}
        if os.path.isfile(self.manifest_path):
            self.manifest = self._load_manifest()

    # ---- manifest -------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str) -> "Store":
        store = cls(root)
        if not store.exists:
            raise FeatstoreError(f"no featstore store at {root} (run featstore encode first)")
        return store

    @property
    def exists(self) -> bool:
        return bool(self.manifest)

    def _load_manifest(self) -> dict[str, Any]:
        try:
            with open(self.manifest_path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise FeatstoreError(f"cannot read {self.manifest_path}: {e}") from None
        if manifest.get("format") != FORMAT:
            raise FeatstoreError(f"{self.manifest_path} is not a featstore format-{FORMAT} manifest")
        for split, info in manifest.get("splits", {}).items():
            check_split_name(split)
            for name in info.get("shards", {}):
                if not SHARD_NAME.match(name):
                    raise FeatstoreError(f"{self.manifest_path} names a bad shard file {name!r}")
        return manifest

    def create(self, model: dict[str, Any], dtype: str) -> None:
        self.manifest = {
            "format": FORMAT,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model,
            "dim": model["dim"],
            "dtype": dtype,
            "classes": [],
            "display_names": {},
            "splits": {},
            "labels": None,
            "next_shard": 0,
        }
        os.makedirs(os.path.join(self.root, "images"), exist_ok=True)

    def save(self) -> None:
        data = json.dumps(self.manifest, indent=1, sort_keys=True).encode()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        atomic_write(self.manifest_path, write)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def class_ids(self, names: list[str]) -> dict[str, int]:
        """Ids for class names, appending unseen names so ids agree across splits (matched by name)."""
        classes = self.manifest["classes"]
        for name in names:
            if name not in classes:
                classes.append(name)
        return {name: i for i, name in enumerate(classes)}

    def split_info(self, split: str, create: bool = False) -> dict[str, Any]:
        splits = self.manifest["splits"]
        if split not in splits:
            if not create:
                have = ", ".join(sorted(splits)) or "none"
                raise FeatstoreError(f"store {self.root} has no split {split!r} (splits: {have})")
            splits[split] = {"source": None, "shards": {}, "failed": {}}
        return splits[split]

    # ---- locking --------------------------------------------------------------------------------
    def check_unlocked(self) -> None:
        """Raise StoreLocked now if a writer holds the store (creates nothing)."""
        path = os.path.join(self.root, ".lock")
        if not os.path.isfile(path):
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise self._locked(fd) from None
        finally:
            os.close(fd)

    def _locked(self, fd: int) -> StoreLocked:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        return StoreLocked(f"store {self.root} is in use by {holder}; try again when it finishes")

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Exclusive writer lock: a POSIX record lock, which dies with its process (so a lock left by
        kill -9 is simply free) and, unlike flock, is not inherited by forked DataLoader workers that
        may outlive a killed writer for a few seconds."""
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise self._locked(fd) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} ({command}, since {time.strftime('%H:%M:%S')})\n".encode(), 0)
            if os.path.isfile(self.manifest_path):  # another writer may have committed since we looked
                self.manifest = self._load_manifest()
            yield
        finally:
            os.close(fd)

    # ---- shards ---------------------------------------------------------------------------------
    def split_dir(self, split: str) -> str:
        return os.path.join(self.root, "images", f"split={check_split_name(split)}")

    def shards(self, split: str) -> dict[str, dict[str, Any]]:
        """The split's committed shards (name -> record). After a crash between a folder exchange and its
        record's promotion (``rewrite_shards``), those the exchanged folder holds, so readers need no writer."""
        info = self.split_info(split)
        shards = {name: rec for name, rec in info["shards"].items() if "sha256" in rec}
        pending = info.get(EXCHANGE)
        if pending and self._exchanged(split, pending):
            shards = {name: rec for name, rec in shards.items() if name not in pending["dropped"]} | pending["added"]
        return shards

    def shard_paths(self, split: str) -> list[str]:
        folder = self.split_dir(split)
        return [os.path.join(folder, name) for name in self.shards(split)]

    def sorted_runs(self, split: str) -> list[list[str]]:
        """The split's shard paths chained into sorted runs (shards whose id ranges follow one another)."""
        return _sorted_runs([(*id_range(path), path) for path in self.shard_paths(split)])

    def new_shard_name(self) -> str:
        number = self.manifest["next_shard"]
        self.manifest["next_shard"] = number + 1
        return f"part-{number:06d}-{uuid.uuid4().hex[:8]}.parquet"

    def write_shard(self, split: str, table: pa.Table, name: str | None = None) -> str:
        """Commit TABLE as a new shard, or as an atomic replacement of shard NAME.

        The manifest learns the new file's checksum ("next") before the rename and promotes it after,
        so a writer killed between the two leaves a state the next writer can tell apart from damage."""
        folder = self.split_dir(split)
        os.makedirs(folder, exist_ok=True)
        name = name or self.new_shard_name()
        path = os.path.join(folder, name)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            written = write_parquet(table, tmp)
            record = self.split_info(split, create=True)["shards"].setdefault(name, {})
            record["next"] = written
            self.save()
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(folder)
        record.update(record.pop("next"), mtime_ns=os.stat(path).st_mtime_ns)
        self.save()
        return name

    @contextlib.contextmanager
    def rewrite_shards(self, split: str, dropped: set[str]) -> Iterator[Any]:
        """Replace shards DROPPED by the tables written with the yielded ``write(table)``, all at once.

        The new split folder is built beside the store (``.exchange-*``: kept shards hard-linked, new ones
        written there), recorded in the manifest, then swapped with the split's folder in one atomic exchange,
        so a plain Parquet reader lists either every old shard or every new one, never a row twice. A crash
        before the exchange leaves the old split (the next writer removes the copy); one after it leaves the
        new split, which readers already see and the next writer records (``reconcile``)."""
        folder = self.split_dir(split)
        staging = os.path.join(self.root, f".exchange-{split}-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        added: dict[str, dict[str, Any]] = {}

        def write(table: pa.Table) -> str:
            name = self.new_shard_name()
            added[name] = write_parquet(table, os.path.join(staging, name))
            return name

        try:
            for name in self.shards(split):
                if name not in dropped:
                    _link_or_copy(os.path.join(folder, name), os.path.join(staging, name))
            yield write
            _fsync_dir(staging)
            info = self.split_info(split)
            info[EXCHANGE] = {"folder": os.path.basename(staging), "added": added, "dropped": sorted(dropped)}
            self.save()
            try:
                exchange_folders(staging, folder)
            finally:
                if not self._exchanged(split, info[EXCHANGE]):
                    del info[EXCHANGE]
                    self.save()
            _fsync_dir(os.path.dirname(folder))
            _fsync_dir(self.root)
            self._finish_exchange(split)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the old folder after an exchange, else the copy

    def _exchanged(self, split: str, pending: dict[str, Any]) -> bool:
        """Whether the recorded exchange happened: the new shards' names (unique) are in the split's folder."""
        folder = self.split_dir(split)
        return any(os.path.isfile(os.path.join(folder, name)) for name in pending["added"])

    def _finish_exchange(self, split: str) -> None:
        info = self.split_info(split)
        shards = self.shards(split)
        folder = self.split_dir(split)
        for name in info.pop(EXCHANGE)["added"]:
            shards[name]["mtime_ns"] = os.stat(os.path.join(folder, name)).st_mtime_ns
        info["shards"] = shards
        self.save()

    def delete_shard(self, split: str, name: str) -> None:
        self.split_info(split)["shards"].pop(name, None)
        self.save()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.split_dir(split), name))

    def check_shard(self, split: str, name: str, record: dict[str, Any], full: bool = True) -> str | None:
        """Why shard NAME on disk disagrees with its manifest RECORD, or None when it matches.

        ``full=False`` trusts an unchanged size and mtime (cheap enough for every run); ``verify`` hashes."""
        path = os.path.join(self.split_dir(split), name)
        if not os.path.isfile(path):
            return "missing"
        st = os.stat(path)
        if not full and (st.st_size, st.st_mtime_ns) == (record["bytes"], record.get("mtime_ns")):
            return None
        if st.st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            return "checksum mismatch"
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:
            return f"unreadable ({e})"
        return None if rows == record["rows"] else f"{rows} rows, manifest says {record['rows']}"

    def reconcile(self, split: str) -> list[str]:
        """Bring the manifest in line with the split's folder before writing (writers only).

        Finishes or rolls back a commit a killed writer left half done, removes its temp files, and drops
        damaged or missing shards so that their rows are encoded again. Returns a line per repair."""
        info = self.split_info(split, create=True)
        folder = self.split_dir(split)
        notes: list[str] = []
        pending = info.get(EXCHANGE)
        if pending and self._exchanged(split, pending):
            self._finish_exchange(split)  # the folder was swapped: record its shards
        elif pending:
            del info[EXCHANGE]  # it was not: the old split stands
            self.save()
        exchanging = {rec[EXCHANGE]["folder"] for rec in self.manifest["splits"].values() if EXCHANGE in rec}
        for name in os.listdir(self.root):
            if name.startswith(".exchange-") and name not in exchanging:  # a copy, or an old folder, left by a crash
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        on_disk = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        for name in sorted(on_disk):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(folder, name))
            elif SHARD_NAME.match(name) and name not in info["shards"]:  # a delete that was interrupted
                os.unlink(os.path.join(folder, name))
        for name, record in list(info["shards"].items()):
            pending = record.pop("next", None)
            path = os.path.join(folder, name)
            if pending and os.path.isfile(path) and sha256_file(path) == pending["sha256"]:
                record.update(pending, mtime_ns=os.stat(path).st_mtime_ns)  # renamed, not yet recorded
                continue
            if "sha256" not in record:  # a new shard whose rename never happened
                del info["shards"][name]
                continue
            problem = self.check_shard(split, name, record, full=False)
            if problem is None:
                record["mtime_ns"] = os.stat(path).st_mtime_ns
                continue
            del info["shards"][name]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            notes.append(f"dropped {problem} shard {name}; its rows will be encoded again")
        self.save()
        return notes

    def read_split(self, split: str, columns: list[str] | None = None, locate: bool = False) -> pa.Table:
        """All rows of a split, in id order (so results do not depend on shard layout).

        With LOCATE, two more columns say where each row lives (``shard``, ``row``), for ``fill_embeddings``.
        """
        paths = self.shard_paths(split)
        schema = shard_schema(self.dim, self.manifest["dtype"], {})
        cols = columns if columns is None or "id" in columns else ["id", *columns]
        tables = [schema.empty_table().select(cols or schema.names)]
        with _reading(split):
            tables += [pq.read_table(path, columns=cols) for path in paths]
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
        with _reading(split):
            runs = self.sorted_runs(split)
            yield from heapq.merge(*(_run_rows(run, columns) for run in runs), key=lambda row: row[0])

    def fill_embeddings(self, split: str, shard: np.ndarray, row: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = `` the embedding at (``shard[i]``, ``row[i]``) as located by ``read_split(locate=True)``.

        Streams record batches of ``READ_ROWS`` rows through a 1 MiB read buffer (not the whole column chunk),
        and copies a batch whose rows are all wanted straight into OUT, so peak memory is OUT plus about two
        batches; ``features`` would hold the split twice (Arrow table and matrix).
        """
        paths = self.shard_paths(split)
        by_shard = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[by_shard], np.arange(len(paths) + 1))
        for number, path in enumerate(paths):
            dest = by_shard[bounds[number]:bounds[number + 1]]
            dest = dest[np.argsort(row[dest], kind="stable")]
            src = row[dest]
            start = 0
            with _reading(split):
                reader = streaming_reader(path, 1 << 20)
                for batch in reader.iter_batches(batch_size=READ_ROWS, columns=["embedding"]):
                    stop = start + batch.num_rows
                    lo, hi = np.searchsorted(src, [start, stop])
                    block, wanted = embedding_matrix(batch.column(0), self.dim), src[lo:hi] - start
                    out[dest[lo:hi]] = block if np.array_equal(wanted, np.arange(batch.num_rows)) else block[wanted]
                    start = stop
            if len(src) and src[-1] >= start:
                raise FeatstoreError(f"split {split!r} changed while it was read: run the command again")
            pa.default_memory_pool().release_unused()  # else the allocator keeps every shard's pages

    def features(self, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, float32 embeddings, int labels with -1 for unlabelled) of a split."""
        table = self.read_split(split, ["id", "label", "embedding"])
        labels = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
        return table.column("id").to_pylist(), embedding_matrix(table.column("embedding"), self.dim), labels

    # ---- reports --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What ``featstore info`` shows; reads the manifest only."""
        splits = {}
        for name, info in sorted(self.manifest["splits"].items()):
            shards = [r for r in info["shards"].values() if "sha256" in r]
            splits[name] = {"rows": sum(r["rows"] for r in shards), "failed": len(info["failed"]),
                            "shards": len(shards), "source": info.get("source")}
        labels = self.manifest.get("labels")
        return {
            "store": self.root,
            "model": self.manifest["model"],
            "dim": self.dim,
            "dtype": self.manifest["dtype"],
            "classes": self.classes,
            "label_index": bool(labels),
            "templates": len(labels["templates"]) if labels else 0,
            "splits": splits,
        }

    def failures(self) -> list[dict[str, Any]]:
        return [
            {"split": split, "id": row_id, "path": rec["path"], "reason": rec["reason"]}
            for split, info in sorted(self.manifest["splits"].items())
            for row_id, rec in sorted(info["failed"].items())
        ]

    def verify(self) -> list[dict[str, str]]:
        """Every shard against its recorded checksum and row count, and the folders against the manifest."""
        problems = []
        for split in sorted(self.manifest["splits"]):
            for name, record in sorted(self.shards(split).items()):
                problem = self.check_shard(split, name, record, full=True)
                if problem:
                    problems.append({"split": split, "file": f"images/split={split}/{name}", "problem": problem})
        images = os.path.join(self.root, "images")
        for folder in sorted(os.listdir(images)) if os.path.isdir(images) else []:
            split = folder.removeprefix("split=")
            recorded = self.shards(split) if split in self.manifest["splits"] else {}
            for name in sorted(os.listdir(os.path.join(images, folder))):
                if name.endswith(".parquet") and name not in recorded:
                    problems.append({"split": split, "file": f"images/{folder}/{name}", "problem": "not in the manifest"})
        return problems
