"""Encode throughput against the seed's reference loop, measured side by side in one run.

    .venv/bin/python bench/encode_bench.py [--n 200] [--model random:ViT-B/32] [--kinds cifar,jpeg]
                                           [--precisions fp32,bf16] [--batch-size 16] [--workers 1] [--rounds 3]

For each image kind (32x32 PNGs "cifar", 640x480 JPEGs "jpeg") it measures, on the same images and weights:
- reference: the seed loop (ImageFolder, DataLoader(batch_size=100), encode_image, fp32 on CPU / fp16 on GPU),
  in a process of its own with glibc's malloc defaults, as in a notebook (featstore's encode tunes its
  process's malloc, and the rest of the bench runs in that process);
- featstore: `featstore encode` end to end (decode in workers, model, Parquet commit) per precision,
  timed like the reference from after the model is loaded (the load is printed on its own);
- model-only: the same forward passes over already preprocessed tensors,
each repeated --rounds times in interleaved rounds (this machine's speed drifts), and prints the fastest
round's img/s with the ratios the throughput goals are stated in, plus accuracy against fp32:
max relative error, min cosine, and zero-shot top-1 agreement against 100 random prompts.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import warnings

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

from featstore.encode import encode  # noqa: E402
from featstore.hardware import capability_line  # noqa: E402
from featstore.models import load_model  # noqa: E402
from featstore.models.openai import encode_image  # noqa: E402
from featstore.store import Store  # noqa: E402

KINDS = {"cifar": ((32, 32), "png"), "jpeg": ((640, 480), "jpg")}


def make_images(root: str, kind: str, n: int) -> None:
    size, ext = KINDS[kind]
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, f"class_{i % 10}")
        os.makedirs(folder, exist_ok=True)
        smooth = rng.integers(0, 255, size=(size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(smooth).resize(size, Image.BILINEAR)
        image.save(os.path.join(folder, f"{i:06d}.{ext}"), **({"quality": 90} if ext == "jpg" else {}))


_reference_model = None


def _load_reference(spec: str, device: str) -> None:
    global _reference_model
    _reference_model = load_model(spec, device)


def _reference(root: str) -> tuple[float, np.ndarray]:
    """The seed notebook's feature loop."""
    model = _reference_model
    dataset = ImageFolder(root, transform=model.preprocess)
    start = time.perf_counter()
    features = []
    with torch.no_grad():
        for images, _ in DataLoader(dataset, batch_size=100):
            features.append(model.model.encode_image(images.to(model.device)).float().cpu())
    return time.perf_counter() - start, torch.cat(features).numpy()


class Reference:
    """The seed loop run in a fresh process that loads the same model once. featstore's encode fixes its
    process's malloc thresholds (``featstore.encode.runner._steady_heap``), and those sped the seed's batch-100
    forwards up too (16.3 img/s with glibc's defaults, 17.4-19.7 with them): the seed runs with the defaults."""

    def __init__(self, spec: str, device: str):
        self.pool = multiprocessing.get_context("spawn").Pool(1, initializer=_load_reference, initargs=(spec, device))

    def __call__(self, root: str) -> tuple[float, np.ndarray]:
        return self.pool.apply(_reference, (root,))


def preprocessed(model, root: str) -> torch.Tensor:
    dataset = ImageFolder(root, transform=model.preprocess)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def model_only(model, pixels: torch.Tensor, batch_size: int) -> float:
    model.encode_images(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        model.encode_images(pixels[i:i + batch_size])
    return time.perf_counter() - start


def gemm_ceiling(model, batch_size: int, precisions: list[str]) -> tuple[float, dict[str, float]]:
    """encode_image's FLOPs per image (multiply and add counted apart: ViT-B/32's "4.4 GFLOPs" are
    multiply-adds, 8.8 GFLOP) and, per precision, the img/s the model would reach if all of them ran at the
    rate this machine does the model's largest matrix product at this batch size: the ceiling for any encoder
    doing encode_image's math."""
    from torch.utils.flop_counter import FlopCounterMode

    linears = [m for m in model.model.visual.modules() if isinstance(m, torch.nn.Linear)]
    largest = max(linears, key=lambda m: m.weight.numel()) if linears else None
    shapes = []
    hook = largest.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape)) if largest else None
    resolution = model.identity["resolution"]
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.model.encode_image(torch.zeros(1, 3, resolution, resolution, device=model.device))
    flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encode_image(model.model, torch.zeros(1, 3, resolution, resolution, device=model.device))
    print(f"{flops / 1e9:.2f} GFLOP per image in encode_image, {counter.get_total_flops() / 1e9:.2f} in featstore's "
          f"forward (its last block computes the class token alone)")
    if hook is None:
        return flops, {}
    hook.remove()
    rows = int(np.prod(shapes[0][:-1])) * batch_size
    rates = {}
    for precision in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        a = torch.randn(rows, largest.in_features, device=model.device, dtype=dtype)
        w = torch.randn(largest.out_features, largest.in_features, device=model.device, dtype=dtype)
        sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        best = float("inf")
        for _ in range(20):
            sync()
            start = time.perf_counter()
            torch.nn.functional.linear(a, w)
            sync()
            best = min(best, time.perf_counter() - start)
        rates[precision] = 2 * rows * largest.in_features * largest.out_features / best / flops
    return flops, rates


