"""Searching, updating, deduplicating, saving and loading an image index made by ``build``.

Keys are the store's int64 row keys (never negative). Removal by kind: Flat and IVF indexes remove rows
(``remove_ids``); HNSW cannot, so a removed row's key becomes -1 in the IDMap (a tombstone, kept in the saved
file) and every search filters tombstones out with an ``IDSelector``: a search never returns a removed row.
Tombstones still cost memory and graph hops, so ``needs_retrain`` asks for a rebuild past 20 % of them.
"""

from __future__ import annotations

import numpy as np

from ..errors import FeatstoreError
from .build import checked
from .tune import ExactTopK, recall_at, set_param, tune

TOMBSTONE_SHARE = 0.20  # HNSW: rebuild when this share of its rows are removed
GROWTH = 2.0            # IVF: retrain when it holds this many times the rows its lists were sized for
PROBE_QUERIES = 200


def _parts(index):
    """``(id_map or None, the index inside)``: the IDMap wrapper Flat and HNSW live in, and the searched index."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return index, faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexPreTransform):
        return None, faiss.downcast_index(index.index)
    return None, index


def _id_map(index) -> np.ndarray | None:
    """A writable view of an HNSW's IDMap (position -> key), or None for kinds that remove rows themselves."""
    import faiss

    wrapper, inner = _parts(index)
    if wrapper is None or not isinstance(inner, faiss.IndexHNSW):
        return None
    return faiss.rev_swig_ptr(wrapper.id_map.data(), wrapper.id_map.size())


def tombstones(index) -> int:
    ids = _id_map(index)
    return 0 if ids is None or not len(ids) else int(np.count_nonzero(ids < 0))


def live_rows(index) -> int:
    """Rows a search can return."""
    return int(index.ntotal) - tombstones(index)


def held_keys(index) -> np.ndarray:
    """The keys of the rows INDEX holds (those a search can return), sorted: an IDMap's ids less tombstones,
    or an IVF's inverted lists' ids."""
    import faiss

    wrapper, inner = _parts(index)
    if wrapper is not None:
        ids = faiss.vector_to_array(wrapper.id_map)
        return np.sort(ids[ids >= 0])
    ivf = faiss.extract_index_ivf(inner)
    lists, found = ivf.invlists, []
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            ids = lists.get_ids(number)
            found.append(faiss.rev_swig_ptr(ids, size).copy())
            lists.release_ids(number, ids)
    return np.sort(np.concatenate([np.empty(0, np.int64), *found]))


