"""``featstore.json`` as typed records, and the one place that reads and writes it.

``load`` checks the file whole against the schema (``schema.py``: one line naming the bad record) and builds
the records; ``save`` writes them back in the same JSON layout (temp file, fsync, rename), and is the only code
that writes the manifest. A shard record is committed (rows, bytes, sha256, mtime_ns; footer_sha256 since
footers were hashed), or pending (``next``: the checksum of a file about to be renamed into place), or both
while a replacement is under way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from featstore.errors import FeatstoreError
from featstore.store.files import atomic_write
from featstore.store.schema import FORMAT, validate


@dataclass(slots=True)
class ShardStats:
    """What a written shard file is: its rows, bytes and sha256, and the sha256 of its Parquet footer
    (``shards.footer_sha256``; None in records written before footers were hashed)."""

    rows: int
    bytes: int
    sha256: str
    footer_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}
        return data | ({"footer_sha256": self.footer_sha256} if self.footer_sha256 else {})


@dataclass(slots=True)
class Shard:
    """A split's shard: committed when it has a sha256; ``next`` is a replacement about to be renamed in."""

    rows: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    mtime_ns: int | None = None
    next: ShardStats | None = None
    footer_sha256: str | None = None  # checked by every reader before it reads (``shards.check_footer``)

    @property
    def committed(self) -> bool:
        return self.sha256 is not None

    def commit(self, stats: ShardStats, mtime_ns: int) -> None:
        """Record the file STATS describes, last modified at MTIME_NS, as the shard (no longer pending)."""
        self.rows, self.bytes, self.sha256, self.mtime_ns, self.next = stats.rows, stats.bytes, stats.sha256, mtime_ns, None
        self.footer_sha256 = stats.footer_sha256

    def to_json(self) -> dict[str, Any]:
        data = {key: getattr(self, key) for key in ("rows", "bytes", "sha256", "mtime_ns", "footer_sha256")}
        data = {key: value for key, value in data.items() if value is not None}
        return data | ({"next": self.next.to_json()} if self.next else {})


@dataclass(slots=True)
class Failure:
    """An image that could not be listed, read or encoded, with the fingerprint it had then."""

    path: str
    reason: str
    size: int
    mtime_ns: int
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "size": self.size, "mtime_ns": self.mtime_ns,
                "sha256": self.sha256}


@dataclass(slots=True)
class Exchange:
    """A folder exchange in progress (``rewrite_shards``): the copy's folder, its new shards, the shards it drops."""

    folder: str
    added: dict[str, ShardStats]
    dropped: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"folder": self.folder, "added": {name: s.to_json() for name, s in self.added.items()},
                "dropped": list(self.dropped)}


@dataclass(slots=True)
class ImageIndex:
    """A split's image index (``featstore index``): the FAISS file ``STORE/image-index/FILE`` over the split's
    normalised embeddings keyed by row key, what it was built as and how good it measured."""

    file: str  # SPLIT-HEX.faiss, a new name each commit
    sha256: str
    bytes: int
    kind: str  # faiss index_factory string
    rows: int  # live rows it holds (the split's rows when current)
    recall_at_10: float  # measured against exact search on held-out rows (1.0 for Flat)
    target: float  # the recall target its search parameters were tuned to
    params: str  # "nprobe=N" / "efSearch=N", "" for exact kinds
    sized_for: int  # rows its coarse quantizer was sized for
    trained_on: int
    built_at: str
    updated_at: str | None = None
    max_memory: int | None = None  # the budget it was built under (updates and rebuilds keep to it)
    model: str | None = None  # the store model's spec when it was built
    next_key: int | None = None  # the split's next_key when the index last held its live rows (None: not known)

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__slots__ if getattr(self, key) is not None}


@dataclass(slots=True)
class Split:
    source: str | None = None
    shards: dict[str, Shard] = field(default_factory=dict)
    failed: dict[str, Failure] = field(default_factory=dict)
    exchange: Exchange | None = None
    next_key: int = 0  # the next row key to give (``Store.give_keys``): keys are never reused
    index: ImageIndex | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"source": self.source, "shards": {name: s.to_json() for name, s in self.shards.items()},
                "failed": {row_id: f.to_json() for row_id, f in self.failed.items()}, "next_key": self.next_key}
        data |= {"index": self.index.to_json()} if self.index else {}
        return data | ({"exchange": self.exchange.to_json()} if self.exchange else {})


