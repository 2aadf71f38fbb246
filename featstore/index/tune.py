"""Recall against exact search, and search parameters tuned to a recall target.

recall@10 here is the strict one: the share of each query's exact 10 nearest rows (by cosine) that the index
returns among its 10, the query's own row left out of both, averaged over the queries.
"""

from __future__ import annotations

import numpy as np

K = 10
# The held-out queries are stored rows; a query from outside the split (a text, a new image) found ~0.01 less at
# the same setting (bench/index_bench.py, 1M rows: 0.942 on fresh queries where held-out rows gave 0.95), so
# the knob is tuned to the target plus this margin, and judged (``needs_retrain``) against the target itself.
MARGIN = 0.02
CHUNK = 2048  # rows ``ExactTopK.add`` scores at once: 8 MiB of float32 scores for 1,000 queries


class ExactTopK:
    """The exact K+1 nearest rows of fixed queries, merged batch by batch as the stream goes by."""

    def __init__(self, query_keys: np.ndarray, queries: np.ndarray, k: int = K):
        self.query_keys, self.queries, self.k = query_keys, queries, k + 1
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.keys = np.empty((len(queries), 0), np.int64)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Merge the rows KEYS, VECTORS, ``CHUNK`` rows at a time: each chunk's own K+1 best first (scores of
        queries x chunk), then those against the kept ones, so memory does not grow with the batch."""
        for start in range(0, len(keys), CHUNK):
            chunk_keys = keys[start:start + CHUNK]
            scores = self.queries @ vectors[start:start + CHUNK].T
            if scores.shape[1] > self.k:
                top = np.argpartition(scores, scores.shape[1] - self.k, axis=1)[:, -self.k:]
                scores, found = np.take_along_axis(scores, top, 1), chunk_keys[top]
            else:
                found = np.broadcast_to(chunk_keys, scores.shape)
            scores, found = np.concatenate([self.scores, scores], 1), np.concatenate([self.keys, found], 1)
            if scores.shape[1] > self.k:
                top = np.argpartition(scores, scores.shape[1] - self.k, axis=1)[:, -self.k:]
                scores, found = np.take_along_axis(scores, top, 1), np.take_along_axis(found, top, 1)
            self.scores, self.keys = scores, found

    def neighbours(self) -> np.ndarray:
        """Each query's exact K nearest keys, its own key left out (rows: queries; -1 pads short sets)."""
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return _drop_self(np.take_along_axis(self.keys, order, 1), self.query_keys, self.k - 1)


def _drop_self(keys: np.ndarray, query_keys: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(keys), k), -1, np.int64)
    for i, (row, own) in enumerate(zip(keys, query_keys)):
        row = row[(row != own) & (row >= 0)][:k]
        out[i, :len(row)] = row
    return out


def recall_at(index, queries: np.ndarray, query_keys: np.ndarray, exact: np.ndarray, k: int = K,
              rerank=None) -> float:
    """recall@k of INDEX's search (``search``'s RERANK) against EXACT (see the module's note), with the index's
    current parameters."""
    from .images import search

    _, found = search(index, queries, k + 1, rerank)
    found = _drop_self(found, query_keys, k)
    hits = [len(np.intersect1d(a[a >= 0], b[b >= 0])) / max(np.count_nonzero(b >= 0), 1)
            for a, b in zip(found, exact)]
    return float(np.mean(hits)) if hits else 1.0


def _knob(index) -> tuple[str, list[int]]:
    """The search parameter that trades speed for recall in INDEX, and the values to try, smallest first."""
    import faiss

    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    if isinstance(inner, faiss.IndexIVF):
        values = [v for v in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
                  if v < inner.nlist] + [inner.nlist]
        return "nprobe", values
    return "", []


def set_param(index, name: str, value: int) -> None:
    """Set NAME on INDEX (through IDMap and pre-transforms); nprobe on an HNSW-quantised IVF also widens the
    quantizer's efSearch to 2 nprobe (at least 64), as autofaiss does."""
    import faiss

    space = faiss.ParameterSpace()
    space.set_index_parameter(index, name, value)
    if name == "nprobe":
        try:
            space.set_index_parameter(index, "quantizer_efSearch", max(64, 2 * value))
        except RuntimeError:  # a flat quantizer has no efSearch
            pass


def tune(index, queries: np.ndarray, query_keys: np.ndarray, exact: np.ndarray, target: float = 0.95,
         rerank=None) -> str:
    """Set the smallest nprobe / efSearch whose recall@10 on QUERIES reaches TARGET + ``MARGIN`` (the largest
    tried when none does; ``needs_retrain`` then says so if it misses TARGET). Binary search: recall grows with the knob. Returns
    ``"name=value"``, or ``""`` for an exact index."""
    name, values = _knob(index)
    if not name:
        return ""
    low, high = 0, len(values) - 1
    while low < high:
        mid = (low + high) // 2
        set_param(index, name, values[mid])
        if recall_at(index, queries, query_keys, exact, rerank=rerank) >= min(target + MARGIN, 1.0):
            high = mid
        else:
            low = mid + 1
    set_param(index, name, values[low])
    return f"{name}={values[low]}"
