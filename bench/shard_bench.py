"""featstore's shard encoding against pyarrow's defaults, on one realistic shard.

    .venv/bin/python bench/shard_bench.py [ROWS]        (default 50000, encode's --shard-rows)

Builds a shard like encode's (ImageNet-like ids and paths, random float16 512-d embeddings, random sizes,
mtimes and sha256 hex, 100 labels) and writes it with featstore's ``write_parquet`` and with
``pyarrow.parquet.write_table``'s defaults (dictionary encoding on every column). Prints the file size, the
write time, the time to read the embeddings (what probe and query do), and the Arrow memory a rerun's walk
holds per sorted run (featstore's reader of the four small columns and its first 4,096-row batch); fastest
of 3.
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from featstore.hardware import capability_line  # noqa: E402
from featstore.store import shard_schema, write_parquet  # noqa: E402

WALK = ("import sys, pyarrow as pa; from featstore.store import run_batches; "  # featstore's reader, either file
        "batches = run_batches([sys.argv[1]], ['size', 'mtime_ns', 'label']); "
        "first = next(batches); print(pa.total_allocated_bytes())")


def shard(rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    ids = sorted(f"train/n{rng.integers(10**8):08d}/n{rng.integers(10**8):08d}_{i}.JPEG" for i in range(rows))
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(rows * 512).astype(np.float16)), 512)
    return pa.table({
        "id": ids, "path": ["/data/imagenet/" + i for i in ids], "label": pa.array(rng.integers(0, 100, rows), pa.int32()),
        "embedding": embedding, "size": pa.array(rng.integers(10**4, 10**6, rows)),
        "mtime_ns": pa.array(rng.integers(10**18, 2 * 10**18, rows)), "sha256": [os.urandom(32).hex() for _ in range(rows)],
        "encoded_at": pa.array([1_700_000_000_000] * rows, pa.timestamp("ms", tz="UTC")),
    }, schema=shard_schema(512, "float16", {}))


def measure(write, table: pa.Table, path: str) -> dict[str, float]:
    writes, reads = [], []
    for _ in range(3):
        started = time.perf_counter()
        write(table, path)
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        pq.read_table(path, columns=["embedding"])
        reads.append(time.perf_counter() - started)
    held = subprocess.run([sys.executable, "-c", WALK, path], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {"MB": os.path.getsize(path) / 1e6, "write s": min(writes), "read embeddings s": min(reads),
            "walk holds MiB": int(held.stdout) / 2**20}


def main() -> None:
    print(capability_line(), flush=True)
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    table = shard(rows)
    with tempfile.TemporaryDirectory(prefix="featstore-shard-") as root:
        mine = measure(write_parquet, table, os.path.join(root, "featstore.parquet"))
        reference = measure(lambda t, p: pq.write_table(t, p), table, os.path.join(root, "pyarrow.parquet"))
    print(f"one shard of {rows} rows: featstore vs pyarrow's defaults")
    for what in mine:
        print(f"  {what:18} {mine[what]:8.3f} vs {reference[what]:8.3f}  = {mine[what] / reference[what]:.2f}x")


if __name__ == "__main__":
    main()
