"""``featstore encode``: plan → reader → mapper → writer, driven by a runner.

- plan (``plan.py``): walk the source's listing and the split's rows together in id order; only new or
  changed items are read, and they and the rows to change wait in spill files, so memory grows with neither
  the source nor the night's changes.
- reader (``reader.py``): a torch DataLoader whose workers read, hash and preprocess images (bad files become
  failures).
- mapper: the model's ``encode_image`` (raw, unnormalised outputs; ``featstore.models``).
- writer (``writer.py``): buffers rows and commits shards on a background thread, then patches shards whose
  rows changed or vanished, each by an atomic replace, one shard's changes at a time.
- runner (``runner.py``): the local DataLoader runner that drives them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

from featstore.compact import AUTO_KEEP, AUTO_RUNS, compact_split
from featstore.encode.plan import CHANGED, REMOVED, make_plan
from featstore.encode.reader import default_batch_size, default_workers
from featstore.encode.runner import run_pipeline
from featstore.encode.writer import ShardWriter
from featstore.errors import FeatstoreError
from featstore.hardware import warn_slow_bf16
from featstore.index.split import refresh as refresh_index
from featstore.identity import describe, same_model
from featstore.models import DEFAULT_MODEL, load_model
from featstore.sources import open_source
from featstore.store import DEFAULT_SHARD_ROWS, DTYPES, Store, check_split_name


def encode(source: str, store_dir: str, split: str, model: str = DEFAULT_MODEL, batch_size: int | None = None,
           workers: int | None = None, device: str = "auto", precision: str | None = None,
           dtype: str | None = None, shard_rows: int = DEFAULT_SHARD_ROWS, progress: bool = True,
           allow_slow_bf16: bool = False, allow_removals: bool = False, engine: str = "local",
           ray_address: str | None = None, actors: int | None = None, gpus_per_actor: float | None = None,
           cpus_per_decoder: float = 1.0) -> dict[str, Any]:
    """Make split SPLIT of the store at STORE_DIR hold exactly the embeddings of SOURCE's images.

    ENGINE "local" runs on this machine; "ray" on the Ray cluster at RAY_ADDRESS (default: a local instance),
    with ACTORS model replicas of GPUS_PER_ACTOR GPUs each and decode tasks of CPUS_PER_DECODER CPUs
    (``featstore.encode.ray_runner``); WORKERS applies to the local engine only.

    A run that would empty the split from an empty listing, or remove more than a quarter of its rows (and more
    than 100), is refused before anything is written unless ALLOW_REMOVALS (``featstore.plan``). A changed file
    whose new bytes fail to read or decode keeps its old row (counted as "stale"), beside a failure record, and
    is tried again next run; only a file no longer listed loses its row.

    bf16 on a CPU without native bf16 warns once on stderr (featstore.hardware) unless ALLOW_SLOW_BF16."""
    check_split_name(split)
    if batch_size is not None and batch_size < 1:
        raise FeatstoreError("--batch-size must be at least 1")
    if shard_rows < 1:
        raise FeatstoreError("--shard-rows must be at least 1")
    if workers is not None and workers < 0:
        raise FeatstoreError("--workers must be 0 or more")
    cores = os.cpu_count() or 1
    if workers is not None and workers > 4 * cores:  # each is a process: 100000 of them would never start
        raise FeatstoreError(f"--workers must be at most {4 * cores} (4 × this machine's {cores} cores)")
    if dtype is not None and dtype not in DTYPES:
        raise FeatstoreError(f"unknown --dtype {dtype!r}: use float16 or float32")
    store = Store(store_dir)
    store.check_unlocked()  # fail at once, before loading a model, when another writer runs
    if store.exists and dtype is not None and dtype != store.manifest.dtype:
        raise FeatstoreError(f"store {store.root} holds {store.manifest.dtype} embeddings, not {dtype}")
    src = open_source(source, split)
    if engine == "ray":
        from featstore.encode import ray_runner

        options = ray_runner.RayOptions(ray_address, actors, gpus_per_actor, cpus_per_decoder)
        ray_runner.start(options)
        clip_model, actors, gpus_per_actor = ray_runner.load(model, device, precision, options)
    elif engine != "local" or (ray_address, actors, gpus_per_actor, cpus_per_decoder) != (None, None, None, 1.0):
        raise FeatstoreError(f"unknown --engine {engine!r}: use local or ray" if engine != "local"
                             else "--ray-address, --actors, --gpus-per-actor and --cpus-per-decoder need --engine ray")
    else:
        clip_model = load_model(model, device, precision)
    if store.exists and not same_model(store.manifest.model, clip_model.identity):
        raise FeatstoreError(
            f"store {store.root} holds embeddings of {describe(store.manifest.model)}; "
            f"this run would use {describe(clip_model.identity)}: use another --store"
        )
    if not allow_slow_bf16:
        warn_slow_bf16(clip_model.device.type, clip_model.precision)
    started = time.perf_counter()
    with store.lock("featstore encode"):
        if not store.exists:
            store.create(clip_model.identity, dtype or "float16")
        repairs = store.reconcile(split)
        store.split_info(split).source = src.spec
        src.skip(store.root)  # a folder source never walks the store, when the store sits inside it
        label_ids = store.class_ids(src.classes())
        from tqdm import tqdm

        with tqdm(src.iter_items(), unit=" files", desc="plan", disable=not progress, file=sys.stderr) as listing:
            plan = make_plan(store, split, listing, src, label_ids, allow_removals)  # long on reruns of millions of files
        with contextlib.ExitStack() as cleanup:  # spill files go however the run ends
            cleanup.callback(plan.discard)
            writer = ShardWriter(store, split, plan, label_ids, shard_rows)
            cleanup.callback(writer.discard)
            workers = default_workers(clip_model.device) if workers is None else workers
            batch_size = max(1, min(batch_size or default_batch_size(clip_model.device), len(plan.to_encode)))
            if engine == "ray":
                ray_runner.run_ray(clip_model, src, plan.to_encode, writer, batch_size, actors, gpus_per_actor,
                                   cpus_per_decoder, progress)
            else:
                run_pipeline(clip_model, src, plan.to_encode, writer, batch_size, workers, progress)
            writer.close()
        compacted = 0
        if writer.shards_written:  # new shards may have added a sorted run; patches never do
            compacted = compact_split(store, split, AUTO_KEEP, shard_rows, progress, when_over=AUTO_RUNS)["rows_rewritten"]
        index = refresh_index(store, split, progress)  # the split's image index, if it has one, kept current
    seconds = time.perf_counter() - started
    info = store.split_info(split)
    encoded = writer.encoded
    return {
        "split": split,
        "store": store.root,
        "model": describe(store.manifest.model),
        "random_weights": bool(store.manifest.model.get("random_weights")),
        "rows": sum(r.rows for r in info.shards.values()),
        "encoded": encoded,
        "replaced": plan.counts[CHANGED] - writer.stale,
        "stale": writer.stale,
        "unchanged": plan.unchanged,
        "removed": plan.counts[REMOVED],
        "failed": len(info.failed),
        "new_failures": len(plan.to_encode) - encoded + plan.new_failures,
        "shards": len(info.shards),
        "shards_written": writer.shards_written,
        "compacted": compacted,
        "seconds": round(seconds, 3),
        "img_per_s": round(len(plan.to_encode) / seconds, 2) if seconds > 0 else None,
        "repairs": repairs,
        "index": index,
    }
