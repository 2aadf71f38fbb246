"""featstore search and featstore dedup over a split's image index (issue 18, items 4 and 5).

The images are smooth random colour fields (a 4x4 grid of random colours, upscaled): the random test model
(random:tiny) maps every image to nearly one direction, but on these its cosines still separate. Calibrated
here: distinct images reach at most 0.9982 of each other; a copy with brightness +-2, resized or re-encoded as
JPEG keeps 0.9999 or more. The tests use --threshold 0.9995, between the two.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import featstore
from featstore.cli import app
from featstore.store import Store, image_index
from featstore.store.manifest import ImageIndex

THRESHOLD = "0.9995"
CLASSES = ("alpha", "beta", "gamma")
FIELDS = {"id", "path", "label", "score"}


def encode(source, store: str) -> None:
    """An encode of SOURCE into split train or test (its folder's name), in this process: no start-up cost."""
    from featstore.encode import encode as run

    run(str(source), store, os.path.basename(source), model="random:tiny", workers=0, progress=False)


def field_image(seed: int, size=(64, 56)) -> Image.Image:
    grid = np.random.default_rng(seed).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    return Image.fromarray(grid).resize(size, Image.BICUBIC)


def brighter(image: Image.Image, step: int) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image).astype(int) + step, 0, 255).astype(np.uint8))


def write_train(root) -> None:
    """30 distinct images (img_NN in class folders by NN % 3); exact copies: three of img_00, one of img_01;
    altered copies: img_02 brightness +2 and -2, img_03 resized, img_04 as JPEG."""
    for i in range(30):
        os.makedirs(root / CLASSES[i % 3], exist_ok=True)
        field_image(i).save(root / CLASSES[i % 3] / f"img_{i:02d}.png")
    for j in range(3):
        shutil.copy(root / "alpha" / "img_00.png", root / "beta" / f"copy0_{j}.png")
    shutil.copy(root / "beta" / "img_01.png", root / "gamma" / "copy1.png")
    brighter(field_image(2), 2).save(root / "gamma" / "bright_plus.png")
    brighter(field_image(2), -2).save(root / "gamma" / "bright_minus.png")
    field_image(3).resize((80, 70), Image.BILINEAR).save(root / "alpha" / "resized.png")
    field_image(4).save(root / "beta" / "jpeg.jpg", quality=90)


