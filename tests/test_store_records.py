"""The store as modules (issue 16): typed manifest records that load and save the same JSON, one sorted merge,
and ``skip`` on every source."""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

from conftest import REPO, write_folder
from featstore.encode import encode
from featstore.errors import FeatstoreError
from featstore.sources import REGISTRY, CifarSource, FolderSource, ManifestSource, Source
from featstore.sources.hf import HfSource
from featstore.sources.webdataset import WebDatasetSource
from featstore.store import Failure, Shard, Split, Store
from featstore.store.merge import InOrder, chain_runs, merge_sorted


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Split train of 8 images in shards of 3, one unreadable file (a failure), and a top-level key from a
    newer featstore."""
    root = tmp_path_factory.mktemp("records")
    source = root / "images"
    write_folder(str(source), per_class=4, seed=5, classes=["circle", "square"])
    (source / "circle" / "broken.png").write_bytes(b"not a png")
    store = str(root / "store")
    encode(str(source), store, "train", model="random:tiny", shard_rows=3, workers=0, progress=False)
    return store


def manifest_json(store: str) -> dict:
    with open(os.path.join(store, "featstore.json")) as f:
        return json.load(f)


def test_the_manifest_loads_as_typed_records_and_saves_the_same_json(store):
    before = manifest_json(store)
    before["from_a_newer_featstore"] = {"kept": True}  # a top-level key this featstore does not know
    with open(os.path.join(store, "featstore.json"), "w") as f:
        json.dump(before, f)
    opened = Store.open(store)
    split = opened.split_info("train")
    assert isinstance(split, Split) and split.source == before["splits"]["train"]["source"]
    assert all(isinstance(s, Shard) and s.committed and s.mtime_ns is not None for s in split.shards.values())
    assert sum(s.rows for s in split.shards.values()) == 8 and len(split.shards) == 3
    assert list(split.failed) == ["circle/broken.png"] and isinstance(split.failed["circle/broken.png"], Failure)
    assert opened.manifest.model == before["model"] and opened.manifest.classes == ["circle", "square"]
    with opened.lock("test"):
        opened.save()
    assert manifest_json(store) == before  # the same layout, the unknown key kept


def test_one_sorted_merge_refuses_disorder_and_reports_duplicates():
    evens, odds = [(f"{i:02d}", "e") for i in range(0, 10, 2)], [(f"{i:02d}", "o") for i in range(1, 10, 2)]
    assert [row[0] for row in merge_sorted([evens, odds, []])] == [f"{i:02d}" for i in range(10)]
    seen = []
    assert len(list(merge_sorted([[("a",), ("b",)], [("b",)]], duplicate=seen.append))) == 3 and seen == ["b"]
    with pytest.raises(FeatstoreError, match="out of id order"):
        list(merge_sorted([[("b",), ("a",)]]))
    rows = InOrder(iter(evens))
    assert rows.get("02") == ("02", "e") and rows.get("03") is None and rows.get("08") == ("08", "e")
    assert chain_runs([("a", "c", "1"), ("d", "f", "2"), ("b", "e", "3")]) == [["1", "2"], ["3"]]


def test_every_source_kind_is_a_source_with_skip():
    for kind in (FolderSource, ManifestSource, CifarSource, HfSource, WebDatasetSource):
        assert Source in kind.__mro__ and callable(kind.skip)
    assert len(REGISTRY) == 6
    assert CifarSource.skip(object.__new__(CifarSource), "/anywhere") is None  # the protocol's no-op


def test_only_the_store_package_touches_the_manifest_dict():
    """Outside featstore/store/, code goes through the typed records and Store's methods: no module indexes
    the manifest as a dict or writes featstore.json itself (jobs.py only reads it)."""
    package = pathlib.Path(REPO) / "featstore"
    for path in package.rglob("*.py"):
        if path.parent.name == "store":
            continue
        text = path.read_text()
        assert not re.search(r"\.manifest\[|\.manifest\.get\(|split_info\([^)]*\)\[", text), path
        assert "json.dump" not in text or "featstore.json" not in text, path
