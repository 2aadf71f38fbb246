"""Model identity records, kept free of torch so that `featstore info` starts fast."""

from __future__ import annotations

from typing import Any


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two identities produce the same embeddings (weights, architecture, preprocessing, precision)."""
    return weights_key(a) == weights_key(b) and all(
        a[k] == b[k] for k in ("architecture", "dim", "preprocessing", "precision"))


def weights_key(identity: dict[str, Any]) -> str:
    """Checkpoints compare by content (sha256); random weights by their spec (architecture and seed)."""
    return identity["sha256"] or identity["spec"]


def describe(identity: dict[str, Any]) -> str:
    text = f"{identity['spec']} ({identity['architecture']}, dim {identity['dim']}, {identity['precision']})"
    return text + " [RANDOM WEIGHTS]" if identity.get("random_weights") else text