def featstore_run(root: str, spec: str, precision: str, batch_size: int, workers: int | None, device: str):
    with tempfile.TemporaryDirectory(prefix="featstore-bench-store-") as store:
        start = time.perf_counter()
        result = encode(root, store, "bench", model=spec, batch_size=batch_size, workers=workers, device=device,
                        precision=precision, dtype="float32", progress=False)
        startup = time.perf_counter() - start - result["seconds"]  # imports are done; this is the model load
        ids, features, _ = Store.open(store).features("bench")
    return result["seconds"], startup, features


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--model", default="random:ViT-B/32")
    parser.add_argument("--kinds", default="cifar,jpeg")
    parser.add_argument("--precisions", default=None, help="default: fp32,bf16 on CPU, fp16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default: featstore's default for the device")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the fastest of each is compared")
    args = parser.parse_args()
    print(capability_line(), flush=True)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    precisions = (args.precisions or ("fp16" if cuda else "fp32,bf16")).split(",")
    from featstore.encode.reader import default_batch_size

    batch_size = args.batch_size or default_batch_size(torch.device("cuda" if cuda else "cpu"))
    ref_model = load_model(args.model, args.device)  # fp32 on CPU, fp16 on CUDA: clip.load's choice
    print(f"model {args.model} | device {ref_model.device} | torch threads {torch.get_num_threads()} | "
          f"{args.n} images per kind | featstore batch {batch_size}, workers {args.workers or 'default'}")
    models = {precision: ref_model if precision == ref_model.precision else load_model(args.model, args.device, precision)
              for precision in precisions}
    _, ceilings = gemm_ceiling(ref_model, batch_size, precisions)
    print(f"at this machine's rate for its largest matrix product (batch {batch_size}), encode_image's "
          f"ceiling is " + ", ".join(f"{p} {c:.1f} img/s" for p, c in ceilings.items()))
    reference = Reference(args.model, args.device)
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory(prefix=f"featstore-bench-{kind}-") as root:
            compare(kind, root, args, reference, ref_model, models, precisions, ceilings, batch_size)


def compare(kind: str, root: str, args, reference: Reference, ref_model, models: dict, precisions: list[str],
            ceilings: dict, batch_size: int) -> None:
    """The reference, featstore and model-only rounds on one kind of image, and their printed comparison."""
    text = torch.nn.functional.normalize(torch.randn(100, ref_model.dim, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    make_images(root, kind, args.n)
    pixels = preprocessed(ref_model, root)
    # the machine's speed drifts by 10-20 % over minutes (shared cores): every variant runs once per
    # round, rounds interleave them, and each variant's fastest round is compared
    ref_times, runs, forwards = [], {p: [] for p in precisions}, {p: [] for p in precisions}
    for _ in range(args.rounds):
        ref_seconds, ref_features = reference(root)
        ref_times.append(ref_seconds)
        for precision in precisions:
            forwards[precision].append(model_only(models[precision], pixels, batch_size))
            runs[precision].append(featstore_run(root, args.model, precision, batch_size, args.workers, args.device))
    ref_rate = args.n / min(ref_times)
    print(f"\n[{kind}] reference loop (batch 100, {ref_model.precision}): {ref_rate:7.1f} img/s "
          f"(fastest of {args.rounds} rounds; slowest {args.n / max(ref_times):.1f}); ceilings = "
          + ", ".join(f"{c / ref_rate:.2f}x ({p})" for p, c in ceilings.items()) + " this reference")
    ref_top1 = np.argmax(ref_features @ text.T / np.linalg.norm(ref_features, axis=1, keepdims=True), axis=1)
    for precision in precisions:
        seconds = min(r[0] for r in runs[precision])
        startup = min(r[1] for r in runs[precision])
        features = runs[precision][-1][2]
        forward = min(forwards[precision])
        rate = args.n / seconds
        cos = (features * ref_features).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(ref_features, axis=1))
        rel = np.abs(features - ref_features).max() / np.abs(ref_features).max()
        top1 = np.argmax(features @ text.T / np.linalg.norm(features, axis=1, keepdims=True), axis=1)
        ratios = ", ".join(f"{min(ref_times) / r[0]:.2f}" for r in runs[precision])
        print(f"[{kind}] featstore {precision:4s} end-to-end {rate:7.1f} img/s = {rate / ref_rate:4.2f}x reference "
              f"(per round vs the fastest reference: {ratios}) | "
              f"model-only {args.n / forward:7.1f} img/s, end-to-end / model-only time {seconds / forward:4.2f} | "
              f"model load {startup:.1f}s | vs reference: max rel err {rel:.1e}, min cos {cos.min():.5f}, top-1 agreement {np.mean(top1 == ref_top1):.3f}")


if __name__ == "__main__":
    main()
