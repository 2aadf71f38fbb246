"""Nothing read from disk makes featstore touch a file outside the store; a malformed manifest is one line and
exit 2; ``labels`` replaces its files atomically and ``verify`` checks them; the shard counter never outgrows
the names the store accepts (issue 15, items 1 and 6)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import REPO, featstore, write_folder
from featstore.cli import app
from featstore.encode import encode
from featstore.errors import FeatstoreError
from featstore.labels import build_labels, load_label_index
from featstore.query import query_split
from featstore.store import Store

TINY = ("--model", "random:tiny", "--quiet")


@pytest.fixture(scope="module")
def base(tmp_path_factory, dataset) -> str:
    """Split test (30 rows, 3 shards) with a label index from one template: copied by each test."""
    store = str(tmp_path_factory.mktemp("hardening_store") / "store")
    encode(os.path.join(dataset, "test"), store, "test", model="random:tiny", shard_rows=12, workers=0, progress=False)
    build_labels(store, templates=["a photo of a {}."], device="cpu")
    return store


@pytest.fixture
def store(tmp_path, base) -> str:
    """A copy of BASE three folders deep, with files of the same names as featstore's beside it at every level."""
    copy = str(tmp_path / "a" / "b" / "store")
    shutil.copytree(base, copy)  # copy2 keeps mtimes, so the manifest's records still match
    for folder in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"):
        for name in ("victim.parquet", "victim.faiss", "featstore.json"):
            (folder / name).write_bytes(b"not featstore's " + str(folder).encode())
        (folder / "victim").mkdir()
        (folder / "victim" / "part-000000-0123abcd.parquet").write_bytes(b"keep me")
    return copy


def tree(root) -> dict[str, str]:
    """Every file under ROOT (links as links) -> sha256 of its bytes or its link target."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            data = os.readlink(path).encode() if os.path.islink(path) else open(path, "rb").read()
            found[os.path.relpath(path, root)] = hashlib.sha256(data).hexdigest()
    return found


def edit(store: str, change) -> None:
    """Rewrite the manifest with CHANGE(manifest) applied (CHANGE may return a replacement)."""
    path = os.path.join(store, "featstore.json")
    with open(path) as f:
        manifest = json.load(f)
    replaced = change(manifest)
    with open(path, "w") as f:
        json.dump(manifest if replaced is None else replaced, f)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def refused(result, *needles: str, code: int = 2) -> str:
    """RESULT exited CODE with one ``featstore: error:`` line holding NEEDLES, and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("featstore: error: "), result.stderr
    assert all(needle in lines[0] for needle in needles), (needles, lines[0])
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    return lines[0]


def every_command(store: str, dataset: str) -> list[tuple[str, ...]]:
    return [("info", store), ("verify", store), ("query", store, "--split", "test"), ("labels", store),
            ("compact", store, "--quiet"), ("encode", os.path.join(dataset, "test"), "--store", store, "--split", "test", *TINY)]


def shard_of(manifest: dict) -> str:
    return sorted(manifest["splits"]["test"]["shards"])[0]


def rename_shard(new):
    def change(m):
        shards = m["splits"]["test"]["shards"]
        shards[new(m)] = shards.pop(shard_of(m))
    return change


def exchange(folder="../../victim", added=None, dropped=()):
    def change(m):
        m["splits"]["test"]["exchange"] = {"folder": folder, "added": added(m) if added else {}, "dropped": list(dropped)}
    return change


def labels_key(key, value):
    return lambda m: m["labels"].__setitem__(key, value)


