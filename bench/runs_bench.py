"""How a rerun's memory grows with a split's sorted runs of shards, and what compaction gives back.

    .venv/bin/python bench/runs_bench.py [NIGHTS [FILES_PER_NIGHT]]       (default 32 and 8000)

NIGHTS encodes (random:tiny, 50,000-row shards) each add FILES_PER_NIGHT files whose ids fall among the stored
ones, so each night leaves one more sorted run (encode's own compaction past 16 runs is held off here). Prints
the peak RSS and time of an unchanged rerun's walk (``make_plan`` over the listing and the split, in its own
process: a whole rerun's peak is set earlier, by torch and the model, which hides the walk) after NIGHTS/4
nights and after NIGHTS nights, the growth per run, then `featstore compact`'s time and the walk after it.
"""

import os
import subprocess
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import featstore.encode  # noqa: E402
from featstore.hardware import capability_line  # noqa: E402
from featstore.store import Store  # noqa: E402

PER_FOLDER = 100  # files of one night per folder: night r adds FOLDER/K_r.png to every folder


def add_night(src: str, night: int, files: int) -> None:
    for k in range(files):
        folder = os.path.join(src, f"{k // PER_FOLDER:05d}")
        os.makedirs(folder, exist_ok=True)
        Image.new("RGB", (8, 8), (k % 256, night % 256, 7)).save(os.path.join(folder, f"{k:06d}_{night:04d}.png"))


WALK = ("import re, sys, time; from featstore.encode.plan import make_plan; from featstore.sources import open_source; "
        "from featstore.store import Store; store = Store(sys.argv[2]); source = open_source(sys.argv[1], 'train'); "
        "started = time.perf_counter(); "
        "plan = make_plan(store, 'train', source.iter_items(), source, store.class_ids(source.classes())); "
        "assert plan.unchanged and not len(plan.to_encode) and not len(plan.changes); plan.discard(); "
        "seconds = time.perf_counter() - started; "  # VmHWM, unlike ru_maxrss, does not inherit the parent's peak
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) / 1024, seconds)")


def walk(src: str, store: str) -> tuple[float, float]:
    """Peak RSS (MiB, median of 3) and seconds (fastest of 3) of an unchanged rerun's walk."""
    runs = [subprocess.run([sys.executable, "-c", WALK, src, store], capture_output=True, text=True, check=True)
            for _ in range(3)]
    peaks, seconds = zip(*(map(float, run.stdout.split()) for run in runs))
    return sorted(peaks)[1], min(seconds)


def main() -> None:
    print(capability_line(), flush=True)
    nights = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    files = int(sys.argv[2]) if len(sys.argv) > 2 else 8000
    featstore.encode.AUTO_RUNS = sys.maxsize  # keep every night's run
    with tempfile.TemporaryDirectory(prefix="featstore-runs-") as root:
        src, store = os.path.join(root, "src"), os.path.join(root, "store")
        peaks = {}
        for night in range(nights):
            add_night(src, night, files)
            featstore.encode.encode(src, store, "train", model="random:tiny", batch_size=256, workers=2, progress=False)
            if night + 1 in (nights // 4, nights):
                runs = len(Store(store).sorted_runs("train"))
                peaks[runs], seconds = walk(src, store)
                print(f"{night + 1} nights ({(night + 1) * files} files): {runs} sorted runs; an unchanged rerun's walk "
                      f"peaks at {peaks[runs]:.0f} MiB, {seconds:.2f}s", flush=True)
        (few, low), (many, high) = sorted(peaks.items())
        print(f"growth: {(high - low) * 1024 / (many - few):.0f} KiB per sorted run")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "featstore", "compact", store, "--quiet"], check=True, stdout=subprocess.DEVNULL)
        compacted = time.perf_counter() - started
        peak, seconds = walk(src, store)
        print(f"featstore compact: {many} runs -> {len(Store(store).sorted_runs('train'))} in {compacted:.1f}s; "
              f"the walk then peaks at {peak:.0f} MiB ({high - peak:.0f} less), {seconds:.2f}s")


if __name__ == "__main__":
    main()
