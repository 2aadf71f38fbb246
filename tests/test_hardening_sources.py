"""Sources on a messy filesystem (issue 15, items 2, 3, 4 and manifest duplicates of 8).

- A listing that is empty, or that would remove a large share of a split, never wipes it (refused, nothing changed).
- Classes are first-level folders that hold images; the store inside its own source is never walked; symlinked
  folders are walked and labelled alike.
- The walk records what it cannot read (loops, dangling links, non-UTF-8 names, unreadable or vanished files
  and folders, FIFOs and devices, decompression bombs) and encodes the rest; rows hidden by an unreadable
  folder are kept.
- Manifest paths naming the same file in different spellings are one id: listed twice is refused.
- Issue 15 fixes: a changed file whose new bytes fail keeps its old (stale) row until it decodes; extreme
  --workers is refused, huge --batch-size/--shard-rows work; a folder with no identifiable image is no class; a
  source that is a file "is not a folder".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal

import pyarrow.parquet as pq
import pytest

from conftest import draw_image, featstore, write_folder
from test_operations import png_claiming

import featstore.encode.plan as plan_module
import featstore.sources.base as base_module
import featstore.sources.folder as folder_module
from featstore.encode import encode
from featstore.errors import FeatstoreError


# ---- helpers --------------------------------------------------------------------------------------
def tree(root) -> dict[str, tuple]:
    """Every regular file under ROOT (links not followed) -> (sha256, mtime_ns); the store's .lock left out, and
    featstore.json by its bytes only (every writer rewrites it atomically on taking the store, same bytes)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name != ".lock" and os.path.isfile(path) and not os.path.islink(path):
                mtime = None if name == "featstore.json" else os.stat(path).st_mtime_ns
                out[os.path.relpath(path, root)] = (hashlib.sha256(open(path, "rb").read()).hexdigest(), mtime)
    return out


def rows(store, split: str) -> dict[str, int | None]:
    """id -> label of every row in the split's Parquet files, read without featstore (no id twice)."""
    folder = os.path.join(store, "images", f"split={split}")
    ids, labels = [], []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".parquet"):
            table = pq.read_table(os.path.join(folder, name), columns=["id", "label"])
            ids += table.column("id").to_pylist()
            labels += table.column("label").to_pylist()
    assert len(ids) == len(set(ids))
    return dict(zip(ids, labels))


def manifest(store) -> dict:
    with open(os.path.join(store, "featstore.json")) as f:
        return json.load(f)


def failed(store, split: str) -> dict[str, str]:
    return {row_id: rec["reason"] for row_id, rec in manifest(store)["splits"][split]["failed"].items()}


def class_of(store, row_label: int | None) -> str | None:
    return None if row_label is None else manifest(store)["classes"][row_label]


def run(source, store, split="train", **options) -> dict:
    return encode(str(source), str(store), split, model="random:tiny", workers=0, progress=False, **options)


