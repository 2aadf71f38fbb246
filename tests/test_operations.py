"""Nightly operations: incremental reruns, bad files, one writer, verify and repair, bad command lines."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from conftest import REPO, draw_image, featstore, write_folder
from conftest import SLOW_MODEL
from test_store import assert_same_store, committed_shards, kill_when, start_encode, store_rows

from featstore.encode import encode
from featstore.models import load_model
from featstore.store import Store


def shard_fingerprints(store: str) -> dict[str, tuple]:
    out = {}
    for folder, _, files in os.walk(os.path.join(store, "images")):
        for name in files:
            path = os.path.join(folder, name)
            out[path] = (os.stat(path).st_mtime_ns, hashlib.sha256(open(path, "rb").read()).hexdigest())
    return out


def shard_names(store: str) -> dict[str, str]:
    """id -> the shard file holding its row."""
    folder = os.path.join(store, "images", "split=train")
    return {row_id: name for name in os.listdir(folder) if name.endswith(".parquet")
            for row_id in pq.read_table(os.path.join(folder, name), columns=["id"]).column("id").to_pylist()}


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header announcing a huge image (a decompression bomb) with almost no data."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bad_files_never_stop_a_run(tmp_path):
    src = tmp_path / "src" / "things"
    src.mkdir(parents=True)
    good = draw_image(0, 0, (40, 30))
    good.save(src / "good.png")
    good.convert("RGBA").save(src / "rgba.png")
    good.convert("L").save(src / "grey.png")
    good.convert("P").save(src / "palette.png")
    good.convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray((np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)).save(src / "deep.png")  # I;16
    assert Image.open(src / "deep.png").mode.startswith("I")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(src / "pixel.png")
    (src / "empty.jpg").write_bytes(b"")
    data = (src / "good.png").read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    (src / "text.jpg").write_text("this is not an image")
    (src / "bomb.png").write_bytes(png_claiming(30000, 30000))
    store = str(tmp_path / "store")

    run = featstore("encode", str(tmp_path / "src"), "--store", store, "--split", "s", "--model", "random:tiny",
                    "--quiet", "--json")
    result = json.loads(run.stdout)
    assert run.returncode == 0 and "4 images could not be read" in run.stderr
    assert (result["rows"], result["failed"]) == (7, 4)
    info = json.loads(featstore("info", store, "--json").stdout)
    assert info["splits"]["s"]["rows"] == 7 and info["splits"]["s"]["failed"] == 4
    listed = featstore("info", store, "--failures").stdout.splitlines()
    reasons = {line.split("\t")[1]: line.split("\t")[2] for line in listed}
    assert set(reasons) == {"things/empty.jpg", "things/truncated.png", "things/text.jpg", "things/bomb.png"}
    assert reasons["things/bomb.png"].startswith("too many pixels (900000000 > ")

    # failures are retried only once the file changes; --strict makes them an error
    again = featstore("encode", str(tmp_path / "src"), "--store", store, "--split", "s", "--model", "random:tiny",
                      "--quiet", "--json", "--strict", check=False)
    assert again.returncode == 4 and json.loads(again.stdout)["encoded"] == 0
    good.save(src / "text.jpg", format="JPEG")
    fixed = json.loads(featstore("encode", str(tmp_path / "src"), "--store", store, "--split", "s",
                                 "--model", "random:tiny", "--quiet", "--json").stdout)
    assert (fixed["encoded"], fixed["rows"], fixed["failed"]) == (1, 8, 3)


def test_incremental_runs(tmp_path):
    src = tmp_path / "src"
    write_folder(src, per_class=5, seed=3, classes=["circle", "square"])
    store = str(tmp_path / "store")
    args = ("--store", store, "--split", "train", "--model", "random:tiny", "--shard-rows", "4", "--quiet", "--json")
    first = json.loads(featstore("encode", str(src), *args).stdout)
    assert (first["rows"], first["shards"]) == (10, 3)

    before = shard_fingerprints(store)
    same = json.loads(featstore("encode", str(src), *args).stdout)
    assert (same["encoded"], same["unchanged"], same["shards_written"]) == (0, 10, 0)
    assert shard_fingerprints(store) == before  # nothing rewritten

    # +new, ~changed (in two shards), -removed, and a touched file whose bytes did not change
    shard_of = shard_names(store)
    draw_image(5, 99).save(src / "square" / "img_new.png")
    draw_image(4, 42).save(src / "circle" / "img_001.png")
    draw_image(1, 43).save(src / "square" / "img_004.png")
    os.unlink(src / "square" / "img_003.png")
    os.utime(src / "circle" / "img_002.png", ns=(1, 1))
    result = json.loads(featstore("encode", str(src), *args).stdout)
    assert (result["encoded"], result["replaced"], result["removed"], result["rows"]) == (3, 2, 1, 10)
    changed = ["circle/img_001.png", "square/img_004.png"]
    assert shard_of["circle/img_001.png"] != shard_of["square/img_004.png"]
    assert all(shard_names(store)[row_id] == shard_of[row_id] for row_id in changed)  # replaced in place
    assert all(name.endswith(".parquet") for name in os.listdir(os.path.join(store, "images", "split=train")))

    rows = store_rows(store, "train")  # asserts no duplicate ids
    expected = sorted(f"{c}/img_{i:03d}.png" for c in ("circle", "square") for i in range(5)) + ["square/img_new.png"]
    expected.remove("square/img_003.png")
    assert sorted(rows) == sorted(expected)
    model = load_model("random:tiny")
    for row_id in changed:
        fresh = model.encode_images(model.preprocess(Image.open(src / row_id).convert("RGB"))[None]).numpy()[0]
        np.testing.assert_allclose(rows[row_id], fresh, rtol=2e-3, atol=2e-3)
    table = pq.read_table(os.path.join(store, "images", "split=train"))
    touched = [r for r in table.to_pylist() if r["id"] == "circle/img_002.png"][0]
    assert touched["mtime_ns"] == 1
    assert featstore("verify", store).returncode == 0
    unchanged = json.loads(featstore("encode", str(src), *args).stdout)
    assert (unchanged["encoded"], unchanged["shards_written"]) == (0, 0)

    # everything removed: the split is empty, and plain readers agree
    shutil.rmtree(src / "square")
    shutil.rmtree(src / "circle")
    # (an empty listing on a split with rows is refused unless removals are allowed: test_hardening_sources)
    empty = json.loads(featstore("encode", str(src), *args, "--allow-removals").stdout)
    assert empty["rows"] == 0 and not os.listdir(os.path.join(store, "images", "split=train"))


def test_changes_across_interleaved_runs_patch_one_shard_per_run_at_a_time(tmp_path, monkeypatch):
    """Two encodes whose ids interleave leave two sorted runs of shards. A night that changes, touches and
    removes files in both is patched by walking the plan's changes in id order: every row lands in its old
    shard, and the patch never holds more shards' changes than there are runs."""
    import featstore.encode.writer
    import featstore.encode.plan

    monkeypatch.setattr(featstore.encode.plan, "PLAN_BATCH", 3)  # spills written and read back across batches
    src, store = tmp_path / "src", str(tmp_path / "store")
    src.mkdir()
    run = lambda: encode(str(src), store, "train", model="random:tiny", batch_size=4, workers=0,  # noqa: E731
                         shard_rows=4, progress=False)
    for parity in (0, 1):  # even ids first, then the odd ids between them
        for i in range(parity, 24, 2):
            draw_image(i % 3, i).save(src / f"img_{i:03d}.png")
        run()
    shard_of = shard_names(store)
    assert len(set(shard_of.values())) == 6

    held = []
    patch_shard = featstore.encode.writer.ShardWriter._patch_shard
    monkeypatch.setattr(featstore.encode.writer.ShardWriter, "_patch_shard",
                        lambda self, shard, pending: (held.append(len(pending)), patch_shard(self, shard, pending)))
    changed, touched, removed = ["img_001.png", "img_002.png", "img_013.png", "img_022.png"], ["img_005.png", "img_010.png"], ["img_006.png", "img_019.png"]
    for name in changed:
        draw_image(0, 1000 + int(name[4:7])).save(src / name)
    for name in touched:
        os.utime(src / name, ns=(7, 7))
    for name in removed:
        os.unlink(src / name)
    result = run()
    assert (result["encoded"], result["replaced"], result["removed"], result["rows"]) == (4, 4, 2, 22)
    assert len(held) == 6 and max(held) <= 2, held  # every shard patched, at most one per run pending

    rows = store_rows(store, "train")  # no duplicate ids
    assert sorted(rows) == sorted(set(shard_of) - set(removed))
    assert all(shard_names(store)[row_id] == shard_of[row_id] for row_id in changed + touched)
    model = load_model("random:tiny")
    for row_id in changed:
        fresh = model.encode_images(model.preprocess(Image.open(src / row_id).convert("RGB"))[None]).numpy()[0]
        np.testing.assert_allclose(rows[row_id], fresh, rtol=2e-3, atol=2e-3)
    table = pq.read_table(os.path.join(store, "images", "split=train")).to_pylist()
    assert sorted(r["id"] for r in table if r["mtime_ns"] == 7) == touched
    assert all(name.endswith(".parquet") for name in os.listdir(os.path.join(store, "images", "split=train")))
    again = run()
    assert (again["encoded"], again["unchanged"], again["shards_written"]) == (0, 22, 0)


