"""The store on disk: crash safety (SIGKILL and resume), plain-Parquet readers, info and verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq

from conftest import REPO, SLOW_MODEL, featstore


def store_rows(store: str, split: str) -> dict[str, np.ndarray]:
    table = pq.read_table(os.path.join(store, "images", f"split={split}"))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows"
    return dict(zip(ids, np.array(table.column("embedding").to_pylist(), np.float32)))


def committed_shards(store: str, split: str) -> int:
    try:
        with open(os.path.join(store, "featstore.json")) as f:
            shards = json.load(f)["splits"][split]["shards"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum("sha256" in r for r in shards.values())


def start_encode(source: str, store: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "featstore", "encode", source, "--store", store, "--split", "train", "--model", SLOW_MODEL,
         "--batch-size", "4", "--shard-rows", "8", "--workers", "1", "--quiet", *extra],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"encode finished before it could be killed: {process.stderr.read()}"
        assert time.time() < deadline, "condition never met"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_same_store(store: str, reference: str) -> None:
    mine, ref = store_rows(store, "train"), store_rows(reference, "train")
    assert sorted(mine) == sorted(ref)
    for row_id in ref:
        np.testing.assert_allclose(mine[row_id], ref[row_id], rtol=2e-3, atol=2e-3)
    folder = os.path.join(store, "images", "split=train")
    assert not [n for n in os.listdir(folder) if not n.endswith(".parquet")], "temp files left behind"
    assert featstore("verify", store).returncode == 0


def test_sigkill_after_first_shards_then_resume(tmp_path, slow_source, uninterrupted):
    store = str(tmp_path / "store")
    kill_when(start_encode(slow_source, store), lambda: committed_shards(store, "train") >= 1)
    killed_at = committed_shards(store, "train")
    assert 1 <= killed_at < 3
    # the killed store is readable as it stands: committed rows only, no duplicates
    partial = store_rows(store, "train")
    assert 0 < len(partial) < 24
    result = json.loads(featstore("encode", slow_source, "--store", store, "--split", "train", "--model", SLOW_MODEL,
                                  "--batch-size", "4", "--shard-rows", "8", "--quiet", "--json").stdout)
    assert result["unchanged"] == len(partial)
    assert result["encoded"] == 24 - len(partial)
    assert_same_store(store, uninterrupted)


def test_duckdb_and_polars_read_the_shards(tmp_path, dataset):
    store = str(tmp_path / "store")
    for split in ("train", "test"):
        featstore("encode", os.path.join(dataset, split), "--store", store, "--split", split,
                  "--model", "random:tiny", "--shard-rows", "25", "--quiet")
    counts = dict(duckdb.sql(
        f"select split, count(*) from read_parquet('{store}/images/*/*.parquet', hive_partitioning=true) group by split"
    ).fetchall())
    assert counts == {"train": 60, "test": 30}
    dim = duckdb.sql(f"select len(embedding) from read_parquet('{store}/images/*/*.parquet') limit 1").fetchall()[0][0]
    assert dim == 64
    frame = pl.read_parquet(f"{store}/images/*/*.parquet", hive_partitioning=True)
    assert frame.group_by("split").len().sort("split").rows() == [("test", 30), ("train", 60)]
    assert frame["label"].null_count() == 0

    info = json.loads(featstore("info", store, "--json").stdout)
    assert info["model"] == "random:tiny:0" and info["dim"] == 64
    assert info["classes"] == ["circle", "cross", "ring", "square", "stripes", "triangle"]
    assert info["splits"]["train"] == {"rows": 60, "failed": 0, "shards": 3, "source": os.path.join(dataset, "train")}
    assert info["splits"]["test"]["rows"] == 30
    assert info["label_index"] is False


def test_fill_embeddings_places_every_located_row(tmp_path, monkeypatch):
    """The probe's streaming reader: rows spread over several shards and record batches, asked for in any
    order (the sweep asks validation-last), land in the right rows of the matrix, in float32, from float16."""
    import featstore.store.shards as store_module
    from featstore.encode.plan import Plan
    from featstore.encode.writer import ShardWriter
    from featstore.sources import Item
    from featstore.store import Store

    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(23, 8)).astype(np.float16)
    store = Store(str(tmp_path / "store"))
    store.create({"spec": "test", "sha256": None, "architecture": "none", "preprocessing": "none", "precision": "fp32", "dim": 8}, "float16")
    with store.lock("test"):
        store.split_info("train", create=True)
        writer = ShardWriter(store, "train", Plan(), {}, shard_rows=10)  # shards of 10, 10 and 3 rows
        writer.add([Item(f"{i:03d}", "", None, 0, 0) for i in range(23)], embeddings, [""] * 23, [])
        writer.close()
    monkeypatch.setattr(store_module, "READ_ROWS", 4)  # several record batches per shard, one of them partial
    located = store.read_split("train", ["id"], locate=True)
    order = rng.permutation(located.num_rows)[:17]  # a shuffled subset, as a validation-last order would be
    out = np.full((len(order), 8), np.nan, dtype=np.float32)
    store.fill_embeddings("train", located.column("shard").to_numpy()[order], located.column("row").to_numpy()[order], out)
    wanted = [int(row_id) for row_id in np.array(located.column("id").to_pylist())[order]]
    np.testing.assert_array_equal(out, embeddings[wanted].astype(np.float32))
    everything = np.empty((located.num_rows, 8), dtype=np.float32)
    store.fill_embeddings("train", located.column("shard").to_numpy(), located.column("row").to_numpy(), everything)
    np.testing.assert_array_equal(everything, embeddings[[int(i) for i in located.column("id").to_pylist()]].astype(np.float32))


def test_rows_stream_in_id_order_from_interleaved_runs(tmp_path, monkeypatch):
    """A rerun reads the stored rows in id order without loading the split: shards are written sorted by id
    (and say so in their footer), shards whose id ranges follow one another are read as one run, and the
    runs are merged. A shard without the mark (written by an older featstore) is sorted as it is read."""
    import featstore.store.shards as store_module
    from featstore.encode.plan import Plan
    from featstore.encode.writer import ShardWriter
    from featstore.sources import Item
    from featstore.store import Store, sha256_file

    store = Store(str(tmp_path / "store"))
    store.create({"spec": "test", "sha256": None, "architecture": "none", "preprocessing": "none", "precision": "fp32", "dim": 4}, "float32")

    def encode_ids(ids: list[str]) -> None:
        with store.lock("test"):
            store.split_info("train", create=True)
            writer = ShardWriter(store, "train", Plan(), {}, shard_rows=4)
            writer.add([Item(i, "", None, int(i), 0) for i in ids], np.zeros((len(ids), 4)), [""] * len(ids), [])
            writer.close()

    encode_ids([f"{i:03d}" for i in range(0, 30, 2)])  # evens: four shards, one after another
    encode_ids([f"{i:03d}" for i in range(1, 30, 2)][::-1])  # odds among them, handed over in reverse
    encode_ids(["100", "101"])  # past every stored id: continues a run
    paths = store.shard_paths("train")
    runs = store.sorted_runs("train")
    assert len(paths) == 9 and len(runs) == 2 and sorted(sum(runs, [])) == sorted(paths)
    for path in paths:
        ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        assert ids == sorted(ids) and pq.read_metadata(path).row_group(0).sorting_columns == (pq.SortingColumn(0),)

    monkeypatch.setattr(store_module, "READ_ROWS", 3)  # several record batches per shard
    located = store.read_split("train", ["id"], locate=True)
    shard_of = {i: os.path.basename(paths[s]) for i, s in zip(located.column("id").to_pylist(), located.column("shard").to_pylist())}
    expected = sorted([f"{i:03d}" for i in range(30)] + ["100", "101"])
    for _ in range(2):
        rows = list(store.iter_rows("train", ["size"]))
        assert [row[0] for row in rows] == expected
        assert all(shard == shard_of[row_id] and size == int(row_id) for row_id, shard, size in rows)
        legacy = pq.read_table(paths[0])  # as an older featstore wrote it: unsorted, unmarked
        pq.write_table(legacy.take(list(range(legacy.num_rows))[::-1]), paths[0])
        assert pq.read_metadata(paths[0]).row_group(0).sorting_columns == ()
        with store.lock("test"):  # recorded as that featstore would have recorded it
            record = store.split_info("train").shards[os.path.basename(paths[0])]
            record.bytes, record.sha256, record.mtime_ns = os.path.getsize(paths[0]), sha256_file(paths[0]), os.stat(paths[0]).st_mtime_ns
            record.footer_sha256 = None  # an older featstore did not hash footers
            store.save()
