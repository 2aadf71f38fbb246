"""The schema of ``featstore.json``, checked whole whenever a store's manifest is loaded.

featstore joins the file names a manifest holds (shards, a folder exchange's record, the label files) to
the store's folders before it opens, hashes, renames or deletes them, so each must be a plain name of its
kind: no ``/``, no ``..``, nothing absolute. ``validate`` refuses a manifest with such a name, a missing key or
a value of the wrong type with one line naming the record, before any command acts on it. Keys the schema
does not list are ignored, and featstore takes no file name from them; at the top level and in the model
identity they are kept when the manifest is saved again, inside other records they are dropped.

The schema is plain data below (one checker per record kind), kept separate from the typed records built
from a manifest that passes it (``manifest.py``), so a record kind added later is added here with its names'
pattern and there with its fields.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from featstore.errors import FeatstoreError

FORMAT = 1
SPLIT_NAME = re.compile(r"\A(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# No fixed width: the counter grows past 999999 into longer names, up to MAX_SHARDS (never reached: 10^18 shards)
SHARD_PATTERN = r"part-[0-9]{6,18}-[0-9a-f]{8}\.parquet"  # unanchored, for patterns of names built from it
SHARD_NAME = re.compile(rf"\A{SHARD_PATTERN}\Z")
MAX_SHARDS = 10 ** 18
EXCHANGE_FOLDER = re.compile(r"\A\.exchange-[A-Za-z0-9_.-]{1,64}-[0-9a-f]{8}\Z")  # in the store's root
INDEX_NAME = re.compile(r"\Aindex(-[0-9a-f]{32})?\.faiss\Z")  # in labels/; without the tag: stores made before
IMAGE_INDEX_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}-[0-9a-f]{16}\.faiss\Z")  # in image-index/
CLASSES_NAME = re.compile(r"\Aclasses(-[0-9a-f]{32})?\.parquet\Z")
SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
# Every pattern is anchored with \A and \Z, not ^ and $: "$" also matches before a final newline, so
# ``.match`` let a name such as "train\n" through. ``text`` checks with ``fullmatch`` besides.
DTYPES = ("float16", "float32")

Check = Callable[[Any], None]


class Bad(Exception):
    """A value that breaks the schema; PATH (record keys, outermost first) is filled in on the way out."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.path: list[str] = []


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _nested(key: str, check: Check, value: Any) -> None:
    try:
        check(value)
    except Bad as e:
        e.path.insert(0, key)
        raise


def integer(low: int = 0, high: int | None = None) -> Check:
    def check(value: Any) -> None:
        if type(value) is not int:  # bool is not a count
            raise Bad(f"expected an integer, got {_type_name(value)} {_shown(value)}")
        if value < low or (high is not None and value > high):
            raise Bad(f"{value} is out of range ({low} to {high if high is not None else 'any'})")

    return check


def text(pattern: re.Pattern | None = None, what: str = "") -> Check:
    def check(value: Any) -> None:
        if type(value) is not str:
            raise Bad(f"expected a string, got {_type_name(value)} {_shown(value)}")
        if pattern is not None and not pattern.fullmatch(value):  # match's "$" would let a final "\n" in
            raise Bad(f"{_shown(value)} is not {what}")

    return check


def number(low: float, high: float) -> Check:
    def check(value: Any) -> None:
        if type(value) not in (int, float) or not low <= value <= high:
            raise Bad(f"{_shown(value)} is not a number in [{low:g}, {high:g}]")

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> None:
        if value not in choices or type(value) is not type(choices[0]):
            raise Bad(f"{_shown(value)} is not one of {', '.join(map(repr, choices))}")

    return check


def nullable(inner: Check) -> Check:
    def check(value: Any) -> None:
        if value is not None:
            inner(value)

    return check


def list_of(item: Check) -> Check:
    def check(value: Any) -> None:
        if type(value) is not list:
            raise Bad(f"expected a list, got {_type_name(value)} {_shown(value)}")
        for number, element in enumerate(value):
            _nested(f"[{number}]", item, element)

    return check


def mapping(key: Check, item: Check) -> Check:
    def check(value: Any) -> None:
        if type(value) is not dict:
            raise Bad(f"expected an object, got {_type_name(value)} {_shown(value)}")
        for name, element in value.items():
            key(name)
            _nested(f"[{name!r}]", item, element)

    return check


def record(required: dict[str, Check], optional: dict[str, Check] | None = None,
           rule: Callable[[dict], str | None] | None = None) -> Check:
    """An object with REQUIRED and OPTIONAL keys (others are ignored); RULE returns a problem or None."""
    fields = {**required, **(optional or {})}

    def check(value: Any) -> None:
        if type(value) is not dict:
            raise Bad(f"expected an object, got {_type_name(value)} {_shown(value)}")
        for name in required:
            if name not in value:
                raise Bad(f"missing key {name!r}")
        for name, field in fields.items():
            if name in value:
                _nested(f".{name}", field, value[name])
        problem = rule(value) if rule else None
        if problem:
            raise Bad(problem)

    return check


