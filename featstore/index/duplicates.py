"""``featstore dedup``: near-duplicate pairs and groups among a split's rows, or between two splits (train vs
test leakage), through the split's image index.

Pairs come two ways. kNN: every row of the queried split, streamed batch by batch, is searched in the index
for its K nearest; those at cosine >= THRESHOLD pair up (a lossy index's estimates only pick candidates, at
THRESHOLD - ``LOSSY_MARGIN``, which are then re-scored exactly from the stored rows). Exact copies: rows with the
same sha256, however many copies (more than K too), each paired with the copy of smallest key, score 1.0
whatever the threshold; found by sorting (sha256 prefix, key) of every row, 24 bytes a row, then confirmed on
the full sha256. Every pair is then resolved through the shards: a row no longer in the split (an index behind
the store) drops out. Groups are the connected components of the pairs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featstore.errors import FeatstoreError
from featstore.index.query import consistent, load_index, locate
from featstore.store import Store

LOSSY_MARGIN = 0.1  # a PQ (or SQ) estimate of a cosine is rarely off by more than this (checked exactly afterwards)
CHUNK = 1 << 16  # pairs resolved per pass over the shards' key columns
PREFIX = 16  # sha256 characters kept per row to find exact copies (64 bits; confirmed on all 64)


def _sha_prefixes(store: Store, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, sha256 prefixes)`` of SPLIT's rows that have a sha256, streamed."""
    from featstore.store.shards import run_batches

    keys, prefixes = [np.empty(0, np.int64)], [np.empty(0, f"S{PREFIX}")]
    for _, batch in run_batches(store.shard_paths(split), ["key", "sha256"]):
        batch = batch.filter(pc.is_valid(batch.column("sha256")))
        keys.append(batch.column("key").to_numpy(zero_copy_only=False).astype(np.int64))
        prefix = pc.utf8_slice_codeunits(batch.column("sha256"), 0, PREFIX)
        prefixes.append(np.array(prefix.cast(pa.binary()).to_pylist(), f"S{PREFIX}"))
    return np.concatenate(keys), np.concatenate(prefixes)


def exact_copies(store: Store, split: str, against: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(id_a, id_b)`` keys of rows sharing a sha256 prefix: within SPLIT, each copy with the copy of smallest
    key (``id_a < id_b``); with AGAINST, each row of AGAINST with SPLIT's copy of smallest key."""
    keys, prefix = _sha_prefixes(store, split)
    order = np.lexsort((keys, prefix))
    unique, first = np.unique(prefix[order], return_index=True)
    heads = keys[order][first]
    if against is not None:
        keys, prefix = _sha_prefixes(store, against)
    if not len(unique):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    at = np.searchsorted(unique, prefix).clip(max=len(unique) - 1)
    hit = unique[at] == prefix
    a, b = keys[hit], heads[at[hit]]
    if against is None:
        a, b = b[a != b], a[a != b]  # the head first: it has the smaller key
    return a, b


def knn_pairs(store: Store, split: str, index, threshold: float, k: int, against: str | None = None):
    """``(id_a, id_b, score)`` keys and index scores of the kNN pairs at THRESHOLD or above (see the module)."""
    from featstore.index import near_pairs

    found = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))]
    k = min(k, max(index.ntotal, 1))  # a K past the index's rows asks for nothing more (and allocates nothing)
    for keys, vectors in store.key_batches(against or split):
        found.append(near_pairs(index, keys, vectors, threshold, k, cross=against is not None))
    return tuple(np.concatenate(part) for part in zip(*found))


def _embeddings(table: pa.Table, dim: int) -> np.ndarray:
    from featstore.index.build import checked
    from featstore.store.shards import embedding_matrix

    return checked(np.zeros(table.num_rows), embedding_matrix(table.column("embedding"), dim), dim)[1]


