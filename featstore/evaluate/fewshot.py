"""Few-shot linear probes: ``featstore probe --shots K[,K...] [--seeds N]``.

For each seed and shot count K, exactly K training rows of every class (all of a class's rows when it has
fewer, which is reported) are drawn, the probe's own solver is fit on them at one C, and accuracy is measured
on the whole test split; the result is the mean and standard deviation over seeds, per K (the CLIP paper's
few-shot curve). Draws depend only on the split's labelled rows (in id order) and the seed: each class's rows
are permuted by ``numpy.random.default_rng(seed)``, class by class in class-id order, and K takes the first K
of that permutation, so a seed's 1-shot rows are among its 2-shot rows. Only drawn rows are read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from featstore.errors import FeatstoreError
from featstore.probe import accuracy, fit, load_features, open_probe

SEED_C = 0.316  # the seed notebook's C; few-shot probes have too few rows to sweep C on a held-out part


def parse_shots(text: str) -> list[int]:
    """``1,2,4,8,16`` as sorted distinct shot counts; FeatstoreError for anything else."""
    try:
        shots = sorted({int(part) for part in text.split(",")})
    except ValueError:
        shots = []
    if not shots or shots[0] < 1:
        raise FeatstoreError(f"--shots must be positive whole numbers separated by commas, e.g. 1,2,4 (got {text!r})")
    return shots


def draw(labels: np.ndarray, shots: list[int], seed: int) -> dict[int, np.ndarray]:
    """Row numbers (sorted) of the K-shot draw of SEED for each K in SHOTS: per class, the first K of a
    permutation of that class's rows by ``default_rng(seed)``, classes taken in increasing id."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    permuted = [rows[rng.permutation(len(rows))] for rows in np.split(order, starts[1:])]
    return {k: np.sort(np.concatenate([rows[:k] for rows in permuted])) for k in shots}


def fewshot(store_dir: str, train_split: str, test_split: str, shots: list[int], seeds: int = 5,
            C: float | None = None, max_iter: int = 1000, solver: str = "torch", device: str = "auto") -> dict[str, Any]:
    """Few-shot probes at each K in SHOTS with seeds 0..SEEDS-1 (C defaults to the seed's 0.316).

    Returns C, solver, classes, n_test, and ``fewshot``: per K, {shots, seeds, acc1_mean, acc1_std (sample,
    ddof=1; 0 for one seed), acc1_per_seed, n_train (rows per fit), short_classes (classes with fewer than K
    rows, all of which were used)}."""
    if not shots or min(shots) < 1:
        raise FeatstoreError("--shots must be positive whole numbers")
    if seeds < 1:
        raise FeatstoreError("--seeds must be at least 1")
    C = SEED_C if C is None else C
    store, train, test, device = open_probe(store_dir, train_split, test_split, C, max_iter, solver, device)
    labels = train.column("label").to_numpy()
    classes, targets = np.unique(labels, return_inverse=True)
    per_class = np.bincount(targets)
    draws = [draw(targets, shots, seed) for seed in range(seeds)]
    used = np.unique(np.concatenate([rows for by_k in draws for rows in by_k.values()]))
    x_used = load_features(store, train_split, train.take(pa.array(used)))
    x_test = load_features(store, test_split, test)
    y_test = test.column("label").to_numpy()
    curve = []
    for k in shots:
        scores = []
        for by_k in draws:
            rows = by_k[k]
            at = np.searchsorted(used, rows)
            classifier = fit(x_used[at], targets[rows], classes, C, max_iter, solver, None, device)
            scores.append(accuracy(classifier, x_test, y_test))
        curve.append({"shots": k, "seeds": seeds, "acc1_mean": float(np.mean(scores)),
                      "acc1_std": float(np.std(scores, ddof=1)) if seeds > 1 else 0.0, "acc1_per_seed": scores,
                      "n_train": len(by_k[k]), "short_classes": int((per_class < k).sum())})
    return {"C": C, "solver": solver, "classes": len(classes), "n_test": len(y_test), "fewshot": curve}
