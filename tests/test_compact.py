"""Compaction: a split's sorted runs of shards merged into fewer, with every row unchanged, crash-safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import REPO, draw_image, featstore
from test_operations import shard_fingerprints

import featstore.encode as encode_module
import featstore.store.exchange as store_module
from featstore.compact import compact
from featstore.encode import encode
from featstore.errors import FeatstoreError
from featstore.store import Store

OPTIONS = dict(model="random:tiny", batch_size=4, workers=0, shard_rows=4, progress=False)


def interleaved_store(root, counts=(16, 8, 8, 8)) -> tuple[str, str]:
    """A split built by one encode per count, whose ids interleave (night r adds img_K_r for K < its count):
    as many sorted runs as counts."""
    src, store = root / "src", str(root / "store")
    src.mkdir()
    for night, count in enumerate(counts):
        for k in range(count):
            draw_image(k % 3, 100 * night + k).save(src / f"img_{k:03d}_{night}.png")
        encode(str(src), store, "train", **OPTIONS)
    return str(src), store


def plain_rows(store: str) -> list[dict]:
    """Every row as a plain Parquet reader sees the split's folder, in id order; no id twice."""
    rows = sorted(pq.read_table(os.path.join(store, "images", "split=train")).to_pylist(), key=lambda r: r["id"])
    assert len({r["id"] for r in rows}) == len(rows), "duplicate rows"
    return rows


def runs(store: str) -> list[list[str]]:
    return Store(store).sorted_runs("train")


def test_compaction_merges_the_smallest_runs_and_changes_no_row(tmp_path):
    src, store = interleaved_store(tmp_path)
    before = plain_rows(store)
    assert len(runs(store)) == 4
    largest = max(runs(store), key=len)  # the first night's 4 shards
    assert len(largest) == 4
    inodes = {p: os.stat(p).st_ino for p in largest}

    result = compact(store, max_runs=2, shard_rows=6, progress=False)["splits"]["train"]
    assert (result["runs_before"], result["runs"]) == (4, 2)
    assert result["rows_rewritten"] == 24  # the three smallest runs; the largest is kept
    assert {p: os.stat(p).st_ino for p in largest} == inodes  # hard-linked, not copied
    assert plain_rows(store) == before

    done = featstore("compact", store, "--split", "train", "--shard-rows", "6", "--json")
    result = json.loads(done.stdout)["splits"]["train"]
    assert (result["runs"], result["rows_rewritten"], result["shards"]) == (1, 40, 7)
    assert plain_rows(store) == before == Store(store).read_split("train").to_pylist()
    assert [n for n in os.listdir(store) if n.startswith(".")] == [".lock"]  # the old folders are gone
    assert featstore("verify", store).returncode == 0

    fingerprints = shard_fingerprints(store)
    again = encode(src, store, "train", **OPTIONS)  # the walk over the compacted split finds nothing to do
    assert (again["encoded"], again["unchanged"], again["shards_written"], again["compacted"]) == (0, 40, 0, 0)
    assert shard_fingerprints(store) == fingerprints


def test_encode_compacts_a_split_past_auto_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(encode_module, "AUTO_RUNS", 2)
    monkeypatch.setattr(encode_module, "AUTO_KEEP", 1)
    src, store = interleaved_store(tmp_path, counts=(10, 10))
    assert len(runs(store)) == 2  # not past AUTO_RUNS yet
    for k in range(10):
        draw_image(k % 3, 900 + k).save(os.path.join(src, f"img_{k:03d}_x.png"))  # ids among the stored ones
    result = encode(src, store, "train", **OPTIONS)
    assert (result["encoded"], result["rows"], result["compacted"]) == (10, 30, 30)
    assert len(runs(store)) == 1 and len(plain_rows(store)) == 30


@pytest.mark.parametrize("moment", ["before the exchange", "after the exchange"])
def test_a_kill_during_compaction_leaves_a_readable_split_the_next_writer_settles(tmp_path, moment):
    """SIGKILL right before or right after the folder exchange: plain readers and featstore see every row
    once, verify passes before any writer ran, and the next writer removes the leftovers and records the
    new shards (after the exchange) or keeps the old (before it)."""
    _, store = interleaved_store(tmp_path)
    before = plain_rows(store)
    swap = "os._exit(9)" if moment == "before the exchange" else "(exchange(a, b), os._exit(9))"
    killed = ("import os, sys; import featstore.store.exchange as s; exchange = s.exchange_folders; "
              f"s.exchange_folders = lambda a, b: {swap}; "
              "from featstore.compact import compact; compact(sys.argv[1], progress=False)")
    assert subprocess.run([sys.executable, "-c", killed, store], cwd=REPO).returncode == 9
    assert Store(store).split_info("train").exchange is not None  # the kill came between record and promotion
    assert plain_rows(store) == before == Store(store).read_split("train").to_pylist()
    assert featstore("verify", store).returncode == 0
    assert len(runs(store)) == (4 if moment == "before the exchange" else 1)

    result = compact(store, progress=False)["splits"]["train"]
    assert result["runs"] == 1 and result["rows_rewritten"] == (40 if moment == "before the exchange" else 0)
    assert Store(store).split_info("train").exchange is None
    assert [n for n in os.listdir(store) if n.startswith(".")] == [".lock"]
    assert plain_rows(store) == before
    assert featstore("verify", store).returncode == 0


def test_a_filesystem_without_folder_exchange_leaves_the_split_as_it_was(tmp_path, monkeypatch):
    _, store = interleaved_store(tmp_path, counts=(10, 10))
    before, manifest = plain_rows(store), open(os.path.join(store, "featstore.json")).read()
    monkeypatch.setattr(store_module, "RENAME_EXCHANGE", 1 << 30)  # a flag renameat2 refuses (EINVAL)
    with pytest.raises(FeatstoreError, match="atomic folder exchange"):
        compact(store, progress=False)
    assert plain_rows(store) == before and len(runs(store)) == 2
    assert json.loads(open(os.path.join(store, "featstore.json")).read())["splits"] == json.loads(manifest)["splits"]
    assert [n for n in os.listdir(store) if n.startswith(".")] == [".lock"]
