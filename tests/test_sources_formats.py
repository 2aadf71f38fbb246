"""WebDataset tar shards and Hugging Face datasets as sources: rows, ids, labels, captions, reruns, kill -9."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import tarfile

import datasets
import pyarrow.parquet as pq
import pytest

from conftest import SLOW_MODEL, draw_image, featstore, write_folder
from test_store import committed_shards, kill_when, start_encode, store_rows

from featstore.compact import compact_split
from featstore.encode import encode
from featstore.errors import FeatstoreError
from featstore.sources import open_source
from featstore.sources.webdataset import WebDatasetSource
from featstore.store import Store, write_parquet

NAMES = ["circle", "cross", "ring", "square"]


def picture(label: int, seed: int, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    draw_image(label, seed).save(out, format=fmt)
    return out.getvalue()


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar as webdataset writes one: each sample's members KEY.EXT, one after another, in the order given."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def files_state(folder, mtimes: bool = True) -> dict[str, tuple]:
    state = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                state[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns if mtimes else None)
    return state


def split_table(store: str, split: str) -> dict[str, dict]:
    table = pq.read_table(os.path.join(store, "images", f"split={split}"))
    rows = {row["id"]: row for row in table.select(["id", "path", "label", "caption", "sha256", "mtime_ns"]).to_pylist()}
    assert len(rows) == table.num_rows, "duplicate ids"
    return rows


def manifest(store: str) -> dict:
    with open(os.path.join(store, "featstore.json")) as f:
        return json.load(f)


def label_names(store: str, rows: dict[str, dict]) -> dict[str, str | None]:
    classes = manifest(store)["classes"]
    return {row_id: classes[row["label"]] if row["label"] is not None else None for row_id, row in rows.items()}


# ---- webdataset -----------------------------------------------------------------------------------
def shard_000() -> list:
    return [("000000", {"png": picture(0, 1), "cls": b"0", "txt": b"a white circle"}),
            ("000001", {"json": json.dumps({"label": "cross", "w": 48}).encode(), "jpg": picture(1, 2, "JPEG")}),
            ("000002", {"webp": picture(3, 3, "WEBP"), "json": b'{"label": 3}'}),
            ("000003", {"jpg": b"\xff\xd8 not a jpeg at all", "cls": b"1"}),  # undecodable
            ("000004", {"png": picture(2, 4), "cls": b" 2\n"})]


def shard_001(changed: bool = False) -> list:
    return [("000005", {"png": picture(0, 55 if changed else 5), "cls": b"0", "txt": b"first caption"}),
            ("000006", {"png": picture(1, 6), "cls": b"1"}),
            ("000007", {"cls": b"2", "txt": b"no image here"}),  # no image
            ("000008", {"png": picture(3, 8), "cls": b"3", "txt": b"new caption" if changed else b"old caption"})]


def shard_002() -> list:  # written out of key order: the listing sorts keys
    return [("000012", {"png": picture(1, 12), "cls": b"9"}),  # class index outside classnames.txt
            ("000011", {"cls": b"3", "png": picture(3, 11)}),
            ("000010", {"png": picture(2, 10), "cls": b"2"}),
            ("000009", {"png": picture(1, 9), "cls": b"1"})]


@pytest.fixture
def tars(tmp_path) -> str:
    """CLIP_benchmark's layout: ROOT/classnames.txt and ROOT/train/shard-NNN.tar."""
    root = tmp_path / "wds"
    (root / "train").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    for number, samples in enumerate((shard_000(), shard_001(), shard_002())):
        write_tar(root / "train" / f"shard-{number:03d}.tar", samples)
    return str(root)


