"""A folder of images: first-level subfolders holding images are classes named by the folder; a flat folder
is unlabelled.

The walk follows symbolic links to files and folders wherever they point (as ``find -L``); a folder already
on the current path (a link loop) is not entered again. What the walk cannot list becomes a failure Item (with
``error`` set) instead of stopping it: a folder that cannot be listed (id ``folder/``, so the plan keeps the
stored rows under it), a dangling link, an image name that is not a regular file (FIFO, device), a file gone
between listing and ``stat``, a name that is not valid UTF-8 (id with the bytes escaped as ``\\xff``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Iterator

from PIL import Image

from featstore.errors import FeatstoreError
from featstore.sources import base
from featstore.sources.base import IMAGE_EXTENSIONS, BadFile, Item

FOLDER, FILE, BROKEN, BAD_NAME = 0, 1, 2, 3  # what an entry is, following links (BROKEN: a link to nothing)


def os_reason(error: OSError) -> str:
    """ERROR in a failure record: BadFile's own words, else the exception's name and strerror (not the path)."""
    return str(error) if isinstance(error, BadFile) else f"{type(error).__name__}: {error.strerror or error}"


def _escaped(name: str) -> str:
    """NAME as a valid UTF-8 string: bytes that are not UTF-8 (``os.fsdecode``'s surrogates) as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _kind(entry: os.DirEntry) -> int:
    try:
        if entry.is_dir():
            return FOLDER
    except OSError:  # a link loop, or a folder that cannot be searched: stat says which below
        pass
    return BROKEN if entry.is_symlink() and not os.path.exists(entry.path) else FILE


def _broken_link(path: str) -> str:
    """Why the link at PATH leads nowhere."""
    try:
        target = _escaped(os.readlink(path))
    except OSError:
        target = "?"
    try:
        os.stat(path)
    except OSError as e:
        return f"broken symlink to {target} ({os_reason(e)})"
    return "symlink changed while listed"


class FolderSource(base.Source):
    """A directory of images; first-level subfolders holding images are classes named by the folder, a flat
    folder is unlabelled."""

    lists_hashes = False  # items' sha256 is known only once a file is read

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FeatstoreError(f"source {root} is not a folder" if os.path.exists(root)
                                 else f"source folder {root} does not exist")
        self.root = os.path.abspath(root)
        self.spec = self.root
        self._skipped: set[tuple[int, int]] = set()

    def skip(self, folder: str) -> None:
        """Never walk FOLDER (the store, when it sits inside the source), however a path reaches it."""
        try:
            st = os.stat(folder)
        except OSError:
            return
        self._skipped.add((st.st_dev, st.st_ino))

    def _entries(self, folder: str, prefix: str) -> list[tuple[str, os.DirEntry, int]]:
        """FOLDER's visible entries as (id, entry, kind), in id order: a folder's id ends with "/", so that
        the walk yields ids in plain string order, the order of the store's rows. A dangling link not named
        as an image may have been a folder (an unmounted share): its id ends with "/" too, so its rows stay."""
        with os.scandir(folder) as scan:
            entries = [e for e in scan if not e.name.startswith(".")]
        listed = []
        for entry in entries:
            kind, name = _kind(entry), _escaped(entry.name)
            folder_like = kind == FOLDER or (kind == BROKEN and not entry.name.lower().endswith(IMAGE_EXTENSIONS))
            listed.append((prefix + name + ("/" if folder_like else ""), entry, kind if name == entry.name else BAD_NAME))
        listed.sort(key=lambda e: e[0])
        return listed

    def _walk(self, folder: str, prefix: str, above: tuple[tuple[int, int], ...]) -> Iterator[Item]:
        """Items under FOLDER (ids starting with PREFIX); ABOVE: (st_dev, st_ino) of the folders on the path."""
        try:
            entries = self._entries(folder, prefix)
        except OSError as e:
            if not prefix:
                raise FeatstoreError(f"cannot list source folder {self.root}: {os_reason(e)}") from None
            yield self._failure(prefix, f"cannot list folder ({os_reason(e)})")
            return
        previous = None
        for rel, entry, kind in entries:
            if rel == previous:
                continue  # an escaped name equal to a real one: listed once
            previous = rel
            if kind == BAD_NAME:
                yield self._failure(rel, "name is not valid UTF-8")
            elif kind == FOLDER:
                yield from self._folder(entry.path, rel, above)
            elif kind == BROKEN:
                yield self._failure(rel, _broken_link(entry.path))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                yield self._file(entry, rel)

    def _folder(self, path: str, rel: str, above: tuple[tuple[int, int], ...]) -> Iterator[Item]:
        try:
            st = os.stat(path)
        except OSError as e:
            yield self._failure(rel, f"cannot open folder ({os_reason(e)})")
            return
        key = (st.st_dev, st.st_ino)
        if key in self._skipped:
            return
        if key in above:
            yield self._failure(rel, "symlink loop (a folder that contains itself)")
            return
        yield from self._walk(path, rel, (*above, key))

    def _file(self, entry: os.DirEntry, rel: str) -> Item:
        try:
            st = entry.stat()
            base.check_regular(st.st_mode)
        except FileNotFoundError:
            return self._failure(rel, "vanished while listed")
        except OSError as e:
            return self._failure(rel, os_reason(e))
        return Item(rel, rel, sys.intern(rel.split("/", 1)[0]) if "/" in rel else None, st.st_size, st.st_mtime_ns)

    @staticmethod
    def _failure(rel: str, reason: str) -> Item:
        return Item(rel, rel, None, -1, -1, error=reason)

    def _root_key(self) -> tuple[tuple[int, int], ...]:
        st = os.stat(self.root)
        return ((st.st_dev, st.st_ino),)

    def classes(self) -> list[str]:
        """First-level folders whose walk yields at least one file PIL can identify (its header, not decoded;
        the walk stops at the first): a folder of empty or broken files, without images, or the store is none.
        Items the walk lists under such a folder have no class, and fail to decode anyway."""
        try:
            entries = self._entries(self.root, "")
        except OSError as e:
            raise FeatstoreError(f"cannot list source folder {self.root}: {os_reason(e)}") from None
        above = self._root_key()
        return [rel[:-1] for rel, entry, kind in entries if kind == FOLDER
                and any(item.error is None and self._identifiable(item) for item in self._folder(entry.path, rel, above))]

    def _identifiable(self, item: Item) -> bool:
        """Whether PIL recognises ITEM's header; a file swapped for a FIFO since the listing is never waited on."""
        try:
            fd = os.open(os.path.join(self.root, item.path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        with os.fdopen(fd, "rb") as file:
            try:
                base.check_regular(os.fstat(fd).st_mode)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image words it
                    with Image.open(file):
                        return True
            except Exception:  # anything PIL or the file system says: not an image
                return False

    def iter_items(self) -> Iterator[Item]:
        """The images, in id order (relative paths as strings), found as they are yielded; what cannot be
        listed comes as an Item with ``error`` set."""
        yield from self._walk(self.root, "", self._root_key())

    def read(self, item: Item) -> bytes:
        return base.read_file(os.path.join(self.root, item.path))

    @classmethod
    def from_spec(cls, rest: str, split: str) -> "FolderSource":
        return cls(rest)
