"""Load CLIP models the way openai's ``clip.load`` does, from a name, a local checkpoint or random weights.

Every model is built through ``clip.model.build_model`` so that weights are rounded to fp16 exactly as
``clip.load`` rounds them; on CPU (and for fp32/bf16) the model is then cast back with ``.float()``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

with warnings.catch_warnings():  # clip imports pkg_resources, which warns on import
    warnings.simplefilter("ignore")
    import clip
    from clip.model import CLIP, LayerNorm, build_model

from featstore.errors import FeatstoreError, ModelUnavailable
from featstore.store import sha256_file
from featstore.identity import weights_key

DEFAULT_MODEL = "ViT-B/32"
CLIP_CACHE = os.path.expanduser("~/.cache/clip")

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
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class ClipModel:
    """A loaded CLIP model with its preprocessing, placement and numeric precision."""

    model: CLIP
    preprocess: Callable
    identity: dict[str, Any]
    device: torch.device
    precision: str

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) ``encode_image`` outputs as float32 on the CPU."""
        pixels = pixels.to(self.device, non_blocking=True)
        with self._autocast():
            features = encode_image(self.model, pixels)
        return features.float().cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Raw ``encode_text`` outputs for prompts (float32 numpy)."""
        tokens = clip.tokenize(texts, truncate=True).to(self.device)
        with self._autocast():
            features = self.model.encode_text(tokens)
        return features.float().cpu().numpy()


def is_vit(model: CLIP) -> bool:
    return hasattr(model.visual, "transformer")  # else a ModifiedResNet


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
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIP(*ARCHITECTURES[arch])
    finally:
        torch.random.set_rng_state(generator_state)
    return model.state_dict(), f"random:{arch}:{seed}"


def _openai_checkpoint(name: str) -> tuple[str, str]:
    """Path and sha256 of an openai release, from clip's cache or downloaded into it."""
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


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", precision: str | None = None) -> ClipModel:
    """Build the model for SPEC: an openai name, a checkpoint path, or ``random:ARCH[:SEED]``."""
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    if spec.startswith("random:"):
        state_dict, spec = _random_state_dict(spec)
        sha = None
    elif spec in clip.available_models():
        path, sha = _openai_checkpoint(spec)
        state_dict = _state_dict_from_file(path)
    elif os.path.isfile(spec):
        sha = sha256_file(spec)
        state_dict = _state_dict_from_file(spec)
        spec = os.path.abspath(spec)
    else:
        raise FeatstoreError(
            f"unknown model {spec!r}: use one of {', '.join(clip.available_models())}, "
            "a checkpoint path, or random:ARCH[:SEED]"
        )
    try:
        with _skipped_init():
            model = build_model(dict(state_dict))  # rounds weights to fp16 exactly like clip.load
    except Exception as e:
        raise FeatstoreError(f"cannot build a CLIP model from {spec} ({type(e).__name__}: {e})") from None
    if precision != "fp16":
        model = model.float()
    if precision == "bf16" and is_vit(model):  # a ResNet's BatchNorm statistics would not be autocast's
        cast_image_weights(model, torch.bfloat16)
    model = model.to(torch_device).eval()
    resolution = int(model.visual.input_resolution)
    identity = {
        "spec": spec,
        "sha256": sha,
        "architecture": architecture_name(model),
        "dim": int(model.text_projection.shape[1]),
        "preprocessing": f"clip._transform({resolution})",
        "resolution": resolution,
        "random_weights": sha is None,
        "precision": precision,
    }
    return ClipModel(model, clip.clip._transform(resolution), identity, torch_device, precision)


def load_recorded_model(identity: dict[str, Any], device: str = "auto") -> ClipModel:
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
