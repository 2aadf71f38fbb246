"""How long an unchanged nightly rerun takes: N small files, encoded once, then encoded again.

    .venv/bin/python bench/rerun_bench.py [N]       (default 100000)

Prints the first (full) encode time and the rerun time, and checks that the rerun rewrote no shard; then the
peak RSS of `featstore encode` (its own process) over N/10 and over N of the files, first encode, unchanged
rerun, a rerun after every file's bytes changed and one after every file's mtime changed (same bytes, as a
restore from backup leaves them), to show how much of encode's memory grows with the dataset. The files lie
in folders of 1,000 (a folder walk holds one folder's entries at a time); manifests have their own bench
(manifest_bench.py).
"""

import hashlib
import itertools
import os
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from featstore.encode import encode  # noqa: E402
from featstore.hardware import capability_line  # noqa: E402
from probe_bench import peak_rss_mib  # noqa: E402

PER_FOLDER = 1000
SHADES = itertools.count(8)  # each rewrite of the files gives them new bytes


def encode_peak_rss(src: str, root: str) -> tuple[float, float, float, float]:
    """Peak RSS (MiB) of a first encode of SRC, of an unchanged rerun of it, of a rerun after every file
    changed and of one after every file was touched; shards of 5,000 rows, so the shard being filled weighs
    the same at every size and a difference between sizes is what grows per file."""
    command = [sys.executable, "-m", "featstore", "encode", src, "--store", tempfile.mkdtemp(dir=root),
               "--split", "train", "--model", "random:tiny", "--batch-size", "256", "--workers", "2",
               "--shard-rows", "5000", "--quiet"]
    first, unchanged = peak_rss_mib(command), peak_rss_mib(command)
    draw_files(src, shade=next(SHADES))
    changed = peak_rss_mib(command)
    touch_files(src)
    return first, unchanged, changed, peak_rss_mib(command)


def draw_files(src: str, shade: int) -> None:
    """(Re)write every PNG under SRC, its colour set by its number and SHADE."""
    for folder, _, names in os.walk(src):
        for name in names:
            i = int(name.split(".")[0])
            Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, shade)).save(os.path.join(folder, name))


def touch_files(src: str) -> None:
    """Give every file under SRC a new mtime, leaving its bytes alone."""
    later = time.time_ns() + 10**9
    for folder, _, names in os.walk(src):
        for name in names:
            os.utime(os.path.join(folder, name), ns=(later, later))


def main() -> None:
    print(capability_line(), flush=True)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory(prefix="featstore-rerun-") as root:
        measure(n, root)


def measure(n: int, root: str) -> None:
    src, small = os.path.join(root, "src"), os.path.join(root, "small")  # SMALL: the first N/10 files, linked
    for i in range(n):
        folder = os.path.join(f"class_{i % 10}", f"{i // (10 * PER_FOLDER):04d}")
        os.makedirs(os.path.join(src, folder), exist_ok=True)
        open(os.path.join(src, folder, f"{i:07d}.png"), "wb").close()
        if i < n // 10:
            os.makedirs(os.path.join(small, folder), exist_ok=True)
            os.link(os.path.join(src, folder, f"{i:07d}.png"), os.path.join(small, folder, f"{i:07d}.png"))
    draw_files(src, shade=7)  # rewritten in place: SMALL's links see the same bytes
    store = os.path.join(root, "store")
    t0 = time.perf_counter()
    first = encode(src, store, "train", model="random:tiny", batch_size=256, workers=2, progress=False)
    t1 = time.perf_counter()
    digest = lambda: {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()  # noqa: E731
                      for d, _, fs in os.walk(os.path.join(store, "images")) for f in fs}
    before = digest()
    t2 = time.perf_counter()
    again = encode(src, store, "train", model="random:tiny", batch_size=256, workers=2, progress=False)
    t3 = time.perf_counter()
    assert digest() == before and again["encoded"] == 0 and again["shards_written"] == 0
    print(f"files {n}: first encode {t1 - t0:.1f}s ({first['img_per_s']} img/s), "
          f"unchanged rerun {t3 - t2:.2f}s (encoded {again['encoded']}, shards rewritten 0)")
    # peaks vary by tens of MiB: alternate sizes
    growth = {"first encode": [], "unchanged rerun": [], "rerun, every file changed": [],
              "rerun, every file touched": []}
    for _ in range(3):
        small_peaks, large_peaks = encode_peak_rss(small, root), encode_peak_rss(src, root)
        for k, what in enumerate(growth):
            growth[what].append(((large_peaks[k] - small_peaks[k]) * 1024 / (n - n // 10), small_peaks[k], large_peaks[k]))
    for what, runs in growth.items():
        per_file = sorted(r[0] for r in runs)
        median = sorted(runs)[1]
        print(f"peak RSS of {what}: {median[1]:.0f} MiB for {n // 10} files, {median[2]:.0f} MiB for {n}: "
              f"{per_file[1]:.2f} KiB more per file (median of 3; {per_file[0]:.2f} to {per_file[2]:.2f})")


if __name__ == "__main__":
    main()