def test_webdataset_tars_are_encoded_then_only_changed_and_added_samples_again(tmp_path, tars, monkeypatch):
    store = str(tmp_path / "store")
    pattern = os.path.join(tars, "train", "shard-{000..002}.tar")
    before = files_state(tars)
    result = encode(f"webdataset:{pattern}", store, "train", model="random:tiny", progress=False, workers=0)
    assert (result["rows"], result["encoded"], result["failed"]) == (10, 10, 3)
    rows = split_table(store, "train")
    assert sorted(rows) == [f"shard-000.tar/00000{i}" for i in (0, 1, 2, 4)] + \
        [f"shard-001.tar/00000{i}" for i in (5, 6, 8)] + [f"shard-002.tar/0000{i:02d}" for i in (9, 10, 11)]
    assert label_names(store, rows) == {
        "shard-000.tar/000000": "circle", "shard-000.tar/000001": "cross", "shard-000.tar/000002": "square",
        "shard-000.tar/000004": "ring", "shard-001.tar/000005": "circle", "shard-001.tar/000006": "cross",
        "shard-001.tar/000008": "square", "shard-002.tar/000009": "cross", "shard-002.tar/000010": "ring",
        "shard-002.tar/000011": "square"}
    assert manifest(store)["classes"] == NAMES  # from classnames.txt in the shards' parent folder
    assert {i: r["caption"] for i, r in rows.items() if r["caption"]} == {
        "shard-000.tar/000000": "a white circle", "shard-001.tar/000005": "first caption",
        "shard-001.tar/000008": "old caption"}
    tar0 = os.path.join(tars, "train", "shard-000.tar")
    assert rows["shard-000.tar/000001"]["path"] == f"{tar0}#000001.jpg"
    assert rows["shard-000.tar/000002"]["sha256"] == hashlib.sha256(shard_000()[2][1]["webp"]).hexdigest()
    assert {r["mtime_ns"] for i, r in rows.items() if i.startswith("shard-000")} == {os.stat(tar0).st_mtime_ns}
    failed = manifest(store)["splits"]["train"]["failed"]
    assert sorted(failed) == ["shard-000.tar/000003", "shard-001.tar/000007", "shard-002.tar/000012"]
    assert failed["shard-001.tar/000007"]["reason"] == "sample has no jpg/jpeg/png/webp image"
    assert failed["shard-002.tar/000012"]["reason"] == "class index 9 is outside classnames.txt (4 names)"
    assert failed["shard-000.tar/000003"]["reason"]
    assert files_state(tars) == before  # the source is only read

    again = encode(f"webdataset:{pattern}", store, "train", model="random:tiny", progress=False, workers=0)
    assert (again["encoded"], again["unchanged"], again["new_failures"], again["failed"]) == (0, 10, 0, 3)

    # one tar rewritten (an image and a caption changed), one tar added: only those tars' members are read
    write_tar(os.path.join(tars, "train", "shard-001.tar"), shard_001(changed=True))
    write_tar(os.path.join(tars, "train", "shard-003.tar"),
              [("000013", {"png": picture(0, 13), "cls": b"0"}), ("000014", {"png": picture(2, 14), "txt": b"unlabelled"})])
    read_from = set()
    real_read = WebDatasetSource.read

    def read(self, item):
        read_from.add(item.id.split("/")[0])
        return real_read(self, item)

    monkeypatch.setattr(WebDatasetSource, "read", read)
    pattern = os.path.join(tars, "train", "shard-{000..003}.tar")
    third = encode(f"webdataset:{pattern}", store, "train", model="random:tiny", progress=False, workers=0)
    assert read_from == {"shard-001.tar", "shard-003.tar"}
    assert (third["encoded"], third["replaced"], third["unchanged"], third["removed"]) == (3, 1, 7, 0)
    assert (third["rows"], third["failed"]) == (12, 3)
    rows = split_table(store, "train")
    assert rows["shard-001.tar/000005"]["sha256"] == hashlib.sha256(picture(0, 55)).hexdigest()
    assert rows["shard-001.tar/000008"]["caption"] == "new caption"  # same image: its row is retouched
    assert rows["shard-003.tar/000014"]["label"] is None and rows["shard-003.tar/000014"]["caption"] == "unlabelled"
    mtime = os.stat(os.path.join(tars, "train", "shard-001.tar")).st_mtime_ns
    assert {r["mtime_ns"] for i, r in rows.items() if i.startswith("shard-001")} == {mtime}
    assert featstore("verify", store).returncode == 0


