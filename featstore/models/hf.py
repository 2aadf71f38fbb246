"""The Hugging Face family: ``hf:REPO_OR_DIR``, a transformers ``CLIPModel`` or ``SiglipModel``.

REPO_OR_DIR is a folder written by ``save_pretrained`` (model, image processor and tokenizer) or a hub id
already in the local Hugging Face cache; featstore does not download these. Images go through the folder's
image processor, prompts through its tokenizer padded as each model's own recipe pads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
import transformers

from featstore.errors import FeatstoreError, ModelUnavailable
from featstore.models import Embedder, error_line
from featstore.store import sha256_file

# config.model_type -> (model class, tokenizer padding): SigLIP was trained on prompts padded to full length
FAMILIES = {"clip": ("CLIPModel", True), "siglip": ("SiglipModel", "max_length")}
WEIGHT_FILES = (".safetensors", ".bin")


class ImageProcessor:
    """One PIL image -> its CHW ``pixel_values``, so that a DataLoader can collate them."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns an output object whose ``pooler_output`` is the projected features (what
    ``forward`` normalises into ``image_embeds``/``text_embeds``); older versions return the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFModel(Embedder):
    family = "hf"

    def __init__(self, *args, tokenizer, padding: bool | str, max_length: int):
        super().__init__(*args)
        self.tokenizer, self.padding, self.max_length = tokenizer, padding, max_length

    def tokenize(self, texts: list[str]):
        return self.tokenizer(texts, padding=self.padding, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens) -> torch.Tensor:
        return _pooled(self.model.get_text_features(**tokens))


def _folder(name: str) -> str:
    if os.path.isdir(name):
        return os.path.abspath(name)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not a repo id, or not cached
        raise ModelUnavailable(
            f"hf:{name} is neither a folder nor a model in the local Hugging Face cache; featstore does not "
            "download it: save_pretrained the model, its processor and tokenizer to a folder and pass hf:FOLDER"
        ) from None


def weights_sha256(folder: str) -> str:
    """One digest over the folder's weight files (names and contents), so a changed checkpoint is noticed."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(WEIGHT_FILES))
    if not names:
        raise FeatstoreError(f"{folder} holds no weights (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{sha256_file(os.path.join(folder, name))}\n".encode())
    return digest.hexdigest()


def load(name: str, device: torch.device, precision: str) -> HFModel:
    folder = _folder(name)
    spec = "hf:" + (folder if os.path.isdir(name) else name)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise FeatstoreError(f"{spec} has no readable config.json ({type(e).__name__})") from None
    if config.model_type not in FAMILIES:
        raise FeatstoreError(f"{spec} is a {config.model_type!r} model; hf: takes {', '.join(FAMILIES)} models")
    class_name, padding = FAMILIES[config.model_type]
    sha = weights_sha256(folder)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar is not ours to show
    try:
        model = getattr(transformers, class_name).from_pretrained(
            folder, local_files_only=True, dtype=torch.float16 if precision == "fp16" else torch.float32)
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise FeatstoreError(f"cannot load {spec} ({error_line(e)})") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    vision, text = config.vision_config, config.text_config
    identity: dict[str, Any] = {
        "family": "hf",
        "spec": spec,
        "sha256": sha,
        "architecture": f"{class_name}(image {vision.image_size}px/{vision.patch_size}, vision {vision.hidden_size}"
                        f"x{vision.num_hidden_layers}, text {text.hidden_size}x{text.num_hidden_layers})",
        "dim": int(getattr(config, "projection_dim", None) or vision.hidden_size),
        "preprocessing": f"{type(processor).__name__}({json.dumps(processor.to_dict(), sort_keys=True, default=str)})",
        "resolution": vision.image_size,
        "random_weights": False,
        "precision": precision,
    }
    return HFModel(model.to(device).eval(), ImageProcessor(processor), identity, device, precision,
                   tokenizer=tokenizer, padding=padding, max_length=text.max_position_embeddings)
