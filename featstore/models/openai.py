"""The openai family: ``clip``'s models from a name, a local checkpoint or random weights (``random:ARCH[:SEED]``).

Every model is built through ``clip.model.build_model`` so that weights are rounded to fp16 exactly as
``clip.load`` rounds them; on CPU (and for fp32/bf16) the model is then cast back with ``.float()``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

with warnings.catch_warnings():  # clip imports pkg_resources, which warns on import
    warnings.simplefilter("ignore")
    import clip
    from clip.model import CLIP, LayerNorm, VisionTransformer, build_model

from featstore.errors import FeatstoreError, ModelUnavailable
from featstore.models import Embedder, seeded
from featstore.store import sha256_file

CLIP_CACHE = os.path.expanduser("~/.cache/clip")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# clip.model.CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
ARCHITECTURES: dict[str, tuple] = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "tiny": (64, 64, 2, 64, 16, 77, 49408, 64, 2, 2),  # for tests and the offline demo
}


class OpenAIClip(Embedder):
    """An openai CLIP; a ViT's image features come from ``encode_image`` below (the class token's last row)."""

    family = "openai"

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return clip.tokenize(texts, truncate=True)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_image(self.model, pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def clip_transform(n_px: int) -> Compose:
    """``clip.clip._transform(n_px)`` (a private function), built the same way from public torchvision parts."""
    return Compose([
        Resize(n_px, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(n_px),
        _to_rgb,
        ToTensor(),
        Normalize(CLIP_MEAN, CLIP_STD),
    ])


def is_vit(model: CLIP) -> bool:
    return isinstance(model.visual, VisionTransformer)  # else a ModifiedResNet


def encode_image(model: CLIP, image: torch.Tensor) -> torch.Tensor:
    """``model.encode_image(image)``, with a ViT's last block computing the class token's row alone.

    The image embedding is read from the class token only, so the last block's attention query, attention
    output and MLP are needed for that one token of 50 (ViT-B/32), as CLIP's own ``AttentionPool2d`` does for
    the ResNets; keys and values still span every token. The arithmetic is the same (results differ from
    ``encode_image`` by float rounding only) and a ViT-B/32 forward does ~7 % fewer FLOPs.
    """
    visual = model.visual
    if not is_vit(model):
        return model.encode_image(image)
    x = visual.conv1(image.type(model.dtype))  # [batch, width, grid, grid]: patch embeddings
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    class_token = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([class_token, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x)
    tokens = last.ln_1(x)
    x = x[:1] + last.attn(tokens[:1], tokens, tokens, need_weights=False)[0]
    x = x + last.mlp(last.ln_2(x))
    return visual.ln_post(x[0]) @ visual.proj


def cast_image_weights(model: CLIP, dtype: torch.dtype) -> None:
    """Store a ViT image tower's weights in the dtype autocast would cast them to on every forward.

    Autocast rounds fp32 weights to bf16 once per call (4-8 % of a bf16 forward on CPU); holding them rounded
    gives bit-identical embeddings without that. LayerNorms stay fp32, as CLIP's LayerNorm computes in fp32
    (``clip.model.convert_weights`` keeps them fp32 for fp16 alike); the text tower is left to autocast.
    """
    for module in model.visual.modules():
        if not isinstance(module, LayerNorm):
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(dtype)


@contextlib.contextmanager
def _skipped_init():
    """Make ``torch.nn.init``'s in-place initialisers leave tensors as they are, for the duration.

    ``build_model`` first builds a randomly initialised CLIP, then overwrites every parameter and buffer
    from the state dict (a strict load), so the random draws (~0.9 s of a ViT-B/32 load on CPU) are
    wasted work; this is transformers' ``no_init_weights`` idea, without touching clip's code."""
    initialisers = {name: fn for name, fn in vars(torch.nn.init).items()
                    if name.endswith("_") and not name.startswith("_") and callable(fn)}
    for name in initialisers:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in initialisers.items():
            setattr(torch.nn.init, name, fn)


def _is_jit_archive(path: str) -> bool:
    """openai's released checkpoints are TorchScript zips (they carry a ``code/`` folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name or name.startswith("code/") for name in z.namelist())


