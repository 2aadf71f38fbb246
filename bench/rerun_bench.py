"""How long an unchanged nightly rerun takes: N small files, encoded once, then encoded again.

    .venv/bin/python bench/rerun_bench.py [N]       (default 100000)

Prints the first (full) encode time and the rerun time, and checks that the rerun rewrote no shard.
"""

import hashlib
import os
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from featstore.encode import encode  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    root = tempfile.mkdtemp(prefix="featstore-rerun-")
    src = os.path.join(root, "src")
    for c in range(10):
        os.makedirs(os.path.join(src, f"class_{c}"))
    for i in range(n):
        Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 7)).save(os.path.join(src, f"class_{i % 10}", f"{i:07d}.png"))
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


if __name__ == "__main__":
    main()