def test_a_kill_between_shard_patches_leaves_a_store_the_next_run_finishes(tmp_path):
    """SIGKILL after the first of three shards was patched: the store stays readable with no id twice, and
    the next run, which must find the rest of the night's changes again, ends equal to a run never killed."""
    src, store, reference = tmp_path / "src", str(tmp_path / "store"), str(tmp_path / "reference")
    write_folder(src, per_class=6, seed=5, classes=["circle", "square"])
    options = dict(model="random:tiny", batch_size=4, workers=0, shard_rows=4, progress=False)
    for target in (store, reference):
        encode(str(src), target, "train", **options)
    for i, name in enumerate(["circle/img_000.png", "circle/img_005.png", "square/img_004.png"]):  # one per shard
        draw_image(i, 500 + i).save(src / name)
    os.unlink(src / "square" / "img_001.png")
    killed_after_one_patch = (
        "import os, signal, sys; import featstore.encode as e, featstore.encode.writer as w; "
        "patch = w.ShardWriter._patch_shard; "
        "w.ShardWriter._patch_shard = lambda *a: (patch(*a), os.kill(os.getpid(), signal.SIGKILL)); "
        f"e.encode(sys.argv[1], sys.argv[2], 'train', **{options!r})")
    done = subprocess.run([sys.executable, "-c", killed_after_one_patch, str(src), store], cwd=REPO)
    assert done.returncode == -signal.SIGKILL
    assert len(store_rows(store, "train")) == 12  # readable, no id twice: 1 shard patched, 2 not yet
    encode(str(src), reference, "train", **options)
    rerun = encode(str(src), store, "train", **options)
    assert (rerun["replaced"], rerun["removed"]) == (2, 1)  # what the killed run had not patched
    assert_same_store(store, reference)