# every near-duplicate pair of train at THRESHOLD (the copies of img_00 pair with each other too)
COPIES_OF_0 = ["alpha/img_00.png", "beta/copy0_0.png", "beta/copy0_1.png", "beta/copy0_2.png"]
TRAIN_PAIRS = {frozenset((a, b)) for a in COPIES_OF_0 for b in COPIES_OF_0 if a < b} | {
    frozenset(p) for p in [("beta/img_01.png", "gamma/copy1.png"), ("gamma/img_02.png", "gamma/bright_plus.png"),
                           ("gamma/img_02.png", "gamma/bright_minus.png"),
                           ("gamma/bright_plus.png", "gamma/bright_minus.png"),
                           ("alpha/img_03.png", "alpha/resized.png"), ("beta/img_04.png", "beta/jpeg.jpg")]}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A store with split train (above, a flat image index) and split test (a copy of img_05, img_06 as JPEG,
    three new images; no index)."""
    root = tmp_path_factory.mktemp("search")
    write_train(root / "train")
    os.makedirs(root / "test" / "alpha")
    shutil.copy(root / "train" / "gamma" / "img_05.png", root / "test" / "alpha" / "leak5.png")
    field_image(6).save(root / "test" / "alpha" / "leak6.jpg", quality=90)
    for i in range(3):
        field_image(100 + i).save(root / "test" / "alpha" / f"new_{i}.png")
    brighter(field_image(7), 2).save(root / "query.png")  # an outside image: an altered copy of img_07
    store = str(root / "store")
    for split in ("train", "test"):
        encode(root / split, store)
    index(store, "flat")
    return root, store


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def index(store: str, kind: str) -> None:
    result = cli("index", store, "--split", "train", "--kind", kind, "--quiet")
    assert result.exit_code == 0, result.output


def ok_json(*args: str):
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def snapshot(folder) -> dict[str, tuple[int, int]]:
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


def check_results(entry: dict, k: int, live: set[str] | None = None) -> list[dict]:
    results = entry["results"]
    assert len(results) == k and all(set(row) == FIELDS for row in results)
    scores = [row["score"] for row in results]
    assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)
    assert all(row["label"] in CLASSES for row in results)
    assert len({row["id"] for row in results}) == k
    if live is not None:
        assert {row["id"] for row in results} <= live
    return results


def test_search_by_id_returns_that_row_first(made):
    _, store = made
    found = ok_json("search", store, "--split", "train", "--id", "gamma/img_05.png", "--id", "alpha/img_00.png",
                    "--k", "6")
    assert [entry["query"] for entry in found] == ["gamma/img_05.png", "alpha/img_00.png"]
    for entry in found:
        first = check_results(entry, 6)[0]
        assert first["id"] == entry["query"] and first["path"] == entry["query"] and abs(first["score"] - 1) < 1e-3
    assert found[0]["results"][0]["label"] == "gamma"
    # its exact copies tie with it at 1 and come next
    assert {row["id"] for row in found[1]["results"][:4]} == set(COPIES_OF_0)


def test_text_and_image_search_return_k_live_rows_best_first(made):
    root, store = made
    (root / "templates.txt").write_text("a photo of {}.\na blurry photo of {}.\n")
    texts = featstore("search", store, "--split", "train", "--text", "a red field", "--text", "blue and green",
                      "--k", "7", "--templates", str(root / "templates.txt"), "--json")
    found = json.loads(texts.stdout)
    assert [entry["query"] for entry in found] == ["a red field", "blue and green"]
    for entry in found:
        check_results(entry, 7)
    images = ok_json("search", store, "--split", "train", "--image", str(root / "query.png"), "--k", "5")
    results = check_results(images[0], 5)
    assert images[0]["query"] == str(root / "query.png")
    assert results[0]["id"] == "beta/img_07.png" and results[0]["score"] > float(THRESHOLD)
    plain = cli("search", store, "--split", "train", "--text", "a red field", "--k", "3")
    assert plain.exit_code == 0 and plain.stdout.splitlines()[0] == "text a red field"
    assert len(plain.stdout.splitlines()) == 4 and plain.stdout.splitlines()[1].split()[0] == "1"


def test_dedup_finds_exact_and_altered_copies_only(made, tmp_path):
    _, store = made
    out = tmp_path / "pairs.parquet"
    counts = ok_json("dedup", store, "--split", "train", "--threshold", THRESHOLD, "--out", str(out))
    assert counts == {"pairs": len(TRAIN_PAIRS), "groups": 5, "rows_in_groups": 13}
    table = pq.read_table(out)
    assert table.column_names == ["id_a", "id_b", "score"]
    assert {frozenset(p) for p in zip(table["id_a"].to_pylist(), table["id_b"].to_pylist())} == TRAIN_PAIRS
    scores = table["score"].to_pylist()
    assert scores == sorted(scores, reverse=True) and min(scores) >= float(THRESHOLD) and max(scores) == 1.0
    assert sorted(os.listdir(tmp_path)) == ["pairs.parquet"]  # no temp file left beside it
    plain = cli("dedup", store, "--split", "train", "--threshold", THRESHOLD)
    assert plain.stdout.splitlines()[0] == "split train: 12 pairs at cosine >= 0.9995 in 5 groups (13 rows)"
    assert plain.stdout.splitlines()[1] == f"group 1 (4 rows): {', '.join(COPIES_OF_0)}"


def test_dedup_finds_every_exact_copy_beyond_k(made, tmp_path):
    _, store = made
    out = tmp_path / "k1.parquet"
    ok_json("dedup", store, "--split", "train", "--threshold", "1", "--k", "1", "--out", str(out))
    table = pq.read_table(out)
    pairs = {frozenset(p) for p in zip(table["id_a"].to_pylist(), table["id_b"].to_pylist())}
    # 4 copies of img_00 with K=1: all found by sha256, each paired with the copy of smallest key
    assert {frozenset(("alpha/img_00.png", c)) for c in COPIES_OF_0[1:]} <= pairs
    assert frozenset(("beta/img_01.png", "gamma/copy1.png")) in pairs


def test_dedup_against_another_split_finds_the_leaks(made, tmp_path):
    _, store = made
    out = tmp_path / "leaks.parquet"
    counts = ok_json("dedup", store, "--split", "train", "--against", "test", "--threshold", THRESHOLD,
                     "--out", str(out))
    assert counts == {"pairs": 2, "groups": 2, "rows_in_groups": 4}
    table = pq.read_table(out).to_pylist()
    assert {(row["id_a"], row["id_b"]) for row in table} == {("alpha/leak5.png", "gamma/img_05.png"),
                                                              ("alpha/leak6.jpg", "alpha/img_06.png")}


def test_readers_work_while_a_writer_holds_the_lock_and_change_nothing(made, tmp_path):
    _, store = made
    with Store(store).lock("a test writer"):  # (the .lock file is the writer's: compared while it is held)
        before = snapshot(store)
        found = ok_json("search", store, "--split", "train", "--id", "beta/img_04.png", "--k", "2")
        assert [row["id"] for row in found[0]["results"]] == ["beta/img_04.png", "beta/jpeg.jpg"]
        assert ok_json("dedup", store, "--split", "train", "--threshold", THRESHOLD)["pairs"] == len(TRAIN_PAIRS)
        assert snapshot(store) == before


def test_a_read_that_meets_a_writers_commit_runs_again_on_the_new_manifest(made):
    from featstore.errors import FeatstoreError
    from featstore.index.query import consistent

    _, store = made
    calls = []

    def read(opened):  # fails the first time as a reader does when a writer removed a file it named
        calls.append(opened.split_info("train").index.file)
        if len(calls) == 1:
            index(store, "flat")  # the writer's commit
            raise FeatstoreError("shard gone")
        return calls[-1]

    assert consistent(store, read) == calls[1] != calls[0]

    def broken(opened):  # the same failure on a manifest no writer touched is a real one
        calls.append(1)
        raise FeatstoreError("shard damaged")

    calls.clear()
    with pytest.raises(FeatstoreError, match="shard damaged"):
        consistent(store, broken)
    assert calls == [1]


def test_search_never_returns_a_row_the_split_no_longer_holds(tmp_path):
    """An index built before an encode removed (and added) files, put back after it: search and dedup
    resolve every candidate through the shards. A PQ kind, so scores are re-scored exactly too."""
    data, store = tmp_path / "train", str(tmp_path / "store")
    write_train(data)
    encode(data, store)
    index(store, "IVF2,PQ16x4")
    opened = Store.open(store)
    old = opened.split_info("train").index
    old_bytes = open(image_index.path(opened, old), "rb").read()
    gone = ["beta/copy0_0.png", "beta/copy0_1.png", "gamma/img_05.png", "alpha/img_09.png", "gamma/bright_plus.png"]
    for name in gone:
        os.unlink(data / name)
    field_image(200).save(data / "alpha" / "added.png")
    encode(data, store)
    opened = Store.open(store)
    with opened.lock("a test putting the old index back"):
        fields = {name: getattr(old, name) for name in ImageIndex.__slots__ if name not in ("file", "sha256", "bytes")}
        image_index.commit(opened, "train", lambda path: open(path, "wb").write(old_bytes), fields)
    live = set(opened.read_split("train", ["id"]).column("id").to_pylist())
    assert len(live) == 38 - len(gone) + 1 and not live & set(gone)

    found = ok_json("search", store, "--split", "train", "--id", "alpha/img_00.png", "--k", "4")
    assert [row["id"] for row in check_results(found[0], 4, live)][:2] == ["alpha/img_00.png", "beta/copy0_2.png"]
    # every row: the index gives its 35 live ones, the one added since is found by the scan
    everything = ok_json("search", store, "--split", "train", "--id", "gamma/img_08.png", "--k", str(len(live)))
    assert {row["id"] for row in check_results(everything[0], len(live), live)} == live
    out = tmp_path / "pairs.parquet"
    counts = ok_json("dedup", store, "--split", "train", "--threshold", THRESHOLD, "--out", str(out))
    table = pq.read_table(out)
    pairs = {frozenset(p) for p in zip(table["id_a"].to_pylist(), table["id_b"].to_pylist())}
    assert pairs == {p for p in TRAIN_PAIRS if not p & set(gone)} and counts["pairs"] == len(pairs)
    jpeg = table.filter(pc.equal(table["id_b"], "beta/jpeg.jpg"))["score"].to_pylist()
    assert len(jpeg) == 1 and float(THRESHOLD) <= jpeg[0] < 1.0  # exact, not a PQ estimate of 1


@pytest.mark.parametrize("args, needle", [
    (("search", "{store}", "--split", "train"), "give one kind of query"),
    (("search", "{store}", "--split", "train", "--text", "x", "--id", "alpha/img_00.png"), "not --text, --image"),
    (("search", "{store}", "--split", "test", "--text", "x"), "split 'test' has no image index: run featstore index"),
    (("search", "{store}", "--split", "nope", "--id", "x"), "has no split 'nope'"),
    (("search", "{store}", "--split", "train", "--id", "alpha/nope.png"), "split 'train' has no row with id"),
    (("search", "{store}", "--split", "train", "--image", "{root}/train/alpha"), "cannot read image"),
    (("search", "{store}", "--split", "train", "--image", "{root}/not-an-image.png"), "not an image"),
    (("search", "{store}", "--split", "train", "--text", "x", "--k", "0"), "--k must be at least 1"),
    (("dedup", "{store}", "--split", "test"), "split 'test' has no image index"),
    (("dedup", "{store}", "--split", "train", "--threshold", "1.5"), "--threshold is a cosine, in [-1, 1]"),
    (("dedup", "{store}", "--split", "train", "--threshold", "-1.01"), "--threshold is a cosine, in [-1, 1]"),
    (("dedup", "{store}", "--split", "train", "--k", "0"), "--k must be at least 1"),
    (("dedup", "{store}", "--split", "train", "--against", "nope"), "has no split 'nope'"),
    (("dedup", "{store}", "--split", "train", "--out", "{store}/images/pairs.parquet"), "/images/pairs.parquet is inside the store "),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(made, args, needle):
    root, store = made
    (root / "not-an-image.png").write_text("text, not pixels")
    before = snapshot(root)
    result = cli(*(arg.format(store=store, root=root) for arg in args))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("featstore: error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert snapshot(root) == before
