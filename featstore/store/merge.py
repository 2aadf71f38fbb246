"""The one sorted merge: streams of rows in id order merged into one, and lookups that walk such a stream.

Shards are sorted by id, and so are a source's listing and the plan's spill files; everything that combines
them does it here, holding one row (or batch) per stream rather than the streams: a rerun walking the split
(``Store.iter_rows``), compaction merging runs of shards, a manifest source merging its spilled runs, and the
plan and writer looking rows up by id as they walk (``InOrder``).
"""

from __future__ import annotations

import bisect
import heapq
import operator
from typing import Any, Callable, Iterable, Iterator

from featstore.errors import FeatstoreError

first = operator.itemgetter(0)  # rows are tuples whose first field is the id


def merge_sorted(streams: Iterable[Iterable[Any]], key: Callable[[Any], str] = first,
                 duplicate: Callable[[str], None] | None = None) -> Iterator[Any]:
    """The rows of STREAMS, each in increasing KEY order, as one stream in KEY order.

    A key met again calls DUPLICATE (which raises to refuse it) when given; a stream out of order, which the
    merge would pass on out of order, is refused."""
    previous = None
    for row in heapq.merge(*streams, key=key):
        current = key(row)
        if previous is not None and current <= previous:
            if current < previous:
                raise FeatstoreError(f"rows out of id order ({current!r} after {previous!r})")
            if duplicate is not None:
                duplicate(current)
        previous = current
        yield row


class InOrder:
    """Rows of a stream sorted by their first field, looked up by keys asked in increasing order: a merge, one
    pass and no index. The stream is started at the first lookup."""

    def __init__(self, rows: Iterable[tuple]):
        self._rows: Iterator[tuple] | Iterable[tuple] = rows
        self._row: tuple | None = None
        self._started = False

    def get(self, key: str) -> tuple | None:
        """The row whose first field is KEY, or None; rows before it are passed for good."""
        if not self._started:
            self._rows, self._started = iter(self._rows), True
            self._row = next(self._rows, None)
        while self._row is not None and self._row[0] < key:
            self._row = next(self._rows, None)
        return self._row if self._row is not None and self._row[0] == key else None


def chain_runs(shards: list[tuple[str, str, str]]) -> list[list[str]]:
    """(low id, high id, path) of shards chained into the fewest runs of shards whose id ranges follow one
    another. Taken by lowest id, a shard joins the run that ended last below it, so the shards one encode
    wrote stay one run (which ``compact`` can then weigh and merge as such)."""
    runs: list[list[str]] = []
    ends: list[tuple[str, int]] = []  # (highest id so far, run number), sorted
    for low, high, path in sorted(shards):
        place = bisect.bisect_left(ends, (low,)) - 1  # the last run ending below LOW
        if place >= 0:
            number = ends.pop(place)[1]
        else:
            number = len(runs)
            runs.append([])
        runs[number].append(path)
        bisect.insort(ends, (high, number))
    return runs