def test_sigkill_twice_then_resume(tmp_path, slow_source, uninterrupted):
    store = str(tmp_path / "store")
    kill_when(start_encode(slow_source, store), lambda: committed_shards(store, "train") >= 1)
    first = committed_shards(store, "train")
    kill_when(start_encode(slow_source, store), lambda: committed_shards(store, "train") >= first + 1)
    assert committed_shards(store, "train") < 3
    featstore("encode", slow_source, "--store", store, "--split", "train", "--model", SLOW_MODEL,
              "--batch-size", "4", "--shard-rows", "8", "--quiet")
    assert_same_store(store, uninterrupted)


def test_one_writer_at_a_time(tmp_path, slow_source):
    store = str(tmp_path / "store")
    big = tmp_path / "big"
    write_folder(big, per_class=60, seed=8, classes=["circle", "square", "triangle"])
    writer = start_encode(str(big), store)
    try:
        lock = os.path.join(store, ".lock")
        deadline = time.time() + 120
        while not (os.path.isfile(lock) and open(lock).read().strip()):
            assert time.time() < deadline and writer.poll() is None
            time.sleep(0.05)
        for command in (["encode", slow_source, "--store", store, "--split", "train", "--model", SLOW_MODEL],
                        ["labels", store]):
            second = featstore(*command, check=False)
            assert second.returncode == 3, second.stderr
            assert f"pid {writer.pid}" in second.stderr and "Traceback" not in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
        assert writer.poll() is None, "the first writer must still be running for this test to mean anything"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    # the killed writer's lock is free again
    result = featstore("encode", slow_source, "--store", store, "--split", "train", "--model", SLOW_MODEL,
                       "--batch-size", "4", "--shard-rows", "8", "--quiet", "--json")
    assert json.loads(result.stdout)["rows"] == 24