OUTSIDE = "@OUTSIDE@"  # replaced by the absolute path of the test's a/b/victim.parquet
BAD_NAMES = {
    "shard-dotdot": (rename_shard(lambda m: "../../../victim.parquet"), "splits['test'].shards: '../../../victim.parquet'"),
    "shard-absolute": (rename_shard(lambda m: OUTSIDE), "splits['test'].shards: "),
    "shard-slash": (rename_shard(lambda m: "victim/part-000000-0123abcd.parquet"), "splits['test'].shards: 'victim/"),
    "shard-near-miss": (rename_shard(lambda m: "part-000000-0123abcd.parquet/.."), "splits['test'].shards"),
    "exchange-folder": (exchange("../../victim"), "splits['test'].exchange.folder: '../../victim'"),
    "exchange-added": (exchange(".exchange-test-0123abcd", lambda m: {"../../../victim.parquet": m["splits"]["test"]["shards"][shard_of(m)]}),
                       "splits['test'].exchange.added: '../../../victim.parquet'"),
    "exchange-dropped": (exchange(".exchange-test-0123abcd", dropped=[OUTSIDE]), "splits['test'].exchange.dropped[0]"),
    "label-index": (labels_key("index_file", "../../victim.faiss"), "labels.index_file: '../../victim.faiss'"),
    "class-table": (labels_key("classes_file", OUTSIDE), "labels.classes_file"),
    # a final newline, which a pattern ending in "$" let through
    "shard-newline": (rename_shard(lambda m: shard_of(m) + "\n"), "splits['test'].shards: 'part-",
                      ".parquet\\n' is not a shard file name"),
    "split-newline": (lambda m: m["splits"].__setitem__("test\n", m["splits"].pop("test")),
                      "splits: 'test\\n' is not a split name"),
    "exchange-folder-newline": (exchange(".exchange-test-0123abcd\n"),
                                "splits['test'].exchange.folder: '.exchange-test-0123abcd\\n' is not"),
    "label-index-newline": (labels_key("index_file", "index.faiss\n"), "labels.index_file: 'index.faiss\\n' is not"),
    "class-table-newline": (labels_key("classes_file", "classes.parquet\n"),
                            "labels.classes_file: 'classes.parquet\\n' is not"),
}


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_a_file_name_outside_the_store_is_refused_and_nothing_is_touched(tmp_path, store, dataset, case):
    change, *record = BAD_NAMES[case]
    outside = str(tmp_path / "a" / "b" / "victim.parquet")

    def planted(m):
        change(m)
        return json.loads(json.dumps(m).replace(OUTSIDE, outside))

    edit(store, planted)
    before = tree(tmp_path)
    for args in every_command(store, dataset):
        refused(cli(*args), "featstore.json is not a valid featstore manifest", *record)
    assert tree(tmp_path) == before  # neither the files beside the store nor the store's own were touched


def test_a_split_name_with_a_final_newline_is_refused(tmp_path, store, dataset):
    before = tree(tmp_path)
    for args in (("encode", os.path.join(dataset, "test"), "--store", store, "--split", "test\n", *TINY),
                 ("query", store, "--split", "test\n")):
        refused(cli(*args), "'test\\n'")
    with pytest.raises(FeatstoreError, match="bad split name"):
        Store.open(store).split_dir("test\n")
    assert tree(tmp_path) == before


