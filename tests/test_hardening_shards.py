"""A damaged shard is never served: every reader refuses it with one line naming verify and encode, and a
stray file among a split's shards is quarantined by the next encode (issue 15, item 5)."""

from __future__ import annotations

import json
import os
import shutil

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import featstore
from featstore.errors import FeatstoreError
from featstore.store import Store, sha256_file, write_parquet
from featstore.store.shards import footer_sha256

ARGS = ("--model", "random:tiny", "--shard-rows", "20", "--quiet")


@pytest.fixture(scope="module")
def base(tmp_path_factory, dataset) -> str:
    """train (60 rows, 3 shards) and test (30 rows, 2 shards) with a label index: copied by each test."""
    store = str(tmp_path_factory.mktemp("hardening") / "store")
    for split in ("train", "test"):
        featstore("encode", os.path.join(dataset, split), "--store", store, "--split", split, *ARGS)
    featstore("labels", store)
    return store


@pytest.fixture
def store(tmp_path, base) -> str:
    copy = str(tmp_path / "store")
    shutil.copytree(base, copy)  # copy2: mtimes kept to the nanosecond, so the manifest's records still match
    return copy


def victim(store: str, split: str = "train") -> str:
    """The middle shard of SPLIT (by name)."""
    folder = os.path.join(store, "images", f"split={split}")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))
    return os.path.join(folder, names[len(names) // 2])


def record(store: str, path: str) -> dict:
    with open(os.path.join(store, "featstore.json")) as f:
        manifest = json.load(f)
    return manifest, manifest["splits"]["train"]["shards"][os.path.basename(path)]


def forge_record(store: str, path: str, mtime: bool = True) -> None:
    """Patch the manifest so it describes PATH as it is now (sha256, bytes, rows, footer, and mtime unless told
    not)."""
    manifest, rec = record(store, path)
    rec.update(sha256=sha256_file(path), bytes=os.path.getsize(path), rows=pq.read_metadata(path).num_rows,
               footer_sha256=footer_sha256(path))
    if mtime:
        rec["mtime_ns"] = os.stat(path).st_mtime_ns
    with open(os.path.join(store, "featstore.json"), "w") as f:
        json.dump(manifest, f)


def keep_mtime(path: str, damage) -> None:
    st = os.stat(path)
    damage(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def flip_embedding_byte(path: str) -> None:
    """One bit flipped in the middle of the embedding column's pages: same size, still parseable Parquet."""
    meta = pq.read_metadata(path).row_group(0)
    column = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith("embedding"))
    flip(path, column.data_page_offset + column.total_compressed_size // 2, 0x04)


def footer_range(path: str) -> range:
    """The offsets of a Parquet file's footer: its metadata, its length and the closing magic."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 8)
        return range(size - 8 - int.from_bytes(f.read(4), "little"), size)


def flip(path: str, offset: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def flip_footer_byte(path: str) -> None:
    """One bit flipped in the footer's metadata, which page checksums do not cover: the file still parses."""
    footer = footer_range(path)
    flip(path, footer[len(footer) // 2])


def truncate(path: str, keep) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep(os.path.getsize(path)))


def with_embeddings(table: pa.Table, matrix: np.ndarray) -> pa.Table:
    column = table.column("embedding")
    values = pa.array(matrix.reshape(-1).astype(column.type.value_type.to_pandas_dtype()), column.type.value_type)
    return table.set_column(table.schema.get_field_index("embedding"), "embedding",
                            pa.FixedSizeListArray.from_arrays(values, column.type.list_size))


def matrix_of(table: pa.Table) -> np.ndarray:
    return np.array(table.column("embedding").to_pylist(), np.float32)


def replace_same_size(path: str) -> None:
    """Another valid shard of the same size: two rows' embeddings swapped (a pair whose swap keeps the size)."""
    table = pq.read_table(path)
    matrix = matrix_of(table)
    tmp = path + ".swap"
    for i in range(1, table.num_rows):
        swapped = matrix.copy()
        swapped[[0, i]] = swapped[[i, 0]]
        write_parquet(with_embeddings(table, swapped), tmp)
        if os.path.getsize(tmp) == os.path.getsize(path):
            os.replace(tmp, path)
            return
    raise AssertionError("no same-size swap found")


def poison(value: float):
    def damage(path: str) -> None:
        table = pq.read_table(path)
        matrix = matrix_of(table)
        matrix[3, 5] = value
        write_parquet(with_embeddings(table, matrix), path)  # valid Parquet with page checksums
    return damage


# name -> damage(store, shard path); the forged ones patch the manifest to describe the new file
DAMAGES = {
    "bit flip, mtime kept": lambda store, path: keep_mtime(path, flip_embedding_byte),
    "bit flip": lambda store, path: flip_embedding_byte(path),
    "footer bit flip, mtime kept": lambda store, path: keep_mtime(path, flip_footer_byte),
    "truncated by half": lambda store, path: truncate(path, lambda size: size // 2),
    "last byte cut, mtime kept": lambda store, path: keep_mtime(path, lambda p: truncate(p, lambda size: size - 1)),
    "replaced, same size": lambda store, path: replace_same_size(path),
    "replaced, fewer rows": lambda store, path: pq.write_table(pq.read_table(path).slice(0, 5), path),
    "NaN, manifest forged": lambda store, path: (poison(float("nan"))(path), forge_record(store, path)),
    "inf, manifest forged": lambda store, path: (poison(float("inf"))(path), forge_record(store, path)),
}


def assert_refused(call) -> str:
    with pytest.raises(FeatstoreError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "is damaged" in message
    assert "featstore verify" in message and "featstore encode into split train" in message
    return message


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_reader_refuses_a_damaged_shard(store, damage):
    path = victim(store)
    located = Store.open(store).read_split("train", ["id", "label"], locate=True)  # before the damage
    DAMAGES[damage](store, path)
    reader = Store.open(store)
    message = assert_refused(lambda: reader.read_split("train"))
    assert os.path.basename(path) in message
    assert_refused(lambda: reader.features("train"))
    assert_refused(lambda: list(reader.iter_rows("train", ["embedding"])))
    out = np.zeros((located.num_rows, reader.dim), np.float32)
    assert_refused(lambda: Store.open(store).fill_embeddings("train", located.column("shard").to_numpy(),
                                                             located.column("row").to_numpy(), out))
    if "forged" not in damage and damage != "bit flip, mtime kept":  # size, mtime or footer differ from the record:
        # refused before reading a value (a flip with the mtime kept is found in the pages it damaged)
        assert_refused(lambda: list(Store.open(store).iter_rows("train", ["size", "label"])))
    # the other split is not touched by it
    assert reader.features("test")[1].shape == (30, reader.dim)


# one member of each family through the command line; for the two that keep the shard's size and mtime (which
# a writer otherwise trusts), the remedy the message names: verify, then encode
@pytest.mark.parametrize("damage, repair", [("bit flip, mtime kept", True), ("footer bit flip, mtime kept", True),
                                            ("last byte cut, mtime kept", False),
                                            ("replaced, same size", False), ("NaN, manifest forged", True)])
def test_query_and_probe_refuse_and_verify_then_encode_repair(store, dataset, tmp_path, damage, repair):
    path = victim(store)
    before = pq.read_table(os.path.join(store, "images", "split=train")).sort_by("id")
    DAMAGES[damage](store, path)
    out = str(tmp_path / "top5.parquet")
    commands = [("query", store, "--split", "train", "--json", "--out", out),
                ("probe", store, "--train-split", "train", "--test-split", "test", "--C", "0.316", "--json")]
    for command in commands:
        result = featstore(*command, check=False)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("featstore: error: shard images/split=train/") and "Traceback" not in line
        assert f"run featstore verify {store}, then featstore encode into split train" in line
        assert result.stdout == ""  # no result computed from damaged rows
    assert not os.path.exists(out)
    if not repair:
        return
    check = featstore("verify", store, check=False)
    assert check.returncode == 1 and os.path.basename(path) in check.stderr
    repaired = json.loads(featstore("encode", os.path.join(dataset, "train"), "--store", store, "--split", "train",
                                    *ARGS, "--json").stdout)
    assert repaired["encoded"] == 20 and any(os.path.basename(path) in line for line in repaired["repairs"])
    after = pq.read_table(os.path.join(store, "images", "split=train")).sort_by("id")
    assert after.column("id").to_pylist() == before.column("id").to_pylist()
    np.testing.assert_allclose(matrix_of(after), matrix_of(before), rtol=2e-3, atol=2e-3)
    assert json.loads(featstore(*commands[0]).stdout)["n"] == 60
    assert not os.path.exists(os.path.join(os.path.dirname(path), ".damaged.json"))  # the note is used up


def test_encode_checks_a_shard_rewritten_behind_its_back_in_full(store, dataset):
    """NaN rows written by someone who patched the checksum but not featstore's mtime: the next encode finds
    the changed mtime, hashes the file (it matches), scans it, and drops it, without a verify first."""
    path = victim(store)
    poison(float("nan"))(path)
    forge_record(store, path, mtime=False)
    assert_refused(lambda: Store.open(store).features("train"))
    repaired = json.loads(featstore("encode", os.path.join(dataset, "train"), "--store", store, "--split", "train",
                                    *ARGS, "--json").stdout)
    assert repaired["encoded"] == 20 and any(os.path.basename(path) in line for line in repaired["repairs"])
    assert np.isfinite(Store.open(store).features("train")[1]).all()


def test_shards_without_page_checksums_still_read(store):
    path = victim(store)
    table = pq.read_table(path)
    pq.write_table(table, path, sorting_columns=[pq.SortingColumn(0)])  # an older featstore's shard
    forge_record(store, path)
    ids, features, _ = Store.open(store).features("train")
    assert len(ids) == 60 and np.isfinite(features).all()


@pytest.mark.parametrize("hashed", [True, False], ids=["footer-hashed", "recorded-before-footer-hashes"])
def test_no_byte_flipped_in_a_footer_is_served(store, hashed):
    """Every byte of a shard's footer flipped in turn, size and mtime kept (page checksums do not cover it):
    each read is refused; a shard recorded before footers were hashed has its footer's schema and row count
    checked, so a read is refused or serves exactly the stored rows."""
    path = victim(store)
    if not hashed:
        manifest, rec = record(store, path)
        del rec["footer_sha256"]
        with open(os.path.join(store, "featstore.json"), "w") as f:
            json.dump(manifest, f)
    ids, embeddings, labels = Store.open(store).features("train")
    digest, st = sha256_file(path), os.stat(path)
    refused = 0
    for offset in footer_range(path):
        flip(path, offset)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        try:
            got = Store.open(store).features("train")
        except FeatstoreError as e:
            assert "is damaged" in str(e) and "\n" not in str(e), (offset, str(e))
            refused += 1
        else:
            assert got[0] == ids and np.array_equal(got[1], embeddings), offset
            assert np.array_equal(got[2], labels), offset
        flip(path, offset)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(path) == digest and len(Store.open(store).features("train")[0]) == 60
    assert refused == len(footer_range(path)) if hashed else refused > 0


def test_a_shard_a_writer_committed_after_the_reader_loaded_the_manifest_is_read(store):
    reader = Store.open(store)  # its manifest says the old file
    path = victim(store)
    table = pq.read_table(path)
    write_parquet(table.slice(1), path)  # a writer replaces the shard (one row gone) and commits it
    forge_record(store, path)
    ids = reader.read_split("train", ["id"]).column("id").to_pylist()
    assert len(ids) == 59 and table.column("id")[0].as_py() not in ids


def test_stray_parquet_files_are_quarantined_by_the_next_encode(store, dataset, tmp_path):
    folder = os.path.join(store, "images", "split=train")
    shard = victim(store)
    outside = tmp_path / "mine.parquet"
    shutil.copy2(shard, outside)
    # DuckDB and Polars read dot and underscore names too; a temp file featstore did not make is not its own
    strays = {"part-999999-deadbeef.parquet": shard, "foo.parquet": shard, "x.parquet": str(outside),
              f".{os.path.basename(shard)}.copy.parquet": shard, "_copy.parquet": shard, ".mine.tmp": str(outside),
              ".plan-0123abcd.tmp.parquet": shard}
    for name, source in strays.items():
        shutil.copy2(source, os.path.join(folder, name))
    own = [f".{os.path.basename(shard)}.0123abcd.tmp", ".plan-0123abcd.tmp", ".ray-0123abcd-40.tmp"]  # a crash's
    for name in own:
        shutil.copy2(shard, os.path.join(folder, name))
    hashes = {name: sha256_file(source) for name, source in strays.items()}
    assert Store.open(store).features("train")[1].shape[0] == 60  # featstore's readers read only known shards
    glob = f"read_parquet('{folder}/*.parquet', hive_partitioning=true)"
    copies = sum(name.endswith(".parquet") for name in strays)
    assert duckdb.sql(f"select count(*), count(distinct id) from {glob}").fetchall()[0] == (60 + 20 * copies, 60)
    check = featstore("verify", store, check=False)
    listed = {line.split(": ")[0].removeprefix("images/split=train/") for line in check.stderr.splitlines()}
    assert check.returncode == 1 and listed == set(strays)  # featstore's own temp files are not strays

    encode = ("encode", os.path.join(dataset, "train"), "--store", store, "--split", "train", *ARGS, "--json")
    result = json.loads(featstore(*encode).stdout)
    assert (result["encoded"], result["rows"]) == (0, 60)
    quarantine = os.path.join(store, ".quarantine", "split=train")
    for name in strays:
        assert any(name in line and ".quarantine/split=train/" in line for line in result["repairs"])
        assert sha256_file(os.path.join(quarantine, name)) == hashes[name]  # nothing the user put there is lost
        assert not os.path.exists(os.path.join(folder, name))
    assert sha256_file(str(outside)) == hashes["x.parquet"]  # the file outside the store is untouched
    assert not any(os.path.exists(os.path.join(folder, name)) or os.path.exists(os.path.join(quarantine, name))
                   for name in own)  # removed, as a crash's leftovers
    ids = ds.dataset(folder).to_table(columns=["id"]).column("id").to_pylist()  # a plain reader of the split
    assert len(ids) == 60 and len(set(ids)) == 60
    assert duckdb.sql(f"select count(*), count(distinct id) from {glob}").fetchall()[0] == (60, 60)
    assert pl.scan_parquet(f"{folder}/*.parquet").select(pl.len()).collect().item() == 60
    assert featstore("verify", store).returncode == 0

    shutil.copy2(shard, os.path.join(folder, "foo.parquet"))  # the same name again: both copies are kept
    again = json.loads(featstore(*encode).stdout)
    assert len(again["repairs"]) == 1 and again["encoded"] == 0
    kept = sorted(os.listdir(quarantine))
    assert len(kept) == len(strays) + 1 and sum(n.startswith("foo.") and n.endswith(".parquet") for n in kept) == 2


def test_a_model_output_that_is_not_finite_is_a_failure_not_a_row(tmp_path, dataset, monkeypatch):
    """NaN from the model, or a value past float16's range once stored, would make a shard every reader refuses:
    those images are recorded as failures and the rest of the split is written and readable."""
    import featstore.encode.runner
    import featstore.encode.writer

    forward = featstore.encode.runner._forward

    def poisoned(model, pixels, model_busy):
        out = forward(model, pixels, model_busy)
        out[0, 0] = np.nan  # the first image of every batch
        out[1, 3] = 1e6  # finite in float32, inf in the store's float16
        return out

    monkeypatch.setattr(featstore.encode.runner, "_forward", poisoned)
    store = str(tmp_path / "store")
    result = featstore.encode.encode(os.path.join(dataset, "test"), store, "test", model="random:tiny", batch_size=10,
                                     workers=0, progress=False)
    assert (result["rows"], result["failed"]) == (24, 6)  # 30 images in 3 batches, 2 poisoned per batch
    opened = Store.open(store)
    ids, embeddings, _ = opened.features("test")
    assert len(ids) == 24 and np.isfinite(embeddings).all()
    failures = opened.failures()
    assert {f["reason"] for f in failures} == {featstore.encode.writer.NOT_FINITE} and not set(ids) & {f["id"] for f in failures}
