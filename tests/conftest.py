"""Fixtures that make models and data the way users have them: checkpoints on disk, image folders, archives."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch
    from clip.model import CLIP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small but complete CLIP (ViT image tower, text transformer, real tokenizer vocabulary).
SMALL_CLIP = dict(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                  context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=2, transformer_layers=2)
CLASSES = ["circle", "cross", "ring", "square", "stripes", "triangle"]


def featstore(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real command line in a new process."""
    result = subprocess.run([sys.executable, "-m", "featstore", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"featstore {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def draw_image(label: int, seed: int, size=(48, 40)) -> Image.Image:
    """A noisy picture whose colour and shape depend on the class, so probes have something to learn."""
    rng = np.random.default_rng(seed)
    base = np.array([(label * 53) % 256, (label * 97 + 60) % 256, (label * 151 + 120) % 256], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 40, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    w, h = size
    shape = CLASSES[label % len(CLASSES)]
    box = [w * 0.2 + rng.integers(0, 5), h * 0.2, w * 0.8, h * 0.8 - rng.integers(0, 5)]
    {"circle": lambda: pen.ellipse(box, fill=(255, 255, 255)),
     "cross": lambda: (pen.line(box, fill=(0, 0, 0), width=5), pen.line([box[0], box[3], box[2], box[1]], fill=(0, 0, 0), width=5)),
     "ring": lambda: pen.ellipse(box, outline=(0, 0, 0), width=4),
     "square": lambda: pen.rectangle(box, fill=(20, 20, 20)),
     "stripes": lambda: [pen.line([0, y, w, y], fill=(250, 250, 0), width=2) for y in range(0, h, 6)],
     "triangle": lambda: pen.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=(0, 0, 255))}[shape]()
    return image


def write_folder(root, per_class: int, seed: int, classes=CLASSES, fmt="png") -> list[str]:
    paths = []
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, name, f"img_{i:03d}.{fmt}")
            size = (48 + (i % 3) * 16, 40 + (i % 2) * 24)
            draw_image(CLASSES.index(name) if name in CLASSES else c, seed * 1000 + c * 100 + i, size).save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    """A random-weight CLIP state dict saved with torch.save, as a team would keep a fine-tuned model."""
    torch.manual_seed(1234)
    model = CLIP(**SMALL_CLIP)
    path = tmp_path_factory.mktemp("ckpt") / "small-clip.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> str:
    """A labelled image folder with train and test splits (class subfolders)."""
    root = tmp_path_factory.mktemp("data")
    write_folder(root / "train", per_class=10, seed=1)
    write_folder(root / "test", per_class=5, seed=2)
    return str(root)


def write_cifar100(root, n_train: int = 30, n_test: int = 12, seed: int = 0) -> list[str]:
    """A small archive in the CIFAR-100 python format (ROOT/cifar-100-python/{train,test,meta})."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    names = [f"class_{i}" for i in range(5)]
    for part, n in (("train", n_train), ("test", n_test)):
        labels = [int(i % 5) for i in range(n)]
        data = np.stack([np.asarray(draw_image(lab, int(rng.integers(1 << 30)), (32, 32))).transpose(2, 0, 1).reshape(-1)
                         for lab in labels])
        with open(os.path.join(folder, part), "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * n}, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"all"]}, f)
    return names


SLOW_MODEL = "random:ViT-B/32:3"  # ~16 img/s here: slow enough to kill mid-run


@pytest.fixture(scope="session")
def slow_source(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("slow")
    write_folder(root, per_class=8, seed=7, classes=["circle", "square", "triangle"])
    return str(root)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, slow_source) -> str:
    """slow_source encoded by one run that nobody killed: what every interrupted run must end up equal to."""
    store = str(tmp_path_factory.mktemp("ref") / "store")
    featstore("encode", slow_source, "--store", store, "--split", "train", "--model", SLOW_MODEL,
              "--batch-size", "4", "--shard-rows", "8", "--quiet")
    return store


@pytest.fixture
def copy(base, tmp_path):
    """A copy of the requesting module's ``base`` fixture (a folder with ``src`` and ``store``), per test:
    (source folder, store folder)."""
    shutil.copytree(base / "src", tmp_path / "src")
    shutil.copytree(base / "store", tmp_path / "store")
    return str(tmp_path / "src"), str(tmp_path / "store")
