"""Choosing and building an image index over a stream of ``(int64 keys, float32 vectors)`` batches.

``choose_kind`` follows autofaiss's rules (get_optimal_index_keys_v2), read for their logic, not copied:
Flat for small sets; HNSW when its vectors and links fit the budget; an unquantised IVF under a million rows
when it fits; else OPQ + IVF + PQ with the largest code that fits. Differences, each on purpose: Flat up to
10,000 rows (autofaiss: HNSW15 from 1,000), exact and ~5 MFLOP a query there; the budget counts the ids and the
coarse quantizer, not the codes alone; a finer list of PQ sizes, so a budget of 1/8 of float32 gets 2-3
dimensions a code byte, not 4; and ``nlist`` at 4 sqrt(n) (the low end of faiss's 4-16 sqrt(n)) for every size,
capped so the training sample holds 39 rows per list, since k-means time is sample x nlist x dim.

``build`` makes two passes over the stream, which must be re-iterable (a list, or an object whose ``__iter__``
re-reads the shards): pass 1 keeps a uniform reservoir sample (the rows with the smallest random priorities, so
memory is the sample plus one batch); the index is trained on it, then pass 2 adds every batch with its keys
and computes the exact neighbours of held-out queries (sample rows) for ``tune``. The split is never held.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import numpy as np

from ..errors import FeatstoreError
from .tune import ExactTopK, recall_at, tune

FLAT_ROWS = 10_000         # Flat below this many rows
PQ_MIN_ROWS = 10_000       # a PQ codebook (256 centroids) needs ~39 x 256 training rows
IVF_FLAT_ROWS = 1_000_000  # an unquantised IVF only below this, as autofaiss
ID_BYTES = 8
PQ_SIZES = (256, 224, 192, 160, 128, 96, 64, 48, 32, 24, 16, 8, 4)
MIN_PER_LIST = 39          # faiss warns below 39 training rows per centroid
QUERIES = 1000             # held-out queries measured by tune
TRAIN_ALLOWANCE = 256 << 20  # training (the sample and its copies) may take this much, or half the budget if more
PQ_COPIES = 3.0  # sample copies an OPQ{m}_{d} training holds at most (d <= 2 dim): sizes the lists of a PQ key
# Each PQ sub-quantizer is a k-means of 256 centroids in 2-4 dimensions, where faiss's k-means is slow (a GEMM
# of width 2-4): 64 rows a centroid (faiss: 256) and 10 OPQ rotations (faiss: 50) keep training to minutes
# at a million rows; recall is then reached through nprobe.
PQ_TRAIN_PER_CENTROID = 64
OPQ_ITERATIONS = 10
KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")

Batch = tuple[np.ndarray, np.ndarray]


def parse_size(text: str | int | None) -> int | None:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"300000000"`` -> bytes (powers of 1024); None stays None."""
    if text is None or (isinstance(text, int) and text >= 1):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    size = float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " ") if match else 0
    if not 1 <= size < float("inf"):  # under a byte (recorded as 0, which no manifest holds) or overflowing
        raise FeatstoreError(f"not a memory size: {text!r} (say 512M, 2G or a number of bytes)")
    return int(size)


def nlist_for(rows: int, dim: int, max_memory: int | None = None, copies: float = 1.0) -> int:
    """Inverted lists: 4 sqrt(rows) as a power of two, at most what the training sample can fill (the sample of
    ``train_rows`` for an index whose training holds COPIES of it)."""
    lists = 2 ** round(math.log2(max(4 * math.sqrt(max(rows, 1)), 1)))
    limit = train_rows(rows, dim, max_memory, copies=copies) // MIN_PER_LIST
    while lists > 1 and lists > limit:
        lists //= 2
    return max(lists, 1)


