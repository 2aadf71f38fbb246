"""Rows move between shards (``compact``) only by exchanging a split's whole folder for a rewritten copy.

The new folder is built beside the store (``.exchange-*``: kept shards hard-linked, new ones written there),
recorded in the manifest (``Split.exchange``), then swapped with the split's folder in one atomic exchange, so a
plain Parquet reader lists either every old shard or every new one, never a row twice. A crash before the
exchange leaves the old split (the next writer removes the copy); one after it leaves the new split, which
readers already see and the next writer records (``finish``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa

from featstore.errors import FeatstoreError
from featstore.store.files import fsync_dir
from featstore.store.manifest import Exchange, ShardStats
from featstore.store.shards import write_parquet

if TYPE_CHECKING:
    from featstore.store import Store

RENAME_EXCHANGE = 2  # renameat2's flag: swap two paths atomically (Linux 3.15+; ext4, xfs, btrfs, tmpfs)


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


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no bytes copied), or a copy with the same mtime where links are not allowed."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def rewrite_shards(store: "Store", split: str, dropped: set[str]) -> Iterator[Any]:
    """Replace shards DROPPED by the tables written with the yielded ``write(table)``, all at once."""
    folder = store.split_dir(split)
    staging = os.path.join(store.root, f".exchange-{split}-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    added: dict[str, ShardStats] = {}

    def write(table: pa.Table) -> str:
        name = store.new_shard_name()
        added[name] = write_parquet(table, os.path.join(staging, name))
        return name

    try:
        for name in store.shards(split):
            if name not in dropped:
                _link_or_copy(os.path.join(folder, name), os.path.join(staging, name))
        yield write
        fsync_dir(staging)
        info = store.split_info(split)
        info.exchange = Exchange(os.path.basename(staging), added, sorted(dropped))
        store.save()
        try:
            exchange_folders(staging, folder)
        finally:
            if not exchanged(store, split, info.exchange):
                info.exchange = None
                store.save()
        fsync_dir(os.path.dirname(folder))
        fsync_dir(store.root)
        finish(store, split)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old folder after an exchange, else the copy


def exchanged(store: "Store", split: str, pending: Exchange) -> bool:
    """Whether the recorded exchange happened: the new shards' names (unique) are in the split's folder."""
    folder = store.split_dir(split)
    return any(os.path.isfile(os.path.join(folder, name)) for name in pending.added)


def finish(store: "Store", split: str) -> None:
    """Record the shards of an exchange that happened as the split's shards."""
    info = store.split_info(split)
    shards = store.shards(split)
    folder = store.split_dir(split)
    for name in info.exchange.added:
        shards[name].mtime_ns = os.stat(os.path.join(folder, name)).st_mtime_ns
    info.exchange = None
    info.shards = shards
    store.save()
