"""Image index: featstore's `auto` index under a budget of 1/8 of float32 vs faiss IndexFlatIP and vs the key
autofaiss would choose for that budget, side by side on clustered CLIP-like vectors (featstore.index.synthetic).

Each variant builds in its own process (peak RSS = that process's VmHWM, data generated batch by batch, never
held). Reported: build time, peak RSS, index bytes, recall@10 against exact search on 1,000 fresh queries (plain,
and re-ranked exactly from the stored vectors, as the store can from its shards), queries per second; for `auto`
also a nightly update touching 1 % of the rows (half removed or changed, half new) against its full build.

    .venv/bin/python bench/index_bench.py --rows 1000000        # the issue's size; --rows 100000 to develop
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from featstore.hardware import capability_line  # noqa: E402


def autofaiss_key(rows: int, dim: int, budget: int) -> str:
    """The OPQ/IVF/PQ key autofaiss's get_optimal_quantization puts first for this budget (its rules, restated)."""
    lists = 2 ** round(math.log2(4 * math.sqrt(rows))) if rows < 1_000_000 else 16_384
    target = 4.0 * rows * dim / budget
    for m in (256, 128, 64, 48, 32, 24, 16, 8, 4):
        if m < dim and 4 * dim / (m + 8) >= target:
            y = (min(dim // m, 6) + 1) * m
            return f"OPQ{m}_{y},{'IVF%d_HNSW32' % lists if lists >= 1000 else 'IVF%d' % lists},PQ{m}x8"
    raise SystemExit("no autofaiss key fits")


def child(args) -> dict:
    import faiss

    import featstore.index as fi
    from featstore.index.synthetic import clip_like

    faiss.omp_set_num_threads(args.threads)
    stream = clip_like(args.rows, args.dim, seed=0, batch=16384)
    stored = np.load(args.vectors, mmap_mode="r")  # the store's rows on disk (float16), for exact re-ranking
    queries, exact = np.load(args.queries), np.load(args.exact)

    def rerank(keys):
        return np.asarray(stored[keys], dtype=np.float32)

    def recall(found):
        return float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(found, exact)]))

    start = time.perf_counter()
    if args.variant == "flat":
        index = faiss.IndexFlatIP(args.dim)
        for _, batch in stream:
            index.add(batch)
        info = {"kind": "IndexFlatIP", "bytes": index.ntotal * args.dim * 4}
    else:
        kind = "auto" if args.variant == "auto" else autofaiss_key(args.rows, args.dim, args.budget)
        index, info = fi.build(stream, args.rows, args.dim, kind=kind, max_memory=args.budget, rerank=rerank)
    out = {"variant": args.variant, "kind": info["kind"], "build_s": time.perf_counter() - start,
           "bytes": info["bytes"], "params": info.get("params", ""), "held_out": info.get("recall_at_10")}
    start = time.perf_counter()
    _, found = (index.search(queries, 10) if args.variant == "flat" else fi.search(index, queries, 10))
    out.update(qps=len(queries) / (time.perf_counter() - start), recall_at_10=recall(found))
    if args.variant != "flat":
        start = time.perf_counter()
        _, found = fi.search(index, queries, 10, rerank=rerank)
        out.update(qps_reranked=len(queries) / (time.perf_counter() - start), recall_reranked=recall(found))
    if args.variant == "auto":  # 1 %: 0.25 % removed, 0.25 % changed, 0.5 % new
        touched = args.rows // 100
        rng = np.random.default_rng(1)
        old = rng.choice(args.rows, touched // 2, replace=False)
        new_keys = np.arange(args.rows, args.rows + touched // 2)
        fresh = clip_like(touched, args.dim, seed=2, batch=touched)
        _, vectors = next(iter(fresh))
        start = time.perf_counter()
        fi.update(index, add=(np.concatenate([old[: touched // 4], new_keys]), vectors[: touched // 4 + len(new_keys)]),
                  remove=old[touched // 4:])
        out["update_s"] = time.perf_counter() - start
    with open("/proc/self/status") as f:  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak
        out["peak_rss_mib"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variant")
    parser.add_argument("--variants", default="flat,auto,autofaiss", help="which to build (flat is the reference)")
    parser.add_argument("--budget", type=int, help="bytes (default: 1/8 of the float32 size); fixed across --rows "
                        "to see that peak RSS does not grow with the split")
    parser.add_argument("--vectors")
    parser.add_argument("--queries")
    parser.add_argument("--exact")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return

    import featstore.index as fi
    from featstore.index.synthetic import clip_like

    print(capability_line())
    args.budget = args.budget or args.rows * args.dim * 4 // 8
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: os.path.join(tmp, f"{name}.npy") for name in ("vectors", "queries", "exact")}
        stored = np.lib.format.open_memmap(paths["vectors"], "w+", np.float16, (args.rows, args.dim))
        rng = np.random.default_rng(9)
        picks = np.sort(rng.choice(args.rows, 1000, replace=False))
        queries = []
        for keys, batch in clip_like(args.rows, args.dim, seed=0, batch=16384):
            stored[keys] = batch
            inside = picks[(picks >= keys[0]) & (picks <= keys[-1])]
            queries.append(batch[inside - keys[0]])
        stored.flush()
        queries = np.concatenate(queries) + 0.05 * rng.standard_normal((1000, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)  # fresh: near stored rows, not stored rows
        exact = fi.ExactTopK(np.full(1000, -2), queries, k=10)  # exact search over the stream, no row left out
        for keys, batch in clip_like(args.rows, args.dim, seed=0, batch=16384):
            exact.add(keys, batch)
        np.save(paths["queries"], queries)
        np.save(paths["exact"], exact.neighbours())
        rows = []
        for variant in dict.fromkeys(["flat", *args.variants.split(",")]):
            cmd = [sys.executable, __file__, "--variant", variant, "--rows", str(args.rows), "--dim", str(args.dim),
                   "--threads", str(args.threads), "--budget", str(args.budget)]
            cmd += [f"--{name}={path}" for name, path in paths.items()]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(result.stderr[-2000:])
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    flat = rows[0]
    print(f"{args.rows} x {args.dim} clustered vectors, budget {args.budget / 2**20:.1f} MiB "
          f"({args.budget / (args.rows * args.dim * 4):.3f} of float32), "
          f"{args.threads} threads")
    for r in rows:
        line = (f"{r['variant']:9} {r['kind']:38} build {r['build_s']:7.1f}s ({r['build_s'] / flat['build_s']:5.1f}x)"
                f"  peak RSS {r['peak_rss_mib']:7.0f} MiB ({r['peak_rss_mib'] / flat['peak_rss_mib']:.2f}x)"
                f"  bytes {r['bytes'] / 2**20:7.1f} MiB ({r['bytes'] / flat['bytes']:.3f}x)"
                f"  recall@10 {r['recall_at_10']:.3f}  {r['qps']:8.0f} q/s ({r['qps'] / flat['qps']:.1f}x)")
        if "recall_reranked" in r:
            line += (f"  re-ranked: recall@10 {r['recall_reranked']:.3f} {r['qps_reranked']:.0f} q/s  {r['params']}"
                     f" (held-out rows: {r['held_out']:.3f})")
        print(line)
    auto = next((r for r in rows if r["variant"] == "auto"), None)
    if auto is None:
        return
    print(f"update touching 1 % of rows: {auto['update_s']:.2f}s = {auto['update_s'] / auto['build_s']:.4f}x "
          f"the full build ({auto['build_s']:.1f}s)")


if __name__ == "__main__":
    main()
