"""The Ray engine (``encode --engine ray``) on one local Ray instance shared by the module: the same rows as the
local engine, every row exactly once when workers, actors or the driver are killed, and a poison file recorded.

Faults are injected in Ray's worker processes by a setup hook (``_chaos``) driven by files in a folder: a file
``poison`` whose bytes kill the decoder that reads them, ``kill-decoder`` and ``kill-actor`` that make the next
decoder / model actor to see them die once (each file is claimed by removing it)."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import featstore, write_folder

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402  (the one Ray pickles the setup hook with)

from featstore.encode import encode  # noqa: E402
from featstore.encode import ray_runner  # noqa: E402
from featstore.errors import FeatstoreError  # noqa: E402
from featstore.jobs import load_job  # noqa: E402

CHAOS = "FEATSTORE_TEST_CHAOS"
RAY = {"engine": "ray", "model": "random:tiny", "dtype": "float32", "batch_size": 4, "progress": False}


def _claim(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _chaos() -> None:
    """Ray's worker_process_setup_hook: wrap the decoder and the model to die as the chaos folder says."""
    import featstore.models
    import featstore.sources.base as base

    folder = os.environ[CHAOS]
    decode, encode_images = base.decode_image, featstore.models.Embedder.encode_images

    def chaotic_decode(data: bytes):
        poison = os.path.join(folder, "poison")
        if (os.path.exists(poison) and open(poison, "rb").read() == data) or _claim(os.path.join(folder, "kill-decoder")):
            os.kill(os.getpid(), signal.SIGKILL)
        return decode(data)

    calls = []

    def chaotic_encode(self, pixels):
        calls.append(1)
        if len(calls) >= 2 and _claim(os.path.join(folder, "kill-actor")):
            os._exit(1)  # mid-run, after a batch went through
        return encode_images(self, pixels)

    base.decode_image = chaotic_decode
    featstore.models.Embedder.encode_images = chaotic_encode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance for the module (2 CPUs); returns (GCS address, chaos folder)."""
    chaos = str(tmp_path_factory.mktemp("chaos"))
    if ray.is_initialized():
        ray.shutdown()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels by value to the workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _chaos, "env_vars": {CHAOS: chaos}})
    yield ray.get_runtime_context().gcs_address, chaos
    ray.shutdown()


def rows(store: str) -> dict[str, dict]:
    table = pq.read_table(os.path.join(store, "images", "split=train"))
    out = {row["id"]: row for row in table.to_pylist()}
    assert len(out) == table.num_rows, "duplicate rows"
    return out


def assert_same_rows(store: str, reference: str) -> None:
    """Same ids, paths, labels, fingerprints and captions; fp32 embeddings with cosine >= 0.99999."""
    mine, ref = rows(store), rows(reference)
    assert sorted(mine) == sorted(ref)
    for row_id, row in ref.items():
        for key in ("path", "label", "size", "mtime_ns", "sha256", "caption"):
            assert mine[row_id][key] == row[key], (row_id, key)
        a, b = np.array(mine[row_id]["embedding"]), np.array(row["embedding"])
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.99999
    folder = os.path.join(store, "images", "split=train")
    assert not [n for n in os.listdir(folder) if not n.endswith(".parquet")], "temp files left behind"
    with open(os.path.join(store, "featstore.json")) as f, open(os.path.join(reference, "featstore.json")) as g:
        assert json.load(f)["classes"] == json.load(g)["classes"]


def local_reference(source: str, store: str) -> str:
    encode(source, store, "train", model="random:tiny", dtype="float32", batch_size=4, workers=0, progress=False)
    return store


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("src")
    write_folder(root, per_class=4, seed=5, classes=["circle", "square", "triangle"])
    return str(root)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> str:
    return local_reference(folder, str(tmp_path_factory.mktemp("ref") / "store"))


def webdataset(root) -> str:
    from test_sources_formats import NAMES, shard_000, shard_001, write_tar

    (root / "train").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    for number, samples in enumerate((shard_000(), shard_001())):
        write_tar(root / "train" / f"shard-{number:03d}.tar", samples)
    return f"webdataset:{root}/train/shard-{{000..001}}.tar"


def manifest(root, folder: str) -> str:
    root.mkdir()
    with open(root / "m.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for name in sorted(os.listdir(folder)):
            writer.writerows([(os.path.join(folder, name, image), name) for image in sorted(os.listdir(os.path.join(folder, name)))])
    with open(os.path.join(folder, "circle", "img_001.png"), "rb") as f:
        (root / "broken.png").write_bytes(f.read()[:60])  # truncated: a recorded failure on both engines
    with open(root / "m.csv", "a", newline="") as f:
        csv.writer(f).writerow([str(root / "broken.png"), "circle"])
    return f"manifest:{root / 'm.csv'}"


@pytest.mark.parametrize("kind", ["folder", "manifest", "webdataset"])
def test_ray_store_equals_local_store(cluster, tmp_path, folder, reference, kind):
    source = {"folder": lambda: folder, "manifest": lambda: manifest(tmp_path / "m", folder),
              "webdataset": lambda: webdataset(tmp_path / "wds")}[kind]()
    ref = reference if kind == "folder" else local_reference(source, str(tmp_path / "ref"))
    store = str(tmp_path / "store")
    result = encode(source, store, "train", shard_rows=5, **RAY)
    assert_same_rows(store, ref)
    with open(os.path.join(store, "featstore.json")) as f, open(os.path.join(ref, "featstore.json")) as g:
        assert json.load(f)["splits"]["train"]["failed"] == json.load(g)["splits"]["train"]["failed"]
    if kind == "folder":  # an unchanged rerun rewrites nothing
        before = {n: os.stat(os.path.join(store, "images", "split=train", n)).st_mtime_ns
                  for n in os.listdir(os.path.join(store, "images", "split=train"))}
        again = encode(source, store, "train", shard_rows=5, **RAY)
        assert (again["encoded"], again["shards_written"], again["unchanged"]) == (0, 0, result["rows"])
        assert before == {n: os.stat(os.path.join(store, "images", "split=train", n)).st_mtime_ns
                          for n in os.listdir(os.path.join(store, "images", "split=train"))}
    else:
        assert result["failed"] >= 1  # the truncated / undecodable files, recorded as locally


def test_killed_actor_and_decoder_are_retried_and_every_row_is_written_once(cluster, tmp_path, folder, reference):
    chaos = cluster[1]
    for name in ("kill-actor", "kill-decoder"):
        open(os.path.join(chaos, name), "w").close()
    store = str(tmp_path / "store")
    result = encode(folder, store, "train", shard_rows=5, **RAY)
    assert not os.path.exists(os.path.join(chaos, "kill-actor")), "no actor was killed"
    assert not os.path.exists(os.path.join(chaos, "kill-decoder")), "no decoder was killed"
    assert (result["encoded"], result["failed"]) == (12, 0)
    assert_same_rows(store, reference)


def test_a_batch_of_only_bad_files_is_recorded_beside_good_batches(cluster, tmp_path, folder):
    """Every file of the second batch is broken (its pixels column is then a blank image's zeros)."""
    (tmp_path / "m").mkdir()
    with open(tmp_path / "m" / "m.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for n in range(4):
            (tmp_path / "m" / f"a{n}.png").write_bytes(b"not a png")
            writer.writerow([str(tmp_path / "m" / f"a{n}.png"), "circle"])
        good = sorted(os.path.join(folder, "square", name) for name in os.listdir(os.path.join(folder, "square")))
        writer.writerows([(path, "square") for path in good])  # absolute: their ids sort first, a full batch
    store = str(tmp_path / "store")
    result = encode(f"manifest:{tmp_path / 'm' / 'm.csv'}", store, "train", **RAY)
    assert (result["rows"], result["failed"]) == (4, 4)
    assert sorted(rows(store)) == good


def test_a_file_that_kills_its_decoder_is_a_recorded_failure(cluster, tmp_path, folder, reference):
    poison = os.path.join(cluster[1], "poison")
    with open(os.path.join(folder, "square", "img_002.png"), "rb") as f, open(poison, "wb") as out:
        out.write(f.read())
    try:
        result = encode(folder, str(tmp_path / "store"), "train", **RAY)
    finally:
        os.unlink(poison)
    assert (result["rows"], result["failed"]) == (11, 1)
    stored = rows(str(tmp_path / "store"))
    assert sorted(stored) == sorted(set(rows(reference)) - {"square/img_002.png"})
    with open(tmp_path / "store" / "featstore.json") as f:
        failed = json.load(f)["splits"]["train"]["failed"]
    assert list(failed) == ["square/img_002.png"] and "decoder process died" in failed["square/img_002.png"]["reason"]


def test_sigkilled_driver_then_the_same_command_resumes(cluster, tmp_path, folder, reference):
    import subprocess

    from conftest import REPO

    store = str(tmp_path / "store")
    command = [sys.executable, "-m", "featstore", "encode", folder, "--store", store, "--split", "train", "--model",
               "random:tiny", "--dtype", "float32", "--batch-size", "2", "--shard-rows", "2", "--quiet", "--json",
               "--engine", "ray", "--ray-address", cluster[0]]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manifest_path, deadline = os.path.join(store, "featstore.json"), time.time() + 120
    while True:  # kill it once it committed a shard
        assert driver.poll() is None, f"encode finished before it could be killed: {driver.stderr.read()}"
        assert time.time() < deadline, "no shard was committed"
        try:
            with open(manifest_path) as f:
                if json.load(f)["splits"]["train"]["shards"]:
                    break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    partial = rows(store)
    assert 0 < len(partial) < 12
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    result = json.loads(resumed.stdout)
    assert (result["unchanged"], result["encoded"]) == (len(partial), 12 - len(partial))
    assert_same_rows(store, reference)


def test_bad_ray_options_fail_in_one_line_with_nothing_written(tmp_path, folder):
    store = str(tmp_path / "store")
    result = featstore("encode", folder, "--store", store, "--split", "train", "--model", "random:tiny",
                       "--engine", "ray", "--actors", "0", check=False)
    assert result.returncode == 2 and result.stderr == "featstore: error: --actors must be at least 1\n"
    for options, message in (({"engine": "spark"}, "unknown --engine 'spark'"),
                             ({"ray_address": "127.0.0.1:1"}, "need --engine ray"),
                             ({"engine": "ray", "cpus_per_decoder": 0}, "--cpus-per-decoder must be more than 0")):
        with pytest.raises(FeatstoreError, match=message):
            encode(folder, store, "train", model="random:tiny", progress=False, **options)
    assert not os.path.exists(store)


def test_a_worker_that_cannot_write_the_store_folder_stops_the_run_in_one_line(tmp_path, folder):
    """Decode tasks return the reason (Ray passes on only the text of a task's exception), the driver raises it."""
    (tmp_path / "file").write_text("")
    decoded = ray_runner._decode({"id": np.array([0])}, source=None, items=[None] * 3, batch_size=3,
                                 preprocess=lambda image: np.zeros(1), folder=str(tmp_path / "file" / "split=train"),
                                 run="run")
    [why] = set(decoded["fatal"])
    assert why.startswith("a Ray worker on ") and "cannot write the store folder" in why
    assert "shared, writable filesystem" in why and "\n" not in why


def test_job_files_take_the_ray_keys(tmp_path, folder):
    job = tmp_path / "job.toml"
    job.write_text(f'store = "s"\nengine = "ray"\nactors = 2\ngpus_per_actor = 0.5\ncpus_per_decoder = 0.5\n'
                   f'ray_address = "auto"\n[[split]]\nname = "train"\nsource = "{folder}"\n')
    assert load_job(str(job))["engine"] == "ray"
    job.write_text(f'store = "s"\nengine = "spark"\n[[split]]\nname = "train"\nsource = "{folder}"\n')
    with pytest.raises(FeatstoreError, match="engine must be local or ray, not 'spark'"):
        load_job(str(job))
