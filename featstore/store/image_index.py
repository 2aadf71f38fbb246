"""A split's image index file: ``STORE/image-index/SPLIT-HEX.faiss``, named by the split's manifest record.

Committed like the label files: the new index is written under a new name (temp file, fsync, rename), the
manifest switches to it in one save, then the file it replaced is removed. A kill at any step leaves the
manifest naming the old file or the new one, both whole; a file no record names (the new one before the
switch, the old one after it) is removed by the next writer (``remove_unnamed``) and listed by ``verify``.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

from featstore.errors import FeatstoreError
from featstore.store import manifest
from featstore.store.files import atomic_write, sha256_file
from featstore.store.manifest import ImageIndex
from featstore.store.schema import IMAGE_INDEX_NAME

if TYPE_CHECKING:
    from featstore.store import Store

FOLDER = "image-index"


def folder(store: "Store", create: bool = False) -> str:
    """STORE/image-index; refused when it is a symbolic link or not a folder (a file removed there must be
    the store's own)."""
    path = os.path.join(store.root, FOLDER)
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        raise FeatstoreError(f"{path} is a symbolic link or a file, not the store's image index folder: move it "
                             "aside and run again")
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def path(store: "Store", record: ImageIndex) -> str:
    return os.path.join(store.root, FOLDER, record.file)


def commit(store: "Store", split: str, write: Callable[[str], None], fields: dict[str, Any]) -> ImageIndex:
    """Write the index with ``write(tmp_path)`` under a new name, switch SPLIT's record to it (FIELDS: the
    record's other fields), remove the file it replaced. Writers only, under the lock."""
    info = store.split_info(split)
    name = f"{split}-{uuid.uuid4().hex[:16]}.faiss"
    target = os.path.join(folder(store, create=True), name)
    atomic_write(target, write)
    fields = {"built_at": now()} | fields
    fields = fields | {"next_key": info.next_key}  # it holds the split's live rows as of this counter
    record = ImageIndex(file=name, sha256=sha256_file(target), bytes=os.path.getsize(target), **fields)
    info.index = record
    store.save()
    remove_unnamed(store)
    return record


def now() -> str:
    """The time of a commit as records hold it (UTC, ISO 8601 to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def drop(store: "Store", split: str) -> None:
    """Forget SPLIT's index (its file goes with the next ``remove_unnamed``)."""
    store.split_info(split).index = None
    store.save()
    remove_unnamed(store)


def named(store: "Store") -> set[str]:
    return {info.index.file for info in store.manifest.splits.values() if info.index}


def unnamed(store: "Store") -> list[str]:
    """Index files and featstore's temp files in the folder that no split's record names (never a folder:
    featstore writes none there, so one is not its own; ``verify`` lists it)."""
    where = os.path.join(store.root, FOLDER)
    if not os.path.isdir(where) or os.path.islink(where):
        return []
    keep = named(store)
    return sorted(name for name in os.listdir(where) if name not in keep and (
        IMAGE_INDEX_NAME.fullmatch(name) or (name.startswith(".") and name.endswith(".tmp")))
        and (os.path.islink(os.path.join(where, name)) or not os.path.isdir(os.path.join(where, name))))


def remove_unnamed(store: "Store") -> list[str]:
    """Remove ``unnamed`` files (a symlink is removed, never followed); other files are not featstore's."""
    gone = unnamed(store)
    for name in gone:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder(store), name))
    return gone


def load(store: "Store", split: str):
    """``(faiss index, record)`` of SPLIT, the file checked against its recorded sha256 first; one line when
    the split has none or it is damaged. A reader needs no lock: when a writer switched the split to a new file
    since this manifest was read (and removed the old one), the manifest is read again."""
    from featstore.index.images import load as read_index

    folder(store)
    while True:
        record = store.split_info(split).index
        if record is None:
            raise FeatstoreError(f"split {split!r} has no image index: run featstore index {store.root} "
                                 f"--split {split}")
        problem = check(store, record)
        if problem is None:
            index = read_index(path(store, record))
            problem = unfit(index, store.dim)
            if problem is None:
                return index, record
        now = manifest.load(store.manifest_path).splits.get(split)
        if not (now and now.index and now.index.file != record.file):
            raise FeatstoreError(f"the image index of split {split!r} ({FOLDER}/{record.file}) is missing or "
                                 f"damaged ({problem}): run featstore index {store.root} --split {split} to "
                                 "rebuild it")
        store.reload()


def unfit(index, dim: int) -> str | None:
    """Why a readable faiss INDEX cannot be a store of DIM's image index (another file put in its place, its
    sha256 edited into the manifest), or None."""
    import faiss

    if index.d != dim:
        return f"dimension {index.d}, not the store's {dim}"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT or not index.is_trained:
        return "not a trained inner-product index"
    return None


def check(store: "Store", record: ImageIndex) -> str | None:
    """What is wrong with the index file RECORD names (``missing``, ``checksum mismatch``), or None."""
    where = path(store, record)
    if os.path.islink(where) or not os.path.isfile(where):
        return "missing"
    return None if sha256_file(where) == record.sha256 else "checksum mismatch"
