"""``featstore probe``: a logistic-regression linear probe trained on stored embeddings, no re-encoding.

With a given C it is the seed notebook's recipe, ``LogisticRegression(random_state=0, C=C, max_iter=...)``;
without one, C comes from a sweep on a validation split carved from train (the CLIP paper's protocol),
and the chosen C is refit on all of train.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np

from featstore.errors import FeatstoreError
from featstore.store import Store, atomic_write

VALIDATION_FRACTION = 0.2
COARSE_GRID = [10.0 ** e for e in range(-6, 7, 2)]


def labelled_features(store: Store, split: str) -> tuple[np.ndarray, np.ndarray]:
    store.split_info(split)
    _, features, labels = store.features(split)
    mask = labels >= 0
    if not mask.any():
        raise FeatstoreError(f"split {split!r} has no labelled rows: the probe needs labels")
    return features[mask], labels[mask]


def fit(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int, warm: Any = None):
    from sklearn.linear_model import LogisticRegression

    classifier = warm or LogisticRegression(random_state=0, C=C, max_iter=max_iter)
    classifier.set_params(C=C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter is the user's choice, as in the seed
        return classifier.fit(features, labels)


def sweep_C(features: np.ndarray, labels: np.ndarray, max_iter: int) -> tuple[float, dict[float, float]]:
    """Best C on a held-out 20 % of train: a coarse log grid, then two halvings of the log step around the best."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    x_fit, x_val, y_fit, y_val = train_test_split(
        features, labels, test_size=VALIDATION_FRACTION, random_state=0, stratify=stratify)
    scores: dict[float, float] = {}
    warm = LogisticRegression(random_state=0, max_iter=max_iter, warm_start=True)

    def score(C: float) -> float:
        if C not in scores:
            scores[C] = float((fit(x_fit, y_fit, C, max_iter, warm).predict(x_val) == y_val).mean())
        return scores[C]

    for C in COARSE_GRID:
        score(C)
    best = max(scores, key=lambda c: (scores[c], -abs(np.log10(c))))
    step = 1.0
    for _ in range(2):
        for C in (best * 10 ** -step, best * 10 ** step):
            score(C)
        best = max(scores, key=lambda c: (scores[c], -abs(np.log10(c))))
        step /= 2
    return best, scores


def save_classifier(path: str, classifier, store: Store, C: float) -> None:
    """npz of coef/intercept plus a JSON sidecar (classes, C, model identity): no pickle."""
    base = path[:-4] if path.endswith(".npz") else path
    os.makedirs(os.path.dirname(os.path.abspath(base)) or ".", exist_ok=True)

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, coef=classifier.coef_, intercept=classifier.intercept_, classes=classifier.classes_)

    atomic_write(os.path.abspath(base + ".npz"), write_npz)
    meta = {
        "classes": [store.classes[c] for c in classifier.classes_],
        "class_ids": [int(c) for c in classifier.classes_],
        "C": C,
        "model": store.manifest["model"],
        "normalised_inputs": False,
    }
    data = json.dumps(meta, indent=1)

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(data)

    atomic_write(os.path.abspath(base + ".json"), write_json)


def load_classifier(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The saved probe: arrays (coef, intercept, classes) and metadata; predict with argmax(x @ coef.T + b)."""
    base = path[:-4] if path.endswith((".npz", ".json")) else path
    with np.load(base + ".npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    with open(base + ".json") as f:
        return arrays, json.load(f)


def probe(store_dir: str, train_split: str, test_split: str, C: float | None = None, max_iter: int = 1000,
          out: str | None = None) -> dict[str, Any]:
    if C is not None and not C > 0:
        raise FeatstoreError("--C must be positive")
    if max_iter < 1:
        raise FeatstoreError("--max-iter must be at least 1")
    store = Store.open(store_dir)
    x_train, y_train = labelled_features(store, train_split)
    x_test, y_test = labelled_features(store, test_split)
    if len(np.unique(y_train)) < 2:
        raise FeatstoreError(f"split {train_split!r} has fewer than two classes: nothing to separate")
    sweep = None
    if C is None:
        C, sweep = sweep_C(x_train, y_train, max_iter)
    classifier = fit(x_train, y_train, C, max_iter)
    acc1 = float((classifier.predict(x_test) == y_test).mean())
    if out:
        save_classifier(out, classifier, store, C)
    result = {"acc1": acc1, "C": C, "n_train": int(len(y_train)), "n_test": int(len(y_test))}
    if sweep:
        result["sweep"] = {f"{c:g}": s for c, s in sorted(sweep.items())}
    return result
