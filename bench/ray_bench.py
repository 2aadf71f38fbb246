"""The Ray engine against the local one: whole-process time of ``featstore encode``, split into a fixed
start-up cost and a per-image cost.

    .venv/bin/python bench/ray_bench.py [--n 600] [--small 60] [--model random:ViT-B/32] [--rounds 1]

Makes N and SMALL 32x32 PNGs (encode_bench's images), then times, in fresh processes and rounds interleaved,
``featstore encode IMAGES --engine local|ray --precision fp32`` into a new store at both sizes (the Ray engine
starts its own local instance, as a laptop or a CI run does). Each engine's time is fitted as
``fixed + per_image x images`` from its fastest round at each size: fixed is start-up (imports, Ray's start,
model loads), per_image the cost of each image once running. The goal is a per-image overhead of at most 10 %.
Each round's line gives the 1-minute load average after it: other work on the machine slows both engines, the
local one most (its decoders wait for the model's pauses), so compare figures taken at the same load.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from encode_bench import make_images  # noqa: E402

from featstore.hardware import capability_line  # noqa: E402


def run(images: str, store: str, engine: str, model: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "featstore", "encode", images, "--store", store, "--split", "train",
                    "--model", model, "--precision", "fp32", "--engine", engine, "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--small", type=int, default=60)
    parser.add_argument("--model", default="random:ViT-B/32")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(capability_line(), flush=True)
    sizes = (args.small, args.n)
    best: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="featstore-ray-") as root:
        for n in sizes:
            make_images(os.path.join(root, f"images{n}"), "cifar", n)
        for round_ in range(args.rounds):
            for n in sizes:
                for engine in ("local", "ray"):
                    seconds = run(os.path.join(root, f"images{n}"), os.path.join(root, f"store-{engine}-{n}-{round_}"),
                                  engine, args.model)
                    best[engine, n] = min(best.get((engine, n), seconds), seconds)
                    print(f"round {round_ + 1}: {engine:5s} {n:5d} images {seconds:7.2f} s (load average "
                          f"{os.getloadavg()[0]:.2f})", flush=True)
    fits = {}
    for engine in ("local", "ray"):
        per_image = (best[engine, args.n] - best[engine, args.small]) / (args.n - args.small)
        fits[engine] = (best[engine, args.small] - per_image * args.small, per_image)
        print(f"{engine:5s}: {best[engine, args.n]:.2f} s for {args.n} images = fixed {fits[engine][0]:.2f} s "
              f"+ {1000 * per_image:.1f} ms/image ({1 / per_image:.1f} img/s once running)")
    (local_fixed, local_each), (ray_fixed, ray_each) = fits["local"], fits["ray"]
    print(f"ray against local: whole process {best['ray', args.n] / best['local', args.n]:.2f}x; fixed start-up "
          f"+{ray_fixed - local_fixed:.2f} s ({ray_fixed / local_fixed:.2f}x); per-image overhead "
          f"{100 * (ray_each / local_each - 1):+.1f} % (goal <= +10 %)")


if __name__ == "__main__":
    main()
