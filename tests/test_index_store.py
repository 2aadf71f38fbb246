"""The image index in the store: stable row keys, `featstore index`, kept current by encode, verify, kill-safety."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from conftest import REPO, draw_image, featstore, write_folder
from test_image_index import one_thread  # noqa: F401 (autouse: faiss on one thread in this process too)

import featstore.index as fi
from featstore.encode import encode
from featstore.errors import FeatstoreError
from featstore.index.split import build_index, refresh
from featstore.index.synthetic import clip_like
from featstore.store import Store, conform, image_index, sha256_file

OPTIONS = dict(model="random:tiny", batch_size=8, workers=0, progress=False)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the test machine's cores are shared: faiss's OpenMP spin-waits


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 30-image folder and its store (split train, random:tiny), with a Flat index: copied by each test."""
    root = tmp_path_factory.mktemp("base")
    write_folder(root / "src", per_class=5, seed=3)
    encode(str(root / "src"), str(root / "store"), "train", **OPTIONS)
    build_index(str(root / "store"), "train", kind="flat", progress=False)
    return root




def keys_by_id(store: str) -> dict[str, int]:
    table = Store.open(store).read_split("train", ["id", "key"])
    return dict(zip(table.column("id").to_pylist(), table.column("key").to_pylist()))


def held(store: str, split: str = "train") -> np.ndarray:
    opened = Store.open(store)
    return fi.held_keys(image_index.load(opened, split)[0])


def assert_current(store: str, split: str = "train") -> None:
    """The index holds exactly the split's live keys, its record as many rows as the split; no leftovers."""
    opened = Store.open(store)
    live = opened.live_keys(split)
    assert np.array_equal(held(store, split), live)
    assert opened.summary()["splits"][split]["index"]["rows"] == len(live)
    assert opened.summary()["splits"][split]["index"]["current"]
    assert opened.verify() == [] and image_index.unnamed(opened) == []


def test_index_is_kept_current_by_encode_and_keys_are_stable(copy):
    src, store = copy
    result = featstore("index", store, "--split", "train", "--kind", "hnsw", "--json", env=ONE_THREAD)
    built = json.loads(result.stdout)
    assert set(built) == {"split", "kind", "rows", "bytes", "recall_at_10"}
    assert (built["split"], built["kind"], built["rows"], built["recall_at_10"]) == ("train", "HNSW32", 30, 1.0)
    before, next_key = keys_by_id(store), Store.open(store).split_info("train").next_key
    assert sorted(before.values()) == list(range(30)) and next_key == 30
    old_vectors = Store.open(store).embeddings_by_key("train", np.arange(30))
    removed, changed = ["circle/img_000.png", "ring/img_001.png"], ["cross/img_002.png", "square/img_003.png"]
    for name in removed:
        os.unlink(os.path.join(src, name))
    for number, name in enumerate(changed):
        draw_image(number + 1, 900 + number).save(os.path.join(src, name))
    for number in range(2):
        draw_image(4, 950 + number).save(os.path.join(src, "stripes", f"new_{number}.png"))

    result = encode(src, store, "train", **OPTIONS)

    assert result["index"] == {"kind": "HNSW32", "rows": 30, "added": 4, "removed": 4, "retrained": None}
    after = keys_by_id(store)
    kept = set(before) - set(removed) - set(changed)
    assert {i: after[i] for i in kept} == {i: before[i] for i in kept}  # unchanged rows keep their keys
    fresh = [after[i] for i in changed + ["stripes/new_0.png", "stripes/new_1.png"]]
    assert sorted(fresh) == list(range(next_key, next_key + 4))  # changed and new rows: new keys, never reused
    assert not set(removed) & set(after) and len(set(after.values())) == 30
    assert_current(store)
    index, _ = image_index.load(Store.open(store), "train")
    _, found = fi.search(index, old_vectors, 10)  # the removed and replaced rows' old vectors
    assert set(found.ravel().tolist()) <= set(after.values())  # never a row no longer in the split
    new_vectors = Store.open(store).embeddings_by_key("train", np.array(fresh))
    assert fi.search(index, new_vectors, 1)[1][:, 0].tolist() == fresh

    featstore("compact", store, "--split", "train", "--quiet")  # compaction keeps every key
    assert keys_by_id(store) == after
    file = Store.open(store).split_info("train").index.file
    stat = os.stat(os.path.join(store, "image-index", file))
    again = encode(src, store, "train", **OPTIONS)  # nothing changed: the index is not rewritten
    assert again["index"] == {"kind": "HNSW32", "rows": 30, "added": 0, "removed": 0, "retrained": None}
    assert Store.open(store).split_info("train").index.file == file
    assert os.stat(os.path.join(store, "image-index", file)).st_mtime_ns == stat.st_mtime_ns
    assert_current(store)


