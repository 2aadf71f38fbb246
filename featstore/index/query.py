"""``featstore search``: the rows of a split nearest to texts, image files or stored rows, through its image index.

Only live rows are returned: every candidate the index gives is resolved through the split's shards
(``rows_by_key``), so a row removed since the index was last updated is dropped, and more candidates are
fetched (4x each round, up to ``MAX_CANDIDATES``) until K live rows are found. An index too far behind to give
them (or an IVF whose probed lists hold too few) is then bypassed: the split is scanned exactly. Scores are
cosines; for lossy kinds (PQ, SQ) the index's estimates are replaced by exact cosines against the stored rows.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featstore.errors import FeatstoreError
from featstore.store import MANIFEST, Store, image_index

MAX_CANDIDATES = 1 << 16  # per query; past this the split is scanned exactly instead
GROWTH = 4


def _stamp(store_dir: str) -> tuple | None:
    try:
        st = os.stat(os.path.join(store_dir, MANIFEST))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def consistent(store_dir: str, read: Callable[[Store], Any]) -> Any:
    """``read(store)`` on the store as committed now. Readers take no lock: when READ fails because a writer
    committed meanwhile (a shard it named was removed, by an encode or a compaction), it runs once more on
    the new manifest; a failure on an unchanged manifest is a real one and is raised."""
    for attempt in range(2):
        before = _stamp(store_dir)
        store = Store.open(store_dir)
        try:
            return read(store)
        except FeatstoreError:
            if attempt or _stamp(store_dir) == before:
                raise


def load_index(store: Store, split: str):
    """SPLIT's image index with its tuned search parameter set, its record, and the exact re-scoring a lossy
    kind (PQ, SQ) needs (``featstore.index.search``'s rerank) or None."""
    from featstore.index.split import reranker
    from featstore.index.images import knob
    from featstore.index.tune import set_param

    store.split_info(split)  # an unknown split is named as such
    index, record = image_index.load(store, split)
    if record.params:
        set_param(index, *knob(record.params))
    return index, record, reranker(store, split, record.kind)


def rows_by_id(store: Store, split: str, ids: list[str]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The rows with IDS, in that order, as search results of score 1 (``{"id", "path", "label", "score"}``),
    and their stored embeddings; an id the split lacks is an error."""
    from featstore.store.shards import run_batches

    wanted, rows = pa.array(list(dict.fromkeys(ids)), pa.string()), {}
    for _, batch in run_batches(store.shard_paths(split), ["key", "path", "label"]):
        for row in batch.filter(pc.is_in(batch.column("id"), wanted)).to_pylist():
            rows[row["id"]] = row
    missing = [row_id for row_id in wanted.to_pylist() if row_id not in rows]
    if missing:
        raise FeatstoreError(f"split {split!r} has no row with id {missing[0]!r}"
                             + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if any(row["key"] is None for row in rows.values()):
        raise FeatstoreError(f"a row of split {split!r} has no key yet: run featstore index {store.root} "
                             f"--split {split}")
    vectors = store.embeddings_by_key(split, np.array([rows[row_id]["key"] for row_id in ids], np.int64))
    return [{"id": row_id, "path": rows[row_id]["path"], "label": rows[row_id]["label"], "score": 1.0}
            for row_id in ids], vectors


def _self_first(results: list[dict[str, Any]], own: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """An --id query's results with its own row first (its cosine is 1, the largest there is: a copy that
    ties with it, or rounds above it, comes after), as it was found or added when ties left it out."""
    own = next((row for row in results if row["id"] == own["id"]), dict(own))
    return [own, *(row for row in results if row["id"] != own["id"])][:k]


def embed_texts(store: Store, texts: list[str], templates: str | None, device: str) -> np.ndarray:
    """TEXTS through the store's text tower: verbatim, or ensembled over TEMPLATES (a file or a shipped
    list's name) as ``featstore labels`` ensembles class names."""
    from featstore.labels import class_embeddings, resolve_templates
    from featstore.models import load_recorded_model

    chosen = resolve_templates(None, templates) if templates else ["{}"]
    return class_embeddings(load_recorded_model(store.manifest.model, device), texts, chosen)


def exact_nearest(store: Store, split: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cosines, keys)`` of each query's K nearest live rows, by a streamed exact scan of the split."""
    from featstore.index.build import checked
    from featstore.index.tune import ExactTopK

    _, queries = checked(np.zeros(len(queries)), queries, store.dim)
    top = ExactTopK(np.full(len(queries), -1, np.int64), queries, k)  # no query is a row: nothing left out
    for keys, vectors in store.key_batches(split):
        top.add(*checked(keys, vectors, store.dim))
    order = np.argsort(-top.scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(top.scores, order, 1), np.take_along_axis(top.keys, order, 1)


def nearest_live(store: Store, split: str, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    """Each query's K nearest live rows of SPLIT (fewer only when the split has fewer), best first, as
    ``{"id", "path", "label", "score"}``."""
    from featstore.index import search

    index, _, rerank = load_index(store, split)
    want, total, todo = k, store.row_count(split), np.arange(len(queries))
    found: list[list[dict[str, Any]]] = [[] for _ in queries]
    while len(todo):
        scan = want > MAX_CANDIDATES or not index.ntotal
        if scan:
            scores, keys = exact_nearest(store, split, queries[todo], k)
        else:
            scores, keys = search(index, queries[todo], min(want, index.ntotal), rerank)
        rows = store.rows_by_key(split, keys[keys >= 0], ["id", "path", "label"])
        where = locate(rows, keys.reshape(-1)).reshape(keys.shape)
        for query, row_scores, row_where in zip(todo, scores, where):
            best: dict[int, float] = {}  # each row once (an index holding a key twice is not a well-formed one)
            for at, score in zip(row_where.tolist(), row_scores.tolist()):
                if at >= 0:
                    best.setdefault(at, score)
            found[query] = [_result(rows, at, score) for at, score in best.items()][:k]
        if scan:
            break
        todo = np.array([q for q in todo if len(found[q]) < min(k, total)], np.int64)
        # an index that gave all it holds and still too few live rows is behind the split: scan it next
        want = MAX_CANDIDATES + 1 if want >= index.ntotal else want * GROWTH
    return found


def locate(rows: pa.Table, keys: np.ndarray) -> np.ndarray:
    """The position in ROWS (``rows_by_key``'s answer) of each of KEYS, -1 where no row has it."""
    where = pc.index_in(pa.array(np.asarray(keys, np.int64)), value_set=rows.column("key").combine_chunks())
    return where.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _result(rows, at: int, score: float) -> dict[str, Any]:
    return {"id": rows.column("id")[at].as_py(), "path": rows.column("path")[at].as_py(),
            "label": rows.column("label")[at].as_py(), "score": score}


def search_split(store_dir: str, split: str, texts: list[str] | None = None, images: list[str] | None = None,
                 ids: list[str] | None = None, k: int = 10, templates: str | None = None,
                 device: str = "auto") -> list[dict[str, Any]]:
    """One entry per query, ``{"query", "results": [{"id", "path", "label", "score"}]}``, best first; label
    is the class name or None. Give one kind of query: TEXTS, IMAGES (files) or IDS (stored rows)."""
    given = [(kind, list(queries)) for kind, queries in (("text", texts), ("image", images), ("id", ids)) if queries]
    if len(given) != 1:
        raise FeatstoreError("give one kind of query: --text T, --image PATH or --id ID (repeatable)"
                             if not given else "give one kind of query at a time, not --text, --image and --id mixed")
    if k < 1:
        raise FeatstoreError(f"--k must be at least 1, not {k}")
    if templates and given[0][0] != "text":
        raise FeatstoreError("--templates applies to --text queries only")
    kind, queries = given[0]
    store = Store.open(store_dir)
    if store.split_info(split).index is None:  # said before any model loads (its one line)
        image_index.load(store, split)
    vectors = None
    if kind == "text":
        vectors = embed_texts(store, queries, templates, device)
    elif kind == "image":
        from featstore.query import embed_image_files

        vectors = embed_image_files(store, queries, device)

    def read(store: Store) -> list[dict[str, Any]]:
        own, queried = rows_by_id(store, split, queries) if kind == "id" else (None, vectors)
        found = nearest_live(store, split, queried, k)
        if own is not None:
            found = [_self_first(results, row, k) for results, row in zip(found, own)]
        for results in found:
            for row in results:
                row["label"] = store.classes[row["label"]] if row["label"] is not None and row["label"] >= 0 else None
        return [{"query": query, "results": results} for query, results in zip(queries, found)]

    return consistent(store_dir, read)
