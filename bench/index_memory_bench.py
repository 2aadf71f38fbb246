"""Image index build memory: peak RSS of ``featstore index STORE --split NAME --max-memory BUDGET`` at a fixed
budget over splits of growing size (goal: within the budget plus a fixed cost, not growing with the split).

    .venv/bin/python bench/index_memory_bench.py [--rows 250000,1000000] [--budget 64M] [--dim 512]

Each split is written through encode's shard writer (float16, clustered CLIP-like vectors from
featstore.index.synthetic, 50,000-row shards) into its own store; the command runs as a child process whose
peak RSS (VmHWM) is read by a wrapper that is its only parent. Also printed: the same command's peak on a
1,000-row split (a Flat index: the interpreter and libraries, the fixed cost's floor), the chosen kind, the
index's bytes, and peak RSS minus the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
from featstore.hardware import capability_line  # noqa: E402
from featstore.index.build import parse_size  # noqa: E402
from featstore.index.synthetic import clip_like  # noqa: E402
from zeroshot_bench import BENCH_MODEL, load_average, synthetic_store  # noqa: E402

WRAPPER = """import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr[-2000:])
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "index": json.loads(done.stdout)}))
"""


def measured(store: str, budget: str) -> dict:
    """Peak RSS and ``--json`` summary of one ``featstore index`` run on STORE's split ``train``."""
    import subprocess

    command = [sys.executable, "-m", "featstore", "index", store, "--split", "train", "--max-memory", budget, "--json"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout) | {"seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="250000,1000000")
    parser.add_argument("--budget", default="64M", help="--max-memory, the same for every size")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    print(capability_line(), flush=True)
    budget_mib = parse_size(args.budget) / 2**20
    print(f"featstore index --max-memory {args.budget} ({budget_mib:.0f} MiB), dim {args.dim}, "
          f"{os.cpu_count()} CPUs", flush=True)
    for rows in [1000, *(int(r) for r in args.rows.split(","))]:
        with tempfile.TemporaryDirectory() as root:
            store = os.path.join(root, "store")
            stream = clip_like(rows, args.dim, seed=0)
            synthetic_store(store, {"train": rows}, 10, {**BENCH_MODEL, "dim": args.dim},
                            vectors=lambda split, start, n: stream.batch_at(start, n)[1])
            result = measured(store, args.budget)
        index, peak = result["index"], result["peak_rss_mib"]
        print(f"{rows:>10,} rows: peak RSS {peak:7.0f} MiB = budget + {peak - budget_mib:5.0f} MiB; "
              f"{index['kind']:32} {index['bytes'] / 2**20:6.1f} MiB, recall@10 {index['recall_at_10']:.3f}, "
              f"{result['seconds']:.0f} s ({load_average()})", flush=True)


if __name__ == "__main__":
    main()
