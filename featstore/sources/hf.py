"""Hugging Face ``datasets`` datasets: ``hf:DIR[:SPLIT]`` (a ``save_to_disk`` folder) or ``hf:NAME[@CONFIG][:SPLIT]``
(a hub dataset already prepared in the local ``datasets`` cache, loaded offline: nothing is downloaded).

A DatasetDict's split is SPLIT, or the ``--split`` name without one; a single Dataset takes no SPLIT. The image
is the first column whose feature is ``Image``, the label the first ``ClassLabel`` column (its names are the
classes; -1 is no label). A row's id is ``SPLIT/ROW`` with the row number zero-padded to 9 digits, so ids sort
in row order. A row's fingerprint is its image's byte count and a number derived from the dataset's files
(their names, sizes and mtimes, and the dataset's fingerprint): while those files stay as they are, a rerun
reads no image; once they change, every image is hashed and only changed bytes are encoded again. An image
stored as a file path (no bytes) is fingerprinted by that file's size and mtime instead.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator


from featstore.errors import FeatstoreError
from featstore.sources import base
from featstore.sources.base import PLAN_BATCH, Item

ROW_DIGITS = 9


def _load(target: str, config: str | None, split: str | None, on_disk: bool):
    """The loaded Dataset or DatasetDict; any failure of ``datasets`` is one FeatstoreError line."""
    from unittest import mock

    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # not its notes on which cached copy it took
    try:
        if on_disk:
            return datasets.load_from_disk(target)
        with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):  # the cache only, never the network
            return datasets.load_dataset(target, config, split=split)
    except ConnectionError:  # what a name missing from the cache comes to, offline
        raise FeatstoreError(f"hf:{target}: not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}); "
                             "featstore reads hub datasets offline: load it once with datasets.load_dataset") from None
    except Exception as e:
        raise FeatstoreError(f"cannot load {target}: {type(e).__name__}: {e}".splitlines()[0][:400]) from None
    finally:
        datasets.logging.set_verbosity(verbosity)


class HfSource(base.Source):
    """One split of a Hugging Face dataset; see the module's notes."""

    lists_hashes = False  # hashes are taken only when the dataset's files changed (see the module's notes)

    def __init__(self, target: str, config: str | None, split: str | None, default_split: str):
        import datasets

        on_disk = os.path.isdir(target)
        if not on_disk and (os.path.isabs(target) or target.startswith((".", "~")) or os.path.exists(target)):
            raise FeatstoreError(f"hf:{target}: no such dataset folder")
        if on_disk:
            target = os.path.abspath(target)
            if config:
                raise FeatstoreError(f"hf:{target}: a save_to_disk folder has no configs (drop @{config})")
        loaded = _load(target, config, split or default_split, on_disk)
        if isinstance(loaded, datasets.DatasetDict):
            split = split or default_split
            if split not in loaded:
                raise FeatstoreError(f"{target} has splits {', '.join(sorted(loaded))}, not {split!r}: "
                                     f"use hf:{target}:SPLIT")
            loaded = loaded[split]
        elif split and on_disk:
            raise FeatstoreError(f"{target} holds one Dataset, not splits: use hf:{target} without :{split}")
        self.split = split or default_split
        self.spec = f"hf:{target}{'@' + config if config else ''}:{self.split}"
        features = loaded.features
        self.image = next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
        if self.image is None:
            raise FeatstoreError(f"{self.spec} has no Image column (columns: {', '.join(features)})")
        self.label = next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        self._classes = list(features[self.label].names) if self.label else []
        # raw Arrow rows (the Image column as {bytes, path}), so nothing is decoded by datasets
        self.rows = loaded.select_columns([self.image] + ([self.label] if self.label else [])).with_format("arrow")
        stamp = hashlib.sha256(str(getattr(loaded, "_fingerprint", "")).encode())
        for f in loaded.cache_files:
            st = os.stat(f["filename"])
            stamp.update(f"\0{f['filename']}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        self.stamp = int(stamp.hexdigest()[:15], 16)  # the rows' mtime_ns: any change to the files changes it

    def classes(self) -> list[str]:
        return list(self._classes)

    def iter_items(self) -> Iterator[Item]:
        import pyarrow.compute as pc

        for start in range(0, len(self.rows), PLAN_BATCH):
            table = self.rows[start:start + PLAN_BATCH]
            images = table.column(self.image)
            labels = table.column(self.label).to_pylist() if self.label else None
            # byte counts from the offsets: listing reads no image
            sizes = pc.binary_length(pc.struct_field(images, "bytes")).to_pylist()
            paths = pc.struct_field(images, "path").to_pylist()
            for i, (size, path) in enumerate(zip(sizes, paths)):
                row_id = f"{self.split}/{start + i:0{ROW_DIGITS}d}"
                label = labels[i] if labels else None
                name = self._classes[label] if label is not None and 0 <= label < len(self._classes) else None
                yield self._item(row_id, name, size, path)

    def _item(self, row_id: str, label: str | None, size: int | None, path: str | None) -> Item:
        if size is not None:
            return Item(row_id, row_id, label, size, self.stamp)
        if path:
            try:
                st = os.stat(path)
                return Item(row_id, row_id, label, st.st_size, st.st_mtime_ns)
            except OSError as e:
                return Item(row_id, row_id, label, -1, -1, error=f"image file {path}: {e.strerror}")
        return Item(row_id, row_id, label, 0, self.stamp, error="row has no image")

    def read(self, item: Item) -> bytes:
        image = self.rows[int(item.id.rpartition("/")[2])].column(self.image)[0].as_py() or {}
        if image.get("bytes") is not None:
            return image["bytes"]
        if image.get("path"):
            with open(image["path"], "rb") as f:
                return f.read()
        raise FileNotFoundError("row has no image")


    @classmethod
    def from_spec(cls, rest: str, split: str) -> "HfSource":
        """``DIR``, ``DIR:SPLIT``, ``NAME[@CONFIG]`` or ``NAME[@CONFIG]:SPLIT`` (a folder whose name holds ':' is
        taken whole when it exists)."""
        target, sep, part = rest.rpartition(":")
        if not sep or os.path.isdir(rest):
            target, part = rest, ""
        if not os.path.isdir(target) and "@" in target:
            target, _, config = target.partition("@")
            return cls(target, config, part or None, split)
        return cls(target, None, part or None, split)
