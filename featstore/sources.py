"""Where images come from: a folder, a CIFAR python archive, or a manifest file.

A source lists its items cheaply and lazily, in id order (``iter_items``: ids, labels and a fingerprint, no
decoding), and opens one item at a time (``open``: bytes hash and an RGB PIL image), so that the store can
decide what to encode before any pixel is read, by walking the listing in step with its own sorted rows,
without holding either, and decoding can run in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from featstore.errors import FeatstoreError
from featstore.store import sort_by_id, streaming_reader

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
PLAN_BATCH = 4096  # items listed, planned or spilled per batch (~1 MiB of Items)
Image.MAX_IMAGE_PIXELS = 178_956_970  # PIL's default bomb guard, stated so it cannot be switched off silently


@dataclass(frozen=True, slots=True)
class Item:
    """One image of a source. ``size``/``mtime_ns`` are the cheap change fingerprint; ``sha256`` is
    known when listed only for in-memory sources (archives), else computed when the file is read.
    Slots: a run holds up to a few batches of Items (``PLAN_BATCH`` each) at a time."""

    id: str
    path: str
    label: str | None
    size: int
    mtime_ns: int
    sha256: str | None = None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; 16/32-bit greyscale is scaled to 8 bits first (PIL's convert would clip)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max()) or 1.0
        image = Image.fromarray((array * (255.0 / top)).clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("P", "PA", "LA"):  # via RGBA, so palette transparency converts without a warning
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


class FolderSource:
    """A directory of images; first-level subfolders are classes named by the folder, a flat folder is unlabelled."""

    lists_hashes = False  # items' sha256 is known only once a file is read

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FeatstoreError(f"source folder {root} does not exist")
        self.root = os.path.abspath(root)
        self.spec = self.root

    def _walk(self, folder: str):
        with os.scandir(folder) as scan:
            entries = [e for e in scan if not e.name.startswith(".")]
        # a folder sorts as "name/": then the walk yields relative paths in plain string order, the order
        # of the store's ids (only one folder's entries are held at a time)
        entries.sort(key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                yield entry

    def classes(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))

    def iter_items(self) -> Iterator[Item]:
        """The images, in id order (relative paths as strings), found as they are yielded."""
        for entry in self._walk(self.root):
            rel = os.path.relpath(entry.path, self.root).replace(os.sep, "/")
            label = sys.intern(rel.split("/", 1)[0]) if "/" in rel else None
            st = entry.stat()
            yield Item(rel, rel, label, st.st_size, st.st_mtime_ns)

    def read(self, item: Item) -> bytes:
        with open(os.path.join(self.root, item.path), "rb") as f:
            return f.read()

    def open(self, item: Item) -> tuple[str, Image.Image]:
        data = self.read(item)
        return hashlib.sha256(data).hexdigest(), decode_image(data)


class ManifestSource(FolderSource):
    """A Parquet or CSV file with a ``path`` column (relative to the file's folder, or absolute) and an
    optional ``label`` column of class names.

    Read in batches and sorted by id in runs of ``SORT_ROWS`` rows; a manifest longer than one run spills its
    sorted runs to temporary Arrow files (in ``$TMPDIR``, unlinked as soon as they are open, so nothing is
    left behind even by a kill) and the listing merges them, so memory does not grow with the manifest."""

    SORT_ROWS = 1 << 20  # ~0.1 GiB of (id, label) rows
    READ_ROWS, READ_BYTES = 1 << 16, 1 << 22  # a batch read from a Parquet manifest, a block of a CSV one

    def __init__(self, manifest: str):
        if not os.path.isfile(manifest):
            raise FeatstoreError(f"manifest {manifest} does not exist")
        self.manifest = os.path.abspath(manifest)
        self.root = os.path.dirname(self.manifest)
        self.spec = f"manifest:{self.manifest}"
        self.runs: list = []  # sorted (id, label) runs: a table, or a reader of a spilled one
        labels: set[str] = set()
        chunk, rows = [], 0
        for table in self._read_batches():
            labels.update(pc.unique(table.column("label")).to_pylist())
            chunk.append(table)
            rows += table.num_rows
            if rows >= self.SORT_ROWS:
                self.runs.append(self._spill(self._sorted_run(chunk)))
                chunk, rows = [], 0
                pa.default_memory_pool().release_unused()  # else the allocator keeps every run's sort
        if chunk or not self.runs:
            self.runs.append(self._sorted_run(chunk))
        labels.discard(None)
        self._classes = sorted(labels)

    def _sorted_run(self, tables: list[pa.Table]) -> pa.Table:
        """TABLES' rows sorted by id; a path listed twice within them is refused here, before any work (the
        merge of several runs finds one listed in two)."""
        run = sort_by_id(pa.concat_tables(tables or [self._empty()]))
        if run.num_rows > 1:
            ids = run.column("id")
            same = pc.equal(ids.slice(1), ids.slice(0, run.num_rows - 1))
            if pc.any(same).as_py():
                self._listed_twice(ids[pc.index(same, True).as_py()].as_py())
        return run

    def _listed_twice(self, row_id: str):
        raise FeatstoreError(f"manifest {self.manifest} lists {row_id} more than once")

    @staticmethod
    def _empty() -> pa.Table:
        return pa.table({"id": pa.array([], pa.string()), "label": pa.array([], pa.string())})

    def _read_batches(self) -> Iterator[pa.Table]:
        """The manifest's (id, label) rows in file order, a batch at a time."""
        try:
            if self.manifest.endswith(".parquet"):
                reader = streaming_reader(self.manifest, 1 << 20)
                names = reader.schema_arrow.names
                batches = reader.iter_batches(batch_size=self.READ_ROWS, columns=[n for n in ("path", "label") if n in names])
            else:
                import pyarrow.csv as pacsv

                batches = pacsv.open_csv(self.manifest, read_options=pacsv.ReadOptions(block_size=self.READ_BYTES),
                                         convert_options=pacsv.ConvertOptions(column_types={"path": pa.string(), "label": pa.string()}))
                names = batches.schema.names
            if "path" not in names:
                raise FeatstoreError(f"manifest {self.manifest} has no 'path' column")
            for batch in batches:
                yield self._rows(batch)
        except (OSError, pa.ArrowException) as e:
            raise FeatstoreError(f"cannot read manifest {self.manifest}: {e}".splitlines()[0]) from None

    def _rows(self, batch: pa.RecordBatch) -> pa.Table:
        paths = batch.column("path").cast(pa.string())
        if paths.null_count:
            raise FeatstoreError(f"manifest {self.manifest} has rows without a path")
        names = batch.schema.names
        labels = batch.column("label").cast(pa.string()) if "label" in names else pa.nulls(len(paths), pa.string())
        labels = pc.if_else(pc.equal(labels, ""), pa.scalar(None, pa.string()), labels)
        return pa.table({"id": pa.array([self._id(p) for p in paths.to_pylist()], pa.string()), "label": labels})

    @staticmethod
    def _spill(table: pa.Table):
        """TABLE in a temporary Arrow file, returned as an open reader of it; the file's name is already gone."""
        with tempfile.NamedTemporaryFile(prefix="featstore-manifest-", suffix=".arrow", delete=False) as f:
            path = f.name
        try:
            with pa.ipc.new_file(path, table.schema) as sink:
                sink.write_table(table, max_chunksize=PLAN_BATCH)
            return pa.ipc.open_file(pa.OSFile(path))  # read, not mapped: merged pages do not stay resident
        finally:
            os.unlink(path)

    def _id(self, path: str) -> str:
        """Relative paths are taken from the manifest's folder and normalised; absolute ones stay as given."""
        if os.path.isabs(path):
            return path
        normal = os.path.normpath(path)  # what relpath gives for a path inside the folder, at a fifth of its cost
        if normal != os.pardir and not normal.startswith(os.pardir + os.sep):
            return normal.replace(os.sep, "/")
        return os.path.relpath(os.path.join(self.root, path), self.root).replace(os.sep, "/")

    def classes(self) -> list[str]:
        return self._classes

    def _sorted_rows(self) -> Iterator[tuple[str, str | None]]:
        def run_rows(run):
            batches = run.to_batches(PLAN_BATCH) if isinstance(run, pa.Table) else (
                run.get_batch(i) for i in range(run.num_record_batches))
            for batch in batches:
                yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())

        previous = None
        for row in heapq.merge(*map(run_rows, self.runs), key=lambda row: row[0]):
            if row[0] == previous:
                self._listed_twice(row[0])
            previous = row[0]
            yield row

    def iter_items(self) -> Iterator[Item]:
        for rel, label in self._sorted_rows():
            full = rel if os.path.isabs(rel) else os.path.join(self.root, rel)
            try:
                st = os.stat(full)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1  # reported as a failure when opened
            yield Item(rel, rel, sys.intern(label) if label is not None else None, size, mtime)


