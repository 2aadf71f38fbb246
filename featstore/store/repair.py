"""Checks and repairs: ``verify`` finds what disagrees with the manifest; ``reconcile`` (every writer, before
it writes) finishes or rolls back a commit a killed writer left half done and drops what is damaged."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from typing import TYPE_CHECKING, Collection

import pyarrow as pa
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError
from featstore.store import exchange, image_index
from featstore.store.files import atomic_write, sha256_file
from featstore.store.manifest import Shard
from featstore.store.schema import SHARD_PATTERN
from featstore.store.shards import DamagedShard, check_footer, run_batches

if TYPE_CHECKING:
    from featstore.store import Store

QUARANTINE = ".quarantine"  # files found among a split's shards that the manifest does not know go here
DAMAGED_NOTE = ".damaged.json"  # in a split's folder: shards verify found damaged, for the next writer to check
# featstore's own temp files in a split's folder, which a writer removes when a crash left them: a shard's or
# the note's (``files.temp_name``: .NAME.HEX.tmp), encode's spills (``encode/plan.py``, ``encode/writer.py``:
# .plan-HEX.tmp, .changes-HEX.tmp, .replace-HEX.tmp) and Ray decode journals (``encode/ray_runner.py``:
# .ray-HEX-N.tmp). Anything else there that the manifest does not name is a stray (``stray``).
OWN_TEMP = re.compile(rf"\A\.(?:(?:{SHARD_PATTERN}|\.damaged\.json)\.[0-9a-f]{{8}}"
                      r"|(?:plan|changes|replace)-[0-9a-f]{8}|ray-[0-9a-f]{8}-[0-9]+)\.tmp\Z")


def stray(name: str, shards: Collection[str]) -> bool:
    """Whether NAME, in a split's folder, is neither one of its SHARDS nor featstore's own file there: a copy
    (``part-1.copy.parquet``, ``_part-1.parquet``: DuckDB and Polars read those too), a delete that was
    interrupted, or anything else put there. Every writer moves strays to ``QUARANTINE``."""
    return name not in shards and name != DAMAGED_NOTE and not OWN_TEMP.fullmatch(name)


def check_shard(store: "Store", split: str, name: str, record: Shard, full: bool = True) -> str | None:
    """Why shard NAME on disk disagrees with its manifest RECORD, or None when it matches.

    ``full=False`` trusts an unchanged size and mtime and checks the footer only (cheap enough for every
    run); ``verify`` hashes."""
    path = os.path.join(store.split_dir(split), name)
    if not os.path.isfile(path):
        return "missing"
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) == (record.bytes, record.mtime_ns):
        try:
            check_footer(path, record.rows, record.footer_sha256, store.shard_schema())
        except DamagedShard as e:
            return e.why
        if not full:
            return None
    if st.st_size != record.bytes or sha256_file(path) != record.sha256:
        return "checksum mismatch"
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as e:
        return f"unreadable ({e})"
    if rows != record.rows:
        return f"{rows} rows, manifest says {record.rows}"
    try:  # what readers refuse: failed page checksums, NaN/inf embeddings
        for _ in run_batches([path], ["embedding"]):
            pass
    except DamagedShard as e:
        return e.why
    return None


def reconcile(store: "Store", split: str) -> list[str]:
    """Bring the manifest in line with the split's folder before writing (writers only).

    Finishes or rolls back a commit a killed writer left half done, removes its temp files, and drops
    damaged or missing shards so that their rows are encoded again. Returns a line per repair."""
    info = store.split_info(split, create=True)
    folder = store.split_dir(split)
    for path in (os.path.dirname(folder), folder):  # what is removed or renamed below stays in the store
        if os.path.islink(path):
            raise FeatstoreError(f"{path} is a symbolic link, which featstore does not write through: move "
                                 "the folder it names into the store")
    if info.index:
        image_index.folder(store)  # a symlink there is refused now, before any shard is written
    notes: list[str] = []
    if info.exchange and exchange.exchanged(store, split, info.exchange):
        exchange.finish(store, split)  # the folder was swapped: record its shards
    elif info.exchange:
        info.exchange = None  # it was not: the old split stands
        store.save()
    exchanging = {rec.exchange.folder for rec in store.manifest.splits.values() if rec.exchange}
    for name in os.listdir(store.root):
        if name.startswith(".exchange-") and name not in exchanging:  # a copy, or an old folder, left by a crash
            shutil.rmtree(os.path.join(store.root, name), ignore_errors=True)
    on_disk = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    for name in sorted(on_disk):
        if OWN_TEMP.fullmatch(name):
            os.unlink(os.path.join(folder, name))
        elif stray(name, info.shards):
            notes.append(_quarantine(store, split, name))
    suspects = _suspects(folder)
    for name, record in list(info.shards.items()):
        pending, record.next = record.next, None
        path = os.path.join(folder, name)
        if pending and os.path.isfile(path) and sha256_file(path) == pending.sha256:
            record.commit(pending, os.stat(path).st_mtime_ns)  # renamed, not yet recorded
            continue
        if not record.committed:  # a new shard whose rename never happened
            del info.shards[name]
            continue
        problem = check_shard(store, split, name, record, full=name in suspects)
        if problem is None:
            record.mtime_ns = os.stat(path).st_mtime_ns
            continue
        del info.shards[name]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        notes.append(f"dropped {problem} shard {name}; its rows will be encoded again")
    store.save()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, DAMAGED_NOTE))
    image_index.remove_unnamed(store)  # index files a killed commit left (image_index.py)
    return notes


def verify(store: "Store") -> list[dict[str, str]]:
    """Every shard against its recorded checksum and row count, the folders against the manifest, and the
    label index and class table against theirs."""
    problems = []
    for split in sorted(store.manifest.splits):
        for name, record in sorted(store.shards(split).items(), key=lambda item: (len(item[0]), item[0])):
            problem = check_shard(store, split, name, record, full=True)
            if problem:
                problems.append({"split": split, "file": f"images/split={split}/{name}", "problem": problem})
    images = os.path.join(store.root, "images")
    for folder in sorted(os.listdir(images)) if os.path.isdir(images) else []:
        split = folder.removeprefix("split=")
        recorded = store.shards(split) if split in store.manifest.splits else {}
        listed = os.path.join(images, folder)
        for name in sorted(os.listdir(listed)) if os.path.isdir(listed) else []:
            if stray(name, recorded):
                problems.append({"split": split, "file": f"images/{folder}/{name}", "problem": "not in the manifest"})
    _note_damaged(store, problems)
    return problems + _verify_labels(store) + _verify_image_indexes(store)


def _verify_image_indexes(store: "Store") -> list[dict[str, str]]:
    """Each split's image index file against its recorded sha256, and files in ``image-index/`` that are not
    featstore's: those it left (``image_index.unnamed``: a killed commit's) are no damage, the next writer
    removes them."""
    where = os.path.join(store.root, image_index.FOLDER)
    if os.path.islink(where) or (os.path.lexists(where) and not os.path.isdir(where)):
        return [{"split": None, "file": image_index.FOLDER, "problem": "a symbolic link or a file, not a folder"}]
    problems = []
    for split, info in sorted(store.manifest.splits.items()):
        problem = image_index.check(store, info.index) if info.index else None
        if problem:
            problems.append({"split": split, "file": f"{image_index.FOLDER}/{info.index.file}", "problem": problem})
    known = image_index.named(store) | set(image_index.unnamed(store))
    for name in sorted(os.listdir(where)) if os.path.isdir(where) else []:
        if name not in known:
            problems.append({"split": None, "file": f"{image_index.FOLDER}/{name}", "problem": "not in the manifest"})
    return problems


def _verify_labels(store: "Store") -> list[dict[str, str]]:
    """The label files the manifest names, against their recorded sha256 (a store made before class tables
    had one: the table's row count)."""
    labels = store.manifest.labels
    if not labels:
        return []
    index, table = store.label_paths()
    problems = []
    for path, digest in ((index, labels.index_sha256), (table, labels.classes_sha256)):
        if not os.path.isfile(path):
            problem = "missing"
        elif digest:
            problem = None if sha256_file(path) == digest else "checksum mismatch"
        else:
            try:
                rows = pq.read_metadata(path).num_rows
                problem = None if rows == labels.classes else f"{rows} rows, manifest says {labels.classes}"
            except (OSError, pa.ArrowException) as e:
                problem = f"unreadable ({' '.join(str(e).split())[:200]})"
        if problem:
            problems.append({"split": None, "file": os.path.relpath(path, store.root), "problem": problem})
    return problems


def _note_damaged(store: "Store", problems: list[dict[str, str]]) -> None:
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
            atomic_write(os.path.join(store.split_dir(split), DAMAGED_NOTE), write)


def _suspects(folder: str) -> set[str]:
    """The shard names verify noted damaged in the split FOLDER (nothing when there is no readable note)."""
    try:
        with open(os.path.join(folder, DAMAGED_NOTE)) as f:
            names = json.load(f)
    except (OSError, ValueError):
        return set()
    return {name for name in names if isinstance(name, str)} if isinstance(names, list) else set()


def _quarantine(store: "Store", split: str, name: str) -> str:
    """Move NAME, which the manifest does not know, out of the split's folder into ``.quarantine`` (a hidden
    folder in the store, which Parquet readers skip), so readers never see its rows and nothing is lost."""
    folder = os.path.join(store.root, QUARANTINE, f"split={split}")
    for path in (os.path.dirname(folder), folder):
        if os.path.islink(path):  # a planted link would move the file out of the store
            raise FeatstoreError(f"{path} is a symbolic link: remove it and run again")
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, name)
    if os.path.lexists(dest):
        stem, ext = os.path.splitext(name)
        dest = os.path.join(folder, f"{stem}.{uuid.uuid4().hex[:8]}{ext}")
    os.rename(os.path.join(store.split_dir(split), name), dest)
    return (f"moved images/split={split}/{name}, which the manifest does not know, to "
            f"{os.path.relpath(dest, store.root)}")
