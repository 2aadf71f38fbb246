"""``featstore run JOB.toml``: a nightly job kept in version control (encode -> labels -> query -> probe -> report).

Paths in a job are relative to the job file. Example::

    store = "../stores/demo"
    model = "ViT-B/32"
    fallback_model = "random:tiny"      # optional: used, with a notice, when the weights are unavailable
    steps = ["encode", "labels", "query", "probe"]

    [[split]]
    name = "train"
    source = "../data/sample/train"

    [labels]
    templates = "paper80"               # or template = ["a photo of a {}."]

    [query]
    split = "test"

    [probe]
    train_split = "train"
    test_split = "test"
    C = 0.316                           # omit to sweep C on a validation split
    solver = "torch"                    # or "sklearn": the seed's LogisticRegression call itself

``load_job`` checks the whole file against ``JOB`` (one table: key -> type, required, value check) before any
step runs, so a bad job fails in one line naming the file and the key, with nothing written. A new key is one
line in ``JOB`` or in one of its section tables.
"""

from __future__ import annotations

import difflib
import errno
import json
import math
import os
import tomllib
from typing import Any, Callable, NamedTuple

from featstore.data import named_or_file
from featstore.errors import FeatstoreError, ModelUnavailable

STEPS = ("encode", "labels", "index", "dedup", "query", "probe", "report")
# what a step reads
STEP_SECTION = {"encode": "split", "labels": None, "index": "index", "dedup": "dedup", "query": "query", "probe": "probe",
                "report": "report"}
ENCODE_KEYS = {"model", "batch_size", "workers", "device", "precision", "dtype", "shard_rows", "allow_slow_bf16",
               "allow_removals", "engine", "ray_address", "actors", "gpus_per_actor", "cpus_per_decoder"}
MANIFEST = "featstore.json"  # featstore.store.MANIFEST, written out: the store module is a heavy import
# source prefix -> is the path after it joined to the job's folder when relative: always, or only when that
# joined path exists (``hf:`` also names hub datasets, e.g. ``hf:frgfm/imagenette``, which stay as written).
# A spec with any other prefix is a folder path, as ``open_source`` reads it.
SOURCE_PREFIXES = {"folder": "always", "manifest": "always", "cifar10": "always", "cifar100": "always",
                   "webdataset": "always", "hf": "if it exists"}
LOCAL_SOURCES = ("folder", "manifest")  # whose path must exist before any step runs

# value kinds: TOML value -> does it fit, and how a message names the kind
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "boolean": (lambda v: isinstance(v, bool), "true or false"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "integers": (lambda v: isinstance(v, list) and all(KINDS["integer"][0](x) for x in v), "a list of integers"),
    "table": (lambda v: isinstance(v, dict), "a table"),
    "tables": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "an array of tables"),
}


class Key(NamedTuple):
    kind: str
    required: bool = False
    check: Callable[[Any], str | None] | None = None  # the value's complaint ("must be at least 1") or None
    schema: dict[str, "Key"] | None = None  # the keys of a table, or of each table in an array


def _did_you_mean(word: str, choices) -> str:
    by_case = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), by_case, n=1)
    return f" (did you mean {by_case[close[0]]!r}?)" if close else ""


def at_least(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low}"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    either = f"{', '.join(choices[:-1])} or {choices[-1]}"
    return lambda v: None if v in choices else f"must be {either}, not {v!r}{_did_you_mean(v, choices)}"


def _positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else f"must be a positive finite number, not {value!r}"


def _device(value: str) -> str | None:
    ok = value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    return None if ok else f"must be auto, cpu, cuda or cuda:N, not {value!r}"


def _split_name(value: str) -> str | None:
    from featstore.store import check_split_name

    try:
        check_split_name(value)
    except FeatstoreError:
        return f"{value!r} is not a split name: use letters, digits, '_', '-' and '.' (at most 64, no '..')"
    return None


def _templates(value: list[str]) -> str | None:
    bad = [t for t in value if t.count("{}") != 1]
    return f"has {bad[0]!r}, which must contain '{{}}' exactly once" if bad else None


def _steps(value: list[str]) -> str | None:
    for step in value:
        if step not in STEPS:
            return f"has unknown step {step!r}{_did_you_mean(step, STEPS)}: steps are {', '.join(STEPS)}"
        if value.count(step) > 1:
            return f"lists {step!r} twice"
    return None if value else "must name at least one step"


def _size(value: str) -> str | None:
    from featstore.index.build import parse_size

    try:
        parse_size(value)
    except FeatstoreError as e:
        return f"is {str(e)[0].lower()}{str(e)[1:]}"
    return None


