"""The ``featstore`` command line: parse, call the library, print. Heavy imports happen inside commands."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from typing import List, Optional

import typer

from featstore.errors import FeatstoreError

SHARD_ROWS = 50_000  # featstore.store.DEFAULT_SHARD_ROWS, written out: the store module is a heavy import (0.4 s)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="A batch feature store for CLIP embeddings: encode, labels, query, probe.")


def _finite(data):
    """DATA with every NaN or infinite float turned into None (JSON null): JSON has no spelling for them."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def _print_json(data) -> None:
    typer.echo(json.dumps(_finite(data), allow_nan=False, indent=None if not sys.stdout.isatty() else 1))


def _escape_code(c: int) -> str:
    if 0xDC80 <= c <= 0xDCFF:  # a byte that was not UTF-8, as Python decodes file names (surrogateescape)
        return f"\\x{c - 0xDC00:02x}"
    return {9: "\\t", 10: "\\n", 13: "\\r"}.get(c, f"\\x{c:02x}" if c < 0x80 else f"\\u{c:04x}")


# control characters, line and paragraph separators, and lone surrogates (non-UTF-8 bytes included)
_UNPRINTABLE = {c: _escape_code(c) for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0xD800, 0xE000))}


def _one_line(text: str) -> str:
    """TEXT as one printable line: control characters and bytes that are not UTF-8 become backslash escapes."""
    return text.translate(_UNPRINTABLE)


def _field(text: str) -> str:
    """A tab-separated field that cannot be forged: backslashes, tabs and newlines escaped (reversibly)."""
    return _one_line(text.replace("\\", "\\\\"))


def _fail(message: str, code: int) -> None:
    typer.echo(f"featstore: error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


# OSErrors that describe the environment (permissions, a read-only or full disk, a bad path), not a bug:
# one line and exit 2, like bad input
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO,
                      errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP,
                      errno.EMFILE, errno.ENFILE}
CLOSED_STDOUT = 141  # 128 + SIGPIPE: what a shell reports for a tool stopped by a closed pipe


def _os_error_line(e: OSError, store: Optional[str]) -> str:
    path, reason = e.filename if isinstance(e.filename, str) else None, e.strerror
    quoted = re.search(r"'(/[^']*)'", reason) if path is None and e.errno and isinstance(reason, str) else None
    if quoted:  # pyarrow's: "Failed to open local file 'PATH'. Detail: [errno 1] Operation not permitted"
        path, reason = quoted[1], os.strerror(e.errno)
    line = f"{path}: {reason}" if path else str(reason or e)
    inside = store and path and (os.path.abspath(path) + os.sep).startswith(os.path.abspath(store) + os.sep)
    if inside and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"store {store} is read-only to this process: {line}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{line} (free some space and rerun)"
    return line


def _stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (``featstore info DIR | head -1``)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, ValueError, OSError):
        return False