def test_a_dying_worker_loses_nothing(tmp_path):
    source = tmp_path / "src"
    write_folder(source, per_class=40, seed=9, classes=["circle", "square", "triangle"])  # workers stay busy
    store = str(tmp_path / "store")
    process = start_encode(str(source), store, "--workers", "2")

    def workers() -> list[int]:
        try:
            with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    deadline = time.time() + 120
    while not (workers() and committed_shards(store, "train") >= 1):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)
    os.kill(workers()[0], signal.SIGKILL)  # as the OOM killer would
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "continuing with fresh workers" in err
    rows = store_rows(store, "train")  # asserts no duplicates
    assert sorted(rows) == sorted(f"{c}/img_{i:03d}.png" for c in ("circle", "square", "triangle") for i in range(40))
    assert json.loads(featstore("info", store, "--json").stdout)["splits"]["train"]["failed"] == 0
    assert featstore("verify", store).returncode == 0


def test_a_file_that_kills_its_decoder_is_isolated_and_recorded(tmp_path, monkeypatch):
    """A decoder that crashes (segfault, OOM kill) takes its worker process with it: the run goes on, reads
    the items near the death one at a time, and records the one file that kills its reader as a failure."""
    import featstore.encode.plan
    import featstore.sources.base

    source = tmp_path / "src"
    write_folder(source, per_class=12, seed=3, classes=["circle", "square"])
    poison = (source / "square" / "img_005.png").read_bytes()
    decode = featstore.sources.base.decode_image

    def crashing_decode(data: bytes):
        if data == poison:
            os.kill(os.getpid(), signal.SIGKILL)  # in a forked DataLoader worker
        return decode(data)

    monkeypatch.setattr(featstore.sources.base, "decode_image", crashing_decode)
    monkeypatch.setattr(featstore.encode.plan, "PLAN_BATCH", 5)  # the spilled plan is read back across batches
    store = str(tmp_path / "store")
    result = encode(str(source), store, "train", model="random:tiny", batch_size=4, workers=2, progress=False)
    assert (result["rows"], result["failed"]) == (23, 1)
    rows = store_rows(store, "train")
    assert "square/img_005.png" not in rows and len(rows) == 23
    [failure] = Store.open(store).failures()
    assert failure["id"] == "square/img_005.png" and "decoder process died" in failure["reason"]


def test_verify_finds_a_truncated_shard_and_encode_repairs_it(tmp_path, dataset):
    store = str(tmp_path / "store")
    args = ("--store", store, "--split", "train", "--model", "random:tiny", "--shard-rows", "20", "--quiet")
    featstore("encode", os.path.join(dataset, "train"), *args)
    before = store_rows(store, "train")
    victim = sorted(os.listdir(os.path.join(store, "images", "split=train")))[1]
    path = os.path.join(store, "images", "split=train", victim)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    check = featstore("verify", store, check=False)
    assert check.returncode == 1 and victim in check.stderr
    repaired = json.loads(featstore("encode", os.path.join(dataset, "train"), *args, "--json").stdout)
    assert repaired["encoded"] == 20 and any(victim in line for line in repaired["repairs"])
    assert featstore("verify", store).returncode == 0
    after = store_rows(store, "train")
    assert sorted(after) == sorted(before)