def _shots(value: list[int]) -> str | None:
    return None if value and min(value) >= 1 else "must list at least one shot count, each at least 1"


SPLIT = {"name": Key("string", True, _split_name), "source": Key("string", True)}
LABELS = {"template": Key("strings", check=_templates), "templates": Key("string"), "classes": Key("string")}
QUERY = {"split": Key("string", True), "top_k": Key("integer", check=at_least(1))}
PROBE = {"train_split": Key("string", True), "test_split": Key("string", True), "C": Key("number", check=_positive),
         "max_iter": Key("integer", check=at_least(1)), "solver": Key("string", check=one_of("torch", "sklearn")),
         "out": Key("string"),  # save the classifier (probe --out), which the report step then evaluates
         "shots": Key("integers", check=_shots), "seeds": Key("integer", check=at_least(1))}  # probe --shots/--seeds
REPORT = {"split": Key("string", True), "out": Key("string")}  # featstore report --split/--out
# featstore index: built when the split has none (encode keeps it current after that) or its kind/budget changed
INDEX = {"split": Key("string", True), "kind": Key("string"), "max_memory": Key("string", check=_size)}
DEDUP = {"split": Key("string", True), "threshold": Key("number", check=lambda v: None if -1 <= v <= 1 else "must be in [-1, 1]"),
         "k": Key("integer", check=at_least(1)), "out": Key("string"), "against": Key("string")}  # featstore dedup
JOB = {
    "store": Key("string", True),
    "model": Key("string"),
    "fallback_model": Key("string"),
    "device": Key("string", check=_device),
    "precision": Key("string", check=one_of("fp32", "fp16", "bf16")),
    "dtype": Key("string", check=one_of("float16", "float32")),
    "batch_size": Key("integer", check=at_least(1)),
    "workers": Key("integer", check=at_least(0)),
    "shard_rows": Key("integer", check=at_least(1)),
    "allow_slow_bf16": Key("boolean"),  # bf16 is meant even on a CPU without native bf16 (no warning)
    "allow_removals": Key("boolean"),  # a run may remove more than a quarter of a split (encode --allow-removals)
    "engine": Key("string", check=one_of("local", "ray")),  # encode --engine
    "ray_address": Key("string"),  # encode --ray-address (engine = "ray")
    "actors": Key("integer", check=at_least(1)),  # encode --actors
    "gpus_per_actor": Key("number", check=lambda v: None if v >= 0 else "must be 0 or more"),  # encode --gpus-per-actor
    "cpus_per_decoder": Key("number", check=_positive),  # encode --cpus-per-decoder
    "steps": Key("strings", check=_steps),
    "split": Key("tables", schema=SPLIT),
    "labels": Key("table", schema=LABELS),
    "query": Key("table", schema=QUERY),
    "probe": Key("table", schema=PROBE),
    "report": Key("table", schema=REPORT),
    "index": Key("table", schema=INDEX),
    "dedup": Key("table", schema=DEDUP),
}


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    for kind in ("integer", "number", "string", "table"):
        if KINDS[kind][0](value):
            return KINDS[kind][1] + (f" ({value!r})" if kind == "string" else "")
    return "an array" if isinstance(value, list) else f"a {type(value).__name__}"


def _key_path(prefix: str, key: str, spec: Key | None) -> str:
    if prefix:
        return f"{prefix}.{key}"
    return {"table": f"[{key}]", "tables": f"[[{key}]]"}.get(spec.kind if spec else "", key)


def check_table(table: dict[str, Any], schema: dict[str, Key], prefix: str = "") -> None:
    """Raise FeatstoreError("KEYPATH complaint") for the first key of TABLE that SCHEMA does not allow."""
    for key, value in table.items():
        spec = schema.get(key)
        path = _key_path(prefix, key, spec)
        if spec is None:
            raise FeatstoreError(f"unknown key {path}{_did_you_mean(key, schema)}; known: {', '.join(schema)}")
        fits, wanted = KINDS[spec.kind]
        if not fits(value):
            hint = f" (write [[{key}]] for each entry)" if spec.kind == "tables" and isinstance(value, dict) else ""
            raise FeatstoreError(f"{path} must be {wanted}{hint}, not {_kind_of(value)}")
        if isinstance(value, str) and not value:
            raise FeatstoreError(f"{path} must not be empty")
        complaint = spec.check(value) if spec.check else None
        if complaint:
            raise FeatstoreError(f"{path} {complaint}")
        if spec.kind == "table":
            check_table(value, spec.schema, path)
        elif spec.kind == "tables":
            for i, entry in enumerate(value, 1):
                check_table(entry, spec.schema, f"{path} #{i}")
    for key, spec in schema.items():
        if spec.required and key not in table:
            raise FeatstoreError(f"{_key_path(prefix, key, spec)} is required")


