"""Numbers and output: extreme option values, strict JSON, unforgeable failure lists, closed pipes, store state."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import REPO, draw_image, featstore, write_folder
from test_operations import png_claiming

from featstore.cli import _field, _print_json, app

FORGED = "a\tb\nsplit\tfake\tforged.png"
BAD_FILES = {  # name in the flat "loose" split -> the reason featstore must record, in words
    FORGED: "not an image (cannot identify image file)",
    "empty.png": "not an image (cannot identify image file)",
    "half.png": "truncated image (image file is truncated)",
    "bomb.png": "too many pixels (900000000 > 178956970)",  # featstore's limit, not PIL's 2x
}


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line(stderr: str, code: int, result_code: int, *needles: str) -> str:
    assert result_code == code, (result_code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featstore: error: "), stderr
    assert "Traceback" not in stderr and "object at 0x" not in stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def fingerprint(folder: str) -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A store with labelled splits "train" (15 rows) and "tiny" (3), a flat split "loose" holding good and bad
    files (one with a forged name), and a label index; plus the --json outputs of the encodes and of labels
    (run in this process: a CLI subprocess costs seconds of imports)."""
    root = tmp_path_factory.mktemp("output")
    write_folder(root / "train", per_class=5, seed=1, classes=["circle", "square", "triangle"])
    write_folder(root / "tiny", per_class=1, seed=2, classes=["circle", "square", "triangle"])
    loose = root / "loose"
    loose.mkdir()
    draw_image(0, 0).save(loose / "good.png")
    draw_image(1, 1).save(loose / "good2.png")
    (loose / FORGED).write_text("not an image")
    (loose / "empty.png").write_bytes(b"")
    data = (loose / "good.png").read_bytes()
    (loose / "half.png").write_bytes(data[: len(data) // 2])
    (loose / "bomb.png").write_bytes(png_claiming(30000, 30000))
    store = str(root / "store")
    outputs = {}
    for split in ("train", "tiny", "loose"):
        run = cli("encode", str(root / split), "--store", store, "--split", split, "--model", "random:tiny",
                  "--quiet", "--json")
        assert run.exit_code == 0, run.output
        outputs[f"encode {split}"] = run.stdout
    outputs["labels"] = cli("labels", store, "--json").stdout
    return {"root": str(root), "store": store, "outputs": outputs}


# ---- extreme numbers ---------------------------------------------------------------------------
REFUSED_OPTIONS = [  # (arguments after the store, message): at least two members of each family
    (["--C", "1e-40"], "--C must be positive, finite and at least 1e-30 (got 1e-40)"),
    (["--C", "5e-324"], "--C must be positive, finite and at least 1e-30 (got 4.94066e-324)"),
    (["--C", "1e-400"], "--C must be positive, finite and at least 1e-30 (got 0)"),  # underflows to 0
    (["--C", "inf"], "(got inf)"),
    (["--C", "1e400"], "(got inf)"),  # overflows to inf
    (["--C", "-inf"], "(got -inf)"),
    (["--C", "nan"], "(got nan)"),
    (["--C", "NaN"], "(got nan)"),
    (["--C", "1", "--max-iter", "0"], "--max-iter must be at least 1"),
    (["--C", "1", "--max-iter", "-5"], "--max-iter must be at least 1"),
    (["--train-split", "tiny"], "split 'tiny' has too few labelled rows (3) to choose C on a held-out 20% with 3 "
                                "classes: give --C"),  # no room for a validation sweep
]


@pytest.mark.parametrize("options, message", REFUSED_OPTIONS, ids=[" ".join(o) for o, _ in REFUSED_OPTIONS])
def test_probe_refuses_unusable_numbers(made, options, message):
    before = fingerprint(made["store"])
    result = cli("probe", made["store"], "--train-split", "train", "--test-split", "train", *options)
    one_line(result.stderr, 2, result.exit_code, message)
    assert result.stdout == "" and fingerprint(made["store"]) == before


@pytest.mark.parametrize("options", [["--top-k", "0"], ["--top-k", "-3"]])
def test_query_refuses_top_k_below_one(made, options):
    for mode in (["--split", "train"], ["--image", os.path.join(made["root"], "loose", "good.png")]):
        result = cli("query", made["store"], *mode, *options)
        one_line(result.stderr, 2, result.exit_code, "--top-k must be at least 1")


def test_extreme_but_usable_numbers_work(made):
    """Huge C (both solvers), the smallest accepted C, huge --max-iter and huge --top-k all give valid JSON."""
    for C, solver in (("1e300", "torch"), ("1.7e308", "sklearn"), ("1e-30", "torch"), ("1e-30", "sklearn")):
        result = cli("probe", made["store"], "--train-split", "train", "--test-split", "train", "--C", C,
                     "--solver", solver, "--max-iter", str(10 ** 12), "--json")
        assert result.exit_code == 0, result.output
        probe = strict_json(result.stdout)
        assert probe["C"] == float(C) and probe["n_train"] == 15 and 0 <= probe["acc1"] <= 1
    huge = str(10 ** 30)
    split = strict_json(cli("query", made["store"], "--split", "train", "--top-k", huge, "--json").stdout)
    assert split["n"] == 15
    out = os.path.join(made["root"], "top.parquet")
    assert cli("query", made["store"], "--split", "train", "--top-k", huge, "--out", out).exit_code == 0
    import pyarrow.parquet as pq

    top = pq.read_table(out)
    assert top.num_rows == 15 and all(len(labels) == 3 for labels in top.column("labels").to_pylist())
    image = os.path.join(made["root"], "loose", "good.png")
    ranked = strict_json(cli("query", made["store"], "--image", image, "--top-k", huge, "--json").stdout)
    assert len(ranked) == 1 and len(ranked[0]["labels"]) == 3


# ---- JSON --------------------------------------------------------------------------------------
def test_non_finite_numbers_print_as_null(capsys):
    _print_json({"acc1": math.nan, "C": math.inf, "sweep": {"1e-06": -math.inf, "1": 0.5}, "scores": (1.0, math.nan)})
    text = capsys.readouterr().out
    assert strict_json(text) == {"acc1": None, "C": None, "sweep": {"1e-06": None, "1": 0.5}, "scores": [1.0, None]}


def test_every_json_output_is_strict_json(made):
    store = made["store"]
    outputs = dict(made["outputs"])
    runs = {
        "query labelled": ["query", store, "--split", "train", "--json"],
        "query unlabelled": ["query", store, "--split", "loose", "--json"],
        "query image": ["query", store, "--image", os.path.join(made["root"], "loose", "good.png"), "--json"],
        "probe": ["probe", store, "--train-split", "train", "--test-split", "train", "--json"],
        "info": ["info", store, "--json"],
        "info failures": ["info", store, "--failures", "--json"],
        "verify": ["verify", store, "--json"],
        "compact": ["compact", store, "--json", "--quiet"],
    }
    for name, args in runs.items():
        result = cli(*args)
        assert result.exit_code == 0, (name, result.output)
        outputs[name] = result.stdout
    parsed = {name: strict_json(text) for name, text in outputs.items()}
    assert parsed["encode loose"]["failed"] == len(BAD_FILES) and parsed["encode loose"]["rows"] == 2
    assert parsed["query unlabelled"] == {"n": 0, "acc1": None, "acc5": None, "mean_per_class_recall": None}
    assert parsed["query labelled"]["n"] == 15 and parsed["verify"] == {"ok": True, "problems": []}
    assert len(parsed["probe"]["sweep"]) >= 2 and parsed["info"]["splits"]["loose"]["failed"] == len(BAD_FILES)


# ---- info --failures: one failure, one line --------------------------------------------------------
def test_failure_list_cannot_be_forged_and_reasons_are_words(made):
    plain = featstore("info", made["store"], "--failures").stdout
    lines = plain.splitlines()
    assert len(lines) == len(BAD_FILES) and plain.endswith("\n")
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 3 and f[0] == "loose" for f in fields)
    assert {f[1]: f[2] for f in fields} == {_field(name): reason for name, reason in BAD_FILES.items()}
    assert "a\\tb\\nsplit\\tfake\\tforged.png" in {f[1] for f in fields}
    listed = strict_json(featstore("info", made["store"], "--failures", "--json").stdout)
    assert {row["path"]: row["reason"] for row in listed} == BAD_FILES  # the exact names, tabs and all
    assert not any("object at 0x" in row["reason"] or "Error" in row["reason"] for row in listed)


def test_field_escapes_are_one_line_and_reversible():
    assert _field("a\\b\tc\nd\re\x1b[31m\x7f\x85\u2028é") == "a\\\\b\\tc\\nd\\re\\x1b[31m\\x7f\\u0085\\u2028é"
    assert _field("bad\udcff.png") == "bad\\xff.png"  # a byte that was not UTF-8 (surrogateescape)
    assert _field("\ud800") == "\\ud800"  # a lone surrogate that stands for no byte
    assert _field("x\\ty") != _field("x\ty")


def test_bad_image_given_to_query_is_named_in_words(made):
    result = cli("query", made["store"], "--image", os.path.join(made["root"], "loose", "half.png"))
    one_line(result.stderr, 2, result.exit_code, "half.png: truncated image (image file is truncated)")


def test_query_image_never_opens_a_fifo_or_a_device(made, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block until a writer came
    for path, kind in ((str(tmp_path / "pipe.png"), "a FIFO"), ("/dev/zero", "a character device")):
        result = cli("query", made["store"], "--image", path)
        one_line(result.stderr, 2, result.exit_code, f"cannot read image {path}: not a regular file: {kind}")


# ---- a closed stdout -------------------------------------------------------------------------------
def test_a_closed_stdout_is_not_a_crash(made):
    """`featstore ... | head -0`: exit 141 (128 + SIGPIPE) with nothing on stderr; the work itself is done."""
    root, store = made["root"], made["store"]
    cases = [["info", store], ["info", store, "--failures"], ["query", store, "--split", "train", "--json"],
             ["encode", os.path.join(root, "train"), "--store", store, "--split", "piped", "--model", "random:tiny",
              "--quiet", "--json"]]
    processes = [subprocess.Popen([sys.executable, "-m", "featstore", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd=REPO) for args in cases]
    for process in processes:
        process.stdout.close()  # the reader is gone before the command writes anything
    for args, process in zip(cases, processes):
        stderr = process.communicate(timeout=300)[1].decode()
        assert process.returncode == 141 and stderr == "", (args, process.returncode, stderr)
    info = strict_json(featstore("info", store, "--json").stdout)
    assert info["splits"]["piped"]["rows"] == 15  # encode committed before its output was lost


# ---- store state -----------------------------------------------------------------------------------
def test_a_store_path_that_is_a_file_is_refused(made, tmp_path):
    path = tmp_path / "not-a-store"
    path.write_text("precious")
    train = os.path.join(made["root"], "train")
    commands = [["encode", train, "--store", str(path), "--split", "x", "--model", "random:tiny", "--quiet"],
                ["info", str(path)], ["query", str(path), "--split", "x"], ["labels", str(path)],
                ["compact", str(path)], ["verify", str(path)],
                ["probe", str(path), "--train-split", "x", "--test-split", "x", "--C", "1"]]
    for args in commands:
        result = cli(*args)
        one_line(result.stderr, 2, result.exit_code, f"store path {path} is not a folder")
    run = featstore(*commands[0], check=False)  # the real process too
    one_line(run.stderr, 2, run.returncode, f"store path {path} is not a folder")
    assert path.read_text() == "precious" and os.listdir(tmp_path) == ["not-a-store"]


@pytest.fixture
def immutable_store(made, tmp_path):
    """A copy of the store nobody may change, root included (chattr +i: tests run as root, where chmod a-w
    does not stop writes)."""
    store = str(tmp_path / "ro")
    shutil.copytree(made["store"], store)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", store], capture_output=True).returncode:
        subprocess.run(["chattr", "-R", "-i", store], capture_output=True)
        pytest.skip("chattr +i is not supported here (the write path is covered by test_write_errors_are_one_line)")
    try:
        yield store
    finally:
        subprocess.run(["chattr", "-R", "-i", store], check=True)


def test_a_read_only_store_is_read_but_not_written(made, immutable_store):
    store, root = immutable_store, made["root"]
    before = fingerprint(store)
    writes = [["encode", os.path.join(root, "loose"), "--store", store, "--split", "x", "--model", "random:tiny",
               "--quiet"], ["labels", store], ["compact", store],
              ["probe", store, "--train-split", "train", "--test-split", "train", "--C", "1", "--out",
               os.path.join(store, "reports", "probe")]]  # the one folder of the store outputs may go to
    run = featstore(*writes[0], check=False)  # the real process once, the others in this one
    results = [(run.stderr, run.returncode)] + [(r.stderr, r.exit_code) for r in (cli(*args) for args in writes[1:])]
    for stderr, code in results:
        line = one_line(stderr, 2, code, store)
        assert any(word in line.lower() for word in ("read-only", "permission denied", "not permitted")), line
    for args in (["info", store], ["verify", store], ["query", store, "--split", "train"]):
        assert cli(*args).exit_code == 0
    assert fingerprint(store) == before


@pytest.mark.parametrize("code, words", [(errno.EROFS, "is read-only to this process"),
                                         (errno.ENOSPC, "No space left on device (free some space and rerun)")])
def test_write_errors_are_one_line(made, monkeypatch, code, words):
    """An OSError from the environment (read-only file system, full disk) is exit 2 and one line, not exit 1."""
    import featstore.probe

    def fail(path, write):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(featstore.probe, "atomic_write", fail)
    out = os.path.join(made["store"], "reports", "probe")
    result = cli("probe", made["store"], "--train-split", "train", "--test-split", "train", "--C", "1", "--out", out)
    line = one_line(result.stderr, 2, result.exit_code, words, os.strerror(code))
    assert "FEATSTORE_DEBUG" not in line


def test_failure_reasons_are_words():
    from featstore.encode.reader import failure_reason
    from featstore.sources.base import BadFile, decode_image

    with pytest.raises(Exception) as raised:
        decode_image(b"GIF89a")
    assert failure_reason(raised.value) == "not an image (cannot identify image file)"
    assert failure_reason(PermissionError(13, "Permission denied", "/x.png")) == "PermissionError: Permission denied"
    assert failure_reason(BadFile("not a regular file: a FIFO")) == "not a regular file: a FIFO"
    assert failure_reason(OSError("Truncated File Read")) == "truncated image (Truncated File Read)"
    assert failure_reason(ValueError("bad <_io.BytesIO object at 0x7f0a> here")) == "cannot decode image (bad here)"


def test_query_refuses_an_unknown_device(made):
    result = cli("query", made["store"], "--split", "train", "--device", "tpu")
    one_line(result.stderr, 2, result.exit_code, "unknown --device 'tpu': use auto, cpu or cuda")


def test_an_immutable_split_folder_is_one_read_only_line(made, tmp_path):
    """pyarrow's own words ("Failed to open local file ... Detail: [errno 1] ...") name no path: featstore's do."""
    store = str(tmp_path / "st")
    shutil.copytree(made["store"], store)
    folder = os.path.join(store, "images", "split=train")
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        before = fingerprint(store)
        result = cli("encode", os.path.join(made["root"], "train"), "--store", store, "--split", "train",
                     "--model", "random:tiny", "--quiet")
        line = one_line(result.stderr, 2, result.exit_code, f"store {store} is read-only to this process: {folder}/",
                        ": Operation not permitted")
        assert "Detail" not in line and "Failed to open" not in line
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)
    assert {k: v for k, v in fingerprint(store).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}