def _state_dict_from_file(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling arbitrary objects (JIT archives are named by the user)."""
    try:
        if _is_jit_archive(path):
            return torch.jit.load(path, map_location="cpu").state_dict()
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign files
        raise FeatstoreError(f"{path} is not a CLIP checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "visual.conv1.weight" not in state and "visual.layer1.0.conv1.weight" not in state:
        raise FeatstoreError(f"{path} is not a CLIP checkpoint (no visual encoder weights)")
    return state


def _random_state_dict(spec: str) -> tuple[dict[str, torch.Tensor], str]:
    arch, _, seed_text = spec[len("random:"):].partition(":")
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise FeatstoreError(f"bad seed in --model {spec!r}: expected random:ARCH[:SEED]") from None
    if arch not in ARCHITECTURES:
        raise FeatstoreError(f"unknown architecture {arch!r} in --model {spec!r}; known: {', '.join(ARCHITECTURES)}")
    with seeded(seed):
        model = CLIP(*ARCHITECTURES[arch])
    return model.state_dict(), f"random:{arch}:{seed}"


def _openai_checkpoint(name: str) -> tuple[str, str]:
    """Path and sha256 of an openai release, from clip's cache or downloaded into it.

    clip has no public way to get a release's file: ``clip.load`` downloads it but returns only the built
    model, so the URL table and the checked download are clip's private ``_MODELS`` and ``_download``."""
    url = clip.clip._MODELS[name]
    sha = url.split("/")[-2]
    target = os.path.join(CLIP_CACHE, os.path.basename(url))
    try:
        return clip.clip._download(url, CLIP_CACHE), sha
    except Exception as e:
        raise ModelUnavailable(
            f"cannot fetch {name} weights ({type(e).__name__}); put the checkpoint at {target} "
            f"or pass --model PATH to a local checkpoint"
        ) from None


def architecture_name(model: CLIP) -> str:
    """The openai name of the model's architecture, or a description of it."""
    visual = model.visual
    res = visual.input_resolution
    embed = model.text_projection.shape[1]
    if hasattr(visual, "conv1") and hasattr(visual, "transformer"):
        sig = ("ViT", embed, res, visual.transformer.layers, visual.conv1.out_channels, visual.conv1.kernel_size[0])
    else:
        layers = tuple(len(getattr(visual, f"layer{i}")) for i in range(1, 5))
        sig = ("RN", embed, res, layers, visual.conv1.out_channels, None)
    for name, cfg in ARCHITECTURES.items():
        kind = "RN" if isinstance(cfg[2], tuple) else "ViT"
        if (kind, cfg[0], cfg[1], cfg[2], cfg[3] if kind == "ViT" else cfg[3] // 2, cfg[4]) == sig:
            return name
    return f"{sig[0]}(embed={embed},res={res},layers={sig[3]},width={sig[4]},patch={sig[5]})"


def load_random(rest: str, device: torch.device, precision: str) -> OpenAIClip:
    return _build(*_random_state_dict("random:" + rest), None, device, precision)


def load(name: str, device: torch.device, precision: str) -> OpenAIClip:
    """An openai name (from clip's cache, downloaded there when there is network) or a checkpoint path."""
    if name in clip.available_models():
        path, sha = _openai_checkpoint(name)
        return _build(_state_dict_from_file(path), name, sha, device, precision)
    if os.path.isfile(name):
        return _build(_state_dict_from_file(name), os.path.abspath(name), sha256_file(name), device, precision)
    raise FeatstoreError(
        f"unknown model {name!r}: use one of {', '.join(clip.available_models())}, a checkpoint path, "
        "random:ARCH[:SEED], open_clip:ARCH[:PRETRAINED] or hf:REPO_OR_DIR"
    )


def _build(state_dict: dict[str, torch.Tensor], spec: str, sha: str | None, device: torch.device,
           precision: str) -> OpenAIClip:
    try:
        with _skipped_init():
            model = build_model(dict(state_dict))  # rounds weights to fp16 exactly like clip.load
    except Exception as e:
        raise FeatstoreError(f"cannot build a CLIP model from {spec} ({type(e).__name__}: {e})") from None
    if precision != "fp16":
        model = model.float()
    if precision == "bf16" and is_vit(model):  # a ResNet's BatchNorm statistics would not be autocast's
        cast_image_weights(model, torch.bfloat16)
    model = model.to(device).eval()
    resolution = int(model.visual.input_resolution)
    identity: dict[str, Any] = {
        "family": "openai",
        "spec": spec,
        "sha256": sha,
        "architecture": architecture_name(model),
        "dim": int(model.text_projection.shape[1]),
        "preprocessing": f"clip._transform({resolution})",  # clip_transform builds exactly that
        "resolution": resolution,
        "random_weights": sha is None,
        "precision": precision,
    }
    return OpenAIClip(model, clip_transform(resolution), identity, device, precision)