def _guard(function):
    """Bad input becomes one line on stderr and a non-zero exit (FEATSTORE_DEBUG=1 shows tracebacks)."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        store = kwargs.get("store")
        try:
            if isinstance(store, str) and os.path.exists(store) and not os.path.isdir(store):
                raise FeatstoreError(f"store path {store} is not a folder")
            return function(*args, **kwargs)
        except FeatstoreError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; committed shards are kept, rerun to finish", 130)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if isinstance(e, BrokenPipeError) and _stdout_closed():
                # the reader of our output has gone: no message, no traceback, and no second error when Python
                # flushes stdout at exit (the Python docs' recipe: point stdout at /dev/null)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise typer.Exit(CLOSED_STDOUT) from None
            if os.environ.get("FEATSTORE_DEBUG"):
                raise
            if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
                _fail(_os_error_line(e, store), 2)
            _fail(f"{type(e).__name__}: {e} (set FEATSTORE_DEBUG=1 for a traceback)", 1)

    return wrapper


def _percent(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


@app.command()
@_guard
def encode(
    source: str = typer.Argument(..., help="Folder, cifar10:ROOT[:train|test], cifar100:ROOT[:train|test] or manifest:FILE"),
    store: str = typer.Option(..., "--store", help="Store directory (created if missing)"),
    split: str = typer.Option(..., "--split", help="Split name, e.g. train"),
    model: str = typer.Option("ViT-B/32", "--model", help=(
        "NAME or PATH (openai CLIP; also openai:NAME|PATH), random:ARCH[:SEED], "
        "open_clip:ARCH[:PRETRAINED_TAG_OR_PATH], open_clip:hf-hub:ORG/REPO, or hf:DIR_OR_REPO")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass (default 16 on CPU, 256 on CUDA)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes (default: by device)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16 or bf16 (default fp16 on CUDA, fp32 on CPU)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Stored embedding type: float16 (default) or float32"),
    shard_rows: int = typer.Option(SHARD_ROWS, "--shard-rows", help="Rows per Parquet shard"),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero when any image failed"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar"),
    allow_removals: bool = typer.Option(False, "--allow-removals",
                                        help="Allow emptying the split, or removing over 25% of its rows (and over 100)"),
    engine: str = typer.Option("local", "--engine", help="local (this machine) or ray (a Ray cluster)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default: start a local instance)"),
    actors: Optional[int] = typer.Option(None, "--actors", help="Ray: model replicas (default: one per GPU, 1 on CPU)"),
    gpus_per_actor: Optional[float] = typer.Option(None, "--gpus-per-actor", help="Ray: GPUs per replica (default 1 with GPUs, else 0)"),
    cpus_per_decoder: float = typer.Option(1.0, "--cpus-per-decoder", help="Ray: CPUs per decode task"),
):
    """Encode SOURCE's images into split SPLIT of the store (only what changed since the last run)."""
    from featstore.encode import encode as run_encode

    result = run_encode(source, store, split, model=model, batch_size=batch_size, workers=workers, device=device,
                        precision=precision, dtype=dtype, shard_rows=shard_rows, progress=not quiet,
                        allow_removals=allow_removals, engine=engine, ray_address=ray_address, actors=actors,
                        gpus_per_actor=gpus_per_actor, cpus_per_decoder=cpus_per_decoder)
    if as_json:
        _print_json(result)
    else:
        for line in result["repairs"]:
            typer.echo(f"repaired: {line}", err=True)
        typer.echo(
            f"split {result['split']}: {result['rows']} rows in {result['shards']} shards | encoded {result['encoded']} "
            f"(replaced {result['replaced']}), unchanged {result['unchanged']}, removed {result['removed']}, "
            f"failed {result['failed']} | {result['seconds']:.1f}s, {result['img_per_s'] or 0:.1f} img/s"
            f"{' | compacted %d rows' % result['compacted'] if result['compacted'] else ''}\n"
            f"model {result['model']}"
        )
    if result["stale"]:
        typer.echo(f"warning: kept {result['stale']} stale rows whose files changed but no longer read or decode "
                   f"(tried again next run)", err=True)
    if result["failed"]:
        typer.echo(f"warning: {result['failed']} images could not be read; see featstore info {store} --failures", err=True)
        if strict:
            raise typer.Exit(4)