def _resolve_source(spec: str, base: str) -> tuple[str, str | None]:
    """SPEC with its relative path joined to the job's folder, and the local path that must exist (or None)."""
    kind, sep, rest = spec.partition(":")
    if not (sep and rest and kind in SOURCE_PREFIXES):
        path = os.path.join(base, spec)
        return path, path
    joined = os.path.join(base, rest)
    if SOURCE_PREFIXES[kind] == "always" or os.path.exists(joined):
        rest = joined
    return f"{kind}:{rest}", rest if kind in LOCAL_SOURCES else None


def _stored_splits(store: str) -> set[str] | None:
    """The splits the store's manifest lists; empty for no store; None when the manifest cannot be read."""
    try:
        with open(os.path.join(store, MANIFEST), encoding="utf-8") as f:
            return set(json.load(f)["splits"])
    except OSError as e:
        return set() if e.errno in (errno.ENOENT, errno.ENOTDIR) else None
    except (ValueError, KeyError, TypeError):
        return None  # a damaged manifest: the first step that opens the store says what is wrong with it


def _validate(job: dict[str, Any], base: str) -> None:
    """Check JOB whole and make its paths absolute; raise FeatstoreError("KEYPATH complaint") on the first fault."""
    check_table(job, JOB)
    steps = job.setdefault("steps", [s for s in STEPS if STEP_SECTION[s] is None or STEP_SECTION[s] in job])
    for step in steps:
        section = STEP_SECTION[step]
        if section and not job.get(section):
            raise FeatstoreError(f"steps include {step!r} but the job has no {_key_path('', section, JOB[section])}")
    job["store"] = os.path.join(base, job["store"])
    names = [split["name"] for split in job.get("split", [])]
    for i, split in enumerate(job.get("split", []), 1):
        first = names.index(split["name"]) + 1
        if first < i:
            raise FeatstoreError(f"[[split]] #{i}.name {split['name']!r} is declared twice (also [[split]] #{first})")
        split["source"], local = _resolve_source(split["source"], base)
        if "encode" in steps and local and not os.path.exists(local):
            raise FeatstoreError(f"[[split]] #{i}.source: no such file or folder {local}")
        if "encode" in steps and local and not split["source"].startswith("manifest:") and not os.path.isdir(local):
            raise FeatstoreError(f"[[split]] #{i}.source: {local} is not a folder")
    labels = job.get("labels", {})
    for key in ("templates", "classes"):
        if key in labels:  # a file relative to the job, or a list shipped with featstore (paper80, cifar100)
            labels[key] = named_or_file(labels[key], key, base)
            if "labels" in steps and not os.path.isfile(labels[key]):
                raise FeatstoreError(f"[labels].{key}: no such file {labels[key]}")
    for section in ("probe", "report", "dedup"):
        if "out" in job.get(section, {}):
            job[section]["out"] = os.path.join(base, job[section]["out"])
    encoded = set(names) if "encode" in steps else set()
    stored = _stored_splits(job["store"])
    references = {"query": ("split",), "probe": ("train_split", "test_split"), "report": ("split",),
                  "index": ("split",), "dedup": ("split", "against")}
    for step, key in [(step, key) for step in steps for key in references.get(step, ()) if key in job[step]]:
        name = job[step][key]
        if stored is not None and name not in encoded | stored:
            raise FeatstoreError(f"[{step}].{key} names split {name!r}, which no [[split]] encodes and store "
                                 f"{job['store']} does not hold{_did_you_mean(name, encoded | stored)}")