@dataclass(slots=True)
class LabelIndex:
    """The label index and class table ``featstore labels`` wrote (stores made before: no file names)."""

    classes: int
    templates: list[str]
    display_names: list[str]
    index_sha256: str
    created_at: str | None = None
    index_file: str | None = None
    classes_file: str | None = None
    classes_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        keys = ("classes", "templates", "display_names", "index_sha256", "created_at", "index_file",
                "classes_file", "classes_sha256")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


@dataclass(slots=True)
class Manifest:
    model: dict[str, Any]  # the model identity (``featstore.identity``), kept as written
    dim: int
    dtype: str
    classes: list[str] = field(default_factory=list)
    splits: dict[str, Split] = field(default_factory=dict)
    next_shard: int = 0
    labels: LabelIndex | None = None
    display_names: dict[str, str] = field(default_factory=dict)
    created_at: str | None = None
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys this featstore does not know, kept as read

    def to_json(self) -> dict[str, Any]:
        data = self.extra | {"format": self.format, "model": self.model, "dim": self.dim, "dtype": self.dtype,
                "classes": list(self.classes), "display_names": dict(self.display_names),
                "splits": {name: s.to_json() for name, s in self.splits.items()},
                "labels": self.labels.to_json() if self.labels else None, "next_shard": self.next_shard}
        return data | ({"created_at": self.created_at} if self.created_at is not None else {})


def new(model: dict[str, Any], dtype: str) -> Manifest:
    """An empty store's manifest for MODEL's embeddings, stored as DTYPE."""
    return Manifest(model=model, dim=model["dim"], dtype=dtype,
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _stats(data: dict[str, Any]) -> ShardStats:
    return ShardStats(data["rows"], data["bytes"], data["sha256"], data.get("footer_sha256"))


def _split(data: dict[str, Any]) -> Split:
    shards = {name: Shard(s.get("rows"), s.get("bytes"), s.get("sha256"), s.get("mtime_ns"),
                          _stats(s["next"]) if "next" in s else None, s.get("footer_sha256"))
              for name, s in data["shards"].items()}
    failed = {row_id: Failure(f["path"], f["reason"], f["size"], f["mtime_ns"], f.get("sha256"))
              for row_id, f in data["failed"].items()}
    pending = data.get("exchange")
    exchange = Exchange(pending["folder"], {name: _stats(s) for name, s in pending["added"].items()},
                        list(pending["dropped"])) if pending else None
    index = data.get("index")
    index = ImageIndex(**{key: index.get(key) for key in ImageIndex.__slots__}) if index else None
    return Split(data.get("source"), shards, failed, exchange, data.get("next_key", 0), index)


def from_json(data: Any, source: str) -> Manifest:
    """The records of DATA (loaded from SOURCE), checked whole first (``schema.validate``)."""
    validate(data, source)
    labels = data.get("labels")
    return Manifest(
        model=data["model"], dim=data["dim"], dtype=data["dtype"], classes=list(data["classes"]),
        splits={name: _split(split) for name, split in data["splits"].items()}, next_shard=data["next_shard"],
        labels=LabelIndex(**{key: labels.get(key) for key in LabelIndex.__slots__}) if labels else None,
        display_names=dict(data.get("display_names", {})), created_at=data.get("created_at"), format=data["format"],
        extra={key: value for key, value in data.items() if key not in Manifest.__slots__})


def load(path: str) -> Manifest:
    """The manifest at PATH; one FeatstoreError line when it cannot be read or breaks the schema."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise FeatstoreError(f"cannot read {path}: {e}") from None
    return from_json(data, path)


def save(path: str, manifest: Manifest) -> None:
    """Write MANIFEST to PATH atomically: the only writer of ``featstore.json``."""
    data = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