def test_rows_written_before_keys_get_them_from_featstore_index(copy):
    _, store = copy
    opened = Store.open(store)
    with opened.lock("test"):  # make the split what a store written before row keys holds
        for path in opened.shard_paths("train"):
            table = pa.parquet.read_table(path)
            opened.write_shard("train", table.drop_columns(["key"]), name=os.path.basename(path))
        info = opened.split_info("train")
        info.next_key, info.index = 0, None
        opened.save()
    assert "key" not in pa.parquet.read_schema(opened.shard_paths("train")[0]).names
    with pytest.raises(FeatstoreError, match="without keys"):
        opened.live_keys("train")

    result = featstore("index", store, "--split", "train", "--quiet", env=ONE_THREAD)

    assert "gave row keys to 30 rows written before keys" in result.stderr
    assert "Flat index of 30 rows" in result.stdout and "image-index/train-" in result.stdout
    assert sorted(keys_by_id(store).values()) == list(range(30))
    assert_current(store)
    shown = featstore("info", store).stdout
    assert "split train: 30 rows" in shown and "  index Flat: 30 rows, recall@10 1.000, 7.8 KiB, current" in shown


KILL = r"""
import os, signal, sys
from featstore.store import image_index

point, command, *paths = sys.argv[1:]
die = lambda *_, **__: os.kill(os.getpid(), signal.SIGKILL)
if point == "write":  # the new index half written to its temp file
    real_write = image_index.atomic_write
    def partial(target, write):
        def half(tmp):
            write(tmp)
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            die()
        real_write(target, half)
    image_index.atomic_write = partial
elif point == "switch":  # the new index renamed into place, the manifest not yet switched to it
    image_index.ImageIndex = die
elif point == "cleanup":  # the manifest switched, the file it replaced not yet removed
    real_remove = image_index.remove_unnamed
    called_by = lambda: sys._getframe(2).f_code.co_name
    image_index.remove_unnamed = lambda store: die() if called_by() == "commit" else real_remove(store)
if command == "index":
    from featstore.index.split import build_index
    build_index(paths[0], "train", kind="hnsw", progress=False)
else:
    from featstore.encode import encode
    encode(paths[1], paths[0], "train", model="random:tiny", batch_size=8, workers=0, progress=False)
print("not killed")
"""


@pytest.mark.parametrize("point, command", [("write", "index"), ("switch", "index"), ("cleanup", "index"),
                                            ("switch", "encode"), ("cleanup", "encode")])
def test_a_kill_while_the_index_is_committed_leaves_the_old_or_the_new_one(copy, point, command):
    src, store = copy
    old_keys, old_file = held(store), Store.open(store).split_info("train").index.file
    if command == "encode":  # a night that adds a file and removes one: the index update is what is killed
        os.unlink(os.path.join(src, "circle", "img_004.png"))
        draw_image(0, 777).save(os.path.join(src, "circle", "new.png"))

    killed = subprocess.run([sys.executable, "-c", KILL, point, command, store, src], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, **ONE_THREAD}, timeout=300)

    assert killed.returncode == -9, killed.stderr
    opened = Store.open(store)
    assert opened.verify() == []  # a kill leaves no damage: at most files the next writer removes
    left = image_index.unnamed(opened)
    assert len(left) == 1  # the new index's temp file or file, or the old file
    if (point, command) == ("switch", "index"):  # verify lists it, as no damage
        shown = featstore("verify", store)
        assert shown.stdout == "store ok\n" and f"note: image-index/{left[0]}: left by an interrupted" in shown.stderr
    index, record = image_index.load(opened, "train")
    new = point == "cleanup"
    assert record.file != old_file if new else record.file == old_file
    if command == "index":
        assert record.kind == ("HNSW32" if new else "Flat") and np.array_equal(fi.held_keys(index), old_keys)
    else:
        assert np.array_equal(fi.held_keys(index), opened.live_keys("train") if new else old_keys)
        assert len(opened.live_keys("train")) == 30 and not np.array_equal(opened.live_keys("train"), old_keys)
    if command == "index":  # the next writer brings it current and removes what the kill left
        build_index(store, "train", kind="hnsw", progress=False)
    else:
        encode(src, store, "train", **OPTIONS)
    assert_current(store)


