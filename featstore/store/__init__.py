"""The on-disk store: plain Parquet shards plus one JSON manifest, both committed atomically.

Layout::

    DIR/featstore.json                     manifest: model identity, classes, shards (rows, sha256), failures
    DIR/images/split=NAME/part-*.parquet   one file per shard, rows sorted by id; every file there holds only live rows
    DIR/labels/classes-HEX.parquet         text embeddings per class (``featstore labels``; named by the manifest)
    DIR/labels/index-HEX.faiss             IndexFlatIP over the normalised class embeddings (named by the manifest)
    DIR/.lock                              locked (lockf) by the one writer

A shard becomes visible by an atomic rename of a fully written, fsynced file; rows are replaced or removed
by atomically replacing the shard file under the same name, and rows move between shards (``compact``) only
by exchanging the split's whole folder for a rewritten copy (``exchange.py``), so a plain Parquet reader never
sees a duplicate or a tombstone. The manifest is rewritten (``manifest.save``, its one writer) after each
commit; a commit cut short by a crash is finished or rolled back by the next writer (``repair.reconcile``).

The modules: ``manifest`` (typed records; load and save), ``schema`` (what a manifest may hold), ``shards``
(write and read shard files), ``merge`` (the one sorted merge), ``lock`` (one writer), ``exchange`` (folder
swaps), ``repair`` (verify and reconcile), ``files`` (atomic writes). ``Store`` below ties them together.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError
from featstore.store import exchange, lock, manifest, repair
from featstore.store.files import atomic_write, fsync_dir, sha256_file, temp_name
from featstore.store.manifest import Failure, LabelIndex, Manifest, Shard, Split
from featstore.store.merge import chain_runs
from featstore.store.read import LABELS, Reads
from featstore.store.schema import MAX_KEY, MAX_SHARDS, SPLIT_NAME
from featstore.store.shards import (DEFAULT_SHARD_ROWS, DTYPES, DamagedShard, check_footer, conform, damaged,
                                        embedding_matrix, id_range, read_shard, reading, run_batches, shard_schema,
                                        sort_by_id, streaming_reader, write_parquet)

MANIFEST = "featstore.json"
REPORTS = "reports"  # the one folder of the store that commands' outputs may go to (report's default)


def check_split_name(split: str) -> str:
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):  # the pattern refuses '..' too
        raise FeatstoreError(f"bad split name {split!r}: use letters, digits, '_', '-' and '.'")
    return split


class Store(Reads):
    """A featstore directory. Reads need no lock; every writer holds ``lock()``. ``manifest`` is the typed
    record of ``featstore.json`` (None before the first encode); ``save`` writes it."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.manifest_path = os.path.join(self.root, MANIFEST)
        self.manifest: Manifest | None = None
        self._hashed: dict[str, tuple[int, int]] = {}  # shard path -> (size, mtime_ns) whose sha256 matched
        self._keys_checked: set[str] = set()  # splits whose next_key was checked against their shards' keys
        if os.path.isfile(self.manifest_path):
            self.reload()

    # ---- manifest -------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str) -> "Store":
        store = cls(root)
        if not store.exists:
            raise FeatstoreError(f"no featstore store at {root} (run featstore encode first)")
        return store

    @property
    def exists(self) -> bool:
        return self.manifest is not None

    def reload(self) -> None:
        """Read the manifest again (another process may have committed since); checked whole."""
        self.manifest = manifest.load(self.manifest_path)

    def create(self, model: dict[str, Any], dtype: str) -> None:
        self.manifest = manifest.new(model, dtype)
        os.makedirs(os.path.join(self.root, "images"), exist_ok=True)

    def save(self) -> None:
        manifest.save(self.manifest_path, self.manifest)

    @property
    def dim(self) -> int:
        return int(self.manifest.dim)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    def class_ids(self, names: list[str]) -> dict[str, int]:
        """Ids for class names, appending unseen names so ids agree across splits (matched by name)."""
        classes = self.manifest.classes
        for name in names:
            if name not in classes:
                classes.append(name)
        return {name: i for i, name in enumerate(classes)}

    def split_info(self, split: str, create: bool = False) -> Split:
        splits = self.manifest.splits
        if split not in splits:
            if not create:
                have = ", ".join(sorted(splits)) or "none"
                raise FeatstoreError(f"store {self.root} has no split {split!r} (splits: {have})")
            splits[split] = Split()
        return splits[split]

    def set_labels(self, labels: LabelIndex) -> None:
        """Commit LABELS as the store's label set (its files are written and fsynced already)."""
        self.manifest.labels = labels
        self.save()

    def check_output(self, out: str, folder: bool = False) -> str:
        """OUT (a command's ``--out``) as an absolute path, refused inside the store except under its
        ``reports/`` folder (symbolic links on the way resolved), and, for a file, when it is a folder or not a
        regular file (the rename that writes it would replace /dev/null or a FIFO)."""
        out = os.path.abspath(out)
        real = os.path.realpath(out)  # every link on the way resolved, the last one too
        root = os.path.realpath(self.root)
        if (real + os.sep).startswith(root + os.sep) and \
                not (real + os.sep).startswith(os.path.join(root, REPORTS) + os.sep):
            raise FeatstoreError(f"--out {out} is inside the store {self.root}: choose a path outside it "
                                 f"(or under its {REPORTS}/ folder)")
        if folder:
            if os.path.lexists(out) and not os.path.isdir(out):
                raise FeatstoreError(f"--out {out} is not a folder")
        elif os.path.isdir(out):
            raise FeatstoreError(f"--out {out} is a folder: give a file name")
        elif os.path.lexists(out) and not os.path.isfile(out):
            raise FeatstoreError(f"--out {out} is not a regular file: give a file name")
        return out

    # ---- locking --------------------------------------------------------------------------------
    def check_unlocked(self) -> None:
        """Raise StoreLocked now if a writer holds the store (creates nothing)."""
        lock.check_unlocked(self.root)

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Exclusive writer lock (``lock.py``); the manifest is read again once it is held."""
        with lock.locked(self.root, command):
            if os.path.isfile(self.manifest_path):  # another writer may have committed since we looked
                self.reload()
            yield

    # ---- shards ---------------------------------------------------------------------------------
    def split_dir(self, split: str) -> str:
        return os.path.join(self.root, "images", f"split={check_split_name(split)}")

    def shards(self, split: str) -> dict[str, Shard]:
        """The split's committed shards (name -> record). After a crash between a folder exchange and its
        record's promotion (``rewrite_shards``), those the exchanged folder holds, so readers need no writer."""
        info = self.split_info(split)
        shards = {name: rec for name, rec in info.shards.items() if rec.committed}
        pending = info.exchange
        if pending and exchange.exchanged(self, split, pending):
            shards = {name: rec for name, rec in shards.items() if name not in pending.dropped}
            shards |= {name: Shard(s.rows, s.bytes, s.sha256, footer_sha256=s.footer_sha256)
                       for name, s in pending.added.items()}
        return shards

    def shard_paths(self, split: str) -> list[str]:
        """The paths of the split's shards, each checked to be the file the manifest recorded (``unchanged``)."""
        return [self.unchanged(split, name, record) for name, record in self.shards(split).items()]

    def unchanged(self, split: str, name: str, record: Shard) -> str:
        """The path of shard NAME, or ``damaged`` when it is not the file RECORD describes.

        Cheap when the file's size and mtime are the recorded ones: then only its footer, which page
        checksums do not cover, is checked (``check_footer``: a few KB). Otherwise the file is hashed once (per
        Store) against the recorded sha256, or against the manifest on disk now, which a writer may have
        committed to since this reader loaded it."""
        path = os.path.join(self.split_dir(split), name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise damaged(path, "missing") from None
        seen = (st.st_size, st.st_mtime_ns)
        if seen == self._hashed.get(path):
            return path
        if seen == (record.bytes, record.mtime_ns):
            check_footer(path, record.rows, record.footer_sha256, self.shard_schema())
            return path
        digest = sha256_file(path)
        if digest not in _digests(record):
            now = manifest.load(self.manifest_path).splits.get(split)
            if digest not in _digests(now.shards.get(name) if now else None):
                why = "checksum mismatch" if st.st_size == record.bytes else \
                    f"{st.st_size} bytes, manifest says {record.bytes}"
                raise damaged(path, why)
        self._hashed[path] = seen
        return path

    def shard_schema(self) -> pa.Schema:
        """The columns and types of this store's shards (without the model metadata)."""
        return shard_schema(self.dim, self.manifest.dtype, {})

    def sorted_runs(self, split: str) -> list[list[str]]:
        """The split's shard paths chained into sorted runs (shards whose id ranges follow one another)."""
        ranges = []
        for path in self.shard_paths(split):
            with reading(path):
                ranges.append((*id_range(path), path))
        return chain_runs(ranges)

    def new_shard_name(self) -> str:
        """part-NNNNNN-xxxxxxxx.parquet: the counter, six digits or more (a 7th from shard 1,000,000 on), and
        eight random hex digits, so even a counter edited back never names an existing shard."""
        number = self.manifest.next_shard
        if number >= MAX_SHARDS:
            raise FeatstoreError(f"store {self.root} has used all {MAX_SHARDS} shard numbers")
        self.manifest.next_shard = number + 1
        return f"part-{number:06d}-{uuid.uuid4().hex[:8]}.parquet"

    def give_keys(self, split: str, table: pa.Table) -> pa.Table:
        """TABLE with a fresh key for each row whose ``key`` is null (all of a new batch's; rows of shards written
        before keys existed), in row order, from the split's counter. A key names one embedding of one row for
        good: it is never given again, and a row keeps it through retouches, patches and compaction (a changed
        file's new row gets a new key). The counter is saved with the next commit, before any shard holding
        these keys becomes visible, so a key seen in a shard is always below the recorded counter."""
        table = conform(table, self.shard_schema()) if "key" not in table.column_names else table
        column = table.column("key")
        missing = column.null_count
        if not missing:
            return table
        info = self.split_info(split, create=True)
        if split not in self._keys_checked and info.shards:  # a counter edited down never gives a stored key again
            info.next_key = max(info.next_key, self._highest_key(split) + 1)
            self._keys_checked.add(split)
        if info.next_key + missing > MAX_KEY:
            raise FeatstoreError(f"split {split!r} has used all {MAX_KEY} row keys")
        keys = column.fill_null(0).to_numpy().astype(np.int64)  # a copy, writable
        nulls = column.is_null().to_numpy()
        keys[nulls] = np.arange(info.next_key, info.next_key + missing, dtype=np.int64)
        info.next_key += missing
        index = table.schema.get_field_index("key")
        return table.set_column(index, table.schema.field(index), pa.array(keys, pa.int64()))

    def _highest_key(self, split: str) -> int:
        """The highest key the split's shards hold (-1: none), from their footers' statistics (or the column)."""
        highest = -1
        for path in self.shard_paths(split):
            with reading(path):
                meta = pq.read_metadata(path)
                if "key" not in meta.schema.to_arrow_schema().names:
                    continue
                column = meta.schema.to_arrow_schema().get_field_index("key")
                stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
                if all(s is not None and s.has_min_max for s in stats):
                    highest = max([highest, *(s.max for s in stats)])
                else:
                    keys = read_shard(path, ["key"]).column(0).drop_null()
                    highest = max(highest, pc.max(keys).as_py() if len(keys) else -1)
        return highest

    def key_all_rows(self, split: str) -> int:
        """Give every row of SPLIT a key (writers only, under the lock): shards written before keys existed are
        rewritten in place, one atomic replacement each (a kill leaves each shard old or keyed). Returns the
        rows that got one."""
        given = 0
        for path in self.shard_paths(split):
            name = os.path.basename(path)
            if "key" in pq.read_schema(path).names and not read_shard(path, ["key"]).column(0).null_count:
                continue
            table = read_shard(path, schema=self.shard_schema())
            missing = table.column("key").null_count
            self.write_shard(split, self.give_keys(split, table), name=name)
            given += missing
        return given

    def write_shard(self, split: str, table: pa.Table, name: str | None = None) -> str:
        """Commit TABLE as a new shard, or as an atomic replacement of shard NAME.

        The manifest learns the new file's checksum ("next") before the rename and promotes it after,
        so a writer killed between the two leaves a state the next writer can tell apart from damage."""
        folder = self.split_dir(split)
        os.makedirs(folder, exist_ok=True)
        name = name or self.new_shard_name()
        path = os.path.join(folder, name)
        tmp = temp_name(folder, name)
        try:
            written = write_parquet(table, tmp)
            record = self.split_info(split, create=True).shards.setdefault(name, Shard())
            record.next = written
            self.save()
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fsync_dir(folder)
        record.commit(written, os.stat(path).st_mtime_ns)
        self.save()
        return name

    def rewrite_shards(self, split: str, dropped: set[str]):
        """Replace shards DROPPED by the tables written with the yielded ``write(table)``, all at once, by one
        folder exchange (``exchange.rewrite_shards``)."""
        return exchange.rewrite_shards(self, split, dropped)

    def delete_shard(self, split: str, name: str) -> None:
        self.split_info(split).shards.pop(name, None)
        self.save()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.split_dir(split), name))

    def reconcile(self, split: str) -> list[str]:
        """Bring the manifest in line with the split's folder before writing (``repair.reconcile``)."""
        return repair.reconcile(self, split)

    def verify(self) -> list[dict[str, str]]:
        """Every file the manifest names, checked in full (``repair.verify``)."""
        return repair.verify(self)


def _digests(record: Shard | None) -> tuple[str | None, ...]:
    """The sha256s a shard file may have under RECORD: the committed one and a pending replacement's."""
    if record is None:
        return ()
    return record.sha256, record.next.sha256 if record.next else None


__all__ = ["DEFAULT_SHARD_ROWS", "DTYPES", "LABELS", "MANIFEST", "REPORTS", "DamagedShard", "Failure", "LabelIndex", "Manifest",
           "Shard", "Split", "Store", "atomic_write", "check_split_name", "conform", "damaged", "embedding_matrix",
           "id_range", "read_shard", "run_batches", "sha256_file", "shard_schema", "sort_by_id", "streaming_reader",
           "write_parquet"]