MALFORMED = {
    "not-json": (None, "cannot read"),
    "a-list": (lambda m: [m], "the top level: expected an object, got a list"),
    "no-splits": (lambda m: m.pop("splits") and None, "the top level: missing key 'splits'"),
    "no-model": (lambda m: m.pop("model") and None, "missing key 'model'"),
    "model-spec-a-number": (lambda m: m["model"].__setitem__("spec", 3), "model.spec: expected a string, got an integer 3"),
    "splits-a-list": (lambda m: m.__setitem__("splits", [m["splits"]["test"]]), "splits: expected an object, got a list"),
    "rows-a-string": (lambda m: m["splits"]["test"]["shards"][shard_of(m)].__setitem__("rows", "12"),
                      "splits['test'].shards['part-000000-", "'].rows: expected an integer, got a string '12'"),
    "footer-not-a-digest": (lambda m: m["splits"]["test"]["shards"][shard_of(m)].__setitem__("footer_sha256", "abc\n"),
                            "'].footer_sha256: 'abc\\n' is not a sha256 hex digest"),
    "shard-without-checksum": (lambda m: m["splits"]["test"]["shards"][shard_of(m)].pop("sha256") and None,
                               "a shard record needs rows, bytes and sha256"),
    "failed-a-list": (lambda m: m["splits"]["test"].__setitem__("failed", []), "splits['test'].failed: expected an object"),
    "failed-without-reason": (lambda m: m["splits"]["test"]["failed"].__setitem__("x.png", {"path": "x.png", "size": 1, "mtime_ns": 1}),
                              "splits['test'].failed['x.png']: missing key 'reason'"),
    "next-shard-huge": (lambda m: m.__setitem__("next_shard", 10 ** 30), "next_shard: 1000000000000000000000000000000 is out of range"),
    "next-shard-negative": (lambda m: m.__setitem__("next_shard", -1), "next_shard: -1 is out of range"),
    "next-shard-a-string": (lambda m: m.__setitem__("next_shard", "7"), "next_shard: expected an integer, got a string '7'"),
    "next-shard-infinite": (lambda m: m.__setitem__("next_shard", float("inf")), "next_shard: expected an integer, got a number inf"),
    "dim-a-bool": (lambda m: m.__setitem__("dim", True), "dim: expected an integer, got a boolean"),
    "classes-not-strings": (lambda m: m.__setitem__("classes", [1, 2]), "classes[0]: expected a string"),
    "labels-short": (lambda m: m["labels"]["display_names"].pop() and None, "labels: 5 display names for 6 classes"),
    "templates-a-string": (lambda m: m["labels"].__setitem__("templates", "a photo of a {}."), "labels.templates: expected a list"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_is_one_line_and_exit_2(tmp_path, store, dataset, case):
    change, *record = MALFORMED[case]
    if change is None:
        with open(os.path.join(store, "featstore.json"), "r+") as f:
            f.truncate(100)
    else:
        edit(store, change)
    before = tree(tmp_path)
    for args in every_command(store, dataset)[:3] + every_command(store, dataset)[-1:]:  # info, verify, query, encode
        refused(cli(*args), "featstore.json", *record)
    assert tree(tmp_path) == before


def test_the_real_command_line_refuses_in_one_line(tmp_path, store):
    edit(store, exchange(".exchange-test-0123abcd", lambda m: {"../../../victim.parquet": m["splits"]["test"]["shards"][shard_of(m)]}))
    before = tree(tmp_path)
    result = featstore("verify", store, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "splits['test'].exchange.added: '../../../victim.parquet' is not a shard file name" in line
    assert tree(tmp_path) == before
    edit(store, lambda m: m["splits"]["test"].pop("exchange") and m.__setitem__("next_shard", "7"))
    before = tree(tmp_path)
    result = featstore("encode", str(tmp_path / "a"), "--store", store, "--split", "test", *TINY, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "next_shard: expected an integer" in result.stderr
    assert tree(tmp_path) == before


# ---- .lock ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path, store, dataset, dangling):
    target = tmp_path / ("nothing-here" if dangling else "victim.parquet")
    lock = os.path.join(store, ".lock")
    os.unlink(lock)
    os.symlink(target, lock)
    before = tree(tmp_path)
    for args in every_command(store, dataset)[3:]:  # the writers: labels, compact, encode
        refused(cli(*args), ".lock is a symbolic link, which featstore does not follow")
    assert tree(tmp_path) == before and os.path.islink(lock) and target.exists() != dangling
    assert cli("verify", store).exit_code == 0 and cli("query", store, "--split", "test").exit_code == 0  # readers lock nothing


def test_a_lock_that_is_a_fifo_a_folder_or_a_hard_link_is_refused_without_hanging(tmp_path, store):
    lock = os.path.join(store, ".lock")
    os.unlink(lock)
    os.mkfifo(lock)
    result = featstore("compact", store, "--quiet", check=False, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.strip().endswith(".lock is not a regular file of its own (a FIFO, a folder, or a file with "
                                          "other hard links): remove it and run again")
    os.unlink(lock)
    os.mkdir(lock)
    refused(cli("compact", store, "--quiet"), ".lock")
    os.rmdir(lock)
    os.link(tmp_path / "victim.parquet", lock)  # the writer would truncate and write the file outside
    before = tree(tmp_path)
    refused(cli("compact", store, "--quiet"), ".lock is not a regular file of its own")
    assert tree(tmp_path) == before


def test_a_symlinked_split_folder_is_not_written_through(tmp_path, store, dataset):
    folder = os.path.join(store, "images", "split=test")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(folder, elsewhere)
    os.symlink(elsewhere, folder)
    (elsewhere / ".plan-0123abcd.tmp").write_bytes(b"someone's")  # what reconcile would remove in the store
    (elsewhere / "part-000099-0123abcd.parquet").write_bytes(b"someone's")  # what it would move aside
    def files() -> dict[str, str]:
        return {path: digest for path, digest in tree(tmp_path).items() if path != "a/b/store/.lock"}

    before = files()
    for args in every_command(store, dataset)[-2:]:  # compact, encode (writers: they hold the lock when they look)
        refused(cli(*args), "split=test is a symbolic link, which featstore does not write through")
    assert files() == before


# ---- labels: one commit, verified ----------------------------------------------------------------------------
KILLER = r"""
import os, shutil, signal, sys, traceback
from featstore.labels import build_labels
store, template, snapshots = sys.argv[1:]

def run(kill_at):
    pid = os.fork()
    if pid == 0:  # a writer killed (SIGKILL) just before its KILL_AT-th replace, unlink or fsync
        try:
            calls = [0]
            def killing(real):
                def call(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return call
            for name in ("replace", "unlink", "fsync"):
                setattr(os, name, killing(getattr(os, name)))
            build_labels(store, templates=[template], device="cpu")
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    status = os.waitpid(pid, 0)[1]
    if not os.WIFSIGNALED(status) and os.WEXITSTATUS(status):
        sys.exit("labels failed")
    return os.WIFSIGNALED(status)

for kill_at in range(1, 13):  # a clean run makes 11 such calls; each killed run leaves files for later runs to remove
    if not run(kill_at):
        break
    shutil.copytree(store, os.path.join(snapshots, f"{kill_at:03d}"), symlinks=True)
run(0)  # then one that nobody kills
"""


def label_set(store: str) -> tuple[list[str], np.ndarray]:
    """(templates, class vectors) of the store's label set; its index, class table and manifest must agree."""
    opened = Store.open(store)
    index, names = load_label_index(opened)
    vectors = index.reconstruct_n(0, index.ntotal)
    table = pq.read_table(opened.label_paths()[1])
    assert names == table.column("display").to_pylist() == opened.manifest.labels.display_names
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), np.float32), vectors)
    return opened.manifest.labels.templates, vectors


def test_labels_killed_at_every_step_leaves_the_old_or_the_new_set(tmp_path, store):
    old_templates, old = label_set(store)
    old_acc = query_split(store, "test", 3, None)["acc1"]
    snapshots = tmp_path / "killed"
    snapshots.mkdir()
    subprocess.run([sys.executable, "-c", KILLER, store, "a drawing of a {}.", str(snapshots)], check=True, cwd=REPO,
                   timeout=600)
    new_templates, new = label_set(store)  # the run that nobody killed
    new_acc = query_split(store, "test", 3, None)["acc1"]
    assert old_templates == ["a photo of a {}."] and new_templates == ["a drawing of a {}."] and not np.allclose(old, new)
    assert sorted(os.listdir(os.path.join(store, "labels"))) == sorted(map(os.path.basename, Store(store).label_paths()))
    seen = []
    for name in sorted(os.listdir(snapshots)):
        killed = str(snapshots / name)
        templates, vectors = label_set(killed)
        assert templates in (old_templates, new_templates)
        np.testing.assert_array_equal(vectors, old if templates == old_templates else new)
        assert query_split(killed, "test", 3, None)["acc1"] == (old_acc if templates == old_templates else new_acc)
        assert Store.open(killed).verify() == []
        seen.append(templates == new_templates)
    assert len(seen) == 12 and seen[0] is False and seen[-1] is True and seen == sorted(seen)  # old until the commit


def test_verify_and_query_catch_a_damaged_or_missing_label_file(store):
    index, table = Store(store).label_paths()
    with open(index, "r+b") as f:
        f.seek(os.path.getsize(index) - 7)
        f.write(b"\x7f")  # one float of the index, same size: still a loadable index
    result = cli("verify", store)
    assert result.exit_code == 1 and f"labels/{os.path.basename(index)}: checksum mismatch" in result.stderr
    refused(cli("query", store, "--split", "test"), "is damaged (checksum mismatch): run featstore labels")
    os.unlink(table)
    result = cli("verify", store, "--json")
    assert result.exit_code == 1
    assert {(p["file"], p["problem"]) for p in json.loads(result.stdout)["problems"]} == {
        (f"labels/{os.path.basename(index)}", "checksum mismatch"), (f"labels/{os.path.basename(table)}", "missing")}
    assert cli("labels", store).exit_code == 0  # the repair
    assert cli("verify", store).exit_code == 0 and cli("query", store, "--split", "test").exit_code == 0
    assert not os.path.exists(index) and not os.path.exists(table)


def test_stores_with_the_old_fixed_label_names_still_load_and_verify(store):
    index, table = Store(store).label_paths()
    folder = os.path.dirname(index)
    os.rename(index, os.path.join(folder, "index.faiss"))
    os.rename(table, os.path.join(folder, "classes.parquet"))
    edit(store, lambda m: [m["labels"].pop(key) for key in ("index_file", "classes_file", "classes_sha256")] and None)
    before = query_split(store, "test", 3, None)["acc1"]
    assert cli("verify", store).exit_code == 0 and cli("query", store, "--split", "test").exit_code == 0
    with open(os.path.join(folder, "classes.parquet"), "r+b") as f:
        f.truncate(40)
    result = cli("verify", store)
    assert result.exit_code == 1 and "labels/classes.parquet: unreadable" in result.stderr
    assert cli("labels", store).exit_code == 0
    assert sorted(os.listdir(folder)) == sorted(map(os.path.basename, Store(store).label_paths()))  # old pair removed
    assert query_split(store, "test", 3, None)["acc1"] == before and cli("verify", store).exit_code == 0


def test_a_symlinked_labels_folder_is_refused(tmp_path, store):
    folder = os.path.join(store, "labels")
    shutil.move(folder, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", folder)
    before = tree(tmp_path)
    refused(cli("labels", store), "labels is a symbolic link or a file")
    assert tree(tmp_path) == before


# ---- the shard counter ---------------------------------------------------------------------------------------
def numbers(folder: str) -> list[str]:
    return sorted(name.rsplit("-", 1)[0] for name in os.listdir(folder))


def test_the_shard_counter_grows_past_six_digits(tmp_path, store):
    source = tmp_path / "more"
    write_folder(source, per_class=2, seed=5, classes=["circle", "triangle"])
    edit(store, lambda m: m.__setitem__("next_shard", 999_998))
    args = ("encode", str(source), "--store", store, "--split", "more", "--shard-rows", "2", *TINY)
    assert cli(*args).exit_code == 0
    for name in ("circle", "triangle"):  # ids among the stored ones: a second sorted run, for compact to merge
        shutil.copy(source / name / "img_000.png", source / name / "img_000b.png")
    assert cli(*args).exit_code == 0
    folder = os.path.join(store, "images", "split=more")
    assert numbers(folder) == ["part-1000000", "part-999998", "part-999999"]
    assert cli("verify", store).exit_code == 0 and cli(*args).exit_code == 0  # reopened, rerun: nothing to do
    assert cli("compact", store, "--split", "more", "--quiet").exit_code == 0
    assert numbers(folder) == ["part-1000001"]
    ids = Store.open(store).read_split("more", ["id"]).column("id").to_pylist()
    assert ids == sorted(os.path.relpath(os.path.join(d, f), source) for d, _, fs in os.walk(source) for f in fs)
    assert Store.open(store).manifest.next_shard == 1_000_002 and cli("verify", store).exit_code == 0


def test_an_exhausted_shard_counter_is_refused_and_nothing_is_lost(tmp_path, store):
    source = tmp_path / "more"
    write_folder(source, per_class=1, seed=6, classes=["circle"])
    edit(store, lambda m: m.__setitem__("next_shard", 10 ** 18))
    before = tree(os.path.join(store, "images"))
    refused(cli("encode", str(source), "--store", store, "--split", "more", *TINY), "has used all")
    assert tree(os.path.join(store, "images")) == before and cli("verify", store).exit_code == 0
