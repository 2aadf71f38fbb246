"""The few-shot probe curve (``featstore probe --shots 1,2,4,8,16 --seeds 5``) against sklearn's
``LogisticRegression`` doing the same fits on the same rows.

    .venv/bin/python bench/fewshot_bench.py [--n-train 50000] [--n-test 10000] [--dim 512] [--classes 100]
                                            [--shots 1,2,4,8,16] [--seeds 5]

Features are probe_bench's CLIP-like ones, written into a store by encode's shard writer. featstore's side is
the whole library call (reading the drawn rows and the test split from the shards, 25 fits, 25 evaluations);
sklearn's side is ``LogisticRegression(random_state=0, C=0.316, max_iter=1000)`` on the same draws, with the
features already in memory. Prints both totals and the mean accuracy per shot count from each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from featstore.hardware import capability_line  # noqa: E402


def main() -> None:
    from probe_bench import clip_like_features, write_store
    from zeroshot_bench import load_average

    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--shots", default="1,2,4,8,16")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    print(capability_line(), flush=True)
    import torch
    from sklearn.linear_model import LogisticRegression

    from featstore.evaluate.fewshot import draw, fewshot, parse_shots

    shots = parse_shots(args.shots)
    x_train, y_train = clip_like_features(args.n_train, args.dim, args.classes, 1)
    x_test, y_test = clip_like_features(args.n_test, args.dim, args.classes, 2)
    print(f"features: train {x_train.shape}, test {x_test.shape}, {args.classes} classes; shots {shots} x "
          f"{args.seeds} seeds; {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as store:
        write_store(store, x_train, y_train, x_test, y_test)
        fewshot(store, "train", "test", shots[:1], seeds=1, device="cpu")  # warm: imports, first torch calls
        start = time.perf_counter()
        mine = fewshot(store, "train", "test", shots, seeds=args.seeds, device="cpu")
        mine_s = time.perf_counter() - start
        mine_load = load_average()

    # the store's labels are y_train in id order (ids are the row numbers), so draws index x_train directly
    warnings.simplefilter("ignore")  # 1-shot: sklearn warns that classes outnumber half the rows
    start = time.perf_counter()
    theirs = {k: [] for k in shots}
    for seed in range(args.seeds):
        for k, rows in draw(y_train, shots, seed).items():
            fitted = LogisticRegression(random_state=0, C=0.316, max_iter=1000).fit(x_train[rows], y_train[rows])
            theirs[k].append(float((fitted.predict(x_test) == y_test).mean()))
    sklearn_s = time.perf_counter() - start
    fits = len(shots) * args.seeds
    print(f"featstore probe --shots   {mine_s:7.1f} s for {fits} fits (reading the shards included; {mine_load})")
    print(f"sklearn LogisticRegression {sklearn_s:6.1f} s for the same {fits} fits -> featstore {sklearn_s / mine_s:.2f}x "
          f"faster ({load_average()})")
    for entry in mine["fewshot"]:
        k = entry["shots"]
        print(f"  {k:3d}-shot: featstore {100 * entry['acc1_mean']:.2f}% (sd {100 * entry['acc1_std']:.2f}), "
              f"sklearn {100 * np.mean(theirs[k]):.2f}% (sd {100 * np.std(theirs[k], ddof=1):.2f})")


if __name__ == "__main__":
    main()
