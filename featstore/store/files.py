"""File steps every commit is made of: hashing, fsync, and all-or-nothing writes."""

from __future__ import annotations

import hashlib
import os
import uuid


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(folder: str, name: str) -> str:
    """A hidden temp file for NAME in FOLDER (``.NAME.xxxxxxxx.tmp``: Parquet readers skip it, writers remove it)."""
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str, write) -> None:
    """Write via ``write(tmp_path)``, fsync, rename over PATH, fsync the folder: all or nothing."""
    folder, name = os.path.split(path)
    tmp = temp_name(folder, name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(folder)
