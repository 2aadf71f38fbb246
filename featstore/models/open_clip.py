"""The open_clip family: ``open_clip:ARCH[:PRETRAINED]`` through ``open_clip.create_model_and_transforms``.

PRETRAINED is a tag of ARCH (fetched into open_clip's cache when the network allows) or a local checkpoint
file; without it the weights are random (drawn from seed 0, so a store's model can be rebuilt).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from typing import Any

import torch

import open_clip
from featstore.errors import FeatstoreError, ModelUnavailable
from featstore.models import Embedder, error_line, seeded
from featstore.store import sha256_file


class OpenClip(Embedder):
    family = "open_clip"

    def __init__(self, *args, tokenizer):
        super().__init__(*args)
        self.tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def quickgelu_mismatch(arch: str, tag: str) -> str | None:
    """Why TAG's weights will embed wrongly in ARCH, or None. Weights trained with QuickGELU (openai's,
    among others) need the ``-quickgelu`` variant of an architecture; open_clip only warns and loads them."""
    wanted = bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu"))
    built = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu"))
    if wanted == built:
        return None
    if wanted:
        return (f"open_clip:{arch}:{tag}: the {tag} weights were trained with QuickGELU but {arch} uses GELU, "
                f"so its embeddings will be off; use open_clip:{arch}-quickgelu:{tag}")
    return (f"open_clip:{arch}:{tag}: the {tag} weights were trained with GELU but {arch} uses QuickGELU, "
            f"so its embeddings will be off; use open_clip:{arch.removesuffix('-quickgelu')}:{tag}")


@contextlib.contextmanager
def _quiet():
    """open_clip reports through the root logger and ``warnings``; featstore says what matters itself."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # its failures come back as exceptions too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def load(rest: str, device: torch.device, precision: str) -> OpenClip:
    arch, _, pretrained = rest.partition(":")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise FeatstoreError(f"unknown open_clip architecture {arch!r} in --model open_clip:{rest} "
                             "(see open_clip.list_models())")
    sha, is_tag = None, False
    if pretrained and os.path.isfile(pretrained):
        pretrained = os.path.abspath(pretrained)
        sha = sha256_file(pretrained)
    elif pretrained:
        if not open_clip.get_pretrained_cfg(arch, pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise FeatstoreError(f"{pretrained!r} is neither a file nor a pretrained tag of open_clip {arch} "
                                 f"(tags: {tags})")
        is_tag = True
        warning = quickgelu_mismatch(arch, pretrained)  # decided before any weights are fetched
        if warning:
            print(f"featstore: warning: {warning}", file=sys.stderr)
    spec = f"open_clip:{arch}:{pretrained}" if pretrained else f"open_clip:{arch}"
    try:
        with seeded(0), _quiet():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained or None, precision="fp16" if precision == "fp16" else "fp32",
                device=device)
            tokenizer = open_clip.get_tokenizer(arch)
    except Exception as e:  # downloads, foreign checkpoints and tokenizers fail in many ways
        if is_tag:
            raise ModelUnavailable(f"cannot fetch open_clip {arch} weights {pretrained!r} ({error_line(e)}); "
                                   f"pass open_clip:{arch}:PATH to a local checkpoint") from None
        raise FeatstoreError(f"cannot build open_clip {arch} from {pretrained or 'random weights'} "
                             f"({error_line(e)})") from None
    preprocess_cfg = model.visual.preprocess_cfg
    identity: dict[str, Any] = {
        "family": "open_clip",
        "spec": spec,
        "sha256": sha,  # a tag names a release: it compares by spec
        "architecture": arch,
        "dim": int(model_cfg["embed_dim"]),
        "preprocessing": f"open_clip.image_transform({json.dumps(preprocess_cfg, sort_keys=True)})",
        "resolution": preprocess_cfg["size"],
        "random_weights": not pretrained,
        "precision": precision,
    }
    return OpenClip(model.eval(), preprocess, identity, device, precision, tokenizer=tokenizer)
