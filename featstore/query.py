"""``featstore query``: nearest labels for stored images (or new image files) from the FAISS label index.

Scores are the seed notebook's probabilities: softmax(100 · cos) over all labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from featstore.errors import FeatstoreError
from featstore.evaluate.zeroshot import logit_matrix, rank, zeroshot
from featstore.labels import load_label_index
from featstore.store import Store


def query_split(store_dir: str, split: str, top_k: int = 5, out: str | None = None) -> dict[str, Any]:
    """Zero-shot labels for every stored image of SPLIT; metrics when the split is labelled (n, acc1, acc5,
    mean_per_class_recall, rows; out when OUT is given). Streamed: ``featstore.evaluate.zeroshot``."""
    return zeroshot(store_dir, split, top_k, out).summary


def embed_image_files(store: Store, paths: list[str], device: str) -> np.ndarray:
    """Image files through the store's image tower and preprocessing; each is read and decoded before the
    model loads, so a bad file is refused first (a FIFO or device is refused, never opened)."""
    import torch

    from featstore.encode.reader import failure_reason
    from featstore.models import load_recorded_model
    from featstore.sources.base import decode_image, read_file

    images = []
    for path in paths:
        try:
            images.append(decode_image(read_file(path)))
        except Exception as e:
            raise FeatstoreError(f"cannot read image {path}: {failure_reason(e)}") from None
    model = load_recorded_model(store.manifest.model, device)
    return model.encode_images(torch.stack([model.preprocess(image) for image in images])).numpy()


def query_images(store_dir: str, images: list[str], top_k: int = 5, device: str = "auto") -> list[dict[str, Any]]:
    """Encode new image files with the store's model and rank the store's labels for each."""
    if top_k < 1:
        raise FeatstoreError("--top-k must be at least 1")
    store = Store.open(store_dir)
    index, names = load_label_index(store)
    features = embed_image_files(store, images, device)
    ranked, probs = rank(features, logit_matrix(index), min(top_k, index.ntotal))
    return [
        {"image": path, "labels": [names[c] for c in ranked[i]], "scores": [float(p) for p in probs[i]]}
        for i, path in enumerate(images)
    ]