def synthetic_store(root, base, rows: int, split: str = "syn") -> Store:
    """A store of ROWS clustered CLIP-like vectors (the base store's model), written through the store."""
    store = Store(str(root))
    store.create(Store.open(str(base / "store")).manifest.model, "float32")
    add_rows(store, split, clip_like(rows, store.dim, seed=11, batch=1000))
    return store


def add_rows(store: Store, split: str, stream) -> None:
    with store.lock("test"):
        for keys, vectors in stream:
            flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), store.dim)
            table = conform(pa.table({"id": [f"row-{k:07d}" for k in keys], "embedding": flat}), store.shard_schema())
            store.write_shard(split, store.give_keys(split, table))


def test_recall_at_10_against_exact_search_on_a_store_split(base, tmp_path):
    store = synthetic_store(tmp_path / "store", base, 3_000)

    result = build_index(store.root, "syn", kind="hnsw", progress=False)

    assert result["recall_at_10"] >= result["target"] == 0.95
    vectors = store.embeddings_by_key("syn", np.arange(3_000))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = np.random.default_rng(0).choice(3_000, 200, replace=False)
    exact = np.argsort(-(vectors[queries] @ vectors.T), axis=1)[:, 1:11]  # its own row left out
    _, found = fi.search(image_index.load(Store.open(store.root), "syn")[0], vectors[queries], 11)
    recall = np.mean([len(np.intersect1d(f[f != q][:10], e)) / 10 for f, e, q in zip(found, exact, queries)])
    assert recall >= 0.95


def test_an_index_that_misses_the_recall_target_says_so(base, tmp_path, capsys):
    store = synthetic_store(tmp_path / "store", base, 2_000)

    result = build_index(store.root, "syn", kind="IVF16,PQ2x4", progress=False)  # 1 byte a row: coarse

    assert result["recall_at_10"] < 0.95 and result["params"] == "nprobe=16"  # the widest search tried
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"featstore: the IVF16,PQ2x4 index of split 'syn' finds recall@10 {result['recall_at_10']:.3f}, "
                    "under the target 0.95, at its widest search (nprobe=16): a finer --kind gives better recall"]


def test_an_ivf_is_retrained_when_the_split_grows_past_its_size_and_an_emptied_split_loses_it(base, tmp_path, capsys):
    store = synthetic_store(tmp_path / "store", base, 2_000)
    build_index(store.root, "syn", kind="ivf-flat", progress=False)
    sized = Store.open(store.root).split_info("syn").index
    assert sized.kind.startswith("IVF") and sized.sized_for == 2_000

    add_rows(store, "syn", clip_like(200, store.dim, seed=12, first_key=2_000))
    with store.lock("test"):
        grown = refresh(store, "syn")  # a night's rows: updated, probed on the new rows, not retrained
    assert grown == {"kind": sized.kind, "rows": 2_200, "added": 200, "removed": 0, "retrained": None}
    assert "rebuilt" not in capsys.readouterr().err

    add_rows(store, "syn", clip_like(2_000, store.dim, seed=13, first_key=2_200))
    with store.lock("test"):
        grown = refresh(store, "syn")
    assert "over 2x the 2000 it was sized for" in grown["retrained"]
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"featstore: the image index of split 'syn' is rebuilt: {grown['retrained']}"]
    record = Store.open(store.root).split_info("syn").index
    assert record.sized_for == 4_200 and record.kind.startswith("IVF") and record.built_at >= sized.built_at
    assert_current(store.root, "syn")

    with store.lock("test"):  # emptied (encode --allow-removals): its index goes
        for name in list(store.shards("syn")):
            store.delete_shard("syn", name)
        assert refresh(store, "syn")["kind"] is None
    assert "is empty: its image index was removed" in capsys.readouterr().err
    assert Store.open(store.root).split_info("syn").index is None
    assert os.listdir(tmp_path / "store" / "image-index") == []


