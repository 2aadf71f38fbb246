"""``featstore labels``: class text embeddings (CLIP's prompt ensembling) and the FAISS label index."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError
from featstore.models import load_recorded_model
from featstore.store import Store, atomic_write, sha256_file

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_TEMPLATE = "a photo of a {}."
LABELS_FILE = "labels/classes.parquet"
INDEX_FILE = "labels/index.faiss"


def read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise FeatstoreError(f"cannot read {what} file {path}: {e.strerror}") from None


def resolve_templates(templates: list[str] | None = None, templates_file: str | None = None) -> list[str]:
    """--template T..., --templates FILE or the name ``paper80``; default ``a photo of a {}.``."""
    chosen = list(templates or [])
    if templates_file == "paper80":
        chosen += read_lines(os.path.join(DATA, "templates", "paper80.txt"), "templates")
    elif templates_file:
        chosen += read_lines(templates_file, "templates")
    chosen = chosen or [DEFAULT_TEMPLATE]
    for template in chosen:
        if template.count("{}") != 1:
            raise FeatstoreError(f"template {template!r} must contain '{{}}' exactly once")
    return chosen


def resolve_display_names(classes: list[str], classes_file: str | None) -> list[str]:
    """Names that go into the prompts: the class names verbatim, or --classes FILE, which holds either one
    name per line in the store's class order, or ``class<TAB>display`` lines."""
    if not classes_file:
        return list(classes)
    lines = read_lines(classes_file, "classes")
    if all("\t" in line for line in lines):
        mapping = dict(line.split("\t", 1) for line in lines)
        return [mapping.get(name, name) for name in classes]
    if len(lines) != len(classes):
        raise FeatstoreError(f"{classes_file} has {len(lines)} names but the store has {len(classes)} classes")
    return lines


def class_embeddings(model, names: list[str], templates: list[str], batch: int = 256) -> np.ndarray:
    """Mean of the normalised template embeddings per class, renormalised (CLIP's prompt ensembling)."""
    out = np.empty((len(names), model.dim), dtype=np.float32)
    prompts = [t.replace("{}", name) for name in names for t in templates]
    features = np.concatenate([model.encode_texts(prompts[i:i + batch]) for i in range(0, len(prompts), batch)])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    for c in range(len(names)):
        mean = features[c * len(templates):(c + 1) * len(templates)].mean(axis=0)
        out[c] = mean / np.linalg.norm(mean)
    return out


def build_labels(store_dir: str, templates: list[str] | None = None, templates_file: str | None = None,
                 classes_file: str | None = None, device: str = "auto") -> dict[str, Any]:
    import faiss

    store = Store.open(store_dir)
    store.check_unlocked()
    chosen = resolve_templates(templates, templates_file)
    classes = store.classes
    if not classes:
        raise FeatstoreError(f"store {store.root} has no classes: encode a labelled source, or a folder of class folders")
    display = resolve_display_names(classes, classes_file)
    model = load_recorded_model(store.manifest["model"], device)
    with store.lock("featstore labels"):
        embeddings = class_embeddings(model, display, chosen)
        os.makedirs(os.path.join(store.root, "labels"), exist_ok=True)
        table = pa.table({
            "class_id": pa.array(range(len(classes)), pa.int32()),
            "name": classes,
            "display": display,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), model.dim),
        })
        index = faiss.IndexFlatIP(model.dim)
        index.add(embeddings)
        atomic_write(os.path.join(store.root, LABELS_FILE), lambda tmp: pq.write_table(table, tmp))
        atomic_write(os.path.join(store.root, INDEX_FILE), lambda tmp: faiss.write_index(index, tmp))
        store.manifest["labels"] = {
            "classes": len(classes),
            "templates": chosen,
            "display_names": display,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "index_sha256": sha256_file(os.path.join(store.root, INDEX_FILE)),
        }
        store.save()
    return {"store": store.root, "classes": len(classes), "templates": len(chosen), "index": INDEX_FILE}


def load_label_index(store: Store):
    """The FAISS index and display names, checked against the store's current classes."""
    import faiss

    labels = store.manifest.get("labels")
    if not labels:
        raise FeatstoreError(f"store {store.root} has no label index: run featstore labels {store.root}")
    if labels["classes"] != len(store.classes):
        raise FeatstoreError(
            f"label index covers {labels['classes']} classes but the store now has {len(store.classes)}: "
            f"run featstore labels {store.root} again"
        )
    path = os.path.join(store.root, INDEX_FILE)
    try:
        index = faiss.read_index(path)
    except Exception:
        raise FeatstoreError(f"cannot read label index {path}: run featstore labels {store.root} again") from None
    return index, labels["display_names"]

