"""``featstore query``: nearest labels for stored images (or new image files) from the FAISS label index.

Scores are the seed notebook's probabilities: softmax(100 · cos) over all labels.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError
from featstore.labels import load_label_index
from featstore.store import Store, atomic_write

CHUNK = 16_384  # rows per FAISS search, so memory stays rows × classes bounded


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def rank_labels(index, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class ids best first, softmax(100·cos) probabilities) over all classes, for each row."""
    n_classes = index.ntotal
    ranked = np.empty((len(features), n_classes), dtype=np.int64)
    probs = np.empty((len(features), n_classes), dtype=np.float32)
    for start in range(0, len(features), CHUNK):
        sims, ids = index.search(np.ascontiguousarray(normalise(features[start:start + CHUNK]), np.float32), n_classes)
        logits = 100.0 * sims
        logits -= logits[:, :1]  # rows are sorted, so the first is the max
        exp = np.exp(logits)
        probs[start:start + CHUNK] = exp / exp.sum(axis=1, keepdims=True)
        ranked[start:start + CHUNK] = ids
    return ranked, probs


def zero_shot_metrics(ranked: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """acc1, acc5 and mean per-class recall over the labelled rows (fractions in [0, 1])."""
    mask = labels >= 0
    y, top = labels[mask], ranked[mask]
    if not len(y):
        return {"n": 0, "acc1": None, "acc5": None, "mean_per_class_recall": None}
    hit1 = top[:, 0] == y
    hit5 = (top[:, :5] == y[:, None]).any(axis=1)
    recalls = [hit1[y == c].mean() for c in np.unique(y)]
    return {"n": int(len(y)), "acc1": float(hit1.mean()), "acc5": float(hit5.mean()),
            "mean_per_class_recall": float(np.mean(recalls))}


def query_split(store_dir: str, split: str, top_k: int = 5, out: str | None = None) -> dict[str, Any]:
    """Zero-shot labels for every stored image of SPLIT; metrics when the split is labelled."""
    if top_k < 1:
        raise FeatstoreError("--top-k must be at least 1")
    store = Store.open(store_dir)
    store.split_info(split)
    index, names = load_label_index(store)
    ids, features, labels = store.features(split)
    ranked, probs = rank_labels(index, features)
    result = zero_shot_metrics(ranked, labels)
    result["rows"] = len(ids)
    if out:
        k = min(top_k, index.ntotal)
        table = pa.table({
            "id": ids,
            "label_ids": pa.array(list(ranked[:, :k].astype(np.int32)), pa.list_(pa.int32())),
            "labels": [[names[c] for c in row] for row in ranked[:, :k]],
            "scores": pa.array(list(probs[:, :k]), pa.list_(pa.float32())),
        })
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic_write(os.path.abspath(out), lambda tmp: pq.write_table(table, tmp))
        result["out"] = os.path.abspath(out)
    return result


def query_images(store_dir: str, images: list[str], top_k: int = 5, device: str = "auto") -> list[dict[str, Any]]:
    """Encode new image files with the store's model and rank the store's labels for each."""
    import torch

    from featstore.encode.reader import failure_reason
    from featstore.models import load_recorded_model
    from featstore.sources.base import decode_image, read_file

    if top_k < 1:
        raise FeatstoreError("--top-k must be at least 1")
    store = Store.open(store_dir)
    index, names = load_label_index(store)
    pixels = []
    for path in images:
        try:
            pixels.append(read_file(path))  # a FIFO or device is refused, never opened
        except OSError as e:
            raise FeatstoreError(f"cannot read image {path}: {e.strerror or e}") from None
    model = load_recorded_model(store.manifest["model"], device)
    batch = []
    for path, data in zip(images, pixels):
        try:
            batch.append(model.preprocess(decode_image(data)))
        except Exception as e:
            raise FeatstoreError(f"image {path}: {failure_reason(e)}") from None
    features = model.encode_images(torch.stack(batch)).numpy()
    ranked, probs = rank_labels(index, features)
    k = min(top_k, index.ntotal)
    return [
        {"image": path, "labels": [names[c] for c in ranked[i, :k]], "scores": [float(p) for p in probs[i, :k]]}
        for i, path in enumerate(images)
    ]