@pytest.fixture
def alarm():
    """Fail a test that hangs (a FIFO opened for reading would block forever) instead of stalling the suite."""
    def ring(*_):
        raise TimeoutError("the run hung")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def save(path, label: int = 0, seed: int = 0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    draw_image(label, seed, (40, 32)).save(path)


# ---- item 2: a listing with nothing never wipes a split --------------------------------------------
@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A source of 3 classes x 4 images and a broken one, encoded into split train: the store every refusal
    must leave alone."""
    root = tmp_path_factory.mktemp("refusals")
    write_folder(root / "src", per_class=4, seed=5, classes=["circle", "square", "ring"])
    (root / "src" / "ring" / "broken.png").write_text("not an image")
    run(root / "src", root / "store")
    return root


def test_an_empty_or_missing_source_is_refused_and_changes_nothing(encoded, tmp_path):
    store, before = encoded / "store", tree(encoded / "store")
    (tmp_path / "mnt").mkdir()  # an unmounted mount point: an empty folder
    result = featstore("encode", str(tmp_path / "mnt"), "--store", str(store), "--split", "train",
                       "--model", "random:tiny", "--quiet", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("featstore: error: ")
    assert "lists no images, and split 'train' holds 12 rows" in result.stderr
    assert "--allow-removals" in result.stderr
    with pytest.raises(FeatstoreError, match="does not exist"):  # a missing folder (same exit path as above)
        run(tmp_path / "nowhere", store)

    (tmp_path / "empty.csv").write_text("path,label\n")  # an empty manifest
    with pytest.raises(FeatstoreError, match="lists no images"):
        run(f"manifest:{tmp_path / 'empty.csv'}", store)
    (tmp_path / "notes.txt").write_text("no images here")  # a folder with files, none of them images
    with pytest.raises(FeatstoreError, match="lists no images"):
        run(tmp_path, store)
    assert tree(store) == before  # manifest bytes (source, failures, classes) and shards
    assert manifest(store)["splits"]["train"]["source"] == str(encoded / "src")
    assert len(rows(store, "train")) == 12 and list(failed(store, "train")) == ["ring/broken.png"]
    assert not os.listdir(tmp_path / "mnt")
    assert not [n for n in os.listdir(store / "images" / "split=train") if not n.endswith(".parquet")]  # no spills


def test_removing_a_large_share_needs_allow_removals(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "MASS_REMOVAL_ROWS", 3)
    src, store = tmp_path / "src", tmp_path / "store"
    write_folder(src, per_class=4, seed=6, classes=["circle", "square"])
    run(src, store)
    for name in ("img_000.png", "img_001.png", "img_002.png"):  # 3 of 8: not more than 3 rows
        os.unlink(src / "square" / name)
    assert run(src, store)["removed"] == 3
    outside = tree(src)
    for name in ("circle/img_001.png", "circle/img_002.png", "circle/img_003.png", "square/img_003.png"):
        os.unlink(src / name)  # 4 of 5 rows: more than 25 % and more than 3
    before = tree(store)
    with pytest.raises(FeatstoreError, match=r"would remove 4 of the 5 rows of split 'train' \(more than 25%\)"):
        run(src, store)
    assert tree(store) == before and len(rows(store, "train")) == 5
    done = run(src, store, allow_removals=True)
    assert (done["removed"], done["rows"]) == (4, 1)
    assert rows(store, "train") == {"circle/img_000.png": manifest(store)["classes"].index("circle")}
    assert {k: v for k, v in outside.items() if os.path.exists(src / k)} == tree(src)  # the source is only read

    for name in os.listdir(src / "circle"):
        os.unlink(src / "circle" / name)
    with pytest.raises(FeatstoreError, match="lists no images"):  # the last row: the empty-listing rule
        run(src, store)
    assert run(src, store, allow_removals=True)["rows"] == 0 and rows(store, "train") == {}


# ---- item 3: classes are image classes -------------------------------------------------------------
def test_classes_are_folders_with_images_and_the_store_inside_is_not_walked(tmp_path):
    src = tmp_path / "src"
    write_folder(src, per_class=2, seed=7, classes=["circle", "square"])
    (src / "docs").mkdir()
    (src / "docs" / "README.txt").write_text("not an image")
    (src / "empty" / "deeper").mkdir(parents=True)
    (src / "fifo_only").mkdir()
    os.mkfifo(src / "fifo_only" / "pipe.png")  # listed as a failure, but no image: not a class
    store = src / "store"  # the store inside its own source, with an image file in it
    save(store / "stray.png")
    first = run(src, store)
    assert manifest(store)["classes"] == ["circle", "square"]
    got = rows(store, "train")
    assert sorted(got) == [f"{c}/img_00{i}.png" for c in ("circle", "square") for i in range(2)]
    assert all(class_of(store, label) == row_id.split("/")[0] for row_id, label in got.items())
    assert set(failed(store, "train")) == {"fifo_only/pipe.png"}
    again = run(src, store)  # the store's own files (shards, spills) never enter the listing
    assert (first["encoded"], again["encoded"], again["unchanged"], again["removed"]) == (4, 0, 4, 0)


def test_symlinked_folders_are_walked_and_labelled_like_folders(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "pool"
    write_folder(src, per_class=2, seed=8, classes=["circle"])
    write_folder(outside, per_class=2, seed=9, classes=["square"])
    os.symlink(src / "circle", src / "ring")  # inside the source
    os.symlink(outside / "square", src / "square")  # outside it
    save(outside / "one.png")
    os.symlink(outside / "one.png", src / "circle" / "linked.png")  # a linked file
    before = tree(outside)
    run(src, tmp_path / "store")
    store = tmp_path / "store"
    assert sorted(manifest(store)["classes"]) == ["circle", "ring", "square"]
    got = {row_id: class_of(store, label) for row_id, label in rows(store, "train").items()}
    assert got == {**{f"{c}/{n}": c for c in ("circle", "ring") for n in ("img_000.png", "img_001.png", "linked.png")},
                   "square/img_000.png": "square", "square/img_001.png": "square"}
    assert failed(store, "train") == {} and tree(outside) == before


# ---- item 4: the walk survives the filesystem -----------------------------------------------------
def test_loops_dangling_links_devices_and_bad_names_are_failures(tmp_path, alarm):
    src = tmp_path / "src"
    write_folder(src, per_class=2, seed=10, classes=["circle", "square"])
    os.symlink("..", src / "circle" / "loop")  # a loop back to the root
    os.symlink(src / "square", src / "square" / "self")  # a folder that contains itself
    os.symlink(tmp_path / "gone.png", src / "circle" / "dangling.png")
    os.symlink("/dev/zero", src / "square" / "zero.png")  # a device behind a link: never read
    os.mkfifo(src / "square" / "fifo.jpg")
    with open(os.fsencode(src / "circle") + b"/bad\xff.png", "wb") as f:  # a name that is not UTF-8
        f.write((src / "circle" / "img_000.png").read_bytes())
    before = tree(src)
    result = featstore("encode", str(src), "--store", str(tmp_path / "store"), "--split", "train",
                       "--model", "random:tiny", "--quiet", "--json", check=False, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "6 images could not be read" in result.stderr
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["failed"], summary["new_failures"]) == (4, 6, 6)
    store = tmp_path / "store"
    assert sorted(rows(store, "train")) == [f"{c}/img_00{i}.png" for c in ("circle", "square") for i in range(2)]
    reasons = failed(store, "train")
    assert set(reasons) == {"circle/loop/", "square/self/", "circle/dangling.png", "square/zero.png",
                            "square/fifo.jpg", "circle/bad\\xff.png"}
    assert "symlink loop" in reasons["circle/loop/"] and "symlink loop" in reasons["square/self/"]
    assert reasons["circle/dangling.png"].startswith("broken symlink to ")
    assert reasons["square/zero.png"] == "not a regular file: a character device"
    assert reasons["square/fifo.jpg"] == "not a regular file: a FIFO"
    assert reasons["circle/bad\\xff.png"] == "name is not valid UTF-8"
    listed = featstore("info", str(store), "--failures").stdout.splitlines()
    assert len(listed) == 6 and all(line.count("\t") == 2 for line in listed)
    again = run(src, store)  # nothing changed: nothing encoded, the failures are not new
    assert (again["encoded"], again["unchanged"], again["new_failures"], again["failed"]) == (0, 4, 0, 6)
    assert tree(src) == before


def test_an_unreadable_or_unmounted_folder_keeps_its_rows(tmp_path, monkeypatch):
    src, store, share = tmp_path / "src", tmp_path / "store", tmp_path / "share"
    write_folder(src, per_class=3, seed=11, classes=["circle", "square"])
    write_folder(share, per_class=3, seed=12, classes=["ring"])
    os.symlink(share / "ring", src / "ring")  # a class on a network share
    run(src, store)
    before = rows(store, "train")
    assert len(before) == 9

    scandir = os.scandir
    def refusing(path="."):
        if os.fspath(path).endswith(os.sep + "square"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(folder_module.os, "scandir", refusing)
    os.unlink(src / "ring")
    os.symlink(tmp_path / "unmounted" / "ring", src / "ring")  # the share is gone: a dangling link
    os.unlink(src / "circle" / "img_000.png")  # a real removal in the same night
    result = run(src, store)
    assert (result["removed"], result["unchanged"], result["new_failures"]) == (1, 8, 2)
    assert rows(store, "train") == {k: v for k, v in before.items() if k != "circle/img_000.png"}
    reasons = failed(store, "train")
    assert reasons["square/"] == "cannot list folder (PermissionError: Permission denied)"
    assert reasons["ring/"].startswith("broken symlink to ") and set(reasons) == {"square/", "ring/"}
    assert "square" in manifest(store)["classes"]  # kept rows keep their labels

    monkeypatch.setattr(folder_module.os, "scandir", scandir)
    os.unlink(src / "ring")
    os.symlink(share / "ring", src / "ring")
    back = run(src, store)
    assert (back["encoded"], back["unchanged"], back["removed"], back["failed"]) == (0, 8, 0, 0)


def test_unreadable_and_vanishing_files_are_failures(tmp_path, monkeypatch):
    src, store = tmp_path / "src", tmp_path / "store"
    write_folder(src, per_class=3, seed=13, classes=["circle"])
    run(src, store)
    os.utime(src / "circle" / "img_001.png", ns=(5, 5))  # a changed fingerprint: must be hashed
    save(src / "circle" / "new.png", 2, 2)
    save(src / "circle" / "vanishing.png", 3, 3)
    real_open, real_scandir = os.open, os.scandir

    def no_read(path, flags, *args, **kwargs):
        if os.fspath(path).endswith(("img_001.png", "new.png")):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    scans = []

    @contextlib.contextmanager
    def vanishing_scandir(path):  # the file goes between the walk's listing of its folder and its stat
        with real_scandir(path) as scan:
            entries = list(scan)
        scans.append(os.fspath(path))
        if scans.count(os.fspath(path)) == 2 and os.fspath(path).endswith("circle"):  # 1st: classes(), 2nd: the walk
            os.unlink(os.path.join(path, "vanishing.png"))
        yield iter(entries)

    monkeypatch.setattr(base_module.os, "open", no_read)
    monkeypatch.setattr(folder_module.os, "scandir", vanishing_scandir)
    result = run(src, store)
    assert (result["encoded"], result["unchanged"], result["removed"], result["new_failures"]) == (0, 3, 0, 3)
    assert sorted(rows(store, "train")) == [f"circle/img_00{i}.png" for i in range(3)]  # img_001's row is kept
    reasons = failed(store, "train")
    assert set(reasons) == {"circle/img_001.png", "circle/new.png", "circle/vanishing.png"}
    assert reasons["circle/img_001.png"] == "PermissionError: Permission denied"  # hashing its changed bytes
    assert "Permission denied" in reasons["circle/new.png"]  # decoding a new file
    assert reasons["circle/vanishing.png"] == "vanished while listed"
    monkeypatch.undo()
    fixed = run(src, store)  # readable again: img_001 is hashed (same bytes), the vanished file is forgotten
    assert (fixed["encoded"], fixed["rows"], set(failed(store, "train"))) == (0, 3, {"circle/new.png"})
    os.utime(src / "circle" / "new.png")  # like any failed file, retried once its size, mtime or bytes change
    retried = run(src, store)
    assert (retried["encoded"], retried["failed"], retried["rows"]) == (1, 0, 4)
    assert "circle/new.png" in rows(store, "train")


def test_decompression_bombs_past_the_limit_are_failures(tmp_path):
    src = tmp_path / "src"
    save(src / "ok.png")
    (src / "bomb.png").write_bytes(png_claiming(15000, 12000))  # 180 M pixels: PIL only warns below 2x its limit
    (src / "huge.png").write_bytes(png_claiming(30000, 30000))  # past 2x: PIL's own error
    result = run(src, tmp_path / "store")
    assert (result["rows"], result["failed"]) == (1, 2) and list(rows(tmp_path / "store", "train")) == ["ok.png"]
    reasons = failed(tmp_path / "store", "train")
    assert "too many pixels (15000 x 12000 > 178956970)" in reasons["bomb.png"]
    assert "too many pixels" in reasons["huge.png"] or "DecompressionBomb" in reasons["huge.png"]


# ---- manifests: non-regular entries, and one id per file ------------------------------------------
def test_manifest_entries_that_are_not_regular_files_are_never_opened(tmp_path, alarm):
    data = tmp_path / "data"
    save(data / "a" / "ok.png")
    os.mkfifo(data / "pipe.png")
    (data / "folder.png").mkdir()
    (data / "m.csv").write_text("path\na/ok.png\npipe.png\nfolder.png\n/dev/null\nmissing.png\n")
    result = run(f"manifest:{data / 'm.csv'}", tmp_path / "store")
    assert (result["rows"], result["failed"]) == (1, 4) and list(rows(tmp_path / "store", "train")) == ["a/ok.png"]
    assert failed(tmp_path / "store", "train") == {
        "pipe.png": "not a regular file: a FIFO", "folder.png": "not a regular file: a folder",
        "/dev/null": "not a regular file: a character device",
        "missing.png": "FileNotFoundError: No such file or directory"}


@pytest.mark.parametrize("paths", [["a/./b.png", "./a/b.png"], ["a//b.png", "a/c/../b.png"], ["{root}/a/b.png", "a/b.png"]],
                         ids=["dot", "slashes-and-dotdot", "absolute-and-relative"])
def test_manifest_spellings_of_one_file_are_one_id(tmp_path, paths):
    data = tmp_path / "data"
    save(data / "a" / "b.png")
    (data / "a" / "c").mkdir()
    (data / "m.csv").write_text("path\n" + "".join(p.format(root=data) + "\n" for p in paths))
    with pytest.raises(FeatstoreError, match=r"lists a/b.png more than once"):
        run(f"manifest:{data / 'm.csv'}", tmp_path / "store")
    assert not os.path.exists(tmp_path / "store" / "featstore.json")
    (data / "m.csv").write_text("path\n" + paths[0].format(root=data) + "\n")
    run(f"manifest:{data / 'm.csv'}", tmp_path / "store")
    assert list(rows(tmp_path / "store", "train")) == ["a/b.png"]


def test_manifest_listing_twice_on_the_command_line(tmp_path):
    data = tmp_path / "data"
    save(data / "x" / "y.png")
    outside = tmp_path / "elsewhere"
    save(outside / "z.png")
    (data / "m.csv").write_text(f"path\n{outside}//sub/../z.png\nx/y.png\n{data}/x/./y.png\n")
    before = tree(tmp_path)
    result = featstore("encode", f"manifest:{data / 'm.csv'}", "--store", str(tmp_path / "store"), "--split", "m",
                       "--model", "random:tiny", "--quiet", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "lists x/y.png more than once" in result.stderr
    assert tree(tmp_path) == before and not os.path.exists(tmp_path / "store")
    (data / "m.csv").write_text(f"path\n{outside}//sub/../z.png\nx/y.png\n")
    run(f"manifest:{data / 'm.csv'}", tmp_path / "store", "m")
    assert sorted(rows(tmp_path / "store", "m")) == [f"{outside}/z.png", "x/y.png"]



# ---- a changed file that no longer decodes keeps its row; extreme options; what is a class or a folder ----
def shard_column(store, split: str, column: str) -> dict[str, object]:
    """id -> COLUMN of every row in the split's Parquet files, read without featstore."""
    folder = os.path.join(store, "images", f"split={split}")
    tables = [pq.read_table(os.path.join(folder, n), columns=["id", column]) for n in sorted(os.listdir(folder))
              if n.endswith(".parquet")]
    return {i: v for t in tables for i, v in zip(t.column("id").to_pylist(), t.column(column).to_pylist())}


def test_a_changed_file_whose_new_bytes_fail_keeps_its_old_row_until_it_decodes(tmp_path):
    from typer.testing import CliRunner

    from featstore.cli import app

    src, store = tmp_path / "src", tmp_path / "store"
    write_folder(src, per_class=3, seed=21, classes=["circle", "square"])
    run(src, store, shard_rows=2)
    before = shard_column(store, "train", "sha256")
    broken = {"circle/img_000.png": b"", "circle/img_002.png": b"not an image",
              "square/img_001.png": (src / "square" / "img_001.png").read_bytes()[:200]}
    for name, data in broken.items():
        (src / name).write_bytes(data)
    args = ["encode", str(src), "--store", str(store), "--split", "train", "--model", "random:tiny", "--quiet",
            "--workers", "0", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["stale"], summary["replaced"], summary["failed"]) == (6, 3, 0, 3)
    assert "kept 3 stale rows whose files changed but no longer read or decode" in result.stderr
    assert shard_column(store, "train", "sha256") == before  # the old rows, as they were
    reasons = failed(store, "train")
    assert reasons == {"circle/img_000.png": "not an image (cannot identify image file)",
                       "circle/img_002.png": "not an image (cannot identify image file)",
                       "square/img_001.png": reasons["square/img_001.png"]}
    assert reasons["square/img_001.png"].startswith("truncated image")

    again = run(src, store, shard_rows=2)  # tried again (the files differ from their rows), still stale
    assert (again["encoded"], again["stale"], again["new_failures"], again["rows"]) == (0, 3, 3, 6)
    save(src / "circle" / "img_000.png", 0, 99)  # decodes again: replaces its row, its failure goes
    os.unlink(src / "circle" / "img_002.png")  # no longer listed: the only way a row goes
    fixed = run(src, store, shard_rows=2)
    assert (fixed["encoded"], fixed["replaced"], fixed["stale"], fixed["removed"], fixed["rows"]) == (1, 1, 1, 1, 5)
    after = shard_column(store, "train", "sha256")
    assert after["circle/img_000.png"] == hashlib.sha256((src / "circle" / "img_000.png").read_bytes()).hexdigest()
    assert "circle/img_002.png" not in after and after["square/img_001.png"] == before["square/img_001.png"]
    assert list(failed(store, "train")) == ["square/img_001.png"]


def test_a_whole_source_that_stops_decoding_keeps_every_row(tmp_path):
    """The reported loss: every file of a split emptied in place used to empty the split with exit 0."""
    src, store = tmp_path / "src", tmp_path / "store"
    write_folder(src, per_class=2, seed=22, classes=["circle", "square"])
    run(src, store)
    for path in src.glob("*/*.png"):
        path.write_bytes(b"")
    result = run(src, store)
    assert (result["rows"], result["stale"], result["failed"], result["removed"]) == (4, 4, 4, 0)
    assert len(rows(store, "train")) == 4


def test_extreme_worker_batch_and_shard_numbers(tmp_path):
    from featstore.jobs import run_job

    src, store = tmp_path / "src", tmp_path / "store"
    write_folder(src, per_class=2, seed=23, classes=["circle"])
    limit = 4 * (os.cpu_count() or 1)
    with pytest.raises(FeatstoreError, match=rf"--workers must be at most {limit} \(4 × this machine's"):
        encode(str(src), str(store), "train", model="random:tiny", workers=100_000, progress=False)
    (tmp_path / "job.toml").write_text('store = "store"\nmodel = "random:tiny"\nworkers = 100000\n'
                                       'steps = ["encode"]\n[[split]]\nname = "train"\nsource = "src"\n')
    with pytest.raises(FeatstoreError, match="--workers must be at most"):
        run_job(str(tmp_path / "job.toml"), echo=lambda line: None)
    assert not store.exists()  # refused before the store (or a spill) was made
    huge = run(src, store, batch_size=10**9, shard_rows=10**12)  # capped at the items: nothing allocated up front
    assert (huge["rows"], huge["shards"]) == (2, 1)


def test_a_folder_with_no_identifiable_image_is_not_a_class(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    write_folder(src, per_class=1, seed=24, classes=["circle", "square"])
    (src / "broken").mkdir()
    (src / "broken" / "a.png").write_bytes(b"")
    (src / "broken" / "b.jpg").write_text("not png")
    (src / "deep" / "down").mkdir(parents=True)
    (src / "deep" / "down" / "c.png").write_text("not png either")
    (src / "mixed").mkdir()
    (src / "mixed" / "a.png").write_bytes(b"")  # broken first, an image after: a class
    save(src / "mixed" / "z.png", 1, 1)
    result = run(src, store)
    assert manifest(store)["classes"] == ["circle", "mixed", "square"]
    assert (result["rows"], result["failed"]) == (3, 4)
    assert class_of(store, rows(store, "train")["mixed/z.png"]) == "mixed"
    assert set(failed(store, "train")) == {"broken/a.png", "broken/b.jpg", "deep/down/c.png", "mixed/a.png"}


def test_a_source_that_is_a_file_is_not_a_folder(tmp_path):
    from featstore.jobs import run_job

    (tmp_path / "photo.png").write_bytes(b"x")
    with pytest.raises(FeatstoreError, match=rf"^source {tmp_path / 'photo.png'} is not a folder$"):
        run(tmp_path / "photo.png", tmp_path / "store")
    (tmp_path / "job.toml").write_text('store = "store"\nmodel = "random:tiny"\nsteps = ["encode"]\n'
                                       '[[split]]\nname = "train"\nsource = "photo.png"\n')
    with pytest.raises(FeatstoreError, match=r"\[\[split\]\] #1.source: .*photo.png is not a folder"):
        run_job(str(tmp_path / "job.toml"), echo=lambda line: None)
    assert sorted(os.listdir(tmp_path)) == ["job.toml", "photo.png"]
