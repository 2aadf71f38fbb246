"""Evaluation at scale: streamed zero-shot (equal to the dense softmax, within a memory limit), few-shot probes
(exact per-class draws, reproducible per seed), and the HTML report (rendered in headless chromium)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, featstore
from featstore.encode import encode
from featstore.evaluate.fewshot import draw, fewshot
from featstore.evaluate.report import matrix_classes, report
from featstore.evaluate.zeroshot import zeroshot
from featstore.labels import build_labels
from featstore.probe import probe
from featstore.store import Store

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, dataset) -> str:
    """The dataset in a store whose test split has several shards in two sorted runs (a second encode added
    ids between the first one's), and a label index."""
    root = tmp_path_factory.mktemp("evaluated")
    source, held = root / "test", root / "held"
    shutil.copytree(os.path.join(dataset, "test"), source)
    for path in sorted(source.glob("*/img_00[13].png")):  # ids that sort between the kept ones
        os.makedirs(held / path.parent.name, exist_ok=True)
        path.rename(held / path.parent.name / path.name)
    store = str(root / "store")
    encode(os.path.join(dataset, "train"), store, "train", model="random:tiny", shard_rows=7, progress=False)
    encode(str(source), store, "test", model="random:tiny", shard_rows=4, progress=False)
    shutil.copytree(held, source, dirs_exist_ok=True)
    encode(str(source), store, "test", model="random:tiny", shard_rows=4, progress=False)
    assert len(Store.open(store).sorted_runs("test")) == 2
    build_labels(store)
    return store


def dense_reference(store_dir: str, split: str):
    """Today's computation in plain numpy: softmax(100 · cos) over all classes, rows in id order."""
    store = Store.open(store_dir)
    ids, x, labels = store.features(split)
    classes = pq.read_table(store.label_paths()[1])
    c = np.stack(classes.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    logits = 100.0 * (x @ c.T)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return ids, labels, np.argsort(-probs, axis=1, kind="stable"), probs, classes.column("display").to_pylist()


def one_line_error(result, code: int = 2) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("featstore: error: ")
    return result.stderr


def tree_digest(folder: str) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, n), folder): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(folder) for n in names}


def test_streamed_query_equals_dense_softmax_on_multi_shard_split(evaluated, tmp_path):
    out = str(tmp_path / "top3.parquet")
    result = featstore("query", evaluated, "--split", "test", "--top-k", "3", "--out", out, "--json")
    summary = json.loads(result.stdout)
    ids, labels, ranked, probs, names = dense_reference(evaluated, "test")
    table = pq.read_table(out).to_pydict()
    assert table["id"] == ids  # every row once, in id order across both sorted runs
    assert [row for row in table["label_ids"]] == ranked[:, :3].tolist()
    assert table["labels"] == [[names[c] for c in row] for row in ranked[:, :3]]
    expected = np.take_along_axis(probs, ranked[:, :3], axis=1)
    np.testing.assert_allclose(np.array(table["scores"]), expected, rtol=0, atol=1e-6)
    hit1 = ranked[:, 0] == labels
    assert summary["n"] == len(ids)
    assert summary["acc1"] == pytest.approx(hit1.mean())
    assert summary["acc5"] == pytest.approx((ranked[:, :5] == labels[:, None]).any(axis=1).mean())
    assert summary["mean_per_class_recall"] == pytest.approx(np.mean([hit1[labels == c].mean() for c in np.unique(labels)]))


# ---- a query whose rows x classes do not fit in the memory limit ------------------------------------
BIG_ROWS, BIG_CLASSES, HEADROOM = 60_000, 3_000, 256 << 20
CHILD = r"""
import resource, sys
limit, mode, store = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
code = 0
if mode == "dense":  # today's rows x classes score matrix, for contrast
    import numpy as np
    from featstore.store import Store
    from featstore.labels import load_label_index
    s = Store.open(store)
    index, _ = load_label_index(s)
    x = s.features(sys.argv[4])[1]
    try:
        scores = x @ index.reconstruct_n(0, index.ntotal).T
    except MemoryError:
        code = 3
else:
    from featstore.cli import main
    sys.argv = ["featstore", "query", store, "--split", sys.argv[4], "--json", "--out", sys.argv[5]]
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmPeak")][0]
print("VMPEAK", int(peak) * 1024, file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory, evaluated) -> str:
    """A store of 3,000 classes with a 60,000-row split (and a 200-row one), written through the shard writer by
    the zero-shot bench's own builder."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from zeroshot_bench import synthetic_store

    root = str(tmp_path_factory.mktemp("many") / "store")
    synthetic_store(root, {"big": BIG_ROWS, "small": 200}, BIG_CLASSES, Store.open(evaluated).manifest.model, 20_000)
    return root


