"""The Ray runner: the same items in and the same writer out as the local runner, with the work on a Ray cluster.

Ray Data's batch-inference pattern: a dataset of batch numbers (whole batches of the plan's items, so every
forward gets a full batch), decoded and preprocessed by CPU tasks (``map_batches`` with a function) into one
float32 tensor column, embedded by an actor pool holding one model replica per GPU (or per ``actors`` on CPU),
streamed back to the driver in item order (``preserve_order``). The driver's ShardWriter alone commits shards,
in the store's atomic way, and writes each item number once: a retried or duplicated task can never add a row
twice, and a killed driver leaves committed shards that a rerun keeps.

CPU priorities, for a model on the CPU cores that decoding and Ray itself also use: a local instance runs its
workers at the driver's priority (Ray's default, nice 15, lets every other process preempt the model's threads),
and decode tasks decode in a thread of lower priority (nice +10), so that they fill the model's pauses.

Decode tasks read the plan's spill file and keep a small journal in the split's folder, so every node must see
the store on a shared filesystem. The journal finds a file that kills its decoder (a segfault, an OOM kill):
a retried task reads its batch one file at a time, noting each before it starts; a file noted by an attempt
that died is recorded as a failure instead of being read again. Killed workers and actors are retried by Ray
(task retries, actor restarts).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import math
import os
import socket
import sys
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from featstore.errors import FeatstoreError

DECODE_RETRIES = 8  # deaths per decode batch (files that kill their decoder, lost nodes) before the run fails
MAX_BLOCKS = 10_000  # Ray Data blocks of batch numbers: tasks to schedule, each decoding its block a batch at a time
DECODE_NICE = 10  # decode threads' nice value above the model's: a tenth of a core's share beside a busy thread


@dataclass
class RayOptions:
    address: str | None = None  # None: a local Ray instance sized to this machine
    actors: int | None = None  # model replicas (default: one per GPU of the cluster, else 1)
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0 (CPU)
    cpus_per_decoder: float = 1.0

    def check(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise FeatstoreError("--actors must be at least 1")
        if self.gpus_per_actor is not None and not self.gpus_per_actor >= 0:
            raise FeatstoreError("--gpus-per-actor must be 0 or more")
        if not self.cpus_per_decoder > 0:
            raise FeatstoreError("--cpus-per-decoder must be more than 0")


@dataclass
class RemoteModel:
    """What the driver knows of the model the actors run: loaded once by a Ray task on an actor's resources."""

    spec: str
    device: Any  # torch.device of the actors
    precision: str
    identity: dict
    preprocess: Any  # a PIL image -> a CHW tensor, for the decode tasks


@contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 points at /dev/null meanwhile (Ray's C++ core logs there, past Python's logging)."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def start(options: RayOptions) -> None:
    """Connect to the cluster at OPTIONS.address, or start a local instance; keep one already open here.

    Ray's logs stay in its log folder: workers' output is not sent here, and this process's C++ core logs
    only fatal errors (Ray Data's actor pool would log a line per actor start), the line saying so swallowed."""
    import ray

    options.check()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        with _stderr_to_devnull():
            if options.address:
                ray.init(address=options.address, **quiet)
            else:  # workers at the driver's priority (Ray's default, nice 15, lets any other process preempt the model)
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(address="local", include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {options.address}" if options.address else "a local Ray instance"
        raise FeatstoreError(f"cannot start or reach {where}: {str(e).strip().splitlines()[0]}") from None


def _actor_resources(options: RayOptions, device: str) -> tuple[int, float]:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    per_actor = options.gpus_per_actor
    if per_actor is None:
        per_actor = 1 if gpus and device != "cpu" else 0
    if device == "cpu" and per_actor:
        raise FeatstoreError("--gpus-per-actor above 0 needs --device auto or cuda")
    if device.startswith("cuda") and not per_actor:
        raise FeatstoreError("--device cuda needs --gpus-per-actor above 0" if gpus else
                             "--device cuda was asked for but the Ray cluster has no GPU")
    if per_actor > gpus:
        raise FeatstoreError(f"--gpus-per-actor {per_actor:g} is more than the Ray cluster's {gpus:g} GPUs")
    actors = options.actors or (max(1, int(gpus // per_actor)) if per_actor else 1)
    return actors, per_actor


def _load_identity(spec: str, device: str, precision: str | None):
    from featstore.models import load_model

    try:
        model = load_model(spec, device, precision)
    except FeatstoreError as e:
        return e  # the driver raises it as it is (ModelUnavailable lets a job fall back)
    return model.device, model.precision, model.identity, model.preprocess


def load(spec: str, device: str, precision: str | None, options: RayOptions) -> tuple[RemoteModel, int, float]:
    """The model as an actor will load it (by a task on an actor's resources), the actors and GPUs per actor."""
    import ray

    actors, gpus = _actor_resources(options, device)
    task = ray.remote(_load_identity).options(num_gpus=gpus, num_cpus=0 if gpus else 1, max_retries=2)
    result = ray.get(task.remote(spec, "cuda" if gpus else "cpu", precision))
    if isinstance(result, FeatstoreError):
        raise result
    return RemoteModel(spec, *result), actors, gpus


_decoder: concurrent.futures.ThreadPoolExecutor | None = None  # this worker process's decode thread


def _decode(batch: dict, **batch_args) -> dict:
    """Decode one batch in this worker process's decode thread, whose OS priority is below the model's.

    On a node whose cores the model's threads use, a decode task preempting one of them stalls the whole
    forward (torch's parallel kernels wait at barriers for the descheduled thread); at a lower priority
    decoding runs in the model's pauses and on idle cores. The priority is lowered for that thread only:
    Ray may later run an actor in this process."""
    global _decoder
    if _decoder is None:
        _decoder = concurrent.futures.ThreadPoolExecutor(1, "featstore-decode", initializer=_lower_priority)
    return _decoder.submit(_decode_batch, int(batch["id"][0]), **batch_args).result()


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(DECODE_NICE)  # Linux: this thread's nice value (and its children's), not the process's


def _decode_batch(number: int, source, items, preprocess, batch_size: int, folder: str, run: str) -> dict:
    """Read, hash and preprocess batch NUMBER of the plan's items; a bad file becomes a failure (zero pixels).

    A worker that cannot write the store folder returns the reason in column ``fatal``: Ray passes on only the
    text of an exception raised in a task, and the driver must stop the run with that one line."""
    from featstore.encode.reader import ItemDataset

    numbers = list(range(number * batch_size, min((number + 1) * batch_size, len(items))))
    journal = os.path.join(folder, f".ray-{run}-{numbers[0]}.tmp")
    tensors, shas, failures, fatal = [], [], [], ""
    try:
        with open(journal, "a+", encoding="ascii") as f:
            f.seek(0)
            notes = f.read().split()
            careful = bool(notes)  # an attempt at this batch died: one file at a time, each noted first
            dead = {int(n[5:]) for n in notes if n.startswith("dead:")}
            if notes and notes[-1].isdigit():  # the file the last attempt was reading when it died
                dead.add(int(notes[-1]))
                f.write(f"dead:{notes[-1]}\n")
            f.write("start\n")
    except OSError as e:
        fatal, numbers = (f"a Ray worker on {socket.gethostname()} cannot write the store folder {folder} "
                          f"({e.strerror or e}): every Ray node must see the store on a shared, writable "
                          "filesystem"), numbers[:1]
    reader = ItemDataset(source, items, preprocess)
    with open(journal if not fatal else os.devnull, "a", encoding="ascii") as log:
        for number in numbers:
            if fatal:
                row = (None, None, "")
            elif number in dead:
                row = (None, None, "decoder process died (killed while reading this file)")
            else:
                if careful:
                    log.write(f"{number}\n")
                    log.flush()
                row = reader[number][1:]
            tensor, sha, why = row
            tensors.append(tensor)
            shas.append(sha or "")
            failures.append(why or "")
    if not fatal:
        os.unlink(journal)
    return {"index": np.array(numbers, np.int64), "pixels": _stack(tensors, preprocess), "sha": shas,
            "failure": failures, "fatal": [fatal] * len(numbers)}


def _stack(tensors: list, preprocess) -> np.ndarray:
    """The batch's pixels as one float32 array (a tensor column: one copy into the object store, none out of
    it); a failed item's are zeros, shaped as the others (as a blank image's when all failed)."""
    from PIL import Image

    shape = next((t.shape for t in tensors if t is not None), None)
    if shape is None:
        shape = preprocess(Image.new("RGB", (256, 256))).shape
    return np.stack([np.zeros(shape, np.float32) if t is None else t.numpy() for t in tensors]).astype(np.float32,
                                                                                                      copy=False)


class _Embed:
    """One model replica (a Ray actor): decoded pixels in, raw embeddings out (zeros for failed items).

    An actor whose model is not the store's returns why in column ``fatal`` instead of embeddings."""

    def __init__(self, model: RemoteModel, threads: int | None):
        import torch

        from featstore.encode.runner import TRIM_EVERY, _steady_heap
        from featstore.identity import describe, same_model
        from featstore.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.trim_heap, self.trim_every, self.untrimmed = _steady_heap(), TRIM_EVERY, 0  # as the local runner
        self.model = load_model(model.spec, str(model.device), model.precision)
        self.fatal = "" if same_model(self.model.identity, model.identity) else (
            f"a Ray actor on {socket.gethostname()} loaded {describe(self.model.identity)}, not "
            f"{describe(model.identity)}: give every node the same checkpoint")

    def __call__(self, batch: dict) -> dict:
        fatal = [self.fatal or why for why in batch["fatal"]]
        ok = np.flatnonzero(batch["failure"] == "") if not any(fatal) else []
        embeddings = np.zeros((len(batch["index"]), self.model.dim), np.float32)
        if len(ok):
            pixels = batch["pixels"] if len(ok) == len(embeddings) else batch["pixels"][ok]
            with warnings.catch_warnings():  # read-only pixels (in the object store): the model only reads them
                warnings.simplefilter("ignore", UserWarning)
                pixels = self.torch.from_numpy(pixels)
            embeddings[ok] = self.model.encode_images(pixels).numpy()
            self.untrimmed += len(ok)
            if self.untrimmed >= self.trim_every:
                self.trim_heap()
                self.untrimmed = 0
        return {"index": batch["index"], "embedding": embeddings, "sha": batch["sha"], "failure": batch["failure"],
                "fatal": fatal}


def run_ray(model: RemoteModel, source, items, writer, batch_size: int, actors: int, gpus_per_actor: float,
            cpus_per_decoder: float, progress: bool) -> None:
    """Drive decode tasks -> model actors -> the driver's WRITER over ITEMS (the plan's SpilledItems, in id
    order), every item number written once and in order."""
    import ray.data
    from tqdm import tqdm

    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # failures reach the caller as one error instead
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if not len(items):
        return
    folder = os.path.dirname(items.path)
    decode = functools.partial(_decode, source=source, items=items, preprocess=model.preprocess,
                               batch_size=batch_size, folder=folder, run=uuid.uuid4().hex[:8])
    threads = None if gpus_per_actor else max(1, (os.cpu_count() or 1) // actors)
    batches = math.ceil(len(items) / batch_size)  # rows of batch numbers: every block a whole number of batches
    blocks = min(MAX_BLOCKS, batches)
    with warnings.catch_warnings():  # max_retries has no named parameter: Ray calls ray_remote_args "deprecated"
        warnings.simplefilter("ignore")
        dataset = (ray.data.range(batches, override_num_blocks=blocks)
                   .map_batches(decode, batch_size=1, num_cpus=cpus_per_decoder, max_retries=DECODE_RETRIES)
                   .map_batches(_Embed, fn_constructor_args=(model, threads), batch_size=batch_size,
                                concurrency=actors, num_gpus=gpus_per_actor, num_cpus=1))
    done = 0
    with tqdm(total=len(items), unit="img", desc="encode", disable=not progress, file=sys.stderr) as bar:
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                fatal = next((str(why) for why in batch["fatal"] if why), None)
                if fatal:
                    raise FeatstoreError(fatal)
                fresh = np.flatnonzero(batch["index"] >= done)  # an item seen again (a retried task) is skipped
                if not np.array_equal(batch["index"][fresh], np.arange(done, done + len(fresh))):
                    raise FeatstoreError(f"the Ray engine returned items out of order after item {done}")
                ok = [i for i in fresh if not batch["failure"][i]]
                writer.add([items[int(batch["index"][i])] for i in ok], batch["embedding"][ok],
                           [str(batch["sha"][i]) for i in ok],
                           [(items[int(batch["index"][i])], str(batch["failure"][i])) for i in fresh if batch["failure"][i]])
                done += len(fresh)
                bar.update(len(fresh))
        except FeatstoreError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FeatstoreError(f"the Ray job failed ({first[:200]}); committed shards are kept: rerun to finish") \
                from None
    if done != len(items):
        raise FeatstoreError(f"the Ray engine returned {done} of {len(items)} items; rerun to finish")
