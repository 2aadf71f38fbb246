"""The on-disk store: plain Parquet shards plus one JSON manifest, both committed atomically.

Layout::

    DIR/featstore.json                     manifest: model identity, classes, shards (rows, sha256), failures
    DIR/images/split=NAME/part-*.parquet   one file per shard, rows sorted by id; every file there holds only live rows
    DIR/labels/classes-HEX.parquet         text embeddings per class (``featstore labels``; named by the manifest)
    DIR/labels/index-HEX.faiss             IndexFlatIP over the normalised class embeddings (named by the manifest)
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
import shutil
import stat
import time
import uuid
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError, StoreLocked
from featstore.manifest import FORMAT, MAX_SHARDS, SPLIT_NAME, validate

MANIFEST = "featstore.json"
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
QUARANTINE = ".quarantine"  # files found among a split's shards that the manifest does not know go here
DAMAGED_NOTE = ".damaged.json"  # in a split's folder: shards verify found damaged, for the next writer to check
LABELS = "labels"  # the folder of the label index and class table (``featstore labels``)
EXCHANGE = "exchange"  # a split's record of a folder exchange in progress (``Store.rewrite_shards``)
RENAME_EXCHANGE = 2  # renameat2's flag: swap two paths atomically (Linux 3.15+; ext4, xfs, btrfs, tmpfs)


def check_split_name(split: str) -> str:
    if not isinstance(split, str) or not SPLIT_NAME.match(split):  # the pattern refuses '..' too
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
                   row_group_size=ROW_GROUP_ROWS, write_page_checksum=True)  # CRCs that readers verify
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
            pa.field("caption", pa.string()),  # webdataset .txt; shards written before it lack it (``conform``)
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
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, dim)


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
def _reading(path: str) -> Iterator[None]:
    """A shard that cannot be read (truncated, a failed page checksum, vanished) becomes ``damaged``."""
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        raise damaged(path, str(e)) from None


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
    with _reading(path):
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
    reads a row group's whole column chunks first: a 50,000-row shard's embeddings, ~50 MiB, per reader.
    Pages written with a checksum (every shard since checksums were written) are verified as they are read."""
    return pq.ParquetFile(path, buffer_size=buffer_size, pre_buffer=False, page_checksum_verification=True)


