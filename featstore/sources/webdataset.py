"""WebDataset tar shards (``webdataset:PATTERN``): one sample per key, its image, label and caption.

PATTERN is expanded as webdataset expands shard URLs (``{000..099}`` braces, ``::`` between patterns); a name
that then holds ``*``, ``?`` or ``[`` is a glob. Only local, uncompressed tars are read (``pipe:`` commands and
URLs are refused: a sample is opened by seeking to its member).

A sample's id is ``TAR/KEY`` (the tar's file name, the member names' part before the first dot of the last
path component, as webdataset groups them), its path ``TARPATH#MEMBER`` (its image member). Its image is its
``jpg``, ``jpeg``, ``png`` or ``webp`` member; its label the ``.cls`` class index or the ``label`` field of its
``.json``, named by ``classnames.txt`` beside the tars or in their parent folder (CLIP_benchmark's layout; a
label that is a name must then be one of them); without that file a class index is its own name (``"3"``).
A ``.txt`` member is the sample's caption. Its fingerprint is the image member's size and the tar's mtime, so
a rewritten tar is listed again and its images are hashed (only changed bytes are encoded again); an
unchanged tar's headers and small label and caption members are read, never its images.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Iterator


from featstore.errors import FeatstoreError
from featstore.sources import base
from featstore.sources.base import Item

IMAGE_TYPES = ("jpg", "jpeg", "png", "webp")  # a sample's image member, in order of preference
META_BYTES = 1 << 20  # a bigger .cls, .json or .txt member is a bad sample, not read
INDEXES_KEPT = 4  # tars whose member index a process keeps (a worker reads the plan's items in tar order)


def member_index(path: str) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of a tar's regular files, from its headers (``tarfile`` seeks over
    the data). A member named twice is its last copy, as extraction would leave it. ``tarfile`` takes a tar
    cut short at a header for a shorter one: the end-of-archive block must follow the last member."""
    try:
        with tarfile.open(path, "r:") as tar:
            index = {info.name: (info.offset_data, info.size) for info in tar if info.isfile()}
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("truncated or damaged after its last readable member")
            return index
    except (OSError, tarfile.TarError) as e:
        raise FeatstoreError(f"cannot read webdataset shard {path}: {e}".splitlines()[0]) from None


