"""The zero-shot fast path (``scored_blocks``): float16 rows cast by torch into a reused buffer, logits into
another, the next block read in a background thread. Same numbers as the dense softmax; a damaged shard is
raised in its turn; the reader thread never outlives the scoring."""

from __future__ import annotations

import os
import sys
import threading
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from featstore.errors import FeatstoreError
from featstore.evaluate import zeroshot as zs
from featstore.labels import load_label_index
from featstore.store import Store

ROWS, CLASSES, DIM = 500, 7, 16


@pytest.fixture(scope="module")
def store() -> Store:
    """ROWS random float16 rows in 120-row shards, labels among CLASSES classes (the zero-shot bench's builder)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import tempfile

    from zeroshot_bench import BENCH_MODEL, synthetic_store

    with tempfile.TemporaryDirectory() as root:
        synthetic_store(root, {"test": ROWS}, CLASSES, {**BENCH_MODEL, "dim": DIM}, shard_rows=120)
        yield Store.open(root)


def reader_threads() -> int:
    return sum(t.name.startswith(("featstore-read", "featstore-score")) for t in threading.enumerate())


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(zs, "BLOCK_SCORES", 45 * CLASSES)  # 45-row blocks: shards end mid-block, a short last block


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def threads(request):
    """Torch's thread count while scoring (one scorer per thread), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_scored_blocks_equal_the_dense_softmax(store, small_blocks, threads):
    import pyarrow as pa
    import torch

    pool = pa.default_memory_pool().backend_name
    index, _ = load_label_index(store)
    ids, x, labels = store.features("test")
    classes = index.reconstruct_n(0, index.ntotal)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    dense = np.exp(100 * unit @ classes.T)
    dense /= dense.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's read-only-array warning is not shown
        blocks = list(zs.scored_blocks(store, "test", zs.logit_matrix(index), 3))
    assert len(blocks) > ROWS // 120 and max(len(b[0]) for b in blocks) == 45 and reader_threads() == 0
    assert sum((b[0].to_pylist() for b in blocks), []) == ids
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), labels)
    top = np.concatenate([b[2] for b in blocks])
    np.testing.assert_array_equal(top, np.argsort(-dense, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(np.concatenate([b[3] for b in blocks]), np.take_along_axis(dense, top, axis=1),
                               rtol=1e-4, atol=1e-7)
    assert torch.get_num_threads() == threads and pa.default_memory_pool().backend_name == pool  # restored


def test_a_damaged_shard_is_raised_in_its_turn_and_the_reader_stops(store, small_blocks):
    index, _ = load_label_index(store)
    classes = zs.logit_matrix(index)
    blocks = zs.scored_blocks(store, "test", classes, 3)
    next(blocks)
    blocks.close()  # the caller stops early (its --out failed): the read under way ends, nothing more is read
    assert reader_threads() == 0

    all_ids = store.features("test")[0]
    last = store.sorted_runs("test")[-1][-1]
    saved, st = open(last, "rb").read(), os.stat(last)
    chunk = pq.read_metadata(last).row_group(0).column(3)  # the embeddings
    at = chunk.data_page_offset + chunk.total_compressed_size // 2
    try:
        with open(last, "r+b") as f:  # a flipped byte in the last shard's embedding pages, size and mtime kept:
            f.seek(at)                # only its page checksum, checked as it is read, tells
            f.write(bytes([saved[at] ^ 0xFF]))
        os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns))
        seen = []
        with pytest.raises(FeatstoreError, match="is damaged"):
            for ids, *_ in zs.scored_blocks(store, "test", classes, 3):
                seen += ids.to_pylist()
        assert seen == all_ids[:ROWS - pq.read_metadata(last).num_rows]  # every row before the damaged shard, in order
        assert reader_threads() == 0
    finally:
        with open(last, "wb") as f:
            f.write(saved)