def run_child(limit: int, mode: str, store: str, split: str, out: str = "") -> tuple[subprocess.CompletedProcess, int]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(limit), mode, store, split, out], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    peak = [int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("VMPEAK")]
    return result, peak[0] if peak else -1


def test_query_over_rows_x_classes_beyond_the_memory_limit_completes(many_classes, tmp_path):
    baseline, peak = run_child(0, "query", many_classes, "small", str(tmp_path / "small.parquet"))
    assert baseline.returncode == 0, baseline.stderr
    limit = peak + HEADROOM
    assert BIG_ROWS * BIG_CLASSES * 4 > 2 * HEADROOM  # the float32 score matrix alone is over twice the headroom
    dense, _ = run_child(limit, "dense", many_classes, "big")
    assert dense.returncode == 3, dense.stderr  # the limit is real: the dense scores cannot be allocated under it
    out = tmp_path / "big.parquet"
    streamed, big_peak = run_child(limit, "query", many_classes, "big", str(out))
    assert streamed.returncode == 0, streamed.stderr
    assert json.loads(streamed.stdout)["n"] == BIG_ROWS and big_peak <= limit
    print(f"VmPeak: {peak >> 20} MiB at 200 rows, {big_peak >> 20} MiB at {BIG_ROWS} rows; limit {limit >> 20} MiB")
    assert pq.read_metadata(out).num_rows == BIG_ROWS

    # and the report of 3,000 classes stays readable: a sorted curve, the worst classes, a 20-class matrix
    result = report(many_classes, "big", out=str(tmp_path / "report"))
    zero = zeroshot(many_classes, "big")
    assert len(matrix_classes(zero.tally)) == 20
    assert result["zeroshot"]["n"] == BIG_ROWS and "fewshot.png" not in result["images"]
    page = open(result["index"]).read()
    assert "Worst 20 classes" in page and "RANDOM WEIGHTS" in page


# ---- few-shot ---------------------------------------------------------------------------------------------
def test_fewshot_draws_are_exact_per_class_and_reproducible_per_seed():
    sizes = [3, 10, 1, 7]
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), sizes))
    for seed in range(3):
        drawn = draw(labels, [1, 2, 5], seed)
        for k, rows in drawn.items():
            assert np.bincount(labels[rows], minlength=4).tolist() == [min(k, s) for s in sizes]
            assert len(set(rows.tolist())) == len(rows)
        assert set(drawn[1]) <= set(drawn[2]) <= set(drawn[5])  # nested: a seed's 1-shot rows are among its 2-shot
        again = draw(labels, [5, 2], seed)
        assert all(np.array_equal(again[k], drawn[k]) for k in (2, 5))
    assert not np.array_equal(draw(labels, [2], 0)[2], draw(labels, [2], 1)[2])


def test_fewshot_probe_cli_and_fits_on_the_drawn_rows(evaluated):
    args = ("probe", evaluated, "--train-split", "train", "--test-split", "test", "--shots", "2,1,20", "--seeds", "3",
            "--json")
    curve = json.loads(featstore(*args).stdout)["fewshot"]
    assert curve == fewshot(evaluated, "train", "test", [1, 2, 20], seeds=3)["fewshot"]  # reproducible per seed
    assert [e["shots"] for e in curve] == [1, 2, 20]
    assert [e["n_train"] for e in curve] == [6, 12, 60] and [e["short_classes"] for e in curve] == [0, 0, 6]
    for e in curve:
        assert len(e["acc1_per_seed"]) == 3 and e["seeds"] == 3
        assert e["acc1_mean"] == pytest.approx(np.mean(e["acc1_per_seed"]))
        assert e["acc1_std"] == pytest.approx(np.std(e["acc1_per_seed"], ddof=1))

    # each seed's fit is the seed's LogisticRegression on exactly the drawn rows
    from sklearn.linear_model import LogisticRegression

    store = Store.open(evaluated)
    _, x, y = store.features("train")
    _, x_test, y_test = store.features("test")
    result = fewshot(evaluated, "train", "test", [2], seeds=2, solver="sklearn")
    for seed, acc in enumerate(result["fewshot"][0]["acc1_per_seed"]):
        rows = draw(y, [2], seed)[2]
        fitted = LogisticRegression(random_state=0, C=0.316, max_iter=1000).fit(x[rows], y[rows])
        assert acc == pytest.approx((fitted.predict(x_test) == y_test).mean())


