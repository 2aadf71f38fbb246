"""``featstore run JOB.toml``: a nightly job kept in version control (encode -> labels -> query -> probe).

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
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, Callable

from featstore.errors import FeatstoreError, ModelUnavailable

STEPS = ("encode", "labels", "query", "probe")
ENCODE_KEYS = {"model", "batch_size", "workers", "device", "precision", "dtype", "shard_rows"}


def load_job(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            job = tomllib.load(f)
    except OSError as e:
        raise FeatstoreError(f"cannot read job {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise FeatstoreError(f"job {path} is not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    if "store" not in job:
        raise FeatstoreError(f"job {path} has no 'store'")
    steps = job.get("steps", list(STEPS))
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise FeatstoreError(f"job {path} has unknown steps {unknown}; known: {', '.join(STEPS)}")
    job["steps"] = steps
    job["store"] = os.path.join(base, job["store"])
    for split in job.get("split", []):
        if not {"name", "source"} <= split.keys():
            raise FeatstoreError(f"job {path}: each [[split]] needs name and source")
        kind, sep, rest = split["source"].partition(":")
        if sep and kind in ("cifar10", "cifar100", "manifest"):
            split["source"] = f"{kind}:{os.path.join(base, rest)}"
        else:
            split["source"] = os.path.join(base, split["source"])
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
                 f"failed {result['failed']}, {result['img_per_s'] or 0:.1f} img/s  [{result['model']}]")
    if "labels" in job["steps"]:
        spec = job.get("labels", {})
        results["labels"] = build_labels(store, spec.get("template"), spec.get("templates"),
                                         spec.get("classes") and os.path.join(os.path.dirname(os.path.abspath(path)), spec["classes"]))
        echo(f"labels: {results['labels']['classes']} classes x {results['labels']['templates']} templates")
    if "query" in job["steps"] and "query" in job:
        results["query"] = query_split(store, job["query"]["split"], job["query"].get("top_k", 5))
        q = results["query"]
        echo(f"query {job['query']['split']}: zero-shot acc1 {q['acc1']:.3f}, acc5 {q['acc5']:.3f}, "
             f"mean per-class recall {q['mean_per_class_recall']:.3f} over {q['n']} images")
    if "probe" in job["steps"] and "probe" in job:
        spec = job["probe"]
        results["probe"] = probe(store, spec["train_split"], spec["test_split"], spec.get("C"), spec.get("max_iter", 1000),
                                  solver=spec.get("solver", "torch"), device=job.get("device", "auto"))
        p = results["probe"]
        echo(f"probe: acc1 {p['acc1']:.3f} with C={p['C']:g} (train {p['n_train']}, test {p['n_test']})")
    return results
