"""What every source shares: the Item a source lists, image decoding, and the Source protocol.

A source lists its items cheaply and lazily, in id order (``iter_items``: ids, labels and a fingerprint, no
decoding), and opens one item at a time (``open``: bytes hash and an RGB PIL image), so that the store can
decide what to encode before any pixel is read, by walking the listing in step with its own sorted rows,
without holding either, and decoding can run in DataLoader workers.
"""

from __future__ import annotations

import io
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


class Source(Protocol):
    """Where images come from. ``spec`` is recorded in the manifest; ``lists_hashes`` says whether listed
    items carry their sha256 (in-memory sources) or it is known only once a file is read."""

    spec: str
    lists_hashes: bool

    def classes(self) -> list[str]:
        """Class names the source's labels come from (any order; the store assigns ids by name)."""

    def iter_items(self) -> Iterator[Item]:
        """Every item, in id order (plain string order of ``Item.id``), without decoding."""

    def read(self, item: Item) -> bytes:
        """The item's bytes (hashed by the plan when a fingerprint changed)."""

    def open(self, item: Item) -> tuple[str, Image.Image]:
        """(sha256 of the item's bytes, its RGB image)."""
