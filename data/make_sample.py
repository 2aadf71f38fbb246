"""Regenerate data/sample/: a small labelled image set (drawn shapes in colours) for the offline demo.

    .venv/bin/python data/make_sample.py
"""

import math
import os
import random
import shutil

from PIL import Image, ImageDraw

CLASSES = {"red circle": (210, 40, 40), "green square": (40, 170, 60), "blue triangle": (40, 70, 210),
           "yellow star": (230, 200, 30)}
COUNTS = {"train": 16, "test": 8}
SIZE = 64


def draw(shape: str, colour: tuple, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(180, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    r = rng.randint(12, 24)
    cx, cy = rng.randint(r, SIZE - r), rng.randint(r, SIZE - r)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    else:
        points = [(cx + (r if i % 2 == 0 else r // 2) * math.cos(math.pi * i / 5 - math.pi / 2),
                   cy + (r if i % 2 == 0 else r // 2) * math.sin(math.pi * i / 5 - math.pi / 2)) for i in range(10)]
        pen.polygon(points, fill=jitter)
    return image


def main() -> None:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(0)
    for split, count in COUNTS.items():
        for name, colour in CLASSES.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(count):
                draw(name.split()[1], colour, rng).save(os.path.join(folder, f"{i:03d}.png"), optimize=True)


if __name__ == "__main__":
    main()
