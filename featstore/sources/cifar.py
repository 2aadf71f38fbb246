"""CIFAR-10/100 python pickle archives, as torchvision downloads them."""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Iterator

import numpy as np
from PIL import Image

from featstore.errors import FeatstoreError
from featstore.sources import base
from featstore.sources.base import Item


class CifarSource(base.Source):
    """CIFAR-10/100 python pickle archives laid out as torchvision downloads them (``ROOT/cifar-100-python``)."""

    LAYOUT = {
        "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    "batches.meta", "label_names", "labels"),
        "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_label_names", "fine_labels"),
    }

    lists_hashes = True  # the pixels are in memory: items are listed with their sha256

    def __init__(self, kind: str, root: str, part: str):
        folder, parts, meta, names_key, labels_key = self.LAYOUT[kind]
        if part not in parts:
            raise FeatstoreError(f"{kind} has parts train and test, not {part!r}: use {kind}:ROOT:train or :test")
        self.root = os.path.join(os.path.abspath(root), folder)
        self.spec = f"{kind}:{os.path.abspath(root)}:{part}"
        if not os.path.isdir(self.root):
            raise FeatstoreError(f"no {folder} folder under {root}")
        try:
            self._classes = [self._decode(n) for n in self._unpickle(meta)[names_key]]
            batches = [self._unpickle(name) for name in parts[part]]
            self.data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
            self.labels = [int(x) for b in batches for x in b[labels_key]]
        except FeatstoreError:
            raise
        except Exception as e:
            raise FeatstoreError(f"{self.root} is not a {kind} python archive ({type(e).__name__}: {e})") from None
        self.part = part

    @staticmethod
    def _decode(name) -> str:
        return name.decode() if isinstance(name, bytes) else str(name)

    def _unpickle(self, name: str) -> dict:
        path = os.path.join(self.root, name)
        if not os.path.isfile(path):
            raise FeatstoreError(f"missing {path}")
        with open(path, "rb") as f:  # CIFAR's own format is pickle; only archives the user names are read
            raw = pickle.load(f, encoding="bytes")
        return {self._decode(k): v for k, v in raw.items()}

    def classes(self) -> list[str]:
        return list(self._classes)

    def iter_items(self) -> Iterator[Item]:
        """Images in id order ("train/10" sorts before "train/2"), hashed as they are yielded."""
        for i in sorted(range(len(self.data)), key=str):
            sha = hashlib.sha256(self.data[i].tobytes()).hexdigest()
            yield Item(f"{self.part}/{i}", f"{self.part}/{i}", self._classes[self.labels[i]], 3072, 0, sha)

    def open(self, item: Item) -> tuple[str, Image.Image]:
        index = int(item.path.rsplit("/", 1)[1])
        row = self.data[index]
        return hashlib.sha256(row.tobytes()).hexdigest(), Image.fromarray(row.transpose(1, 2, 0))

    @classmethod
    def from_spec(cls, kind: str, rest: str, split: str) -> "CifarSource":
        """``ROOT[:train|test]``; without a part, the split's name is taken as the part."""
        root, _, part = rest.rpartition(":") if rest.endswith((":train", ":test")) else (rest, "", split)
        return cls(kind, root, part)
