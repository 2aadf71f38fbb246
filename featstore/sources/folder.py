"""A folder of images: first-level subfolders are classes named by the folder; a flat folder is unlabelled."""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Iterator

from PIL import Image

from featstore.errors import FeatstoreError
from featstore.sources import base
from featstore.sources.base import IMAGE_EXTENSIONS, Item


class FolderSource:
    """A directory of images; first-level subfolders are classes named by the folder, a flat folder is unlabelled."""

    lists_hashes = False  # items' sha256 is known only once a file is read

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FeatstoreError(f"source folder {root} does not exist")
        self.root = os.path.abspath(root)
        self.spec = self.root

    def _walk(self, folder: str):
        with os.scandir(folder) as scan:
            entries = [e for e in scan if not e.name.startswith(".")]
        # a folder sorts as "name/": then the walk yields relative paths in plain string order, the order
        # of the store's ids (only one folder's entries are held at a time)
        entries.sort(key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                yield entry

    def classes(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))

    def iter_items(self) -> Iterator[Item]:
        """The images, in id order (relative paths as strings), found as they are yielded."""
        for entry in self._walk(self.root):
            rel = os.path.relpath(entry.path, self.root).replace(os.sep, "/")
            label = sys.intern(rel.split("/", 1)[0]) if "/" in rel else None
            st = entry.stat()
            yield Item(rel, rel, label, st.st_size, st.st_mtime_ns)

    def read(self, item: Item) -> bytes:
        with open(os.path.join(self.root, item.path), "rb") as f:
            return f.read()

    def open(self, item: Item) -> tuple[str, Image.Image]:
        data = self.read(item)
        return hashlib.sha256(data).hexdigest(), base.decode_image(data)

    @classmethod
    def from_spec(cls, rest: str, split: str) -> "FolderSource":
        return cls(rest)