def test_verify_catches_a_flipped_byte_in_the_index_and_encode_rebuilds_it(copy, capsys):
    src, store = copy
    record = Store.open(store).split_info("train").index
    path = os.path.join(store, "image-index", record.file)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))

    result = featstore("verify", store, "--json", check=False)

    assert result.returncode == 1
    assert json.loads(result.stdout)["problems"] == [
        {"split": "train", "file": f"image-index/{record.file}", "problem": "checksum mismatch"}]
    with pytest.raises(FeatstoreError, match=r"missing or damaged \(checksum mismatch\): run featstore index"):
        image_index.load(Store.open(store), "train")
    assert encode(src, store, "train", **OPTIONS)["index"]["retrained"].endswith("checksum mismatch")
    assert "is rebuilt: its file image-index/" in capsys.readouterr().err
    assert_current(store)


def test_a_symlinked_image_index_folder_is_refused(copy, tmp_path):
    src, store = copy
    outside = tmp_path / "outside"
    shutil.move(os.path.join(store, "image-index"), outside)
    os.symlink(outside, os.path.join(store, "image-index"))
    (outside / "train-0123456789abcdef.faiss").write_bytes(b"not the store's")  # a name featstore would remove
    before = {name: sha256_file(str(outside / name)) for name in os.listdir(outside)}

    result = featstore("index", store, "--split", "train", check=False)

    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "symbolic link" in result.stderr
    with pytest.raises(FeatstoreError, match="symbolic link"):  # encode refuses before writing a shard
        encode(src, store, "train", **OPTIONS)
    assert {name: sha256_file(str(outside / name)) for name in os.listdir(outside)} == before
    assert {"split": None, "file": "image-index", "problem": "a symbolic link or a file, not a folder"} in \
        Store.open(store).verify()


@pytest.mark.parametrize("args, message", [
    (["--split", "nope"], "has no split 'nope'"),
    (["--split", "train", "--max-memory", "lots"], "not a memory size: 'lots'"),
    (["--split", "train", "--kind", "nonsense"], "unknown --kind 'nonsense'"),
    (["--split", "train", "--max-memory", "1K"], "over --max-memory 1.0 KiB"),
    (["--split", "empty"], "split 'empty' has no rows to index"),
])
def test_bad_input_is_one_line_and_nothing_is_written(copy, args, message):
    _, store = copy
    opened = Store.open(store)
    with opened.lock("test"):
        opened.split_info("empty", create=True)
        opened.save()
    manifest = open(os.path.join(store, "featstore.json"), "rb").read()
    files = sorted(os.listdir(os.path.join(store, "image-index")))

    result = featstore("index", store, *args, check=False, env=ONE_THREAD)

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("featstore: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert open(os.path.join(store, "featstore.json"), "rb").read() == manifest
    assert sorted(os.listdir(os.path.join(store, "image-index"))) == files


def test_featstore_index_never_loads_torch(copy):
    """torch is ~0.5 GiB of RSS: building an index (and casting float16 rows) must not import it."""
    _, store = copy
    code = ("import sys, numpy as np, pyarrow as pa\n"
            "from featstore.index.split import build_index\n"
            "from featstore.store.shards import embedding_matrix\n"
            "build_index(sys.argv[1], 'train', kind='hnsw', progress=False)\n"
            "half = np.random.default_rng(0).standard_normal((4096, 512)).astype(np.float16)\n"
            "rows = embedding_matrix(pa.FixedSizeListArray.from_arrays(pa.array(half.reshape(-1)), 512), 512)\n"
            "assert np.array_equal(rows, half.astype(np.float32))\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, store], capture_output=True, text=True, cwd=REPO)
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr[-2000:]