def _committed_or_pending(shard: dict) -> str | None:
    """A shard record is committed (rows, bytes, sha256) or a new shard's pending checksum (next) or both."""
    if "next" not in shard and not {"rows", "bytes", "sha256"} <= shard.keys():
        return "a shard record needs rows, bytes and sha256 (or a pending 'next')"
    return None


def _labels_agree(labels: dict) -> str | None:
    if len(labels["display_names"]) != labels["classes"]:
        return f"{len(labels['display_names'])} display names for {labels['classes']} classes"
    return None


def _unique_classes(manifest: dict) -> str | None:
    classes = manifest["classes"]
    return "classes lists a name twice" if len(set(classes)) != len(classes) else None


MAX_KEY = (1 << 62)  # row keys are int64 for FAISS; a split gives at most this many in its life
COUNT = integer()
ANY_INT = integer(-(1 << 63), (1 << 63) - 1)
STRING = text()
DIGEST = text(SHA256, "a sha256 hex digest")
SHARD_FILE = text(SHARD_NAME, "a shard file name (part-NNNNNN-xxxxxxxx.parquet)")
SHARD_STATS = record({"rows": COUNT, "bytes": COUNT, "sha256": DIGEST}, {"footer_sha256": DIGEST})
SHARD = record({}, {"rows": COUNT, "bytes": COUNT, "sha256": DIGEST, "mtime_ns": ANY_INT, "next": SHARD_STATS,
                    "footer_sha256": DIGEST}, rule=_committed_or_pending)
FAILED = record({"path": STRING, "reason": STRING, "size": ANY_INT, "mtime_ns": ANY_INT},
                {"sha256": nullable(STRING)})
EXCHANGE = record({"folder": text(EXCHANGE_FOLDER, "an exchange folder name (.exchange-SPLIT-xxxxxxxx)"),
                   "added": mapping(SHARD_FILE, SHARD_STATS), "dropped": list_of(SHARD_FILE)})
IMAGE_INDEX = record({"file": text(IMAGE_INDEX_NAME, "an image index file name (SPLIT-HEX.faiss)"), "sha256": DIGEST,
                      "bytes": COUNT, "kind": STRING, "rows": COUNT, "recall_at_10": number(0, 1),
                      "target": number(0, 1), "params": STRING, "sized_for": COUNT, "trained_on": COUNT,
                      "built_at": STRING},
                     {"updated_at": STRING, "max_memory": integer(1), "model": STRING,
                      "next_key": integer(0, MAX_KEY)})
SPLIT = record({"shards": mapping(SHARD_FILE, SHARD), "failed": mapping(STRING, FAILED)},
               {"source": nullable(STRING), "exchange": EXCHANGE, "next_key": integer(0, MAX_KEY),
                "index": IMAGE_INDEX})
LABELS = record({"classes": COUNT, "templates": list_of(STRING), "display_names": list_of(STRING),
                 "index_sha256": DIGEST},
                {"created_at": STRING, "index_file": text(INDEX_NAME, "a label index file name (index-HEX.faiss)"),
                 "classes_file": text(CLASSES_NAME, "a class table file name (classes-HEX.parquet)"),
                 "classes_sha256": DIGEST},
                rule=_labels_agree)
# What identity.same_model and describe read; a store written before model families has no "family" (openai)
MODEL = record({"dim": integer(1), "spec": STRING, "sha256": nullable(STRING), "architecture": STRING,
                "preprocessing": STRING, "precision": STRING}, {"family": STRING})
MANIFEST = record(
    {"format": one_of(FORMAT), "model": MODEL, "dim": integer(1), "dtype": one_of(*DTYPES),
     "classes": list_of(STRING), "splits": mapping(text(SPLIT_NAME, "a split name"), SPLIT),
     "next_shard": integer(0, MAX_SHARDS)},
    {"created_at": STRING, "display_names": mapping(STRING, STRING), "labels": nullable(LABELS)},
    rule=_unique_classes)


def where(path: list[str]) -> str:
    return "".join(path).lstrip(".") or "the top level"


def validate(manifest: Any, source: str) -> dict[str, Any]:
    """MANIFEST (loaded from SOURCE) if it fits the schema; else one FeatstoreError naming the bad record."""
    if type(manifest) is dict and manifest.get("format") != FORMAT:
        raise FeatstoreError(f"{source} is not a featstore format-{FORMAT} manifest")
    try:
        MANIFEST(manifest)
    except Bad as e:
        raise FeatstoreError(f"{source} is not a valid featstore manifest: {where(e.path)}: {e} (restore it, "
                             "or move the store aside and encode again)") from None
    return manifest
