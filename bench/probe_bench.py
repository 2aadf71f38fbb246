"""Linear-probe time against the seed's sklearn call, on the same features, in one run.

    .venv/bin/python bench/probe_bench.py [--n-train 50000] [--n-test 10000] [--dim 512] [--classes 100] [--sweep]

Features imitate raw CLIP image features (CIFAR-100 train shape by default): class means in a shared
low-rank subspace, overlapping clusters and anisotropic noise, so L-BFGS needs hundreds of iterations.
Prints seconds, iterations and accuracy for the seed's `LogisticRegression(random_state=0, C=0.316,
max_iter=1000)` and for featstore's probe (`--C 0.316`, and with `--sweep` the C sweep), with the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from featstore.probe import fit, sweep_C  # noqa: E402


def clip_like_features(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)  # shared class geometry for train and test
    basis = rng.normal(size=(32, dim)) / np.sqrt(32)
    means = rng.normal(size=(classes, 32)) @ basis * 0.9
    scales = np.exp(rng.normal(scale=0.7, size=dim))
    common = rng.normal(size=dim) * 2.0
    sample = np.random.default_rng(seed)
    labels = sample.integers(0, classes, size=n)
    noise = sample.normal(size=(n, dim)) * scales * 0.35
    return (common + means[labels] + noise).astype(np.float32), labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = clip_like_features(args.n_train, args.dim, args.classes, 1)
    x_test, y_test = clip_like_features(args.n_test, args.dim, args.classes, 2)
    print(f"features: train {x_train.shape}, test {x_test.shape}, {args.classes} classes, float32")

    start = time.perf_counter()
    seed = LogisticRegression(random_state=0, C=0.316, max_iter=1000).fit(x_train, y_train)
    seed_seconds = time.perf_counter() - start
    seed_acc = float((seed.predict(x_test) == y_test).mean())
    print(f"seed sklearn C=0.316: {seed_seconds:7.1f}s, {int(seed.n_iter_[0])} iterations, acc {100 * seed_acc:.2f}%")

    start = time.perf_counter()
    mine = fit(x_train, y_train, 0.316, 1000)
    seconds = time.perf_counter() - start
    acc = float((mine.predict(x_test) == y_test).mean())
    print(f"featstore probe --C 0.316: {seconds:7.1f}s = {seed_seconds / seconds:4.2f}x faster, "
          f"acc {100 * acc:.2f}% ({100 * (acc - seed_acc):+.2f} points)")
    if args.sweep:
        start = time.perf_counter()
        best, scores = sweep_C(x_train, y_train, 1000)
        sweep_seconds = time.perf_counter() - start
        print(f"featstore C sweep: {sweep_seconds:7.1f}s = {sweep_seconds / seed_seconds:4.2f}x the seed's single fit, "
              f"{len(scores)} fits, best C {best:g}")


if __name__ == "__main__":
    main()