@pytest.mark.parametrize("args, message", [
    (("probe", "{store}", "--train-split", "train", "--test-split", "test", "--shots", "0,x"), "--shots must be"),
    (("probe", "{store}", "--train-split", "train", "--test-split", "test", "--shots", "1", "--out", "p"), "--out"),
    (("report", "{store}", "--split", "test", "--probe", "/nonexistent/probe"), "cannot read probe"),
    (("report", "{store}", "--split", "test", "--out", "{store}/images/r"), "/images/r is inside the store "),
])
def test_bad_evaluation_input_is_one_line(evaluated, args, message):
    before = tree_digest(evaluated)
    result = featstore(*(a.format(store=evaluated) for a in args), check=False)
    assert message in one_line_error(result)
    assert tree_digest(evaluated) == before


# ---- the report -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report_dir(evaluated, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("report")
    probe(evaluated, "train", "test", C=0.316, out=str(root / "probe"))
    (root / "fewshot.json").write_text(json.dumps(fewshot(evaluated, "train", "test", [1, 2, 4], seeds=2)))
    before = tree_digest(evaluated)
    out = str(root / "out")
    result = json.loads(featstore("report", evaluated, "--split", "test", "--probe", str(root / "probe"),
                                  "--fewshot", str(root / "fewshot.json"), "--out", out, "--json").stdout)
    assert tree_digest(evaluated) == before  # the store is only read
    assert result["index"] == os.path.join(out, "index.html") and result["random_weights"] is True
    return out


def test_report_files_and_clip_benchmark_results(report_dir, evaluated):
    names = set(os.listdir(report_dir))
    assert {"index.html", "per_class.png", "confusions.png", "confusion_matrix.png", "scores.png", "fewshot.png",
            "results.json", "results-linear_probe.json", "results-fewshot-1.json", "results-fewshot-4.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    zero = json.load(open(os.path.join(report_dir, "results.json")))
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(zero)
    assert zero["task"] == "zeroshot_classification"
    expected = zeroshot(evaluated, "test").summary
    assert zero["metrics"] == {k: expected[k] for k in ("acc1", "acc5", "mean_per_class_recall")}
    assert set(json.load(open(os.path.join(report_dir, "results-linear_probe.json")))["metrics"]) == {
        "lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}
    page = open(os.path.join(report_dir, "index.html")).read()
    assert "RANDOM WEIGHTS" in page and "http" not in page  # self-contained: nothing fetched from elsewhere


def render(folder: str, page: str, user_data: str) -> str:
    """Chromium's DOM of FOLDER/PAGE after it loaded, served over HTTP from FOLDER."""
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=folder)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={user_data}", "--virtual-time-budget=10000",
                               "--dump-dom", f"http://127.0.0.1:{server.server_port}/{page}"],
                              capture_output=True, text=True, timeout=120).stdout
    finally:
        server.shutdown()
        server.server_close()


CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="result">not loaded</pre><iframe src="{report}/index.html"></iframe>
<script>
document.querySelector("iframe").addEventListener("load", function () {{
  var images = Array.from(this.contentDocument.images);
  var loaded = images.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.getElementById("result").textContent = "images " + images.length + " loaded " + loaded.length;
}});
</script></body></html>"""


def test_report_renders_in_headless_chromium_with_every_image(report_dir, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (Debian's `chromium`; .ci/run installs it): the report is not rendered")
    site = tmp_path / "site"
    shutil.copytree(report_dir, site / "good")
    shutil.copytree(report_dir, site / "broken")
    os.unlink(site / "broken" / "scores.png")  # the check must be able to fail
    pngs = len([n for n in os.listdir(report_dir) if n.endswith(".png")])
    for name in ("good", "broken"):
        (site / f"check-{name}.html").write_text(CHECK_PAGE.format(report=name))
    assert f"images {pngs} loaded {pngs}<" in render(str(site), "check-good.html", str(tmp_path / "chrome1"))
    assert f"images {pngs} loaded {pngs - 1}<" in render(str(site), "check-broken.html", str(tmp_path / "chrome2"))


def test_job_runs_fewshot_and_report_steps(evaluated, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'store = "{evaluated}"\nsteps = ["probe", "report"]\n'
                   '[probe]\ntrain_split = "train"\ntest_split = "test"\nC = 0.316\nout = "rep/probe"\nshots = [1, 2]\n'
                   'seeds = 2\n[report]\nsplit = "test"\nout = "rep"\n')
    result = featstore("run", str(job), "--json")
    data = json.loads(result.stdout)
    assert [e["shots"] for e in data["fewshot"]["fewshot"]] == [1, 2]
    assert os.path.isfile(tmp_path / "rep" / "index.html") and os.path.isfile(tmp_path / "rep" / "results-fewshot-2.json")
    assert data["report"]["probe"]["acc1"] == pytest.approx(data["probe"]["acc1"])  # the saved probe, on its test split
    job.write_text(job.read_text().replace("[report]\nsplit", "[report]\nsplt"))
    assert "did you mean 'split'" in one_line_error(featstore("run", str(job), check=False))