class WebDatasetSource(base.Source):
    """Local tar shards in the WebDataset layout; see the module's notes."""

    lists_hashes = False  # a member's sha256 is known only once it is read

    def __init__(self, pattern: str):
        import glob

        from webdataset.shardlists import expand_urls

        if pattern.startswith("pipe:") or "://" in pattern:
            raise FeatstoreError(f"webdataset:{pattern}: only local tar files are supported (no pipe: or URLs)")
        patterns = [os.path.abspath(os.path.expanduser(p)) for p in pattern.split("::")]
        self.spec = "webdataset:" + "::".join(patterns)
        tars = set()
        for name in expand_urls("::".join(patterns)):
            found = glob.glob(name) if any(c in name for c in "*?[") else [name]
            missing = [t for t in found if not os.path.isfile(t)]
            if missing or not found:
                raise FeatstoreError(f"webdataset shard {missing[0] if missing else name} does not exist")
            tars.update(found)
        # sorted as "NAME/": then ids (NAME/KEY) come in plain string order
        self.tars = sorted(tars, key=lambda t: os.path.basename(t) + "/")
        for before, after in zip(self.tars, self.tars[1:]):
            if os.path.basename(before) == os.path.basename(after):
                raise FeatstoreError(f"webdataset shards {before} and {after} have the same name, which ids are made of")
        self._by_name = {os.path.basename(t): t for t in self.tars}
        self._names = self._classnames()
        self._indexes: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}  # per process: tar -> (mtime, index)

    def _classnames(self) -> list[str] | None:
        folder = os.path.dirname(self.tars[0])
        for place in (folder, os.path.dirname(folder)):
            path = os.path.join(place, "classnames.txt")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    names = [line.strip() for line in f.read().rstrip().splitlines()]
                if len(set(names)) != len(names):
                    raise FeatstoreError(f"{path} names a class twice")
                return names
        return None

    def classes(self) -> list[str]:
        """classnames.txt's names; without it, the labels the samples give (a first pass over the tars)."""
        if self._names is not None:
            return list(self._names)
        return sorted({item.label for item in self.iter_items() if item.label is not None})

    def iter_items(self) -> Iterator[Item]:
        for tar in self.tars:
            yield from self._samples(tar)

    def _samples(self, tar: str) -> Iterator[Item]:
        """One tar's samples in key order, from its headers and small members."""
        from webdataset.tariterators import base_plus_ext

        mtime_ns = os.stat(tar).st_mtime_ns
        samples: dict[str, dict[str, tuple[str, int, int]]] = {}
        for name, (offset, size) in member_index(tar).items():
            key, kind = base_plus_ext(name)
            if key is not None:
                samples.setdefault(key, {})[kind.lower()] = (name, offset, size)
        prefix = os.path.basename(tar) + "/"
        with open(tar, "rb") as f:
            def text(members: dict[str, tuple[str, int, int]], kind: str) -> str | None:
                if kind not in members:
                    return None
                _, offset, size = members[kind]
                if size > META_BYTES:
                    raise ValueError(f".{kind} member of {size} bytes (more than {META_BYTES})")
                f.seek(offset)
                return f.read(size).decode("utf-8", errors="replace")

            for key in sorted(samples):
                members = samples[key]
                image = next((members[kind] for kind in IMAGE_TYPES if kind in members), None)
                try:
                    cls = text(members, "cls")
                    label = self._label(cls, text(members, "json") if cls is None else None)
                    caption = text(members, "txt")
                    error = None if image else f"sample has no {'/'.join(IMAGE_TYPES)} image"
                except ValueError as e:
                    caption = label = None
                    error = str(e)
                path = f"{tar}#{image[0] if image else key}"
                yield Item(prefix + key, path, label, image[2] if image else 0, mtime_ns, error=error, caption=caption)

    def _label(self, cls: str | None, meta: str | None) -> str | None:
        """The class name a sample's ``.cls`` text or ``.json`` text gives (None without either); ValueError
        says why a label is unusable."""
        if cls is not None:
            try:
                value = int(cls.strip())
            except ValueError:
                raise ValueError(f".cls is not a class index: {cls.strip()[:40]!r}") from None
        elif meta is not None:
            try:
                record = json.loads(meta)
            except (ValueError, RecursionError) as e:
                raise ValueError(f".json is not JSON ({type(e).__name__}: {e})"[:200]) from None
            value = record.get("label") if isinstance(record, dict) else None
            if value is None:
                return None
        else:
            return None
        if isinstance(value, str):
            if self._names is not None and value not in self._names:
                raise ValueError(f"label {value[:40]!r} is not in classnames.txt")
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"label {value!r:.40} is neither a class index nor a name")
        if self._names is None:
            return str(value)
        if not 0 <= value < len(self._names):
            raise ValueError(f"class index {value} is outside classnames.txt ({len(self._names)} names)")
        return self._names[value]

    def read(self, item: Item) -> bytes:
        """The sample's image bytes; OSError when the tar changed since it was listed or lacks the member."""
        tar = self._by_name[item.id.partition("/")[0]]
        member = item.path[len(tar) + 1:]  # the path is TARPATH#MEMBER, and either may hold a '#'
        with open(tar, "rb") as f:
            if os.fstat(f.fileno()).st_mtime_ns != item.mtime_ns:
                raise OSError(f"{tar} changed since it was listed")
            mtime, index = self._indexes.get(tar, (None, {}))
            if mtime != item.mtime_ns:
                if len(self._indexes) >= INDEXES_KEPT:
                    self._indexes.pop(next(iter(self._indexes)))
                index = member_index(tar)
                self._indexes[tar] = (item.mtime_ns, index)
            if member not in index:
                raise FileNotFoundError(f"{tar} has no member {member}")
            offset, size = index[member]
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{tar} is truncated at {member}")
        return data


    def __getstate__(self) -> dict:  # a spawned worker builds its own indexes
        return {**self.__dict__, "_indexes": {}}

    @classmethod
    def from_spec(cls, rest: str, split: str) -> "WebDatasetSource":
        return cls(rest)