class CifarSource:
    """CIFAR-10/100 python pickle archives laid out as torchvision downloads them (``ROOT/cifar-100-python``)."""

    LAYOUT = {
        "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    "batches.meta", "label_names", "labels"),
        "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_label_names", "fine_labels"),
    }

    lists_hashes = True  # the pixels are in memory: items are listed with their sha256

    def __init__(self, kind: str, root: str, part: str):
        folder, parts, meta, names_key, labels_key = self.LAYOUT[kind]
        if part not in parts:
            raise FeatstoreError(f"{kind} has parts train and test, not {part!r}: use {kind}:ROOT:train or :test")
        self.root = os.path.join(os.path.abspath(root), folder)
        self.spec = f"{kind}:{os.path.abspath(root)}:{part}"
        if not os.path.isdir(self.root):
            raise FeatstoreError(f"no {folder} folder under {root}")
        try:
            self._classes = [self._decode(n) for n in self._unpickle(meta)[names_key]]
            batches = [self._unpickle(name) for name in parts[part]]
            self.data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
            self.labels = [int(x) for b in batches for x in b[labels_key]]
        except FeatstoreError:
            raise
        except Exception as e:
            raise FeatstoreError(f"{self.root} is not a {kind} python archive ({type(e).__name__}: {e})") from None
        self.part = part

    @staticmethod
    def _decode(name) -> str:
        return name.decode() if isinstance(name, bytes) else str(name)

    def _unpickle(self, name: str) -> dict:
        path = os.path.join(self.root, name)
        if not os.path.isfile(path):
            raise FeatstoreError(f"missing {path}")
        with open(path, "rb") as f:  # CIFAR's own format is pickle; only archives the user names are read
            raw = pickle.load(f, encoding="bytes")
        return {self._decode(k): v for k, v in raw.items()}

    def classes(self) -> list[str]:
        return list(self._classes)

    def iter_items(self) -> Iterator[Item]:
        """Images in id order ("train/10" sorts before "train/2"), hashed as they are yielded."""
        for i in sorted(range(len(self.data)), key=str):
            sha = hashlib.sha256(self.data[i].tobytes()).hexdigest()
            yield Item(f"{self.part}/{i}", f"{self.part}/{i}", self._classes[self.labels[i]], 3072, 0, sha)

    def open(self, item: Item) -> tuple[str, Image.Image]:
        index = int(item.path.rsplit("/", 1)[1])
        row = self.data[index]
        return hashlib.sha256(row.tobytes()).hexdigest(), Image.fromarray(row.transpose(1, 2, 0))


def open_source(spec: str, split: str):
    """Parse SOURCE: a folder, ``cifar10:ROOT[:PART]``, ``cifar100:ROOT[:PART]`` or ``manifest:FILE``."""
    kind, _, rest = spec.partition(":")
    if kind in CifarSource.LAYOUT and rest:
        root, _, part = rest.rpartition(":") if rest.endswith((":train", ":test")) else (rest, "", split)
        return CifarSource(kind, root, part)
    if kind == "manifest" and rest:
        return ManifestSource(rest)
    return FolderSource(spec)