def test_webdataset_labels_without_classnames(tmp_path):
    write_tar(tmp_path / "a.tar", [("x/2", {"png": picture(0, 1), "json": b'{"label": "owl"}'}),
                                   ("x/10", {"png": picture(1, 2), "cls": b"7"}),
                                   ("y", {"png": picture(2, 3), "json": b'{"caption": "no label"}'}),
                                   ("z", {"png": picture(2, 3), "cls": b"seven"})])
    write_tar(tmp_path / "a.tar.tar", [("k", {"png": picture(0, 4), "cls": b"0"})])  # sorts before a.tar/ in ids
    source = open_source(f"webdataset:{tmp_path}/*.tar", "train")
    assert source.classes() == ["0", "7", "owl"]  # a class index names itself without classnames.txt
    items = list(source.iter_items())
    assert [(i.id, i.label, i.error) for i in items] == [
        ("a.tar.tar/k", "0", None), ("a.tar/x/10", "7", None), ("a.tar/x/2", "owl", None), ("a.tar/y", None, None),
        ("a.tar/z", None, ".cls is not a class index: 'seven'")]
    assert source.read(items[2]) == picture(0, 1)


def test_bad_webdataset_sources_change_nothing(tmp_path, tars):
    store = str(tmp_path / "store")
    pattern = os.path.join(tars, "train", "shard-{000..002}.tar")
    encode(f"webdataset:{pattern}", store, "train", model="random:tiny", progress=False, workers=0)
    before = files_state(store, mtimes=False)  # a refused run may rewrite the manifest, not change it
    missing = featstore("encode", f"webdataset:{os.path.join(tars, 'train', 'shard-{000..004}.tar')}", "--store", store,
                        "--split", "train", "--model", "random:tiny", "--quiet", check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"featstore: error: webdataset shard {os.path.join(tars, 'train', 'shard-003.tar')} does not exist"]
    # a tar cut short right after a member (a copy in progress) stops the run before anything is written
    tar2 = os.path.join(tars, "train", "shard-002.tar")
    with tarfile.open(tar2) as tar:
        first = tar.next()
    with open(tar2, "r+b") as f:
        f.truncate(first.offset_data + (first.size + 511) // 512 * 512)
    with pytest.raises(FeatstoreError, match=r"cannot read webdataset shard .*shard-002.tar: truncated"):
        encode(f"webdataset:{pattern}", store, "train", model="random:tiny", progress=False, workers=0)
    with pytest.raises(FeatstoreError, match="only local tar files"):
        open_source("webdataset:pipe:curl -s http://example.com/a.tar", "train")
    assert files_state(store, mtimes=False) == before


def test_webdataset_run_killed_then_resumed(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    for number in range(3):
        write_tar(root / f"part-{number}.tar", [(f"{number}{i:02d}", {"png": picture(i % 3, number * 10 + i), "cls": b"%d" % (i % 3)})
                                               for i in range(8)])
    (root / "classnames.txt").write_text("circle\ncross\nring\n")
    source, store = f"webdataset:{root}/part-{{0..2}}.tar", str(tmp_path / "store")
    kill_when(start_encode(source, store), lambda: committed_shards(store, "train") >= 1)  # one decode worker
    partial = store_rows(store, "train")
    assert 0 < len(partial) < 24
    result = json.loads(featstore("encode", source, "--store", store, "--split", "train", "--model", SLOW_MODEL,
                                  "--batch-size", "4", "--shard-rows", "8", "--quiet", "--json").stdout)
    assert (result["unchanged"], result["encoded"], result["rows"]) == (len(partial), 24 - len(partial), 24)
    rows = store_rows(store, "train")
    assert sorted(rows) == [f"part-{n}.tar/{n}{i:02d}" for n in range(3) for i in range(8)]
    for row_id, embedding in partial.items():  # rows committed before the kill were kept, not encoded again
        assert (rows[row_id] == embedding).all()
    assert split_table(store, "train")["part-1.tar/103"]["label"] == 0
    assert [n for n in os.listdir(os.path.join(store, "images", "split=train")) if not n.endswith(".parquet")] == []
    assert Store(store).verify() == []


# ---- Hugging Face datasets --------------------------------------------------------------------------
FEATURES = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=NAMES[:3])})


