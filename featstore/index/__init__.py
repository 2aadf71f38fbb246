"""The image index: a FAISS inner-product index over a split's L2-normalised image embeddings, keyed by the
store's int64 row keys, built under a memory budget, tuned to a recall target and kept current by updates.

A library over ``(keys, vectors)`` batch streams; the store feeds it shards (see build.py for the passes)."""

from .build import KINDS, build, choose_kind, index_bytes, parse_size
from .images import (dedup, fresh_probe, groups, held_keys, live_rows, load, near_pairs, needs_retrain, save, search,
                     tombstones, update)
from .tune import ExactTopK, recall_at, tune

__all__ = ["KINDS", "ExactTopK", "build", "choose_kind", "dedup", "fresh_probe", "groups", "held_keys", "index_bytes",
           "live_rows", "load", "near_pairs", "needs_retrain", "parse_size", "recall_at", "save", "search", "tombstones",
           "tune", "update"]
