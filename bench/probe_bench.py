"""Linear probe against the seed's sklearn call, on the same features, in one run; and the probe's peak memory.

    .venv/bin/python bench/probe_bench.py [--n-train 50000] [--n-test 10000] [--dim 512] [--classes 100]
                                          [--no-sweep] [--no-memory] [--rounds 3]

Features imitate raw CLIP image features (CIFAR-100's train shape by default): norm ~8, a shared offset,
class means inside the high-variance directions, and a power-law spectrum (condition number ~1e5), so
sklearn's L-BFGS needs hundreds of iterations and test accuracy is ~80 %, not a separable toy.

Prints seconds, iterations and test accuracy for the seed's ``LogisticRegression(random_state=0, C=0.316,
max_iter=1000)`` and featstore's probe at C=0.316, then featstore's C sweep (validation split + refit) against
the seed's single fit, then the peak RSS of ``featstore probe`` on a store holding the same features, against
the float32 train matrix.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from featstore.hardware import capability_line  # noqa: E402
from featstore.probe import accuracy, fit, sweep_C, validation_split  # noqa: E402
from featstore.store import Store  # noqa: E402


def clip_like_features(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    geometry = np.random.default_rng(1234)  # shared by train and test
    rotation, _ = np.linalg.qr(geometry.normal(size=(dim, dim)))
    spread = np.arange(1, dim + 1) ** -2.0
    spread *= 8.0 / np.sqrt((spread ** 2).sum())
    means = geometry.normal(size=(classes, 64)) @ (geometry.normal(size=(64, dim)) * spread)
    means *= 0.06 * 8.0 / np.linalg.norm(means, axis=1).mean()
    offset = geometry.normal(size=dim)
    offset *= 3.0 / np.linalg.norm(offset)
    sample = np.random.default_rng(seed)
    labels = sample.integers(0, classes, size=n)
    noise = (sample.normal(size=(n, dim)) * spread) @ rotation.T
    return (offset + means[labels] + noise).astype(np.float32), labels


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def write_store(root: str, x_train, y_train, x_test, y_test) -> None:
    """A store holding these features, written by encode's own shard writer (10,000-row shards)."""
    from featstore.encode.plan import Plan
    from featstore.encode.writer import ShardWriter
    from featstore.sources import Item

    store = Store(root)
    store.create({"spec": "bench", "sha256": None, "architecture": "none", "preprocessing": "none", "precision": "fp32", "dim": x_train.shape[1]}, "float32")
    label_ids = store.class_ids([f"class {i}" for i in range(int(y_train.max()) + 1)])
    with store.lock("bench"):
        for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            store.split_info(split, create=True)
            writer = ShardWriter(store, split, Plan(), label_ids, shard_rows=10_000)
            items = [Item(f"{split}/{i:07d}", "", f"class {label}", 0, 0) for i, label in enumerate(y)]
            writer.add(items, x, [""] * len(items), [])
            writer.close()


def peak_rss_mib(command: list[str]) -> float:
    """Peak RSS of COMMAND, read from a wrapper process whose only child it is."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    return float(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="small/large pairs of memory runs")
    args = parser.parse_args()
    print(capability_line(), flush=True)
    import torch  # imported before the clocks start: start-up cost, not fit time, on both sides
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = clip_like_features(args.n_train, args.dim, args.classes, 1)
    x_test, y_test = clip_like_features(args.n_test, args.dim, args.classes, 2)
    classes = np.arange(args.classes)
    print(f"features: train {x_train.shape}, test {x_test.shape}, {args.classes} classes, float32, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")

    seed, seed_s = timed(LogisticRegression(random_state=0, C=0.316, max_iter=1000).fit, x_train, y_train)
    seed_acc = float((seed.predict(x_test) == y_test).mean())
    print(f"seed sklearn C=0.316        {seed_s:7.1f} s  {int(seed.n_iter_[0]):4d} iterations  acc {100 * seed_acc:.2f}%")

    mine, mine_s = timed(fit, x_train, y_train, classes, 0.316, 1000)
    acc = accuracy(mine, x_test, y_test)
    print(f"featstore probe --C 0.316   {mine_s:7.1f} s  {mine.n_iter_:4d} iterations  acc {100 * acc:.2f}% "
          f"({100 * (acc - seed_acc):+.2f} points)  -> {seed_s / mine_s:.2f}x faster (goal 3x)")

    if not args.no_sweep:
        def sweep_and_refit():
            fit_rows, val_rows = validation_split(y_train)
            best, scores, warm = sweep_C(x_train[fit_rows], y_train[fit_rows], x_train[val_rows], y_train[val_rows],
                                         classes, 1000)
            return best, scores, fit(x_train, y_train, classes, best, 1000, warm=warm)

        (best, scores, swept), sweep_s = timed(sweep_and_refit)
        print(f"featstore C sweep + refit   {sweep_s:7.1f} s  {len(scores)} fits, best C {best:g}, "
              f"acc {100 * accuracy(swept, x_test, y_test):.2f}%  -> {sweep_s / seed_s:.2f}x the seed's single fit "
              f"(goal < 3x)")
        print("  validation accuracy by C: " + ", ".join(f"{c:g}: {100 * s:.1f}%" for c, s in sorted(scores.items())))

    if not args.no_memory:
        # Fixed costs (interpreter, libraries' code pages, allocator and thread-pool arenas: ~900 MiB with
        # torch and sklearn) are measured as the same command's peak on a store of 1,000 rows; the rest is what
        # grows with the data. The fixed part varies by tens of MiB from run to run, so small and large runs
        # alternate for --rounds rounds and the median growth is reported with the range.
        small_x, small_y = clip_like_features(1000, args.dim, args.classes, 3)
        matrix = x_train.nbytes / 2 ** 20
        with tempfile.TemporaryDirectory() as small, tempfile.TemporaryDirectory() as large:
            write_store(small, small_x, small_y, small_x, small_y)
            write_store(large, x_train, y_train, x_test, y_test)
            for label, extra in (("--C 0.316", ["--C", "0.316"]), ("C sweep", [])):
                if label == "C sweep" and args.no_sweep:
                    continue
                growth = []
                for _ in range(args.rounds):
                    small_peak, large_peak = (
                        peak_rss_mib([sys.executable, "-m", "featstore", "probe", root, "--train-split", "train",
                                      "--test-split", "test", "--device", "cpu", *extra]) for root in (small, large))
                    growth.append(large_peak - small_peak)
                median = float(np.median(growth))
                print(f"peak RSS probe {label:10s} {large_peak:7.0f} MiB, {small_peak:.0f} MiB on 1,000 rows: grows by "
                      f"{median:.0f} MiB (median of {args.rounds}; {min(growth):.0f}-{max(growth):.0f}) = "
                      f"{median / matrix:.2f}x the {matrix:.0f} MiB float32 train matrix (goal <= 1.5x)")


if __name__ == "__main__":
    main()