def search(index, queries, k: int = 10, rerank=None, factor: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The K nearest live rows of each query (L2-normalised here): ``(cosines, keys)``, best first, each of shape
    (queries, K); -1 keys (score -inf) where fewer than K rows exist. A PQ index's scores are approximate:
    RERANK, a callable ``keys -> vectors`` (the store reading rows from its shards), re-scores FACTOR x K
    candidates exactly, as faiss's IndexRefine does with the vectors kept on disk instead of in the index.
    A row RERANK returns as NaN (no longer stored: the index is behind the store) is left out."""
    import faiss

    queries = np.array(queries, dtype=np.float32, ndmin=2)
    _, queries = checked(np.zeros(len(queries)), queries, index.d)
    params, live = None, faiss.IDSelectorRange(0, np.iinfo(np.int64).max)  # keys >= 0: tombstones (-1) left out
    if tombstones(index):
        params = faiss.SearchParameters()
        params.sel = live  # faiss holds no reference: LIVE keeps it alive through the search
    scores, keys = index.search(queries, k * factor if rerank else k, params=params)
    if rerank is not None:
        valid = keys >= 0
        unique, where = np.unique(keys[valid], return_inverse=True)
        vectors = np.array(rerank(unique), dtype=np.float32, ndmin=2).reshape(len(unique), index.d)
        stored = np.isfinite(vectors).all(axis=1)
        vectors[stored] = checked(unique[stored], vectors[stored], index.d)[1]
        vectors[~stored] = 0
        scores = np.full(keys.shape, -np.inf, np.float32)
        scores[valid] = np.where(stored[where], np.einsum("ij,ij->i", vectors[where], queries[np.nonzero(valid)[0]]),
                                 -np.inf)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, keys = np.take_along_axis(scores, best, 1), np.take_along_axis(keys, best, 1)
        keys[np.isneginf(scores)] = -1
    scores[keys < 0] = -np.inf
    return scores, keys


def update(index, add=None, remove=None) -> dict:
    """Make INDEX hold exactly the live rows after a change: remove the keys in REMOVE and those re-added, then
    add ADD = ``(keys, vectors)`` (new or changed rows). No retraining: see ``needs_retrain``.
    Returns ``{"added", "removed"}`` (rows actually found and removed)."""
    import faiss

    add_keys, add_vectors = checked(*add, index.d) if add is not None else (np.empty(0, np.int64), None)
    gone = np.union1d(np.asarray(remove if remove is not None else [], dtype=np.int64), add_keys)
    removed = 0
    if len(gone):
        ids = _id_map(index)
        if ids is not None:
            hit = np.isin(ids, gone)
            removed = int(np.count_nonzero(hit))
            ids[hit] = -1
        else:
            removed = int(index.remove_ids(faiss.IDSelectorBatch(gone)))
    if len(add_keys):
        index.add_with_ids(add_vectors, add_keys)
    return {"added": int(len(add_keys)), "removed": removed}


def fresh_probe(keys, vectors, batches, n: int = PROBE_QUERIES, seed: int = 0):
    """A probe for ``needs_retrain``: N of the given (new) rows as queries, with their exact neighbours over
    BATCHES (the split's live rows, streamed once). Returns ``(queries, query_keys, exact)``."""
    keys, vectors = checked(keys, vectors, np.shape(vectors)[-1])
    pick = np.random.default_rng(seed).permutation(len(keys))[:n]
    exact = ExactTopK(keys[pick], vectors[pick])
    for batch_keys, batch in batches:
        exact.add(*checked(batch_keys, batch, vectors.shape[1]))
    return exact.queries, exact.query_keys, exact.neighbours()


def needs_retrain(index, info: dict, probe=None, rerank=None) -> str | None:
    """Why INDEX should be rebuilt from the split (a sentence), or None while its quality holds.

    IVF: it holds over twice the rows its lists were sized for (``info["sized_for"]``). HNSW: over 20 % of its
    rows are tombstones. Any tuned kind, given PROBE (``fresh_probe``): it is re-tuned on the probe first
    (``info["params"]`` and ``info["recall_at_10"]`` updated), and needs a retrain only if recall@10 still
    misses ``info["target"]`` (the data has drifted from what it was trained on)."""
    rows, dead = live_rows(index), tombstones(index)
    if "IVF" in info["kind"] and rows > GROWTH * info["sized_for"]:
        return f"the index holds {rows} rows, over {GROWTH:g}x the {info['sized_for']} it was sized for"
    if dead > TOMBSTONE_SHARE * index.ntotal:
        return f"{dead} of its {index.ntotal} rows are removed ones, over {TOMBSTONE_SHARE:.0%}"
    if probe is not None and info.get("params"):
        before = info["params"]
        info["params"] = tune(index, *probe, target=info["target"], rerank=rerank)
        if _knob_value(info["params"]) < _knob_value(before):  # new rows alone never lower what the build chose
            info["params"] = before
            set_param(index, *knob(before))
        info["recall_at_10"] = recall_at(index, *probe, rerank=rerank)
        if info["recall_at_10"] < info["target"]:
            return (f"recall@10 on new rows is {info['recall_at_10']:.3f} at {info['params']}, "
                    f"below the target {info['target']}")
    return None


def knob(params: str) -> tuple[str, int]:
    """A recorded search parameter, ``"nprobe=8"``, as ``("nprobe", 8)``."""
    name, _, value = params.partition("=")
    return name, int(value)


def _knob_value(params: str) -> int:
    return knob(params)[1] if params else 0


def near_pairs(index, keys, vectors, threshold: float = 0.95, k: int = 10, cross: bool = False):
    """Pairs among each row's K nearest with cosine >= THRESHOLD: arrays ``(id_a, id_b, score)``.

    Within a split (CROSS false) each pair appears once, ``id_a < id_b``, and a row is never paired with itself.
    CROSS: KEYS are rows of another split (train vs test leakage): ``id_a`` is the query row, ``id_b`` the
    indexed one. Call it batch by batch over a split; ``groups`` joins the pairs."""
    keys, vectors = checked(keys, vectors, index.d)
    scores, found = search(index, vectors, k if cross else k + 1)
    a = np.broadcast_to(keys[:, None], found.shape)
    keep = (scores >= threshold) & (found >= 0) & (cross | (found != a))  # across splits, equal keys are two rows
    a, b, s = a[keep], found[keep], scores[keep]
    if not cross:
        a, b = np.minimum(a, b), np.maximum(a, b)
        a, first = np.unique(np.stack([a, b], 1), axis=0, return_index=True)
        a, b, s = a[:, 0], a[:, 1], s[first]
    return a.astype(np.int64), b.astype(np.int64), s.astype(np.float32)


def groups(id_a, id_b) -> list[np.ndarray]:
    """Connected components of the pairs: each an array of keys (sorted), the largest group first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, edges = np.unique(np.concatenate([id_a, id_b]), return_inverse=True)
    if not len(nodes):
        return []
    half = len(id_a)
    graph = coo_matrix((np.ones(half), (edges[:half], edges[half:])), shape=(len(nodes), len(nodes)))
    _, label = connected_components(graph, directed=False)
    found = [nodes[label == g] for g in np.unique(label)]
    return sorted(found, key=lambda g: (-len(g), g[0]))


def dedup(index, vectors, keys, threshold: float = 0.95, k: int = 10, cross: bool = False) -> dict:
    """Near-duplicates of the given rows in INDEX: ``{"pairs": (id_a, id_b, score), "groups": [keys, ...],
    "rows_in_groups": n}``. Exact copies score ~1; PQ kinds score approximately (re-score from the shards)."""
    a, b, s = near_pairs(index, keys, vectors, threshold, k, cross)
    found = groups(a, b)
    return {"pairs": (a, b, s), "groups": found, "rows_in_groups": int(sum(len(g) for g in found))}


def save(index, path: str) -> None:
    """Write INDEX to PATH (faiss's own format). The store commits it through ``store.image_index.commit``
    (atomic, sha256 recorded) and reads it back through ``image_index.load``, which checks the file and then
    calls ``load`` below: the one place index files are read."""
    import faiss

    faiss.write_index(index, path)


def load(path: str):
    """Read an index written by ``save``; an unreadable file is a one-line error."""
    import faiss

    try:
        return faiss.read_index(path)
    except RuntimeError as e:
        raise FeatstoreError(f"{path}: not a readable faiss index ({str(e).splitlines()[0][:200]})") from None
