"""Where images come from. A source kind is a module here plus one line in ``REGISTRY``.

``SOURCE`` arguments: a folder (``folder:DIR`` or a plain path), ``cifar10:ROOT[:PART]``,
``cifar100:ROOT[:PART]``, ``manifest:FILE``, ``webdataset:PATTERN`` (tar shards) or ``hf:DIR_OR_NAME[:SPLIT]``
(a Hugging Face dataset). Every source follows ``base.Source``: list items in id order,
open one item.
"""

from __future__ import annotations

import functools
from typing import Callable

from featstore.sources.base import IMAGE_EXTENSIONS, PLAN_BATCH, Item, Source, decode_image, to_rgb
from featstore.sources.cifar import CifarSource
from featstore.sources.folder import FolderSource
from featstore.sources.hf import HfSource
from featstore.sources.manifest import ManifestSource
from featstore.sources.webdataset import WebDatasetSource

# spec prefix -> opener(rest of the spec, split name)
REGISTRY: dict[str, Callable[[str, str], Source]] = {
    "folder": FolderSource.from_spec,
    "manifest": ManifestSource.from_spec,
    "cifar10": functools.partial(CifarSource.from_spec, "cifar10"),
    "cifar100": functools.partial(CifarSource.from_spec, "cifar100"),
    "webdataset": WebDatasetSource.from_spec,
    "hf": HfSource.from_spec,
}


def open_source(spec: str, split: str) -> Source:
    """The source SPEC names (``KIND:REST`` for a registered kind, else a folder path)."""
    kind, sep, rest = spec.partition(":")
    if sep and rest and kind in REGISTRY:
        return REGISTRY[kind](rest, split)
    return FolderSource(spec)


__all__ = ["IMAGE_EXTENSIONS", "PLAN_BATCH", "REGISTRY", "CifarSource", "FolderSource", "Item", "ManifestSource",
           "Source", "decode_image", "open_source", "to_rgb"]