def resolve(store: Store, split_a: str, split_b: str, a, b, s, exact, threshold: float, rescore: bool) -> pa.Table:
    """The pairs whose rows are both still stored, as ``key_a, key_b, id_a, id_b, score``: exact copies checked
    on the full sha256 (score 1.0), the others re-scored from the stored rows when RESCORE and kept at
    THRESHOLD or above. CHUNK pairs per pass over the shards."""
    columns = ["id", "sha256", *(["embedding"] if rescore else [])]
    tables = []
    for start in range(0, len(a), CHUNK):
        part = slice(start, start + CHUNK)
        rows_a, rows_b = store.rows_by_key(split_a, a[part], columns), store.rows_by_key(split_b, b[part], columns)
        where_a, where_b = locate(rows_a, a[part]), locate(rows_b, b[part])
        live = (where_a >= 0) & (where_b >= 0)
        rows_a, rows_b = rows_a.take(where_a[live]), rows_b.take(where_b[live])
        same = pc.fill_null(pc.equal(rows_a.column("sha256"), rows_b.column("sha256")), False).to_numpy()
        copy, score = exact[part][live] & same, s[part][live]
        if rescore:
            score = np.einsum("ij,ij->i", _embeddings(rows_a, store.dim), _embeddings(rows_b, store.dim))
        score = np.where(copy, 1.0, score).astype(np.float32)
        keep = copy | (~exact[part][live] & (score >= threshold))
        tables.append(pa.table({"key_a": a[part][live][keep], "key_b": b[part][live][keep],
                                "id_a": rows_a.column("id").filter(keep), "id_b": rows_b.column("id").filter(keep),
                                "score": score[keep]}))
    empty = pa.table({"key_a": pa.array([], pa.int64()), "key_b": pa.array([], pa.int64()),
                      "id_a": pa.array([], pa.string()), "id_b": pa.array([], pa.string()),
                      "score": pa.array([], pa.float32())})
    return pa.concat_tables([empty, *tables])


def _union(knn, copies) -> tuple[np.ndarray, ...]:
    """kNN pairs and exact copies as one set of pairs ``(a, b, score, exact)``, each pair once (as a copy
    when it is one)."""
    a = np.concatenate([copies[0], knn[0]])
    b = np.concatenate([copies[1], knn[1]])
    s = np.concatenate([np.ones(len(copies[0]), np.float32), knn[2]])
    exact = np.arange(len(a)) < len(copies[0])
    _, first = np.unique(np.stack([a, b], 1).reshape(-1, 2), axis=0, return_index=True)
    return a[first], b[first], s[first], exact[first]


def _groups(pairs: pa.Table, split: str, against: str | None) -> list[list[tuple[str, str]]]:
    """Connected components as lists of (split, id), the largest first. Across splits, a key of AGAINST is
    written -1 - key here, so the two key spaces never meet."""
    from featstore.index import groups

    key_a = pairs.column("key_a").to_numpy()
    nodes_a = key_a if against is None else -1 - key_a
    nodes = np.concatenate([nodes_a, pairs.column("key_b").to_numpy()])
    ids = pa.concat_arrays([pairs.column("id_a").combine_chunks(), pairs.column("id_b").combine_chunks()])
    unique, first = np.unique(nodes, return_index=True)
    name = {int(node): ((against or split) if node < 0 else split, ids[int(i)].as_py())
            for node, i in zip(unique, first)}
    return [[name[int(node)] for node in group] for group in groups(nodes[:len(key_a)], nodes[len(key_a):])]


def dedup_split(store_dir: str, split: str, threshold: float = 0.95, k: int = 10, out: str | None = None,
                against: str | None = None) -> dict[str, Any]:
    """Near-duplicates in SPLIT (or rows of AGAINST near rows of SPLIT): ``{"pairs", "groups",
    "rows_in_groups"}`` (counts) and ``group_ids`` (each group's (split, id) rows, the largest group first);
    OUT gets every pair as a Parquet file of ``id_a, id_b, score`` (best first; across splits ``id_a`` is
    AGAINST's row), written atomically. Reads only: no lock, and a writer may run meanwhile."""
    if not -1 <= threshold <= 1:
        raise FeatstoreError(f"--threshold is a cosine, in [-1, 1], not {threshold:g}")
    if k < 1:
        raise FeatstoreError(f"--k must be at least 1, not {k}")
    if against is not None and against == split:
        raise FeatstoreError("--against names the split itself: give another split (dedup within a split "
                             "needs no --against)")
    out = Store.open(store_dir).check_output(out) if out else None

    def read(store: Store) -> pa.Table:
        if against is not None:
            store.split_info(against)
        index, record, rerank = load_index(store, split)
        floor = max(threshold - LOSSY_MARGIN, -1.0) if rerank else threshold
        pairs = _union(knn_pairs(store, split, index, floor, k, against), exact_copies(store, split, against))
        return resolve(store, against or split, split, *pairs, threshold, rescore=rerank is not None)

    pairs = consistent(store_dir, read)
    pairs = pairs.sort_by([("score", "descending"), ("id_a", "ascending"), ("id_b", "ascending")])
    found = _groups(pairs, split, against)
    if out:
        import pyarrow.parquet as pq

        from featstore.store.files import atomic_write

        os.makedirs(os.path.dirname(out), exist_ok=True)
        atomic_write(out, lambda tmp: pq.write_table(pairs.select(["id_a", "id_b", "score"]), tmp))
    return {"split": split, "against": against, "threshold": threshold, "k": k, "pairs": pairs.num_rows,
            "groups": len(found), "rows_in_groups": sum(len(group) for group in found), "group_ids": found,
            **({"out": out} if out else {})}
