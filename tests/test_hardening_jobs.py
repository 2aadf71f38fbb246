"""Job files are checked whole before any step runs: one line naming the file and the key, exit 2, nothing written."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, featstore

from featstore.errors import FeatstoreError
from featstore.jobs import JOB, Key, load_job

HEAD = 'store = "store"\n'
SPLITS = '[[split]]\nname = "train"\nsource = "src"\n\n[[split]]\nname = "test"\nsource = "src"\n'
PROBE = '[probe]\ntrain_split = "train"\ntest_split = "test"\n'

# (job text, the whole stderr message after "job.toml: "), at least two members per family
BAD_JOBS = {
    # wrong types
    "batch_size string": (HEAD + 'batch_size = "16"\n', "batch_size must be an integer, not a string ('16')"),
    "batch_size boolean": (HEAD + "batch_size = true\n", "batch_size must be an integer, not a boolean (true)"),
    "C string": (HEAD + SPLITS + PROBE + 'C = "0.3"\n', "[probe].C must be a number, not a string ('0.3')"),
    "templates integer": (HEAD + "[labels]\ntemplates = 3\n", "[labels].templates must be a string, not an integer"),
    "store integer": ("store = 3\n", "store must be a string, not an integer"),
    "top_k float": (HEAD + SPLITS + '[query]\nsplit = "test"\ntop_k = 1.5\n',
                    "[query].top_k must be an integer, not a number"),
    # bad values
    "C zero": (HEAD + SPLITS + PROBE + "C = 0\n", "[probe].C must be a positive finite number, not 0"),
    "C nan": (HEAD + SPLITS + PROBE + "C = nan\n", "[probe].C must be a positive finite number, not nan"),
    "batch_size zero": (HEAD + "batch_size = 0\n", "batch_size must be at least 1"),
    "precision typo": (HEAD + 'precision = "bf61"\n',
                       "precision must be fp32, fp16 or bf16, not 'bf61' (did you mean 'bf16'?)"),
    "solver typo": (HEAD + SPLITS + PROBE + 'solver = "sklern"\n',
                    "[probe].solver must be torch or sklearn, not 'sklern' (did you mean 'sklearn'?)"),
    "empty store": ('store = ""\n', "store must not be empty"),
    "template without {}": (HEAD + '[labels]\ntemplate = ["a {}.", "b"]\n',
                            "[labels].template has 'b', which must contain '{}' exactly once"),
    # unknown keys, with a suggestion
    "stpes": (HEAD + 'stpes = ["encode"]\n', "unknown key stpes (did you mean 'steps'?); known: "),
    "labels templtes": (HEAD + '[labels]\ntempltes = "paper80"\n',
                        "unknown key [labels].templtes (did you mean 'templates'?); "
                        "known: template, templates, classes"),
    "probe c": (HEAD + SPLITS + PROBE + "c = 0.3\n", "unknown key [probe].c (did you mean 'C'?)"),
    "split sorce": (HEAD + '[[split]]\nname = "train"\nsorce = "src"\n',
                    "unknown key [[split]] #1.sorce (did you mean 'source'?)"),
    # misspelled or repeated steps
    "step lables": (HEAD + 'steps = ["encode", "lables"]\n' + SPLITS,
                    "steps has unknown step 'lables' (did you mean 'labels'?): steps are encode, labels, index, dedup, "
                    "query, probe"),
    "step encdoe": (HEAD + 'steps = ["encdoe"]\n', "steps has unknown step 'encdoe' (did you mean 'encode'?)"),
    "step twice": (HEAD + 'steps = ["encode", "encode"]\n' + SPLITS, "steps lists 'encode' twice"),
    "no steps": (HEAD + "steps = []\n", "steps must name at least one step"),
    # missing sections and keys
    "split without source": (HEAD + '[[split]]\nname = "train"\n', "[[split]] #1.source is required"),
    "probe without test_split": (HEAD + 'steps = ["encode", "probe"]\n' + SPLITS
                                 + '[probe]\ntrain_split = "train"\n', "[probe].test_split is required"),
    "query step without [query]": (HEAD + 'steps = ["encode", "query"]\n' + SPLITS,
                                   "steps include 'query' but the job has no [query]"),
    "encode step without splits": (HEAD + 'steps = ["encode"]\n',
                                   "steps include 'encode' but the job has no [[split]]"),
    "index step without [index]": (HEAD + 'steps = ["encode", "index"]\n' + SPLITS,
                                   "steps include 'index' but the job has no [index]"),
    "index max_memory": (HEAD + SPLITS + '[index]\nsplit = "train"\nmax_memory = "lots"\n',
                         "[index].max_memory is not a memory size: 'lots' (say 512M, 2G or a number of bytes)"),
    "dedup threshold": (HEAD + SPLITS + '[dedup]\nsplit = "train"\nthreshold = 2\n', "[dedup].threshold must be in [-1, 1]"),
    "dedup against unknown": (HEAD + SPLITS + '[dedup]\nsplit = "train"\nagainst = "tset"\n',
                              "[dedup].against names split 'tset', which no [[split]] encodes"),
    "no store": (SPLITS, "store is required"),
    # a string, a table or a scalar where a list or an array of tables is expected
    "steps string": (HEAD + 'steps = "encode"\n' + SPLITS, "steps must be a list of strings, not a string ('encode')"),
    "template string": (HEAD + '[labels]\ntemplate = "a photo of a {}."\n',
                        "[labels].template must be a list of strings, not a string ('a photo of a {}.')"),
    "split table": (HEAD + '[split]\nname = "train"\nsource = "src"\n',
                    "[[split]] must be an array of tables (write [[split]] for each entry), not a table"),
    "labels string": (HEAD + 'labels = "paper80"\n', "[labels] must be a table, not a string ('paper80')"),
    # splits: names, duplicates, references
    "duplicate split": (HEAD + SPLITS + '[[split]]\nname = "train"\nsource = "src"\n',
                        "[[split]] #3.name 'train' is declared twice (also [[split]] #1)"),
    "bad split name": (HEAD + '[[split]]\nname = "a/b"\nsource = "src"\n',
                       "[[split]] #1.name 'a/b' is not a split name: use letters, digits, '_', '-' and '.'"),
    "dotdot split name": (HEAD + '[[split]]\nname = "a..b"\nsource = "src"\n',
                          "[[split]] #1.name 'a..b' is not a split name"),
    "query unknown split": (HEAD + SPLITS + '[query]\nsplit = "tset"\n',
                            "[query].split names split 'tset', which no [[split]] encodes and store {dir}/store "
                            "does not hold (did you mean 'test'?)"),
    "probe split not encoded": (HEAD + 'steps = ["probe"]\n' + SPLITS + PROBE,
                                "[probe].train_split names split 'train', which no [[split]] encodes and store"),
    # files the job names
    "missing source": (HEAD + SPLITS + '[[split]]\nname = "val"\nsource = "nowhere"\n',
                       "[[split]] #3.source: no such file or folder {dir}/nowhere"),
    "missing manifest": (HEAD + '[[split]]\nname = "val"\nsource = "manifest:m.csv"\n',
                         "[[split]] #1.source: no such file or folder {dir}/m.csv"),
    "missing classes": (HEAD + '[labels]\nclasses = "names.txt"\n', "[labels].classes: no such file {dir}/names.txt"),
    # not TOML
    "unterminated string": ('store = "store\n', "not valid TOML: "),
    "duplicate key": (HEAD + HEAD, "not valid TOML: "),
    "not UTF-8": ('store = "\xff"\n', "not valid TOML: 'utf-8' codec can't decode"),
}


def snapshot(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def fake_store(tmp_path) -> None:
    """A store folder whose manifest lists splits train and test: all that validation reads of a store."""
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "featstore.json").write_text(json.dumps({"splits": {"train": {}, "test": {}}}))


def job_folder(tmp_path, text: str):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "a.png").write_bytes(b"not read by validation")
    job = tmp_path / "job.toml"
    job.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    return job


@pytest.mark.parametrize("case", BAD_JOBS)
def test_bad_job_is_one_line_naming_file_and_key(tmp_path, case, monkeypatch):
    text, message = BAD_JOBS[case]
    job_folder(tmp_path, text)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FeatstoreError) as e:
        load_job("job.toml")
    error = str(e.value)
    assert error.startswith("job.toml: " + message.replace("{dir}", str(tmp_path))) and "\n" not in error, error
    assert e.value.exit_code == 2
    assert not (tmp_path / "store").exists() and snapshot(tmp_path) == before


def test_cli_refuses_bad_jobs_and_writes_nothing(tmp_path):
    """The real command: exit 2, one stderr line, no traceback, a present store byte-identical, no new store."""
    fake_store(tmp_path)
    job = job_folder(tmp_path, HEAD + SPLITS + PROBE + 'C = "0.3"\n')
    before = snapshot(tmp_path)
    result = featstore("run", str(job), "--json", check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"featstore: error: {job}: [probe].C must be a number, not a string ('0.3')\n"
    assert snapshot(tmp_path) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "job.toml").write_text('store = "new"\nsteps = ["encode"\n')
    result = featstore("run", str(other / "job.toml"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"featstore: error: {other}/job.toml: not valid TOML: ")
    assert result.stderr.count("\n") == 1 and os.listdir(other) == ["job.toml"]


def test_query_and_probe_may_name_splits_the_store_already_holds(tmp_path):
    """Steps without encode read the store's splits; a split the store holds needs no [[split]]."""
    fake_store(tmp_path)
    job = job_folder(tmp_path, HEAD + 'steps = ["query", "probe"]\n[query]\nsplit = "test"\n' + PROBE)
    assert load_job(str(job))["steps"] == ["query", "probe"]
    job.write_text(HEAD + 'steps = ["query"]\n[query]\nsplit = "val"\n')
    with pytest.raises(FeatstoreError, match=r"\[query\].split names split 'val', .* does not hold$"):
        load_job(str(job))


