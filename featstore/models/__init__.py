"""Image-text models behind one interface (``Embedder``), loaded from a ``--model`` spec.

A spec's prefix picks a family from ``REGISTRY``; anything without a known prefix (an openai name or a
checkpoint path) is openai's. Adding a family is one module with a ``load(name, device, precision)``
function and one registry line.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable

import numpy as np
import torch

from featstore.errors import FeatstoreError
from featstore.identity import weights_key

DEFAULT_MODEL = "ViT-B/32"
PRECISIONS = ("fp32", "fp16", "bf16")

# spec prefix -> "module:function"; the function takes (the spec after the prefix, torch device, precision)
REGISTRY: dict[str, str] = {
    "openai": "featstore.models.openai:load",
    "random": "featstore.models.openai:load_random",  # random:ARCH[:SEED], openai architectures
    "open_clip": "featstore.models.open_clip:load",
    "hf": "featstore.models.hf:load",
}


class Embedder:
    """A loaded image-text model with its preprocessing, placement, numeric precision and identity.

    Families implement ``tokenize`` (texts -> what ``encode_text`` takes), ``encode_image`` (pixels on the
    device -> features) and ``encode_text``; callers use ``preprocess`` (a PIL image -> a CHW tensor),
    ``encode_images`` and ``encode_texts``, which return raw (unnormalised) float32 features on the CPU.
    """

    family = ""

    def __init__(self, model: Any, preprocess: Callable, identity: dict[str, Any], device: torch.device,
                 precision: str):
        self.model, self.preprocess, self.identity = model, preprocess, identity
        self.device, self.precision = device, precision

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def tokenize(self, texts: list[str]) -> Any:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) image features as float32 on the CPU."""
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        pixels = pixels.to(self.device, non_blocking=True).to(dtype)  # cast on the device: the copy stays async
        with self._autocast():
            features = self.encode_image(pixels)
        return features.float().cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Raw text features for prompts (float32 numpy)."""
        tokens = self.tokenize(texts).to(self.device)
        with self._autocast():
            features = self.encode_text(tokens)
        return features.float().cpu().numpy()


ClipModel = Embedder  # the name callers used before there were several families


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise FeatstoreError(f"unknown --device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatstoreError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    if precision is None:
        return "fp16" if device.type == "cuda" else "fp32"  # as clip.load does
    if precision not in PRECISIONS:
        raise FeatstoreError(f"unknown --precision {precision!r}: use fp32, fp16 or bf16")
    if precision == "fp16" and device.type != "cuda":
        raise FeatstoreError("--precision fp16 needs a CUDA device; on CPU use fp32 or bf16")
    return precision


@contextlib.contextmanager
def seeded(seed: int):
    """Draw random weights from SEED, leaving torch's global generator as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def error_line(e: Exception, limit: int = 120) -> str:
    """An exception as one short line, for messages about libraries whose errors run to paragraphs."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", precision: str | None = None) -> Embedder:
    """Build the model for SPEC: ``FAMILY:NAME`` with a family of ``REGISTRY``, or an openai name or path."""
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    prefix, _, rest = spec.partition(":")
    if prefix not in REGISTRY:
        prefix, rest = "openai", spec
    module, _, function = REGISTRY[prefix].partition(":")
    return getattr(importlib.import_module(module), function)(rest, torch_device, precision)


def load_recorded_model(identity: dict[str, Any], device: str = "auto") -> Embedder:
    """Reload the model a store was encoded with (text prompts and new images must use the same weights).

    The recorded precision is kept where the device supports it; fp16 stores queried on a CPU use fp32."""
    torch_device = resolve_device(device)
    precision = identity["precision"]
    if precision == "fp16" and torch_device.type != "cuda":
        precision = "fp32"
    model = load_model(identity["spec"], str(torch_device), precision)
    if weights_key(model.identity) != weights_key(identity):
        raise FeatstoreError(f"checkpoint {identity['spec']} changed since the store was encoded (sha256 differs)")
    return model

