"""Zero-shot classification of a stored split, streamed: ``featstore query --split``.

Scores are the seed notebook's probabilities, softmax(100 · cos) over all classes. The split is read in blocks
of rows; for each block the cosines against every class are one matrix product, of which only the top-k and
the softmax's normaliser (a logsumexp) are kept, so memory is a block of rows × classes, never the split's.
``--out`` rows are written as their block is done, in id order. Blocks are read ahead by one thread and
scored whole by one thread per core (``scored_blocks``): at 1,000 classes reading a block costs ~0.2x and its
top-k and normaliser ~0.15x of its matrix product's core time, so ~1.5x the bare products is this design's floor.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError
from featstore.store import Store, atomic_write, embedding_matrix, run_batches
from featstore.store.shards import cast_rows, stored_matrix

LOGIT_SCALE = 100.0  # CLIP's: softmax(100 · cos)
BLOCK_SCORES = 1 << 22  # rows × classes scored at once: 16 MiB of float32 (one such buffer per scorer)
MAX_BLOCK_ROWS = 4096
MAX_SCORERS = 8  # scoring threads; past ~5 the one reader (~10 ms a block) is what they wait for
ARGMAX_PASSES = 16  # top-k by repeated argmax up to this k; a partition beyond
PAIR_LIMIT = 1 << 18  # distinct (true, predicted) confusion pairs kept; past it only the most frequent stay
HISTOGRAM_BINS = 50  # of the top-1 probability, over [0, 1]
OUT_SCHEMA = pa.schema([("id", pa.string()), ("label_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.string())),
                        ("scores", pa.list_(pa.float32()))])


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def logit_matrix(index):
    """100 x the label index's normalised class embeddings, (classes, dim) float32, as a torch tensor: a
    normalised image embedding's product with it is its logits (the scale costs no pass over the scores)."""
    import torch

    return torch.from_numpy(LOGIT_SCALE * index.reconstruct_n(0, index.ntotal))


def rank(features: np.ndarray, classes, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the K best class ids, best first; their softmax(100·cos) probabilities over all classes) per row.
    CLASSES is ``logit_matrix`` (torch's matrix product was faster than numpy's here)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(normalise(features), np.float32))
    return softmax_top((x @ classes.T).numpy(), k)


