"""One writer per store: a POSIX record lock on ``STORE/.lock``, which holds the writer's pid and command.

The lock dies with its process (a lock left by kill -9 is simply free) and, unlike flock, is not inherited by
forked DataLoader workers that may outlive a killed writer for a few seconds. Readers take no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from typing import Iterator

from featstore.errors import FeatstoreError, StoreLocked

LOCK = ".lock"


def check_unlocked(root: str) -> None:
    """Raise StoreLocked now if a writer holds the store at ROOT (creates nothing)."""
    fd = _open(root, os.O_RDONLY)
    if fd is None:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _locked(root, fd) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(root: str, command: str) -> Iterator[None]:
    """Hold the exclusive writer lock of the store at ROOT (created if missing) as COMMAND."""
    os.makedirs(root, exist_ok=True)
    fd = _open(root, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise _locked(root, fd) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({command}, since {time.strftime('%H:%M:%S')})\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _open(root: str, flags: int) -> int | None:
    """The lock file, opened with FLAGS but never through a symlink (a link planted there would have a
    writer truncate a file outside the store) nor a FIFO or folder; None when it does not exist."""
    path = os.path.join(root, LOCK)
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


def _locked(root: str, fd: int) -> StoreLocked:
    holder = " ".join(os.pread(fd, 200, 0).decode(errors="replace").split()) or "another process"
    return StoreLocked(f"store {root} is in use by {holder}; try again when it finishes")
