"""Model identity records, kept free of torch so that `featstore info` starts fast."""

from __future__ import annotations

from typing import Any


def family(identity: dict[str, Any]) -> str:
    """The model family (openai, open_clip, hf); stores written before families existed are openai's."""
    return identity.get("family", "openai")


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two identities produce the same embeddings (family, weights, architecture, preprocessing,
    precision)."""
    return family(a) == family(b) and weights_key(a) == weights_key(b) and all(
        a[k] == b[k] for k in ("architecture", "dim", "preprocessing", "precision"))


def weights_key(identity: dict[str, Any]) -> str:
    """Checkpoints compare by content (sha256); random weights and named releases without a file hash by
    their spec."""
    return identity["sha256"] or identity["spec"]


def describe(identity: dict[str, Any]) -> str:
    text = (f"{identity['spec']} ({family(identity)} {identity['architecture']}, dim {identity['dim']}, "
            f"{identity['precision']})")
    return text + " [RANDOM WEIGHTS]" if identity.get("random_weights") else text
