"""featstore's data files, installed as the package ``featstore.data``: prompt templates (``templates/``),
class name lists (``classes/``) and the demo's sample images (``sample/``)."""

from __future__ import annotations

import os
from importlib import resources


def packaged(folder: str, name: str) -> str | None:
    """The path of list NAME shipped in FOLDER (``templates``: paper80; ``classes``: cifar10, cifar100,
    cifar100-display, imagenet), or None."""
    path = resources.files(__name__).joinpath(folder, f"{name}.txt")
    return str(path) if path.is_file() else None


def named_or_file(value: str, folder: str, base: str = "") -> str:
    """A file path (relative ones joined to BASE), or the name of a list shipped in FOLDER: a bare name that is
    not an existing file."""
    path = os.path.join(base, value)
    if os.path.sep not in value and not os.path.exists(path):
        return packaged(folder, value) or path
    return path