def hf_split(images: list[bytes | None], labels: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} if b is not None else None for b in images],
         "caption": ["x"] * len(images), "label": labels}, features=FEATURES)


TRAIN = [picture(0, 1), picture(1, 2), b"\x89PNG broken", picture(2, 3), None, picture(0, 4)]


def test_hf_save_to_disk_dataset_dict(tmp_path):
    folder, store = str(tmp_path / "hf"), str(tmp_path / "store")
    datasets.DatasetDict({"train": hf_split(TRAIN, [0, 1, 1, 2, 0, -1]),
                          "validation": hf_split([picture(2, 7), picture(1, 8)], [2, 1])}).save_to_disk(folder)
    result = encode(f"hf:{folder}", store, "train", model="random:tiny", progress=False, workers=0)
    assert (result["rows"], result["encoded"], result["failed"]) == (4, 4, 2)
    rows = split_table(store, "train")
    assert label_names(store, rows) == {"train/000000000": "circle", "train/000000001": "cross",
                                        "train/000000003": "ring", "train/000000005": None}
    assert rows["train/000000003"]["sha256"] == hashlib.sha256(TRAIN[3]).hexdigest()
    failed = manifest(store)["splits"]["train"]["failed"]
    assert sorted(failed) == ["train/000000002", "train/000000004"]
    assert failed["train/000000004"]["reason"] == "row has no image"
    assert manifest(store)["splits"]["train"]["source"] == f"hf:{folder}:train"

    val = encode(f"hf:{folder}:validation", store, "val", model="random:tiny", progress=False, workers=0)
    assert val["rows"] == 2
    assert label_names(store, split_table(store, "val")) == {"validation/000000000": "ring", "validation/000000001": "cross"}

    again = encode(f"hf:{folder}", store, "train", model="random:tiny", progress=False, workers=0)
    assert (again["encoded"], again["unchanged"], again["new_failures"]) == (0, 4, 0)

    # saved again with one image changed and a row added: its files changed, so every image is hashed and
    # only the changed and the new one are encoded
    changed = [*TRAIN[:3], picture(2, 33), None, TRAIN[5], picture(1, 9)]
    hf_split(changed, [0, 1, 1, 2, 0, -1, 1]).save_to_disk(str(tmp_path / "new"))
    shutil.rmtree(folder)
    shutil.move(str(tmp_path / "new"), folder)  # now a single Dataset: the --split name names it
    third = encode(f"hf:{folder}", store, "train", model="random:tiny", progress=False, workers=0)
    assert (third["encoded"], third["replaced"], third["removed"], third["rows"]) == (2, 1, 0, 5)
    rows = split_table(store, "train")
    assert rows["train/000000003"]["sha256"] == hashlib.sha256(changed[3]).hexdigest()
    assert label_names(store, {"train/000000006": rows["train/000000006"]}) == {"train/000000006": "cross"}
    with pytest.raises(FeatstoreError, match="holds one Dataset, not splits"):
        open_source(f"hf:{folder}:train", "train")