def test_paths_are_joined_to_the_job_folder(tmp_path):
    """Relative paths after folder:, manifest:, cifar10:, cifar100:, webdataset: are joined to the job's folder;
    after hf: only when that path exists (else a hub name); absolute paths and paper80 stay as written."""
    job = job_folder(tmp_path, "")
    (tmp_path / "m.csv").write_text("path\n")
    (tmp_path / "t.txt").write_text("a {}.\n")
    specs = {"a": "src", "b": "folder:src", "c": "manifest:m.csv", "d": "cifar10:data:train",
             "e": "cifar100:/x:test", "f": "webdataset:shards/{000..009}.tar", "g": "hf:frgfm/imagenette",
             "h": "hf:src", "i": str(tmp_path / "src")}
    job.write_text(HEAD + "".join(f'[[split]]\nname = "{n}"\nsource = "{s}"\n' for n, s in specs.items())
                   + '[labels]\ntemplates = "t.txt"\n')
    loaded = load_job(str(job))
    d = str(tmp_path)
    assert [s["source"] for s in loaded["split"]] == [
        f"{d}/src", f"folder:{d}/src", f"manifest:{d}/m.csv", f"cifar10:{d}/data:train", "cifar100:/x:test",
        f"webdataset:{d}/shards/{{000..009}}.tar", "hf:frgfm/imagenette", f"hf:{d}/src", f"{d}/src"]
    assert loaded["store"] == f"{d}/store" and loaded["labels"]["templates"] == f"{d}/t.txt"
    assert loaded["steps"] == ["encode", "labels"]  # default: the steps whose sections the job has


def test_shipped_jobs_are_valid_and_the_schema_takes_new_keys(tmp_path, monkeypatch):
    demo = ["encode", "labels", "index", "dedup", "query", "probe", "report"]  # the demo indexes and ends with a report
    for name, steps in (("demo.toml", demo), ("nightly-cifar100.toml", ["encode", "labels", "query", "probe"])):
        assert load_job(os.path.join(REPO, "jobs", name))["steps"] == steps
    for missing, reason in ((tmp_path / "none.toml", "No such file or directory"), (tmp_path, "Is a directory")):
        with pytest.raises(FeatstoreError, match=f"^{missing}: cannot read the job file: {reason}$"):
            load_job(str(missing))
    monkeypatch.setitem(JOB, "allow_removals", Key("boolean"))  # a new key is one line in the table
    job = tmp_path / "job.toml"
    job.write_text(HEAD + "allow_removals = true\n")
    assert load_job(str(job))["allow_removals"] is True
    job.write_text(HEAD + 'allow_removals = "yes"\n')
    with pytest.raises(FeatstoreError, match="allow_removals must be true or false, not a string"):
        load_job(str(job))
