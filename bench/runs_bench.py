"""How a rerun's memory grows with a split's sorted runs of shards, and what compaction gives back.

    .venv/bin/python bench/runs_bench.py [NIGHTS [FILES_PER_NIGHT]]       (default 64 and 1000)

NIGHTS encodes (random:tiny) each add FILES_PER_NIGHT files whose ids fall among the stored ones, so each
night leaves one more sorted run (encode's own compaction past 16 runs is held off here). Prints the peak RSS
of an unchanged rerun (`featstore encode` in its own process, median of 3) after NIGHTS/4 nights and after
NIGHTS nights, the growth per run, then `featstore compact`'s time and the rerun's peak and time after it.
"""

import os
import subprocess
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import featstore.encode  # noqa: E402
from featstore.store import Store  # noqa: E402
from probe_bench import peak_rss_mib  # noqa: E402

PER_FOLDER = 100  # files of one night per folder: night r adds FOLDER/K_r.png to every folder


def add_night(src: str, night: int, files: int) -> None:
    for k in range(files):
        folder = os.path.join(src, f"{k // PER_FOLDER:05d}")
        os.makedirs(folder, exist_ok=True)
        Image.new("RGB", (8, 8), (k % 256, night % 256, 7)).save(os.path.join(folder, f"{k:06d}_{night:04d}.png"))


def rerun(src: str, store: str) -> list[str]:
    return [sys.executable, "-m", "featstore", "encode", src, "--store", store, "--split", "train",
            "--model", "random:tiny", "--batch-size", "256", "--workers", "2", "--shard-rows", "5000", "--quiet"]


def median_peak(command: list[str]) -> float:
    return sorted(peak_rss_mib(command) for _ in range(3))[1]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    nights = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    files = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    featstore.encode.AUTO_RUNS = sys.maxsize  # keep every night's run
    with tempfile.TemporaryDirectory(prefix="featstore-runs-") as root:
        src, store = os.path.join(root, "src"), os.path.join(root, "store")
        peaks = {}
        for night in range(nights):
            add_night(src, night, files)
            featstore.encode.encode(src, store, "train", model="random:tiny", batch_size=256, workers=2,
                                    shard_rows=5000, progress=False)
            if night + 1 in (nights // 4, nights):
                runs = len(Store(store).sorted_runs("train"))
                peaks[runs] = median_peak(rerun(src, store))
                print(f"{night + 1} nights ({(night + 1) * files} files): {runs} sorted runs, unchanged rerun "
                      f"peak RSS {peaks[runs]:.0f} MiB", flush=True)
        (few, low), (many, high) = sorted(peaks.items())
        print(f"growth: {(high - low) * 1024 / (many - few):.0f} KiB per sorted run")
        before = timed(rerun(src, store))
        compact = [sys.executable, "-m", "featstore", "compact", store, "--quiet"]
        seconds = timed(compact)
        after_peak, after = median_peak(rerun(src, store)), timed(rerun(src, store))
        print(f"featstore compact: {many} runs -> {len(Store(store).sorted_runs('train'))} in {seconds:.1f}s; "
              f"unchanged rerun peak RSS {high:.0f} -> {after_peak:.0f} MiB, time {before:.2f} -> {after:.2f}s")


if __name__ == "__main__":
    main()
