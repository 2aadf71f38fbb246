"""How much memory listing a manifest takes: featstore's sorted runs against reading the manifest whole.

    .venv/bin/python bench/manifest_bench.py [ROWS [SORT_ROWS]]       (default 3000000, ROWS/20)

Writes a Parquet manifest of ROWS shuffled paths with labels (the files need not exist: listing only stats
them), then prints the peak RSS of a process that lists it in id order with featstore (``ManifestSource``:
sorted runs of SORT_ROWS rows, spilled and merged; featstore's own runs are 1 Mi rows, smaller here so that
both sizes spill) and of one that reads it whole with ``pyarrow.parquet.read_table`` and sorts it (the
reference: what a notebook, or featstore before the runs, holds), for ROWS/10 and for ROWS rows; the growth
per row between the two sizes is what grows with the manifest.
"""

import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_bench import peak_rss_mib  # noqa: E402
from featstore.hardware import capability_line  # noqa: E402

LIST = ("import sys; from featstore.sources import ManifestSource; ManifestSource.SORT_ROWS = int(sys.argv[3]); "
        "n = sum(1 for _ in ManifestSource(sys.argv[1]).iter_items()); assert n == int(sys.argv[2])")
READ_WHOLE = ("import sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1]); "
              "t = t.sort_by('path'); assert t.num_rows == int(sys.argv[2])")


def write_manifest(path: str, rows: int) -> None:
    order = np.random.default_rng(0).permutation(rows)
    paths = pa.array([f"class_{i % 100:03d}/{i // 1000:06d}/img_{i:09d}.jpg" for i in order.tolist()])
    labels = pa.array([f"class_{i % 100:03d}" for i in order.tolist()])
    pq.write_table(pa.table({"path": paths, "label": labels}), path)


def main() -> None:
    print(capability_line(), flush=True)
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 3_000_000
    sort_rows = int(sys.argv[2]) if len(sys.argv) > 2 else rows // 20
    print(f"featstore sorts runs of {sort_rows:,} rows")
    with tempfile.TemporaryDirectory(prefix="featstore-manifest-bench-") as root:
        peaks: dict[str, list[float]] = {"featstore": [], "reference": []}
        for n in (rows // 10, rows):
            manifest = os.path.join(root, f"m{n}.parquet")
            write_manifest(manifest, n)
            for what, code in (("featstore", LIST), ("reference", READ_WHOLE)):
                start = time.perf_counter()
                peaks[what].append(peak_rss_mib([sys.executable, "-c", code, manifest, str(n), str(sort_rows)]))
                print(f"{what:9s} {n:>10,} rows: peak RSS {peaks[what][-1]:6.0f} MiB ({time.perf_counter() - start:.1f} s)")
        growth = {what: (p[1] - p[0]) * 1024 * 1024 / (rows - rows // 10) for what, p in peaks.items()}
        print(f"growth per row from {rows // 10:,} to {rows:,} rows: featstore {growth['featstore']:.0f} B, "
              f"reference (read whole) {growth['reference']:.0f} B = {growth['featstore'] / growth['reference']:.2f}x")


if __name__ == "__main__":
    main()