def load_job(path: str) -> dict[str, Any]:
    """The job at PATH, checked whole, with absolute paths; FeatstoreError("PATH: KEYPATH complaint") if bad."""
    try:
        with open(path, "rb") as f:
            job = tomllib.load(f)
    except OSError as e:
        raise FeatstoreError(f"{path}: cannot read the job file: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FeatstoreError(f"{path}: not valid TOML: {e}") from None
    try:
        _validate(job, os.path.dirname(os.path.abspath(path)))
    except FeatstoreError as e:
        raise FeatstoreError(f"{path}: {e}") from None
    return job


def run_job(path: str, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from featstore.encode import encode
    from featstore.labels import build_labels
    from featstore.probe import probe
    from featstore.query import query_split

    job = load_job(path)
    store = job["store"]
    options = {k: v for k, v in job.items() if k in ENCODE_KEYS}
    results: dict[str, Any] = {}
    if "encode" in job["steps"]:
        for split in job.get("split", []):
            try:
                result = encode(split["source"], store, split["name"], progress=False, **options)
            except ModelUnavailable as e:
                if not job.get("fallback_model"):
                    raise
                echo(f"notice: {e}\nnotice: using {job['fallback_model']} instead (RANDOM WEIGHTS: scores are not meaningful)")
                options["model"] = job["fallback_model"]
                result = encode(split["source"], store, split["name"], progress=False, **options)
            results.setdefault("encode", {})[split["name"]] = result
            echo(f"encode {split['name']}: {result['rows']} rows, encoded {result['encoded']}, "
                 f"failed {result['failed']}{', kept %d stale' % result['stale'] if result['stale'] else ''}, "
                 f"{result['img_per_s'] or 0:.1f} img/s  [{result['model']}]")
    if "labels" in job["steps"]:
        spec = job.get("labels", {})
        results["labels"] = build_labels(store, spec.get("template"), spec.get("templates"), spec.get("classes"))
        echo(f"labels: {results['labels']['classes']} classes x {results['labels']['templates']} templates")
    if "index" in job["steps"]:
        from featstore.index.split import human_size

        spec = job["index"]
        results["index"] = built = _index_if_needed(store, spec)
        echo(f"index {spec['split']}: " + (f"{built['kind']} of {built['rows']} rows, {human_size(built['bytes'])}, "
                                          f"recall@10 {built['recall_at_10']:.3f}" if built else "current (encode keeps it so)"))
    if "dedup" in job["steps"]:
        from featstore.index.duplicates import dedup_split

        spec = job["dedup"]
        results["dedup"] = d = dedup_split(store, spec["split"], spec.get("threshold", 0.95), spec.get("k", 10),
                                           spec.get("out"), spec.get("against"))
        echo(f"dedup {spec['split']}: {d['pairs']} pairs in {d['groups']} groups ({d['rows_in_groups']} rows)"
             + (f" -> {d['out']}" if d.get("out") else ""))
    if "query" in job["steps"]:
        results["query"] = query_split(store, job["query"]["split"], job["query"].get("top_k", 5))
        q = results["query"]
        echo(f"query {job['query']['split']}: zero-shot acc1 {q['acc1']:.3f}, acc5 {q['acc5']:.3f}, "
             f"mean per-class recall {q['mean_per_class_recall']:.3f} over {q['n']} images")
    if "probe" in job["steps"]:
        spec = job["probe"]
        results["probe"] = probe(store, spec["train_split"], spec["test_split"], spec.get("C"), spec.get("max_iter", 1000),
                                  spec.get("out"), solver=spec.get("solver", "torch"), device=job.get("device", "auto"))
        p = results["probe"]
        echo(f"probe: acc1 {p['acc1']:.3f} with C={p['C']:g} (train {p['n_train']}, test {p['n_test']})")
        if "shots" in spec:
            from featstore.evaluate.fewshot import fewshot

            results["fewshot"] = fewshot(store, spec["train_split"], spec["test_split"], spec["shots"],
                                         spec.get("seeds", 5), spec.get("C"), spec.get("max_iter", 1000),
                                         spec.get("solver", "torch"), job.get("device", "auto"))
            curve = ", ".join(f"{e['shots']}: {e['acc1_mean']:.3f}" for e in results["fewshot"]["fewshot"])
            echo(f"few-shot probe acc1 by shots per class: {curve}")
    if "report" in job["steps"]:
        from featstore.evaluate.report import report

        saved = job.get("probe", {}).get("out")
        results["report"] = report(store, job["report"]["split"], saved if saved and "probe" in job["steps"] else None,
                                   results.get("fewshot"), job["report"].get("out"))
        echo(f"report: {len(results['report']['images'])} plots -> {results['report']['index']}")
    return results


def _index_if_needed(store: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Build the split's image index unless it has one of the asked kind and budget (encode keeps it current)."""
    from featstore.index.build import parse_size
    from featstore.index.split import build_index, family
    from featstore.store import Store

    record = Store.open(store).split_info(spec["split"]).index
    budget, kind = parse_size(spec.get("max_memory")), spec.get("kind", "auto")
    if record and budget == record.max_memory and kind in ("auto", record.kind,
                                                          family(record.kind, record.rows, 1, budget)):
        return None
    return build_index(store, spec["split"], spec.get("kind", "auto"), budget, progress=False)