def train_rows(rows: int, dim: int, max_memory: int | None, lists: int | None = None, copies: float = 1.0) -> int:
    """The training sample: up to 100 rows a list (all rows when fewer), such that COPIES of it (``train_copies``)
    fit in the larger of half the budget and ``TRAIN_ALLOWANCE``: a fixed cost, whatever the split's size (the
    sample is freed before rows are added)."""
    want = rows if lists is None else min(rows, max(100 * lists, 256 * 39))
    allowance = max(max_memory // 2, TRAIN_ALLOWANCE) if max_memory else TRAIN_ALLOWANCE
    want = min(want, int(allowance // (4 * dim * copies)))
    return max(min(want, rows), 1)


def train_copies(key: str, dim: int) -> float:
    """Copies of the training sample faiss holds while training KEY: the sample, and its transformed copy when
    KEY starts with a transform (``OPQ{m}_{d}``, ``PCA{d}``, ``L2norm``, ...: the whole sample goes through it)."""
    first = key.split(",")[0] if "," in key else ""
    if not first or re.match(r"(IVF|IMI|HNSW|NSG|Flat|PQ|SQ|LSH|RQ|LSQ|IDMap|Refine)", first):
        return 1.0
    out = re.fullmatch(r"OPQ\d+_(\d+)|(?:PCAW?R?|RR|ITQ|Pad)(\d+)", first)
    return 1.0 + int(out and (out.group(1) or out.group(2)) or dim) / dim


def _quantizer(lists: int) -> str:
    return f"IVF{lists}_HNSW32" if lists >= 1000 else f"IVF{lists}"


def index_bytes(key: str, rows: int, dim: int) -> int:
    """Estimated memory (and file size) of index KEY holding ROWS vectors of DIM, ids included."""
    lists = re.search(r"IVF(\d+)", key)
    lists = int(lists.group(1)) if lists else 0
    coarse = lists * dim * 4 + (lists * 32 * 2 * 4 if "_HNSW" in key else 0) + lists * 32  # centroids, links, lists
    opq = re.match(r"OPQ(\d+)_(\d+)", key)
    if opq:
        coarse = coarse // dim * int(opq.group(2)) + dim * int(opq.group(2)) * 4
    pq = re.search(r"PQ(\d+)x(\d+)", key)
    if pq:
        m, bits = int(pq.group(1)), int(pq.group(2))
        code = math.ceil(m * bits / 8)
        return rows * (code + ID_BYTES) + coarse + (int(opq.group(2)) if opq else dim) * (1 << bits) * 4
    if key.startswith("HNSW"):
        links = int(re.match(r"HNSW(\d+)", key).group(1))
        return rows * (4 * dim + 2 * links * 4 + 4 + ID_BYTES)  # vectors, level-0 links, levels, id map
    return rows * (4 * dim + ID_BYTES) + coarse  # Flat, IVF*,Flat


def _pq_key(rows: int, dim: int, lists: int, max_memory: int | None) -> str | None:
    """The largest OPQ{m}_{y},IVF..,PQ{m}x8 that fits; without a budget, 1/8 of float32's size."""
    budget = max_memory if max_memory else rows * dim * 4 // 8
    for key in (_opq_key(m, dim, lists) for m in PQ_SIZES if m < dim):
        if index_bytes(key, rows, dim) <= budget:
            return key
    return None


def _opq_key(m: int, dim: int, lists: int) -> str:
    y = (min(dim // m, 6) + 1) * m if dim % m else dim  # autofaiss: slightly over dim; dim itself when m divides it
    return f"OPQ{m}_{y},{_quantizer(lists)},PQ{m}x8"


def choose_kind(rows: int, dim: int, max_memory: int | None = None, kind: str = "auto") -> str:
    """The faiss ``index_factory`` string for ROWS vectors of DIM within MAX_MEMORY bytes (None: no limit).

    KIND narrows the family: ``flat``, ``hnsw``, ``ivf-flat``, ``ivf-pq``; a factory string passes through."""
    if kind not in KINDS:
        return kind
    if kind == "flat" or (kind == "auto" and rows < FLAT_ROWS):
        return "Flat"
    if kind in ("hnsw", "auto"):
        links = 32 if not max_memory else int((max_memory / rows - 4 * dim - 4 - ID_BYTES) // 8)
        if kind == "hnsw" or links >= 8:
            return f"HNSW{min(max(links, 8), 32)}"
    flat_ivf = f"{_quantizer(nlist_for(rows, dim, max_memory))},Flat"
    if kind == "ivf-flat" or (kind == "auto" and rows < IVF_FLAT_ROWS
                              and (not max_memory or index_bytes(flat_ivf, rows, dim) <= max_memory)):
        return flat_ivf
    if rows < PQ_MIN_ROWS:
        raise FeatstoreError(f"a PQ index needs at least {PQ_MIN_ROWS} rows to train on, not {rows}")
    lists = nlist_for(rows, dim, max_memory, PQ_COPIES)
    key = _pq_key(rows, dim, lists, max_memory)
    if key is None:
        raise FeatstoreError(f"no index of {rows} x {dim} fits in {max_memory} bytes "
                             f"(the smallest needs {index_bytes(_opq_key(min(PQ_SIZES), dim, lists), rows, dim)})")
    return key


def new_index(key: str, dim: int):
    """An empty inner-product index for KEY that takes int64 ids (an IDMap around those that do not)."""
    import faiss

    index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    if "IVF" not in key:
        return faiss.IndexIDMap(index)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):  # training cost, see PQ_TRAIN_PER_CENTROID
        ivf.do_polysemous_training = False  # the factory's default: annealing for Hamming filtering, unused here
        ivf.pq.cp.max_points_per_centroid = PQ_TRAIN_PER_CENTROID
    if isinstance(index, faiss.IndexPreTransform):
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.niter, opq.max_train_points = OPQ_ITERATIONS, 256 * PQ_TRAIN_PER_CENTROID
    return index


def checked(keys, vectors, dim: int) -> Batch:
    """KEYS as int64 and VECTORS as C-contiguous float32, L2-normalised, or a one-line error."""
    keys = np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
    vectors = np.array(vectors, dtype=np.float32, order="C", ndmin=2)  # a copy: normalised in place
    if vectors.shape != (len(keys), dim):
        raise FeatstoreError(f"vectors of shape {vectors.shape} for {len(keys)} keys of dimension {dim}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise FeatstoreError("a vector is zero or not finite: it has no direction to index")
    vectors /= norms
    return keys, vectors


def _reservoir(batches: Iterable[Batch], size: int, dim: int, seed: int, first: int = QUERIES) -> Batch:
    """A uniform sample of SIZE rows: those with the smallest random priorities. One buffer of SIZE rows is
    filled, then a batch's rows replace the sample's largest priorities in place, so memory is the sample plus
    one batch (no concatenated copies). The FIRST rows returned are a uniform draw among them (held out)."""
    rng = np.random.default_rng(seed)
    keys, vectors, prio = np.empty(size, np.int64), np.empty((size, dim), np.float32), np.empty(size)
    held = 0
    for batch_keys, batch in batches:
        batch_keys, batch = checked(batch_keys, batch, dim)
        batch_prio = rng.random(len(batch_keys))
        free = min(size - held, len(batch_keys))  # filling: the first rows go to the free slots
        keys[held:held + free], vectors[held:held + free], prio[held:held + free] = \
            batch_keys[:free], batch[:free], batch_prio[:free]
        held += free
        rest = np.arange(free, len(batch_keys))
        if len(rest):  # full: the rest replace held rows of larger priority, the largest first
            worst = np.argpartition(-prio, min(len(rest), size) - 1)[:len(rest)]
            worst = worst[np.argsort(-prio[worst])]
            best = rest[np.argsort(batch_prio[rest])][:len(worst)]
            swap = batch_prio[best] < prio[worst]
            worst, best = worst[swap], best[swap]
            keys[worst], vectors[worst], prio[worst] = batch_keys[best], batch[best], batch_prio[best]
    return _lowest_first(keys[:held], vectors[:held], prio[:held], first)


def _lowest_first(keys: np.ndarray, vectors: np.ndarray, prio: np.ndarray, first: int) -> Batch:
    """KEYS and VECTORS with the FIRST rows of lowest priority moved, in that order, to the front (the held-out
    queries: a uniform draw), by swapping rows in place: no second copy of the sample."""
    pick = np.argsort(prio)[:first]
    leaving = pick[pick >= len(pick)]  # picked rows outside the front swap with unpicked rows inside it
    entering = np.setdiff1d(np.arange(len(pick)), pick)
    for array in (keys, vectors):
        array[leaving], array[entering] = array[entering], array[leaving].copy()
    moved = pick.copy()
    moved[pick >= len(pick)] = entering
    for array in (keys, vectors):
        array[:len(pick)] = array[moved]
    return keys, vectors


def build(batches: Iterable[Batch], rows: int, dim: int, kind: str = "auto", max_memory: int | None = None,
          sample: int | None = None, target: float = 0.95, queries: int = QUERIES, seed: int = 0,
          rerank=None):
    """Build an index over the stream; returns ``(index, info)``.

    ``info``: ``kind`` (factory string), ``rows``, ``dim``, ``bytes`` (serialised size), ``recall_at_10``
    (measured on held-out queries after ``tune``, through ``search``'s RERANK if given; 1.0 for Flat),
    ``params`` (nprobe/efSearch chosen), ``sized_for`` (rows the coarse quantizer was sized for), ``trained_on``
    (sample rows), ``target``."""
    if iter(batches) is batches:
        raise FeatstoreError("build reads the stream twice: pass a list or a re-iterable, not an iterator")
    if rows < 1:
        raise FeatstoreError("nothing to index: the split has no rows")
    key = choose_kind(rows, dim, max_memory, kind)
    index = new_index(key, dim)
    lists = re.search(r"IVF(\d+)", key)
    size = 0 if index.is_trained else sample or train_rows(rows, dim, max_memory, int(lists.group(1)) if lists else None,
                                                            train_copies(key, dim))
    if not index.is_trained or key != "Flat":  # queries for tune come from the sample too
        sample_keys, sample_vectors = _reservoir(batches, max(size, min(queries, rows)), dim, seed, queries)
        if not index.is_trained:
            index.train(sample_vectors[:size] if len(sample_vectors) > size else sample_vectors)
        held_out = (sample_keys[:queries], sample_vectors[:queries].copy())
        del sample_vectors
    exact = ExactTopK(*held_out) if key != "Flat" else None
    added = 0
    for batch_keys, batch in batches:
        batch_keys, batch = checked(batch_keys, batch, dim)
        index.add_with_ids(batch, batch_keys)
        if exact:
            exact.add(batch_keys, batch)
        added += len(batch_keys)
    info = {"kind": key, "rows": added, "dim": dim, "target": target, "params": "", "recall_at_10": 1.0,
            "sized_for": added, "trained_on": min(size, added) if not key.startswith(("Flat", "HNSW")) else 0}
    if exact:
        probe = (exact.queries, exact.query_keys, exact.neighbours())
        info["params"] = tune(index, *probe, target, rerank=rerank)
        info["recall_at_10"] = recall_at(index, *probe, rerank=rerank)
    info["bytes"] = serialized_bytes(index)
    return index, info


def serialized_bytes(index) -> int:
    """The size of INDEX's file, counted as faiss writes it (``serialize_index`` would hold a copy of it)."""
    import faiss

    written = [0]

    def count(chunk) -> int:
        written[0] += len(chunk)
        return len(chunk)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index, writer)
    del writer
    return written[0]