@app.command()
@_guard
def labels(
    store: str = typer.Argument(..., help="Store directory"),
    template: Optional[List[str]] = typer.Option(None, "--template", help="Prompt template with {} (repeatable)"),
    templates: Optional[str] = typer.Option(None, "--templates", help="File of templates, one per line, or paper80"),
    classes: Optional[str] = typer.Option(None, "--classes", help="Display names: one per line in class order, or name<TAB>display"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Embed class prompts (ensembled over templates) and build the FAISS label index."""
    from featstore.labels import build_labels

    result = build_labels(store, template, templates, classes, device)
    if as_json:
        _print_json(result)
    else:
        typer.echo(f"label index: {result['classes']} classes x {result['templates']} templates -> {result['index']}")


@app.command()
@_guard
def query(
    store: str = typer.Argument(..., help="Store directory"),
    split: Optional[str] = typer.Option(None, "--split", help="Rank labels for every stored image of this split"),
    image: Optional[List[str]] = typer.Option(None, "--image", help="Rank labels for new image files (repeatable)"),
    top_k: int = typer.Option(5, "--top-k"),
    out: Optional[str] = typer.Option(None, "--out", help="Write per-image top-k (id, labels, scores) to Parquet"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Zero-shot nearest labels: accuracy over a split, or top-k for new images."""
    from featstore import query as q

    if bool(split) == bool(image):
        raise FeatstoreError("give either --split NAME or --image PATH")
    if device != "auto":  # --split uses no model, but a wrong --device is still an error
        from featstore.models import resolve_device

        resolve_device(device)
    if image:
        _print_json(q.query_images(store, image, top_k, device))
        return
    result = q.query_split(store, split, top_k, out)
    if as_json:
        _print_json({k: result[k] for k in ("n", "acc1", "acc5", "mean_per_class_recall")})
    else:
        typer.echo(f"split {split}: {result['rows']} images, {result['n']} labelled | acc1 {_percent(result['acc1'])} "
                   f"acc5 {_percent(result['acc5'])} mean per-class recall {_percent(result['mean_per_class_recall'])}")
        if out:
            typer.echo(f"top-{top_k} written to {result['out']}")


@app.command()
@_guard
def search(
    store: str = typer.Argument(..., help="Store directory"),
    split: str = typer.Option(..., "--split", help="The split searched (its image index: featstore index)"),
    text: Optional[List[str]] = typer.Option(None, "--text", help="Images matching this text (repeatable)"),
    image: Optional[List[str]] = typer.Option(None, "--image", help="Images like this image file (repeatable)"),
    row_id: Optional[List[str]] = typer.Option(None, "--id", help="Images like this stored row (repeatable)"),
    k: int = typer.Option(10, "--k", help="Results per query"),
    templates: Optional[str] = typer.Option(None, "--templates", help="Ensemble each --text over these templates "
                                            "(a file, one per line, or paper80), as labels does"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json"),
):
    """The split's images nearest to texts, image files or stored rows: live rows only, best first (cosine)."""
    from featstore.index.query import search_split

    found = search_split(store, split, text, image, row_id, k, templates, device)
    if as_json:
        _print_json(found)
        return
    kind = "text" if text else "image" if image else "id"
    for entry in found:
        typer.echo(f"{kind} {_one_line(entry['query'])}")
        for rank, row in enumerate(entry["results"], 1):
            typer.echo(f"{rank:>4}  {row['score']:7.4f}  {_one_line(row['label'] or '-'):<16}  {_one_line(row['id'])}")


@app.command()
@_guard
def dedup(
    store: str = typer.Argument(..., help="Store directory"),
    split: str = typer.Option(..., "--split", help="The split (its image index: featstore index)"),
    threshold: float = typer.Option(0.95, "--threshold", help="Pairs at this cosine or above (exact copies: always)"),
    k: int = typer.Option(10, "--k", help="Nearest rows each row is compared with"),
    out: Optional[str] = typer.Option(None, "--out", help="Write every pair (id_a, id_b, score) to this Parquet file"),
    against: Optional[str] = typer.Option(None, "--against", help="Rows of this split near rows of --split (leakage)"),
    as_json: bool = typer.Option(False, "--json", help='Print {"pairs", "groups", "rows_in_groups"} (counts)'),
):
    """Near-duplicate pairs and groups in a split (or across two), exact copies (same sha256) included."""
    from featstore.index.duplicates import dedup_split

    result = dedup_split(store, split, threshold, k, out, against)
    if as_json:
        _print_json({key: result[key] for key in ("pairs", "groups", "rows_in_groups")})
        return
    where = f"split {split}" if against is None else f"rows of {against} near rows of {split}"
    typer.echo(f"{where}: {result['pairs']} pairs at cosine >= {threshold:g} in {result['groups']} groups "
               f"({result['rows_in_groups']} rows)")
    for number, group in enumerate(result["group_ids"][:DEDUP_SHOWN], 1):
        names = (row_id if against is None else f"{name}:{row_id}" for name, row_id in group)
        typer.echo(f"group {number} ({len(group)} rows): {_one_line(', '.join(names))}")
    if result["groups"] > DEDUP_SHOWN:
        typer.echo(f"... {result['groups'] - DEDUP_SHOWN} more groups" + ("" if out else " (--out FILE for every pair)"))
    if out:
        typer.echo(f"pairs written to {result['out']}")


DEDUP_SHOWN = 20  # groups dedup lists; --out holds every pair


@app.command()
@_guard
def probe(
    store: str = typer.Argument(..., help="Store directory"),
    train_split: str = typer.Option(..., "--train-split"),
    test_split: str = typer.Option(..., "--test-split"),
    C: Optional[float] = typer.Option(None, "--C", help="Inverse regularisation; omitted: chosen by a validation sweep"),
    max_iter: int = typer.Option(1000, "--max-iter"),
    out: Optional[str] = typer.Option(None, "--out", help="Save the classifier (PATH.npz + PATH.json)"),
    solver: str = typer.Option("torch", "--solver", help="torch (L-BFGS, float32, GPU if any) or sklearn (the seed's call)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (torch solver)"),
    shots: Optional[str] = typer.Option(None, "--shots", help="Few-shot probes: K train images per class, e.g. 1,2,4,8,16 "
                                        "(C defaults to 0.316)"),
    seeds: int = typer.Option(5, "--seeds", help="Few-shot draws per K (seeds 0..N-1)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Train a logistic-regression linear probe on stored embeddings and report test accuracy."""
    if shots is not None:
        _fewshot(store, train_split, test_split, shots, seeds, C, max_iter, out, solver, device, as_json)
        return
    from featstore.probe import probe as run_probe

    result = run_probe(store, train_split, test_split, C, max_iter, out, solver, device)
    if as_json:
        _print_json(result)
    else:
        swept = f", chosen from {len(result['sweep'])} by validation" if "sweep" in result else ""
        typer.echo(f"linear probe: acc1 {_percent(result['acc1'])} with C={result['C']:g}{swept} "
                   f"(train {result['n_train']}, test {result['n_test']}; {result['solver']} solver, "
                   f"{result['iterations']} iterations)")


def _fewshot(store, train_split, test_split, shots, seeds, C, max_iter, out, solver, device, as_json) -> None:
    from featstore.evaluate.fewshot import fewshot, parse_shots

    if out:
        raise FeatstoreError("--out saves one classifier: it cannot be combined with --shots")
    result = fewshot(store, train_split, test_split, parse_shots(shots), seeds, C, max_iter, solver, device)
    if as_json:
        _print_json(result)
        return
    typer.echo(f"few-shot linear probe: C={result['C']:g}, {result['solver']} solver, {result['classes']} classes, "
               f"test {result['n_test']}")
    for entry in result["fewshot"]:
        short = f", {entry['short_classes']} classes had fewer" if entry["short_classes"] else ""
        typer.echo(f"  {entry['shots']}-shot: acc1 {_percent(entry['acc1_mean'])} (sd {_percent(entry['acc1_std'])} "
                   f"over {entry['seeds']} seeds; train {entry['n_train']}{short})")


@app.command()
@_guard
def report(
    store: str = typer.Argument(..., help="Store directory"),
    split: str = typer.Option(..., "--split", help="The split to evaluate"),
    probe: Optional[str] = typer.Option(None, "--probe", help="A classifier saved by probe --out, evaluated on the split"),
    fewshot: Optional[str] = typer.Option(None, "--fewshot", help="A file holding probe --shots --json output"),
    out: Optional[str] = typer.Option(None, "--out", help="Report folder (default STORE/reports/SPLIT)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """An HTML page with plots (per-class accuracy, confusions, few-shot curve, scores) and JSON metrics."""
    from featstore.evaluate.report import report as run_report

    result = run_report(store, split, probe, fewshot, out)
    if as_json:
        _print_json(result)
        return
    flag = " [RANDOM WEIGHTS]" if result["random_weights"] else ""
    typer.echo(f"report: zero-shot acc1 {_percent(result['zeroshot']['acc1'])}{flag}, {len(result['images'])} plots "
               f"-> {result['index']}")


@app.command()
@_guard
def info(
    store: str = typer.Argument(..., help="Store directory"),
    failures: bool = typer.Option(False, "--failures", help="List images that could not be read"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Model, classes, label index and per-split rows / failures / shards (reads the manifest only)."""
    from featstore.store import Store

    opened = Store.open(store)
    if failures:
        rows = opened.failures()
        if as_json:
            _print_json(rows)
        for row in [] if as_json else rows:
            typer.echo("\t".join(_field(row[key]) for key in ("split", "path", "reason")))
        return
    summary = opened.summary()
    if as_json:
        summary["model"] = summary["model"]["spec"]
        summary["model_identity"] = opened.manifest.model
        _print_json(summary)
        return
    from featstore.identity import describe

    classes = summary["classes"]
    typer.echo(f"store   {summary['store']}\nmodel   {describe(opened.manifest.model)}\n"
               f"dim     {summary['dim']} ({summary['dtype']})\n"
               f"classes {len(classes)}: {_one_line(', '.join(classes[:8]))}{' ...' if len(classes) > 8 else ''}\n"
               f"labels  {'index of %d templates' % summary['templates'] if summary['label_index'] else 'none (run featstore labels)'}")
    for name, s in summary["splits"].items():
        typer.echo(f"split {name}: {s['rows']} rows, {s['failed']} failed, {s['shards']} shards  <- {_one_line(str(s['source']))}")
        if "index" in s:
            from featstore.index.split import human_size

            i = s["index"]
            typer.echo(f"  index {i['kind']}: {i['rows']} rows, recall@10 {i['recall_at_10']:.3f}, "
                       f"{human_size(i['bytes'])}, {'current' if i['current'] else 'behind the split (run encode)'}")


@app.command()
@_guard
def verify(store: str = typer.Argument(..., help="Store directory"), as_json: bool = typer.Option(False, "--json")):
    """Check every shard against the manifest's checksums and row counts; exit 1 if any is damaged."""
    from featstore.store import Store

    opened = Store.open(store)
    problems = opened.verify()
    from featstore.store import image_index

    for name in image_index.unnamed(opened):  # no damage: the next writer removes them
        typer.echo(f"note: {image_index.FOLDER}/{_one_line(name)}: left by an interrupted writer (the next one "
                   "removes it)", err=True)
    if as_json:
        _print_json({"ok": not problems, "problems": problems})
    else:
        for p in problems:
            typer.echo(_one_line(f"{p['file']}: {p['problem']}"), err=True)
        typer.echo("store ok" if not problems else f"{len(problems)} damaged or missing files; run featstore encode to repair")
    if problems:
        raise typer.Exit(1)


@app.command()
@_guard
def index(
    store: str = typer.Argument(..., help="Store directory"),
    split: str = typer.Option(..., "--split", help="The split whose image embeddings to index"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="The index's memory budget, e.g. 512M or 2G"),
    kind: str = typer.Option("auto", "--kind", help="auto, flat, hnsw, ivf-flat, ivf-pq or an index_factory string"),
    as_json: bool = typer.Option(False, "--json", help='Print {"split", "kind", "rows", "bytes", "recall_at_10"}'),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar"),
):
    """Build the split's FAISS image index (search, dedup); every encode of the split keeps it current."""
    from featstore.index.split import build_index, human_size

    result = build_index(store, split, kind, max_memory, progress=not quiet)
    if as_json:
        _print_json({key: result[key] for key in ("split", "kind", "rows", "bytes", "recall_at_10")})
        return
    for line in result["repairs"]:
        typer.echo(f"repaired: {line}", err=True)
    if result["keyed"]:
        typer.echo(f"gave row keys to {result['keyed']} rows written before keys", err=True)
    typer.echo(f"split {split}: {result['kind']} index of {result['rows']} rows, {human_size(result['bytes'])}, "
               f"recall@10 {result['recall_at_10']:.3f} ({result['params'] or 'exact'}, target {result['target']:g}) "
               f"| {result['seconds']:.1f}s\n-> {result['file']}")


@app.command()
@_guard
def compact(
    store: str = typer.Argument(..., help="Store directory"),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split (default: every split)"),
    max_runs: int = typer.Option(1, "--max-runs", help="Sorted runs of shards to leave per split"),
    shard_rows: int = typer.Option(SHARD_ROWS, "--shard-rows", help="Rows per rewritten Parquet shard"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar"),
):
    """Merge each split's sorted runs of shards, so reruns hold fewer read batches (encode does it past 16)."""
    from featstore.compact import compact as run_compact

    result = run_compact(store, split, max_runs=max_runs, shard_rows=shard_rows, progress=not quiet)
    if as_json:
        _print_json(result)
        return
    for name, s in result["splits"].items():
        for line in s["repairs"]:
            typer.echo(f"repaired: {line}", err=True)
        typer.echo(f"split {name}: sorted runs {s['runs_before']} -> {s['runs']}, rewrote {s['rows_rewritten']} rows, "
                   f"{s['shards']} shards")
    typer.echo(f"{result['seconds']:.1f}s")


@app.command()
@_guard
def run(jobfile: str = typer.Argument(..., help="TOML job file"), as_json: bool = typer.Option(False, "--json")):
    """Run a job file's steps (encode -> labels -> query -> probe -> report)."""
    from featstore.jobs import run_job

    results = run_job(jobfile, echo=lambda line: typer.echo(line, err=as_json))
    if as_json:
        _print_json(results)


def main() -> None:
    """Run the command line; a usage error (unknown option, bad value) is one line on stderr and exit 2."""
    try:  # typer 0.29 carries its own click
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        code = 2
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else "featstore"
        message = " ".join(e.format_message().split())
        typer.echo(f"featstore: error: {message} (see {command} --help)", err=True)
        code = e.exit_code
    except typer.Abort:
        typer.echo("featstore: error: interrupted", err=True)
        code = 130
    except BrokenPipeError:  # `featstore --help | head`: the reader has gone (commands handle it in _guard)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = CLOSED_STDOUT
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
