"""A split's image index in the store: ``featstore index`` builds it (``build_index``), every ``encode`` of the
split keeps it current (``refresh``), both under the store's writer lock.

The index holds the split's rows by their stable keys (``Store.give_keys``). ``refresh`` compares the keys the
index holds with the split's live keys: a removed row's key is removed, a new row's key added with its vector,
and a changed row is both (its old key removed, its new key added), with no rebuild while ``needs_retrain``
finds the index's quality holds; when it does not, the index is rebuilt with the family it was built as, under
the budget it was built under, and the reason is said on stderr. Nothing is written when the keys agree. Every
new index is committed by ``store.image_index.commit`` (new file, one manifest switch), so a kill at any moment
leaves the old index or the new one. A split emptied by ``encode --allow-removals`` loses its index (there is
nothing to search, and a rebuild needs rows); a split's index goes with the split.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any, Callable

import numpy as np

from featstore.errors import FeatstoreError
from featstore.index.build import KINDS, build, choose_kind, index_bytes, nlist_for, parse_size, train_copies
from featstore.index import images
from featstore.store import Store, check_split_name, image_index
from featstore.store.manifest import ImageIndex
from featstore.store.read import index_current

PROBE_MIN = 100  # new rows needed before they are used as a recall probe (fewer: too noisy to retrain on)
KIND_HELP = "auto, flat, hnsw, ivf-flat, ivf-pq or a faiss index_factory string"


def build_index(store_dir: str, split: str, kind: str = "auto", max_memory: str | int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Build SPLIT's image index of KIND within MAX_MEMORY bytes ("512M", "2G") and commit it to the store;
    rows written before row keys are given theirs first. Returns the summary ``featstore index`` prints."""
    budget = parse_size(max_memory)
    check_split_name(split)
    store = Store.open(store_dir)
    store.check_unlocked()
    store.split_info(split)  # an unknown split, kind or budget is refused before any work
    _choose(store, split, kind, budget)
    started = time.perf_counter()
    with store.lock("featstore index"):
        image_index.folder(store)
        repairs = store.reconcile(split)
        keyed = store.key_all_rows(split)
        index, fields = _build(store, split, kind, budget, progress)
        record = _commit(store, split, index, fields)
    return {"split": split, "kind": record.kind, "rows": record.rows, "bytes": record.bytes,
            "recall_at_10": record.recall_at_10, "params": record.params, "target": record.target,
            "file": f"{image_index.FOLDER}/{record.file}", "keyed": keyed, "repairs": repairs,
            "seconds": round(time.perf_counter() - started, 3)}


def refresh(store: Store, split: str, progress: bool = False) -> dict[str, Any] | None:
    """Make SPLIT's index hold exactly the split's live rows (writers only, under the lock, after their shards
    are committed); None when the split has no index. Returns ``{"kind", "rows", "added", "removed",
    "retrained"}``, ``retrained`` the reason of a rebuild (also said on stderr) or None."""
    record = store.split_info(split).index
    if record is None:
        return None
    unchanged = record.next_key is not None and index_current(record, store.row_count(split),
                                                              store.split_info(split).next_key)
    if unchanged:  # nothing changed since it was made current: only its file is checked (``load``)
        try:
            image_index.load(store, split)
        except FeatstoreError:
            return _rebuild(store, split, record, _damage(store, record), progress, 0, 0)
        return {"kind": record.kind, "rows": record.rows, "added": 0, "removed": 0, "retrained": None}
    store.key_all_rows(split)  # a no-op once the index was built (it keyed every row)
    live = store.live_keys(split)
    if not len(live):
        image_index.drop(store, split)
        _say(f"split {split!r} is empty: its image index was removed")
        return {"kind": None, "rows": 0, "added": 0, "removed": record.rows, "retrained": None}
    try:
        index, record = image_index.load(store, split)
    except FeatstoreError:
        return _rebuild(store, split, record, _damage(store, record), progress, 0, 0)
    held = images.held_keys(index)
    removed, added = np.setdiff1d(held, live, True), np.setdiff1d(live, held, True)
    if not len(removed) and not len(added):
        return {"kind": record.kind, "rows": record.rows, "added": 0, "removed": 0, "retrained": None}
    vectors = store.embeddings_by_key(split, added)
    try:
        images.update(index, add=(added, vectors), remove=removed)
    except RuntimeError as e:  # a factory kind faiss cannot remove rows from (NSG, a transform around HNSW)
        why = f"its kind {record.kind} cannot remove rows ({str(e).strip().splitlines()[-1][:120]})"
        return _rebuild(store, split, record, why, progress, len(added), len(removed))
    fields = _fields(record)
    rerank = reranker(store, split, record.kind)
    probe = None
    if len(added) >= PROBE_MIN and fields["params"]:  # new rows as queries, exact neighbours from the split
        probe = images.fresh_probe(added, vectors, store.key_batches(split))
    reason = images.needs_retrain(index, fields, probe, rerank)
    if reason:
        return _rebuild(store, split, record, reason, progress, len(added), len(removed))
    fields |= {"rows": images.live_rows(index), "updated_at": image_index.now()}
    record = _commit(store, split, index, fields)
    return {"kind": record.kind, "rows": record.rows, "added": int(len(added)), "removed": int(len(removed)),
            "retrained": None}


