"""What every source shares: the Item a source lists, image decoding, and the Source protocol.

A source lists its items cheaply and lazily, in id order (``iter_items``: ids, labels and a fingerprint, no
decoding), and opens one item at a time (``open``: bytes hash and an RGB PIL image), so that the store can
decide what to encode before any pixel is read, by walking the listing in step with its own sorted rows,
without holding either, and decoding can run in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
from PIL import Image

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
    error: str | None = None  # set when the item could not be listed (a failure the plan records, never read)
    caption: str | None = None  # text stored with the row (webdataset ``.txt``), else None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; 16/32-bit greyscale is scaled to 8 bits first (PIL's convert would clip)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max()) or 1.0
        image = Image.fromarray((array * (255.0 / top)).clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("P", "PA", "LA"):  # via RGBA, so palette transparency converts without a warning
        image = image.convert("RGBA")
    return image.convert("RGB")


MAX_FILE_BYTES = 1 << 30  # a file listed as an image that is bigger is a failure, not read


class BadFile(OSError):
    """A listed file that must not or could not be read whole (not a regular file, too big, changing)."""


def check_regular(mode: int) -> None:
    """Raise BadFile unless MODE (of ``os.stat``) is a regular file's."""
    if not stat.S_ISREG(mode):
        kind = next((kind for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                                             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                                             (stat.S_ISSOCK, "a socket")) if test(mode)), "of another kind")
        raise BadFile(f"not a regular file: {kind}")


def read_file(path: str) -> bytes:
    """A regular file's bytes. Anything else (FIFO, device, folder) is refused before it is opened, and again
    after (``fstat`` of the descriptor, opened non-blocking, so a FIFO swapped in between cannot hang); at
    most the size ``fstat`` gave is read, and a file that grows or shrinks meanwhile is refused."""
    check_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        check_regular(st.st_mode)
        if st.st_size > MAX_FILE_BYTES:
            raise BadFile(f"file too large ({st.st_size} bytes > {MAX_FILE_BYTES})")
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left or os.read(fd, 1):
            raise BadFile("file changed size while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_image(data: bytes) -> Image.Image:
    """DATA decoded to RGB. More than ``Image.MAX_IMAGE_PIXELS`` pixels is an error, checked before the
    pixels are decoded (PIL itself only warns below twice that limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    with image:
        width, height = image.size
        if width * height > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"too many pixels ({width} x {height} > {Image.MAX_IMAGE_PIXELS})")
        image.load()
        return to_rgb(image)


class Source(Protocol):
    """Where images come from. ``spec`` is recorded in the manifest; ``lists_hashes`` says whether listed
    items carry their sha256 (in-memory sources) or it is known only once a file is read. Source kinds
    subclass it, and so inherit ``open``'s and ``skip``'s defaults."""

    spec: str
    lists_hashes: bool

    def classes(self) -> list[str]:
        """Class names the source's labels come from (any order; the store assigns ids by name)."""

    def iter_items(self) -> Iterator[Item]:
        """Every item, in id order (plain string order of ``Item.id``), without decoding. What cannot be listed
        comes as an Item with ``error`` set (a folder's id ending with "/"): the plan records it as a failure and
        keeps the stored rows it may hide."""

    def read(self, item: Item) -> bytes:
        """The item's bytes (hashed by the plan when a fingerprint changed)."""

    def open(self, item: Item) -> tuple[str, Image.Image]:
        """(sha256 of the item's bytes, its RGB image): ``read``, hashed and decoded (an in-memory source may
        override it). An item listed with an error is never opened."""
        if item.error:
            raise ValueError(item.error)
        data = self.read(item)
        return hashlib.sha256(data).hexdigest(), decode_image(data)

    def skip(self, folder: str) -> None:
        """Never list what lies in FOLDER (encode passes the store's root, which may sit inside a walked
        source). Nothing to do for a source that walks no folder."""
