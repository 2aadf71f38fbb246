"""The open_clip family: ``open_clip:ARCH[:PRETRAINED]`` through ``open_clip.create_model_and_transforms``.

PRETRAINED is a tag of ARCH (fetched into open_clip's cache when the network allows) or a local checkpoint
file (what ``torch.save`` writes of a state dict, open_clip's training checkpoints, ``.safetensors``); without it
the weights are random (drawn from seed 0, so a store's model can be rebuilt). ``open_clip:hf-hub:ORG/REPO`` names
a model on the Hugging Face hub as a whole: its config and weights come from the repo (or the local hub cache).
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
from featstore.models.openai import _is_jit_archive, _skipped_init
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


HF_HUB = "hf-hub:"  # open_clip's prefix for a model whose config and weights live in a hub repo


def parse_spec(rest: str) -> tuple[str, str]:
    """ARCH and PRETRAINED of ``open_clip:ARCH[:PRETRAINED]``; ``hf-hub:ORG/REPO`` is a model name as a whole
    (its weights come with it), so it has no PRETRAINED part."""
    if rest.startswith(HF_HUB):
        if not rest[len(HF_HUB):]:
            raise FeatstoreError("--model open_clip:hf-hub: needs a repo: open_clip:hf-hub:ORG/REPO")
        return rest, ""
    arch, _, pretrained = rest.partition(":")
    return arch, pretrained


def load(rest: str, device: torch.device, precision: str) -> OpenClip:
    arch, pretrained = parse_spec(rest)
    hub = arch.startswith(HF_HUB)
    model_cfg = None if hub else open_clip.get_model_config(arch)  # a hub model's config is fetched with it
    if model_cfg is None and not hub:
        raise FeatstoreError(f"unknown open_clip architecture {arch!r} in --model open_clip:{rest} "
                             "(see open_clip.list_models())")
    sha, fetched = None, hub
    if pretrained and os.path.isfile(pretrained):
        pretrained = os.path.abspath(pretrained)
        if _is_jit_archive(pretrained):  # open_clip reads state dicts only (torch.load with weights_only)
            raise FeatstoreError(f"{pretrained} is a TorchScript archive (openai's release format): pass it as "
                                 "--model PATH, which builds it as the openai family")
        sha = sha256_file(pretrained)
    elif pretrained:
        if not open_clip.get_pretrained_cfg(arch, pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise FeatstoreError(f"{pretrained!r} is neither a file nor a pretrained tag of open_clip {arch} "
                                 f"(tags: {tags})")
        fetched = True
        warning = quickgelu_mismatch(arch, pretrained)  # decided before any weights are fetched
        if warning:
            print(f"featstore: warning: {warning}", file=sys.stderr)
    spec = f"open_clip:{arch}:{pretrained}" if pretrained else f"open_clip:{arch}"
    try:
        # weights that are loaded overwrite every parameter (a strict load): drawing random ones first is waste
        with seeded(0), _quiet(), _skipped_init() if pretrained or hub else contextlib.nullcontext():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained or None, precision="fp16" if precision == "fp16" else "fp32",
                device=device)
            tokenizer = open_clip.get_tokenizer(arch)
            model_cfg = model_cfg or open_clip.get_model_config(arch)  # a hub repo's, from the cache by now
    except Exception as e:  # downloads, foreign checkpoints and tokenizers fail in many ways
        if fetched:
            what, local = (f"weights {pretrained!r}", arch) if pretrained else ("config and weights", "ARCH")
            raise ModelUnavailable(f"cannot fetch open_clip {arch} {what} ({error_line(e)}); "
                                   f"pass open_clip:{local}:PATH to a local checkpoint") from None
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
        "random_weights": not (pretrained or hub),
        "precision": precision,
    }
    return OpenClip(model.eval(), preprocess, identity, device, precision, tokenizer=tokenizer)