def softmax_top(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``rank``'s result from the LOGITS (rows × classes float32), which are overwritten."""
    ids, top = top_k(logits, k)  # the top entries of LOGITS are now -inf
    best = top[:, :1]
    np.subtract(logits, best, out=logits)
    np.exp(logits, out=logits)
    top = np.exp(top - best)
    return ids, top / (logits.sum(axis=1, keepdims=True) + top.sum(axis=1, keepdims=True))


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(column ids, values) of each row's K largest SCORES, largest first (ties: lower id first); those
    entries of SCORES are set to -inf. A few argmax passes beat a partition (and torch.topk) for small K."""
    rows = np.arange(len(scores))[:, None]
    if k > ARGMAX_PASSES:
        ids = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
        ids = np.take_along_axis(ids, np.lexsort((ids, -scores[rows, ids])), axis=1)
        values = scores[rows, ids]
        scores[rows, ids] = -np.inf
        return ids, values
    ids, values = np.empty((len(scores), k), np.int64), np.empty((len(scores), k), scores.dtype)
    for i in range(k):
        ids[:, i] = scores.argmax(axis=1)
        values[:, i] = scores[rows[:, 0], ids[:, i]]
        scores[rows[:, 0], ids[:, i]] = -np.inf
    return ids, values


def block_rows(n_classes: int) -> int:
    return max(1, min(MAX_BLOCK_ROWS, BLOCK_SCORES // max(n_classes, 1)))


def split_blocks(store: Store, split: str, rows: int, matrix: Callable[[pa.ChunkedArray, int], np.ndarray] =
                 embedding_matrix) -> Iterator[tuple[pa.Array, np.ndarray, np.ndarray]]:
    """(ids, labels with -1 for none, float32 embeddings) of SPLIT, at most ROWS rows at a time, in id order;
    the embeddings as MATRIX makes them (``stored_matrix``: as stored, float16 in most stores).

    Each sorted run of shards is streamed (``run_batches``, which checks every shard, ``MAX_BLOCK_ROWS`` rows a
    batch); several runs are merged a batch at a time: rows up to the smallest of the runs' last buffered ids
    are in order across all runs, so memory is a batch per run."""
    runs = [run_batches(run, ["label", "embedding"], MAX_BLOCK_ROWS) for run in store.sorted_runs(split)]
    buffers: list[pa.Table | None] = [None] * len(runs)
    while True:
        for i, run in enumerate(runs):
            while run is not None and (buffers[i] is None or buffers[i].num_rows == 0):
                batch = next(run, None)
                if batch is None:
                    runs[i] = run = None
                else:
                    buffers[i] = pa.Table.from_batches([batch[1]])
        if not any(table is not None and table.num_rows for table in buffers):
            return
        bound = min((b.column("id")[-1] for b, run in zip(buffers, runs) if run is not None), default=None,
                    key=lambda s: s.as_py())
        parts = []
        for i, table in enumerate(buffers):
            if table is None or not table.num_rows:
                continue
            n = table.num_rows if bound is None else pc.sum(pc.less_equal(table.column("id"), bound)).as_py() or 0
            parts.append(table.slice(0, n))
            buffers[i] = table.slice(n)
        ready = pa.concat_tables(parts)
        if len(parts) > 1:
            ready = ready.take(pc.sort_indices(ready, [("id", "ascending")]))
        for start in range(0, ready.num_rows, rows):
            part = ready.slice(start, rows)
            labels = part.column("label").fill_null(-1).to_numpy().astype(np.int64)
            yield part.column("id").combine_chunks(), labels, matrix(part.column("embedding"), store.dim)


def unit_rows(features):
    """FEATURES (a float32 torch tensor) scaled to unit rows in place (a zero row stays zero)."""
    import torch

    norms = torch.linalg.vector_norm(features, dim=1, keepdim=True)
    return features.div_(norms.masked_fill_(norms == 0, 1))


def scored_blocks(store: Store, split: str, classes, k: int) -> Iterator[tuple[pa.Array, np.ndarray, np.ndarray,
                                                                               np.ndarray]]:
    """(ids, labels, ``rank``'s top-K class ids and probabilities) of SPLIT's blocks, in id order.

    One reader thread reads blocks ahead (pyarrow releases the GIL) and casts each into a free float32 buffer
    of a fixed pool (so Arrow's memory is freed by the thread that took it, and nothing else is allocated per
    block); one scoring thread per core torch would use (at most ``MAX_SCORERS``) takes whole blocks: unit rows,
    a matrix product into logits of its own on its share of the cores (one thread on a small machine), the
    buffer back to the pool, then top-k and normaliser. So every core is busy with some block's work and none
    waits for another's, where a product spread over all cores left them idle through each block's one-core
    top-k (1.6x the bare products vs 2.4x, 1,000,000 x 1,000 on 2 cores). Torch's thread count and Arrow's memory
    pool are set process-wide meanwhile and restored after (two such generators open at once would restore
    them out of turn; featstore never opens two). Results are yielded in block order; a read's error (a damaged
    shard) is raised in its turn; stopping early stops the threads."""
    import torch

    rows, cores = block_rows(len(classes)), max(torch.get_num_threads(), 1)
    per_scorer = -(-cores // MAX_SCORERS)  # threads a product runs on: 1 up to MAX_SCORERS cores
    scorers_n = cores // per_scorer
    blocks = split_blocks(store, split, rows, stored_matrix)
    free: queue.Queue = queue.Queue()  # buffers in use: <= scorers_n + 1 scoring, 1 being read
    for _ in range(scorers_n + 2):
        free.put(classes.new_empty((rows, store.dim)))
    stop, logits = threading.Event(), threading.local()

    def read():
        block = next(blocks, None)
        if block is None:
            return None
        ids, labels, stored = block
        while not stop.is_set():
            try:
                buffer = free.get(timeout=0.1)
            except queue.Empty:
                continue
            cast_rows(stored, buffer[:len(stored)])
            return ids, labels, buffer, len(stored)
        return None

    def score(block):
        ids, labels, buffer, n = block
        if not hasattr(logits, "buffer"):
            logits.buffer = classes.new_empty((rows, len(classes)))
        torch.matmul(unit_rows(buffer[:n]), classes.T, out=logits.buffer[:n])
        free.put(buffer)
        return ids, labels, *softmax_top(logits.buffer[:n].numpy(), k)

    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="featstore-read")
    scorers = concurrent.futures.ThreadPoolExecutor(scorers_n, thread_name_prefix="featstore-score")
    scoring: collections.deque = collections.deque()
    arrow_pool = pa.default_memory_pool()
    try:
        torch.set_num_threads(per_scorer)  # process-wide, as Arrow's pool: restored below
        pa.set_memory_pool(threaded_pool())
        pending = reader.submit(read)
        while pending is not None or scoring:
            while pending is not None and len(scoring) <= scorers_n:  # every scorer busy, one block more ready
                if pending.exception() is not None:  # a read's error: raised after the blocks before it
                    scoring.append(pending)
                    pending = None
                elif (block := pending.result()) is None:
                    pending = None
                else:
                    pending = reader.submit(read)
                    scoring.append(scorers.submit(score, block))
            if scoring:
                yield scoring.popleft().result()
    finally:
        stop.set()
        for future in scoring:
            future.cancel()
        reader.shutdown(wait=True, cancel_futures=True)
        scorers.shutdown(wait=True, cancel_futures=True)
        blocks.close()
        torch.set_num_threads(cores)
        pa.set_memory_pool(arrow_pool)


def threaded_pool() -> pa.MemoryPool:
    """Arrow's memory pool for reading across threads: jemalloc where pyarrow has it. With mimalloc (pyarrow's
    default) the zero-shot reader and scorers' peak RSS grew with the split (+7-12 % from 100,000 to 1,000,000
    rows, flat with jemalloc: bench/zeroshot_bench.py)."""
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without it
        return pa.default_memory_pool()


@dataclass
class Tally:
    """Per-class counts over labelled rows (rows, top-1 hits, top-5 hits) and (true, predicted) confusion
    counts for wrong top-1 predictions. Confusions are exact while at most ``PAIR_LIMIT`` distinct pairs occur;
    past that the rarest pairs are dropped, so kept counts are lower bounds (``exact`` turns False)."""

    n_classes: int
    rows: np.ndarray = field(init=False)
    hit1: np.ndarray = field(init=False)
    hit5: np.ndarray = field(init=False)
    exact: bool = True

    def __post_init__(self):
        self.rows, self.hit1, self.hit5 = (np.zeros(self.n_classes, np.int64) for _ in range(3))
        self._keys, self._counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def add(self, labels: np.ndarray, top: np.ndarray) -> None:
        """LABELS (-1: unlabelled, skipped) against TOP, the predicted class ids best first (rows × k)."""
        labelled = labels >= 0
        y, top = labels[labelled], top[labelled]
        hit1 = top[:, 0] == y
        hit5 = (top[:, :5] == y[:, None]).any(axis=1)
        for counts, rows in ((self.rows, y), (self.hit1, y[hit1]), (self.hit5, y[hit5])):
            counts += np.bincount(rows, minlength=self.n_classes)
        self._pending.append(y[~hit1] * self.n_classes + top[~hit1, 0])
        self._pending_rows += int((~hit1).sum())
        if self._pending_rows > PAIR_LIMIT:
            self._fold()

    def _fold(self) -> None:
        keys = np.concatenate([self._keys, *self._pending])
        weights = np.concatenate([self._counts, np.ones(self._pending_rows, np.int64)])
        self._keys, inverse = np.unique(keys, return_inverse=True)
        self._counts = np.bincount(inverse, weights=weights).astype(np.int64)
        self._pending, self._pending_rows = [], 0
        if len(self._keys) > PAIR_LIMIT:
            keep = np.sort(np.argpartition(self._counts, -PAIR_LIMIT)[-PAIR_LIMIT:])
            self._keys, self._counts, self.exact = self._keys[keep], self._counts[keep], False

    def confusions(self, n: int | None = None) -> list[tuple[int, int, int]]:
        """(true class, predicted class, count) of the N most frequent confusions, most frequent first."""
        self._fold()
        order = np.lexsort((self._keys, -self._counts))[:n]
        return [(int(k // self.n_classes), int(k % self.n_classes), int(c))
                for k, c in zip(self._keys[order], self._counts[order])]

    def matrix(self, chosen: np.ndarray) -> np.ndarray:
        """Counts of (true, predicted) among the CHOSEN classes: top-1 hits on the diagonal, confusions off it."""
        self._fold()
        place = np.full(self.n_classes, -1)
        place[chosen] = np.arange(len(chosen))
        true, predicted = place[self._keys // self.n_classes], place[self._keys % self.n_classes]
        kept = (true >= 0) & (predicted >= 0)
        counts = np.zeros((len(chosen), len(chosen)), np.int64)
        counts[true[kept], predicted[kept]] = self._counts[kept]
        counts[np.diag_indices(len(chosen))] = self.hit1[chosen]
        return counts

    def metrics(self) -> dict[str, Any]:
        """acc1, acc5 and mean per-class recall (over the classes with rows) as fractions; None without labels."""
        n = int(self.rows.sum())
        if not n:
            return {"n": 0, "acc1": None, "acc5": None, "mean_per_class_recall": None}
        present = self.rows > 0
        return {"n": n, "acc1": float(self.hit1.sum() / n), "acc5": float(self.hit5.sum() / n),
                "mean_per_class_recall": float(np.mean(self.hit1[present] / self.rows[present]))}


@dataclass
class ZeroShot:
    """What ``zeroshot`` measured: ``summary`` (what ``query --split`` reports) and the details a report plots."""

    summary: dict[str, Any]
    tally: Tally
    names: list[str]  # display names, by class id
    histogram: dict[str, list[int]]  # top-1 probability counts in HISTOGRAM_BINS bins: correct, wrong, unlabelled


def zeroshot(store_dir: str, split: str, top_k: int = 5, out: str | None = None) -> ZeroShot:
    """Zero-shot labels for every stored image of SPLIT; metrics when the split is labelled; the top-K of
    every row to Parquet OUT (id, label_ids, labels, scores), written as it goes and renamed into place."""
    from featstore.labels import load_label_index

    if top_k < 1:
        raise FeatstoreError("--top-k must be at least 1")
    store = Store.open(store_dir)
    store.split_info(split)
    out = store.check_output(out) if out else None  # refused before any work
    index, names = load_label_index(store)
    classes = logit_matrix(index)
    n_classes = len(names)
    k_out, k_rank = min(top_k, n_classes), min(max(top_k, 5), n_classes)
    tally = Tally(n_classes)
    histogram = {key: np.zeros(HISTOGRAM_BINS, np.int64) for key in ("correct", "wrong", "unlabelled")}
    name_array = pa.array(names, pa.string())
    seen = 0

    def score(writer: pq.ParquetWriter | None) -> None:
        nonlocal seen
        for ids, labels, top, probs in scored_blocks(store, split, classes, k_rank):
            tally.add(labels, top)
            seen += len(labels)
            bins = np.minimum((probs[:, 0] * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
            for key, rows in (("correct", top[:, 0] == labels), ("wrong", (top[:, 0] != labels) & (labels >= 0)),
                              ("unlabelled", labels < 0)):
                histogram[key] += np.bincount(bins[rows], minlength=HISTOGRAM_BINS)
            if writer is not None:
                writer.write_table(out_table(ids, top[:, :k_out], probs[:, :k_out], name_array))

    def write(tmp: str) -> None:
        with pq.ParquetWriter(tmp, OUT_SCHEMA, use_dictionary=["labels.list.element"]) as writer:  # class names
            # (ids, class ids, scores: a dictionary would hold nearly every value, only costing time)
            score(writer)

    if out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        atomic_write(out, write)
    else:
        score(None)
    summary = {**tally.metrics(), "rows": seen, **({"out": out} if out else {})}
    return ZeroShot(summary, tally, names, {key: value.tolist() for key, value in histogram.items()})


def out_table(ids: pa.Array, top: np.ndarray, probs: np.ndarray, names: pa.Array) -> pa.Table:
    """The ``--out`` rows of one block: per row its top class ids, their display names and probabilities."""
    n, k = top.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    flat = pa.array(top.reshape(-1).astype(np.int32))
    return pa.Table.from_arrays([
        ids,
        pa.ListArray.from_arrays(offsets, flat),
        pa.ListArray.from_arrays(offsets, names.take(flat)),
        pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1).astype(np.float32))),
    ], schema=OUT_SCHEMA)