def cache_as_hub_dataset(tmp_path, name: str, config: str) -> str:
    """A datasets cache holding NAME's CONFIG as ``load_dataset`` leaves it after a download: prepared with
    the parquet builder from local files, then filed under the hub name."""
    cache, files = str(tmp_path / "cache"), {}
    for split, dataset in (("train", hf_split(TRAIN[:2], [0, 1])), ("validation", hf_split([picture(2, 5)], [2]))):
        files[split] = str(tmp_path / f"{split}.parquet")
        dataset.to_parquet(files[split])
    builder = datasets.load_dataset_builder("parquet", data_files=files, cache_dir=cache)
    builder.download_and_prepare()
    owner, short = name.split("/")
    dest = os.path.join(cache, f"{owner}___{short}", config, "0.0.0", os.path.basename(builder.cache_dir))
    shutil.move(builder.cache_dir, dest)
    for path in glob.glob(os.path.join(dest, "parquet-*.arrow")):
        os.rename(path, path.replace(f"{os.sep}parquet-", f"{os.sep}{short}-"))
    with open(os.path.join(dest, "dataset_info.json")) as f:
        info = json.load(f)
    with open(os.path.join(dest, "dataset_info.json"), "w") as f:
        json.dump({**info, "config_name": config}, f)
    return cache


def test_hf_hub_name_is_read_from_the_local_cache_offline(tmp_path, monkeypatch):
    cache = cache_as_hub_dataset(tmp_path, "tester/pets", "small")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    store = str(tmp_path / "store")
    result = encode("hf:tester/pets@small:validation", store, "val", model="random:tiny", progress=False, workers=0)
    assert result["rows"] == 1
    assert label_names(store, split_table(store, "val")) == {"validation/000000000": "ring"}
    assert manifest(store)["splits"]["val"]["source"] == "hf:tester/pets@small:validation"

    absent = featstore("encode", "hf:tester/absent:train", "--store", str(tmp_path / "other"), "--split", "train",
                       "--model", "random:tiny", "--quiet", check=False, env={"HF_DATASETS_CACHE": cache})
    assert absent.returncode == 2 and "Traceback" not in absent.stderr
    assert absent.stderr.strip().splitlines() == [
        f"featstore: error: hf:tester/absent: not in the local datasets cache ({cache}); featstore reads hub "
        "datasets offline: load it once with datasets.load_dataset"]
    assert not os.path.exists(tmp_path / "other")


# ---- stores written before the caption column --------------------------------------------------------
def test_shards_without_a_caption_column_still_read_patch_and_compact(tmp_path):
    source, store = str(tmp_path / "images"), str(tmp_path / "store")
    paths = write_folder(source, per_class=1, seed=3, classes=["circle", "square"])
    encode(source, store, "train", model="random:tiny", progress=False, workers=0)
    for c, name in enumerate(["circle", "square"]):  # ids among the stored ones: a second sorted run
        draw_image(c, 50 + c).save(os.path.join(source, name, "img_001.png"))
    encode(source, store, "train", model="random:tiny", progress=False, workers=0)
    old = Store(store)
    assert len(old.sorted_runs("train")) == 2
    for name, record in old.shards("train").items():  # as an older featstore wrote them
        path = os.path.join(old.split_dir("train"), name)
        record.commit(write_parquet(pq.read_table(path).drop_columns(["caption"]), path), os.stat(path).st_mtime_ns)
    old.save()
    assert Store(store).read_split("train").column("caption").null_count == 4
    draw_image(3, 99).save(paths[0])
    result = encode(source, store, "train", model="random:tiny", progress=False, workers=0)
    assert (result["replaced"], result["unchanged"]) == (1, 3)  # the old shard is patched
    store_now = Store(store)
    with store_now.lock("test"):
        assert compact_split(store_now, "train", 1, 10)["rows_rewritten"] == 4
    table = store_now.read_split("train")
    assert table.num_rows == 4 and table.column("caption").null_count == 4
    assert store_now.verify() == []