def run_batches(paths: list[str], columns: list[str] | None, batch_rows: int = READ_ROWS) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(shard name, record batch) of a sorted run's shards, in id order (COLUMNS after ``id``; all when None).
    A shard written before shards were sorted is sorted in memory when its turn comes. Embeddings read are
    checked finite (``check_embeddings``); a shard that fails that or a page checksum is refused (``damaged``)."""
    for path in paths:
        name = os.path.basename(path)
        with _reading(path):
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
        self._hashed: dict[str, tuple[int, int]] = {}  # shard path -> (size, mtime_ns) whose sha256 matched
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
        except (OSError, ValueError, RecursionError) as e:
            raise FeatstoreError(f"cannot read {self.manifest_path}: {e}") from None
        return validate(manifest, self.manifest_path)  # every key's type, every file name a plain one

    def reload(self) -> None:
        """Read the manifest again (another process may have committed since)."""
        self.manifest = self._load_manifest()

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
        fd = self._open_lock(os.O_RDONLY)
        if fd is None:
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise self._locked(fd) from None
        finally:
            os.close(fd)

    def _open_lock(self, flags: int) -> int | None:
        """The lock file, opened with FLAGS but never through a symlink (a link planted there would have a
        writer truncate a file outside the store) nor a FIFO or folder; None when it does not exist."""
        path = os.path.join(self.root, ".lock")
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            if flags & os.O_CREAT:
                raise FeatstoreError(f"cannot create {path}: no such folder") from None
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FeatstoreError(f"{path} is a symbolic link, which featstore does not follow: remove it "
                                     "and run again") from None
            raise FeatstoreError(f"cannot open {path}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a hard link would carry our writes elsewhere
            os.close(fd)
            raise FeatstoreError(f"{path} is not a regular file of its own (a FIFO, a folder, or a file with "
                                 "other hard links): remove it and run again")
        return fd

    def _locked(self, fd: int) -> StoreLocked:
        holder = " ".join(os.pread(fd, 200, 0).decode(errors="replace").split()) or "another process"
        return StoreLocked(f"store {self.root} is in use by {holder}; try again when it finishes")

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Exclusive writer lock: a POSIX record lock, which dies with its process (so a lock left by
        kill -9 is simply free) and, unlike flock, is not inherited by forked DataLoader workers that
        may outlive a killed writer for a few seconds."""
        os.makedirs(self.root, exist_ok=True)
        fd = self._open_lock(os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise self._locked(fd) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} ({command}, since {time.strftime('%H:%M:%S')})\n".encode(), 0)
            if os.path.isfile(self.manifest_path):  # another writer may have committed since we looked
                self.reload()
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
        """The paths of the split's shards, each checked to be the file the manifest recorded (``unchanged``)."""
        return [self.unchanged(split, name, record) for name, record in self.shards(split).items()]

    def unchanged(self, split: str, name: str, record: dict[str, Any]) -> str:
        """The path of shard NAME, or ``damaged`` when it is not the file RECORD describes.

        Cheap when the file's size and mtime are the recorded ones; otherwise the file is hashed once (per
        Store) against the recorded sha256, or against the manifest on disk now, which a writer may have
        committed to since this reader loaded it."""
        path = os.path.join(self.split_dir(split), name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise damaged(path, "missing") from None
        seen = (st.st_size, st.st_mtime_ns)
        if seen in ((record["bytes"], record.get("mtime_ns")), self._hashed.get(path)):
            return path
        digest = sha256_file(path)
        if digest not in (record["sha256"], record.get("next", {}).get("sha256")):
            now = self._load_manifest()["splits"].get(split, {}).get("shards", {}).get(name, {})
            if digest not in (now.get("sha256"), now.get("next", {}).get("sha256")):
                why = "checksum mismatch" if st.st_size == record["bytes"] else \
                    f"{st.st_size} bytes, manifest says {record['bytes']}"
                raise damaged(path, why)
        self._hashed[path] = seen
        return path

    def sorted_runs(self, split: str) -> list[list[str]]:
        """The split's shard paths chained into sorted runs (shards whose id ranges follow one another)."""
        ranges = []
        for path in self.shard_paths(split):
            with _reading(path):
                ranges.append((*id_range(path), path))
        return _sorted_runs(ranges)

    def new_shard_name(self) -> str:
        """part-NNNNNN-xxxxxxxx.parquet: the counter, six digits or more (a 7th from shard 1,000,000 on), and
        eight random hex digits, so even a counter edited back never names an existing shard."""
        number = self.manifest["next_shard"]
        if number >= MAX_SHARDS:
            raise FeatstoreError(f"store {self.root} has used all {MAX_SHARDS} shard numbers")
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
        if rows != record["rows"]:
            return f"{rows} rows, manifest says {record['rows']}"
        try:  # what readers refuse: failed page checksums, NaN/inf embeddings
            for _ in run_batches([path], ["embedding"]):
                pass
        except DamagedShard as e:
            return e.why
        return None

    def reconcile(self, split: str) -> list[str]:
        """Bring the manifest in line with the split's folder before writing (writers only).

        Finishes or rolls back a commit a killed writer left half done, removes its temp files, and drops
        damaged or missing shards so that their rows are encoded again. Returns a line per repair."""
        info = self.split_info(split, create=True)
        folder = self.split_dir(split)
        for path in (os.path.dirname(folder), folder):  # what is removed or renamed below stays in the store
            if os.path.islink(path):
                raise FeatstoreError(f"{path} is a symbolic link, which featstore does not write through: move "
                                     "the folder it names into the store")
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
            elif not name.startswith((".", "_")) and name not in info["shards"]:  # a Parquet reader would read it
                notes.append(self._quarantine(split, name))  # a stray copy, or a delete that was interrupted
        suspects = self._suspects(split)
        for name, record in list(info["shards"].items()):
            pending = record.pop("next", None)
            path = os.path.join(folder, name)
            if pending and os.path.isfile(path) and sha256_file(path) == pending["sha256"]:
                record.update(pending, mtime_ns=os.stat(path).st_mtime_ns)  # renamed, not yet recorded
                continue
            if "sha256" not in record:  # a new shard whose rename never happened
                del info["shards"][name]
                continue
            problem = self.check_shard(split, name, record, full=name in suspects)
            if problem is None:
                record["mtime_ns"] = os.stat(path).st_mtime_ns
                continue
            del info["shards"][name]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            notes.append(f"dropped {problem} shard {name}; its rows will be encoded again")
        self.save()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, DAMAGED_NOTE))
        return notes

    def _note_damaged(self, problems: list[dict[str, str]]) -> None:
        """Leave verify's findings in each split's folder (``DAMAGED_NOTE``), so that the next writer checks
        those shards in full: a flipped bit or a record forged to match keeps the size and mtime that
        ``reconcile`` otherwise trusts. Best effort: a read-only store only misses the note."""
        damaged_shards: dict[str, list[str]] = {}
        for p in problems:
            if p["problem"] != "not in the manifest":  # strays: every writer moves them away anyway
                damaged_shards.setdefault(p["split"], []).append(os.path.basename(p["file"]))
        for split, names in damaged_shards.items():
            data = json.dumps(names).encode()

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    f.write(data)

            with contextlib.suppress(OSError):
                atomic_write(os.path.join(self.split_dir(split), DAMAGED_NOTE), write)

    def _suspects(self, split: str) -> set[str]:
        """The shard names verify noted damaged in SPLIT (nothing when there is no readable note)."""
        try:
            with open(os.path.join(self.split_dir(split), DAMAGED_NOTE)) as f:
                names = json.load(f)
        except (OSError, ValueError):
            return set()
        return {name for name in names if isinstance(name, str)} if isinstance(names, list) else set()

    def _quarantine(self, split: str, name: str) -> str:
        """Move NAME, which the manifest does not know, out of the split's folder into ``.quarantine`` (a hidden
        folder in the store, which Parquet readers skip), so readers never see its rows and nothing is lost."""
        folder = os.path.join(self.root, QUARANTINE, f"split={split}")
        for path in (os.path.dirname(folder), folder):
            if os.path.islink(path):  # a planted link would move the file out of the store
                raise FeatstoreError(f"{path} is a symbolic link: remove it and run again")
        os.makedirs(folder, exist_ok=True)
        dest = os.path.join(folder, name)
        if os.path.lexists(dest):
            stem, ext = os.path.splitext(name)
            dest = os.path.join(folder, f"{stem}.{uuid.uuid4().hex[:8]}{ext}")
        os.rename(os.path.join(self.split_dir(split), name), dest)
        return (f"moved images/split={split}/{name}, which the manifest does not know, to "
                f"{os.path.relpath(dest, self.root)}")

    def read_split(self, split: str, columns: list[str] | None = None, locate: bool = False) -> pa.Table:
        """All rows of a split, in id order (so results do not depend on shard layout).

        With LOCATE, two more columns say where each row lives (``shard``, ``row``), for ``fill_embeddings``.
        """
        paths = self.shard_paths(split)
        schema = shard_schema(self.dim, self.manifest["dtype"], {})
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
            with _reading(path):
                reader = streaming_reader(path, 1 << 20)
                for batch in reader.iter_batches(batch_size=READ_ROWS, columns=["embedding"]):
                    check_embeddings(batch.column(0), path)
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
        """Every shard against its recorded checksum and row count, the folders against the manifest, and the
        label index and class table against theirs."""
        problems = []
        for split in sorted(self.manifest["splits"]):
            for name, record in sorted(self.shards(split).items(), key=lambda item: (len(item[0]), item[0])):
                problem = self.check_shard(split, name, record, full=True)
                if problem:
                    problems.append({"split": split, "file": f"images/split={split}/{name}", "problem": problem})
        images = os.path.join(self.root, "images")
        for folder in sorted(os.listdir(images)) if os.path.isdir(images) else []:
            split = folder.removeprefix("split=")
            recorded = self.shards(split) if split in self.manifest["splits"] else {}
            listed = os.path.join(images, folder)
            for name in sorted(os.listdir(listed)) if os.path.isdir(listed) else []:
                if name.endswith(".parquet") and name not in recorded:
                    problems.append({"split": split, "file": f"images/{folder}/{name}", "problem": "not in the manifest"})
        self._note_damaged(problems)
        return problems + self._verify_labels()

    def _verify_labels(self) -> list[dict[str, str]]:
        """The label files the manifest names, against their recorded sha256 (a store made before class tables
        had one: the table's row count)."""
        labels = self.manifest.get("labels")
        if not labels:
            return []
        index, table = self.label_paths()
        problems = []
        for path, digest in ((index, labels["index_sha256"]), (table, labels.get("classes_sha256"))):
            if not os.path.isfile(path):
                problem = "missing"
            elif digest:
                problem = None if sha256_file(path) == digest else "checksum mismatch"
            else:
                try:
                    rows = pq.read_metadata(path).num_rows
                    problem = None if rows == labels["classes"] else f"{rows} rows, manifest says {labels['classes']}"
                except (OSError, pa.ArrowException) as e:
                    problem = f"unreadable ({' '.join(str(e).split())[:200]})"
            if problem:
                problems.append({"split": None, "file": os.path.relpath(path, self.root), "problem": problem})
        return problems

    def label_paths(self) -> tuple[str, str]:
        """The label index and class table the manifest names (``featstore labels`` writes them under new
        names each time, then commits the manifest); stores made before: ``index.faiss``, ``classes.parquet``."""
        labels = self.manifest.get("labels") or {}
        folder = os.path.join(self.root, LABELS)
        return (os.path.join(folder, labels.get("index_file", "index.faiss")),
                os.path.join(folder, labels.get("classes_file", "classes.parquet")))