def test_command_line_shard_rows_default_is_the_librarys():
    from featstore import cli
    from featstore.compact import compact
    from featstore.store import DEFAULT_SHARD_ROWS

    assert cli.SHARD_ROWS == DEFAULT_SHARD_ROWS
    for entry in (encode, compact):
        assert inspect.signature(entry).parameters["shard_rows"].default == DEFAULT_SHARD_ROWS


def test_bad_command_lines(tmp_path, dataset, checkpoint):
    train = os.path.join(dataset, "train")
    fresh = str(tmp_path / "never")
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"definitely not a checkpoint")
    twice = tmp_path / "twice.csv"
    twice.write_text(f"path\n{train}/circle/img_000.png\ntrain/circle/img_001.png\n{train}/circle/img_000.png\n")
    cases = [
        (["encode", f"manifest:{twice}", "--store", fresh, "--split", "a", "--model", "random:tiny"], 2, "img_000.png more than once"),
        (["encode", str(tmp_path / "nope"), "--store", fresh, "--split", "a", "--model", "random:tiny"], 2, "does not exist"),
        (["encode", train, "--store", fresh, "--split", "a", "--model", "ViT-Z/99"], 2, "unknown model 'ViT-Z/99'"),
        (["encode", train, "--store", fresh, "--split", "a", "--model", str(not_a_model)], 2, "is not a CLIP checkpoint"),
        (["encode", train, "--store", fresh, "--split", "a", "--model", "random:tiny", "--batch-size", "0"], 2, "--batch-size"),
        (["encode", train, "--store", fresh, "--split", "../x", "--model", "random:tiny"], 2, "bad split name"),
        (["encode", "cifar100:" + str(tmp_path), "--store", fresh, "--split", "train", "--model", "random:tiny"], 2, "no cifar-100-python"),
        (["query", fresh, "--split", "a"], 2, "no featstore store"),
        (["info", fresh], 2, "no featstore store"),
        (["compact", fresh], 2, "no featstore store"),
    ]
    for args, code, message in cases:
        result = featstore(*args, check=False)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not os.path.exists(fresh), args

    store = str(tmp_path / "store")
    featstore("encode", train, "--store", store, "--split", "train", "--model", "random:tiny", "--quiet")
    featstore("encode", str(tmp_path / "flat"), "--store", store, "--split", "x", "--model", "random:tiny",
              "--quiet", check=False)  # nonexistent: must not create the split
    os.makedirs(tmp_path / "flat")
    draw_image(0, 0).save(tmp_path / "flat" / "one.png")
    featstore("encode", str(tmp_path / "flat"), "--store", store, "--split", "unlabelled", "--model", "random:tiny", "--quiet")
    snapshot = shard_fingerprints(store), open(os.path.join(store, "featstore.json")).read()
    store_cases = [
        (["query", store, "--split", "train"], "no label index"),
        (["probe", store, "--train-split", "train", "--test-split", "nope", "--C", "1"], "no split 'nope'"),
        (["probe", store, "--train-split", "train", "--test-split", "unlabelled", "--C", "1"], "no labelled rows"),
        (["query", store, "--split", "nope"], "no split 'nope'"),
        (["encode", train, "--store", store, "--split", "train", "--model", checkpoint], "holds embeddings of random:tiny"),
        (["encode", train, "--store", store, "--split", "train", "--model", "random:tiny", "--dtype", "float32"], "holds float16"),
        (["labels", store, "--template", "no placeholder"], "must contain"),
        (["probe", store, "--train-split", "train", "--test-split", "train", "--C", "-1"], "--C must be positive"),
        (["probe", store, "--train-split", "train", "--test-split", "train", "--solver", "lbfgs"], "unknown --solver"),
        (["probe", store, "--train-split", "train", "--test-split", "train", "--device", "tpu"], "unknown --device"),
        (["compact", store, "--split", "nope"], "no split 'nope'"),
        (["compact", store, "--max-runs", "0"], "--max-runs must be at least 1"),
    ]
    for args, message in store_cases:
        result = featstore(*args, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (shard_fingerprints(store), open(os.path.join(store, "featstore.json")).read()) == snapshot
    assert "x" not in json.loads(featstore("info", store, "--json").stdout)["splits"]