def reranker(store: Store, split: str, kind: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """``keys -> embeddings`` read from the split's shards, for ``images.search`` to re-score a lossy index
    (PQ, SQ) exactly; None for kinds that hold the float32 vectors (Flat, HNSW, IVF..,Flat)."""
    if re.fullmatch(r"Flat|HNSW\d*(,Flat)?|IVF\d+(_HNSW\d*)?,Flat", kind):  # a transform (PCA, OPQ): rerank
        return None
    return lambda keys: store.embeddings_by_key(split, keys)


def check_kind(kind: str, dim: int) -> None:
    """Refuse a --kind that is neither a family nor a faiss index_factory string faiss can make."""
    import faiss

    if kind in KINDS:
        return
    if re.search(r"(HNSW|NSG)[01](?!\d)|x0(?!\d)", kind):  # values faiss crashes the process on (abort, SIGFPE)
        raise FeatstoreError(f"--kind {kind!r}: an HNSW or NSG graph needs M >= 2 links, a PQ at least 1 bit")
    try:
        faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise FeatstoreError(f"unknown --kind {kind!r}: use {KIND_HELP}") from None


def family(kind: str, rows: int, dim: int, budget: int | None) -> str:
    """The --kind a rebuild of an index built as KIND uses for ROWS: its family (sized again by
    ``choose_kind``); a factory string of another shape keeps its shape, an IVF's lists sized for ROWS."""
    if "PQ" in kind and "IVF" in kind:
        return "ivf-pq"
    if "IVF" in kind and kind.endswith(",Flat"):
        return "ivf-flat"
    if re.fullmatch(r"HNSW\d+(,Flat)?", kind):
        return "hnsw"
    if kind == "Flat":
        return "flat"
    return re.sub(r"IVF\d+", f"IVF{nlist_for(rows, dim, budget, train_copies(kind, dim))}", kind, count=1)


def _choose(store: Store, split: str, kind: str, budget: int | None) -> str:
    """The factory string of a KIND index over the split's rows within BUDGET bytes, or a one-line refusal."""
    check_kind(kind, store.dim)
    rows, dim = store.row_count(split), store.dim
    if not rows:
        raise FeatstoreError(f"split {split!r} has no rows to index")
    key = choose_kind(rows, dim, budget, kind)
    need = index_bytes(key, rows, dim)
    if budget and need > budget:
        raise FeatstoreError(f"a {key} index of {rows} rows needs about {human_size(need)}, over --max-memory "
                             f"{human_size(budget)}: give a larger budget{' or --kind auto' if kind != 'auto' else ''}")
    return key


def _build(store: Store, split: str, kind: str, budget: int | None, progress: bool):
    """``(index, record fields)`` of a new index of KIND over the split's rows, within BUDGET bytes."""
    key, rows, dim = _choose(store, split, kind, budget), store.row_count(split), store.dim
    try:
        index, info = build(_Shown(store.key_batches(split), rows, key, progress), rows, dim, key, budget,
                                    rerank=reranker(store, split, key))
    except RuntimeError as e:  # faiss refusing the factory string for these rows (too few to train, ...)
        why = re.split(r"Error: |\.cpp:\d+: ", str(e).strip().splitlines()[-1])[-1][:200]
        raise FeatstoreError(f"faiss could not build {key} over {rows} rows: {why}") from None
    fields = {name: info[name] for name in ("kind", "rows", "recall_at_10", "target", "params", "sized_for",
                                              "trained_on")}
    if info["recall_at_10"] < info["target"]:
        advice = "a larger --max-memory gives a finer index" if kind in KINDS else "a finer --kind gives better recall"
        _say(f"the {key} index of split {split!r} finds recall@10 {info['recall_at_10']:.3f}, under the target "
             f"{info['target']:g}, at its widest search ({info['params'] or 'no search parameter'}): {advice}")
    return index, fields | {"max_memory": budget, "model": store.manifest.model.get("spec")}


def _rebuild(store: Store, split: str, record: ImageIndex, reason: str, progress: bool, added: int,
             removed: int) -> dict[str, Any]:
    """Build SPLIT's index again as RECORD's family within its budget (else as ``auto``), saying why."""
    _say(f"the image index of split {split!r} is rebuilt: {reason}")
    kinds = dict.fromkeys([family(record.kind, store.row_count(split), store.dim, record.max_memory), "auto"])
    for number, kind in enumerate(kinds, 1):
        try:
            index, fields = _build(store, split, kind, record.max_memory, progress)
            break
        except FeatstoreError as e:
            if number == len(kinds):
                raise FeatstoreError(f"{e} (the image index of split {split!r} was being rebuilt: {reason}); "
                                     "the split's shards are committed") from None
    record = _commit(store, split, index, fields)
    return {"kind": record.kind, "rows": record.rows, "added": added, "removed": removed, "retrained": reason}


def _damage(store: Store, record: ImageIndex) -> str:
    """Why RECORD's index file cannot be used, as ``refresh`` says it when it rebuilds."""
    return f"its file {image_index.FOLDER}/{record.file}: {image_index.check(store, record) or 'unreadable'}"


def _commit(store: Store, split: str, index, fields: dict[str, Any]) -> ImageIndex:
    return image_index.commit(store, split, lambda tmp: images.save(index, tmp), fields)


def _fields(record: ImageIndex) -> dict[str, Any]:
    """RECORD's fields that describe the index (not its file), for the next commit."""
    return {name: getattr(record, name) for name in ImageIndex.__slots__ if name not in ("file", "sha256", "bytes")}


def _say(line: str) -> None:
    print(f"featstore: {line}", file=sys.stderr, flush=True)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class _Shown:
    """The split's key batches with a progress bar on stderr for each pass ``build`` makes over them."""

    def __init__(self, batches, rows: int, key: str, progress: bool):
        self.batches, self.rows, self.key, self.progress, self.passes = batches, rows, key, progress, 0

    def __iter__(self):
        from tqdm import tqdm

        self.passes += 1
        with tqdm(total=self.rows, unit=" rows", desc=f"index {self.key} pass {self.passes}",
                  disable=not self.progress, file=sys.stderr) as bar:
            for keys, vectors in self.batches:
                yield keys, vectors
                bar.update(len(keys))
