"""`featstore compact` against the obvious alternative: read the whole split, sort it, write it back.

    .venv/bin/python bench/compact_bench.py [RUNS [ROWS_PER_RUN]]       (default 8 and 25000)

Builds a split of RUNS interleaved sorted runs (ROWS_PER_RUN rows each, ImageNet-like ids, random float16
512-d embeddings, 50,000-row shards) and compacts it into one run, two ways, each in its own process: with
`featstore compact`, which merges the runs batch by batch and holds about one output shard, and with
`pyarrow.parquet.read_table` of the split's folder, a sort by id and `write_table` in 50,000-row files, which
holds the split twice. Prints the peak RSS and time of each (fastest of 2) and their ratios; both results
hold the same rows in the same order.
"""

import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from featstore.hardware import capability_line  # noqa: E402
from featstore.store import Store, shard_schema  # noqa: E402
from probe_bench import peak_rss_mib  # noqa: E402

SHARD_ROWS = 50_000
MODEL = {"spec": "bench", "sha256": None, "architecture": "none", "preprocessing": "none", "precision": "fp32", "dim": 512,
         "random_weights": True}
REFERENCE = ("import os, sys, pyarrow.compute as pc, pyarrow.parquet as pq; "
             "table = pq.read_table(sys.argv[1]); table = table.take(pc.sort_indices(table, [('id', 'ascending')])); "
             "[pq.write_table(table.slice(start, 50000), os.path.join(sys.argv[2], f'part-{start}.parquet')) "
             "for start in range(0, table.num_rows, 50000)]")


def build(store_dir: str, runs: int, rows: int) -> None:
    """RUNS nights of ROWS rows whose ids interleave (night r: ids n*_r), committed the way encode does."""
    rng = np.random.default_rng(0)
    store = Store(store_dir)
    store.create(MODEL, "float16")
    schema = shard_schema(512, "float16", MODEL)
    with store.lock("compact_bench"):
        for night in range(runs):
            for start in range(0, rows, SHARD_ROWS):
                count = min(SHARD_ROWS, rows - start)
                ids = [f"train/n{k:08d}_{night:03d}.JPEG" for k in range(start, start + count)]
                embedding = pa.FixedSizeListArray.from_arrays(
                    pa.array(rng.standard_normal(count * 512).astype(np.float16)), 512)
                store.write_shard("train", pa.table({
                    "id": ids, "path": ids, "label": pa.array(rng.integers(0, 100, count), pa.int32()),
                    "embedding": embedding, "size": pa.array(rng.integers(10**4, 10**6, count)),
                    "mtime_ns": pa.array(rng.integers(10**18, 2 * 10**18, count)),
                    "sha256": [os.urandom(32).hex() for _ in range(count)],
                    "encoded_at": pa.array([1_700_000_000_000] * count, pa.timestamp("ms", tz="UTC")),
                }, schema=schema))


def measure(command: list[str], reset) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of COMMAND, fastest of 2, RESET run before each."""
    results = []
    for _ in range(2):
        reset()
        started = time.perf_counter()
        peak = peak_rss_mib(command)
        results.append((peak, time.perf_counter() - started))
    return min(r[0] for r in results), min(r[1] for r in results)


def main() -> None:
    print(capability_line(), flush=True)
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 25_000
    with tempfile.TemporaryDirectory(prefix="featstore-compact-") as root:
        pristine, store, out = (os.path.join(root, name) for name in ("pristine", "store", "out"))
        build(pristine, runs, rows)
        folder = os.path.join(store, "images", "split=train")

        def fresh_store():
            shutil.rmtree(store, ignore_errors=True)
            shutil.copytree(pristine, store)

        def fresh_out():
            fresh_store()
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)

        assert len(Store(pristine).sorted_runs("train")) == runs
        mine = measure([sys.executable, "-m", "featstore", "compact", store, "--quiet"], fresh_store)
        compacted = pq.read_table(folder).sort_by("id")
        assert len(Store(store).sorted_runs("train")) == 1
        reference = measure([sys.executable, "-c", REFERENCE, folder, out], fresh_out)
        assert pq.read_table(out).sort_by("id").equals(compacted)
    print(f"{runs} runs x {rows} rows, 512-d float16: featstore compact {mine[0]:.0f} MiB, {mine[1]:.1f}s; "
          f"read_table + sort + write {reference[0]:.0f} MiB, {reference[1]:.1f}s; "
          f"ratios: peak RSS {mine[0] / reference[0]:.2f}x, time {mine[1] / reference[1]:.2f}x")


if __name__ == "__main__":
    main()
