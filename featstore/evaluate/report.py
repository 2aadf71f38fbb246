"""``featstore report DIR --split NAME``: a self-contained HTML page of how zero-shot (and a saved probe) do on
a split, with PNG plots beside it, and the metrics as JSON in CLIP_benchmark's result layout.

The folder (``--out``, default ``STORE/reports/NAME``) holds ``index.html`` (inline style, no scripts, nothing
fetched from elsewhere; images by relative path), ``per_class.png``, ``confusions.png``,
``confusion_matrix.png``, ``scores.png``, ``fewshot.png`` (with few-shot results) and ``results*.json``.
Each file is written whole and renamed into place. Plots stay readable at 1,000 classes and more: per-class
accuracy becomes a sorted curve (and a table of the worst classes), and the confusion matrix covers only the
classes most involved in the top confusions.
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

import numpy as np

from featstore.errors import FeatstoreError
from featstore.evaluate.zeroshot import Tally, block_rows, split_blocks, top_k, zeroshot
from featstore.identity import describe, same_model
from featstore.store import REPORTS, Store, atomic_write

BARS_UP_TO = 40  # classes drawn as one bar each; beyond, a sorted accuracy curve
FULL_MATRIX_UP_TO = 30  # classes whose whole confusion matrix is drawn; beyond, the most confused classes only
TOP = 20  # confused pairs, worst classes and matrix classes shown


def report(store_dir: str, split: str, probe: str | None = None, fewshot: str | dict | None = None,
           out: str | None = None) -> dict[str, Any]:
    """Write the report of SPLIT into OUT; PROBE is a classifier saved by ``probe --out`` (evaluated on SPLIT),
    FEWSHOT the result of ``probe --shots`` (a dict, or a file holding its ``--json`` output)."""
    store = Store.open(store_dir)
    out = store.check_output(out or os.path.join(store.root, REPORTS, split), folder=True)
    curve = _load_fewshot(fewshot) if fewshot is not None else None
    classifier = _load_probe(store, probe) if probe else None  # refused before any work
    zero = zeroshot(store_dir, split)
    probed = _probe_tally(store, split, *classifier) if classifier else None
    os.makedirs(out, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {
        "per_class.png": _per_class_plot(plt, zero.tally, probed, zero.names),
        "confusions.png": _confusions_plot(plt, zero.tally, zero.names),
        "confusion_matrix.png": _matrix_plot(plt, zero.tally, zero.names),
        "scores.png": _scores_plot(plt, zero.histogram),
    }
    if curve:
        plots["fewshot.png"] = _fewshot_plot(plt, curve, zero.summary["acc1"],
                                             probed.metrics()["acc1"] if probed else None)
    for name, figure in plots.items():
        if figure is not None:
            atomic_write(os.path.join(out, name), lambda tmp, f=figure: f.savefig(tmp, format="png", dpi=100))
            plt.close(figure)
    images = [name for name, figure in plots.items() if figure is not None]

    identity = store.manifest.model
    results = _results(store, split, zero.summary, probed, curve)
    for name, record in results.items():
        _write_text(os.path.join(out, name), json.dumps(record, indent=1, allow_nan=False))
    page = _page(store, split, identity, zero, probed, curve, images, probe, sorted(results))
    _write_text(os.path.join(out, "index.html"), page)
    return {"out": out, "index": os.path.join(out, "index.html"), "images": images, "results": sorted(results),
            "zeroshot": zero.summary, "probe": probed.metrics() if probed else None,
            "random_weights": bool(identity.get("random_weights"))}


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def _load_fewshot(fewshot: str | dict) -> list[dict[str, Any]]:
    """The per-K entries of a ``probe --shots`` result (or of a file holding its ``--json`` output)."""
    data = fewshot
    if isinstance(fewshot, str):
        try:
            with open(fewshot, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise FeatstoreError(f"cannot read few-shot results {fewshot}: {e.strerror}") from None
        except ValueError:
            raise FeatstoreError(f"few-shot results {fewshot} are not JSON (save `featstore probe --shots ... "
                                 "--json` output)") from None
    curve = data.get("fewshot") if isinstance(data, dict) else None
    keys = ("shots", "acc1_mean", "acc1_std")
    if not isinstance(curve, list) or not all(isinstance(e, dict) and all(k in e for k in keys) for e in curve):
        raise FeatstoreError(f"few-shot results {fewshot if isinstance(fewshot, str) else ''} lack a 'fewshot' list of "
                             "{shots, acc1_mean, acc1_std} entries (the --json output of featstore probe --shots)")
    return curve


def _load_probe(store: Store, path: str):
    """(class ids, coef, intercept) of the probe saved at PATH, checked against the store's model and classes."""
    import torch

    from featstore.probe import load_classifier

    try:
        arrays, meta = load_classifier(path)
        class_ids, names = np.asarray(arrays["classes"], np.int64), list(meta["classes"])
        coef = torch.from_numpy(np.asarray(arrays["coef"], np.float32))
        intercept = torch.from_numpy(np.asarray(arrays["intercept"], np.float32))
        model = meta["model"]
    except OSError as e:
        raise FeatstoreError(f"cannot read probe {path}: {e.strerror or e} (give the PATH saved by probe --out)") from None
    except Exception:
        raise FeatstoreError(f"probe {path} is not a classifier saved by featstore probe --out") from None
    if not same_model(model, store.manifest.model):
        raise FeatstoreError(f"probe {path} was fit on {describe(model)} embeddings, not this store's "
                             f"{describe(store.manifest.model)}")
    classes = store.classes
    if len(names) != len(class_ids) or any(c >= len(classes) or classes[c] != n for c, n in zip(class_ids, names)):
        raise FeatstoreError(f"probe {path} names classes this store does not have under the same ids")
    return class_ids, coef, intercept


def _probe_tally(store: Store, split: str, class_ids: np.ndarray, coef, intercept) -> Tally:
    """A saved probe evaluated on every labelled row of SPLIT (streamed, like zero-shot)."""
    import torch

    tally = Tally(len(store.classes))
    for _, labels, features in split_blocks(store, split, block_rows(len(class_ids))):
        logits = (torch.from_numpy(features) @ coef.T + intercept).numpy()
        tally.add(labels, class_ids[top_k(logits, min(5, len(class_ids)))[0]])
    return tally


# ---- plots: each returns a matplotlib figure, or None when there is nothing to draw ----------------
def _accuracy(tally: Tally) -> np.ndarray:
    return np.divide(tally.hit1, tally.rows, out=np.full(len(tally.rows), np.nan), where=tally.rows > 0)


def _per_class_plot(plt, zero: Tally, probed: Tally | None, names: list[str]):
    present = np.flatnonzero(zero.rows > 0)
    if not len(present):
        return None
    series = [("zero-shot", _accuracy(zero)[present])] + ([("linear probe", _accuracy(probed)[present])] if probed else [])
    if len(present) <= BARS_UP_TO:
        order = np.argsort(series[0][1], kind="stable")
        figure, axes = plt.subplots(figsize=(8, 1.2 + 0.28 * len(present)))
        height = 0.8 / len(series)
        for i, (label, values) in enumerate(series):
            axes.barh(np.arange(len(order)) + i * height, values[order], height, label=label)
        axes.set_yticks(np.arange(len(order)) + height * (len(series) - 1) / 2, [names[c] for c in present[order]])
        axes.set_xlim(0, 1)
    else:
        figure, axes = plt.subplots(figsize=(8, 4.5))
        for label, values in series:
            axes.plot(np.arange(len(values)), np.sort(values), label=label)
        axes.set_xlabel(f"classes, sorted by accuracy ({len(present)} with rows)")
        axes.set_ylabel("top-1 accuracy")
        axes.set_ylim(0, 1)
    axes.set_title("Per-class top-1 accuracy")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return figure


def _confusions_plot(plt, tally: Tally, names: list[str]):
    pairs = tally.confusions(TOP)
    if not pairs:
        return None
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.3 * len(pairs)))
    axes.barh(np.arange(len(pairs))[::-1], [count for _, _, count in pairs])
    axes.set_yticks(np.arange(len(pairs))[::-1], [f"{names[t]} \u2192 {names[p]}" for t, p, _ in pairs])
    axes.set_xlabel("images (true \u2192 predicted)")
    axes.set_title(f"Most confused class pairs (top {len(pairs)})")
    figure.tight_layout()
    return figure


def matrix_classes(tally: Tally) -> np.ndarray:
    """Every class with rows when they are few; else the classes most involved in the top confusions."""
    present = np.flatnonzero(tally.rows > 0)
    if len(present) <= FULL_MATRIX_UP_TO:
        return present
    chosen: list[int] = []
    for true, predicted, _ in tally.confusions():
        chosen += [c for c in (true, predicted) if c not in chosen]
        if len(chosen) >= TOP:
            break
    return np.array(chosen[:TOP], np.int64)


def _matrix_plot(plt, tally: Tally, names: list[str]):
    chosen = matrix_classes(tally)
    if not len(chosen):
        return None
    counts = tally.matrix(chosen)
    fractions = counts / np.maximum(tally.rows[chosen], 1)[:, None]
    size = 2.5 + 0.35 * len(chosen)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    shown = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    labels = [names[c] for c in chosen]
    axes.set_xticks(range(len(chosen)), labels, rotation=90)
    axes.set_yticks(range(len(chosen)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(chosen) <= TOP:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                axes.text(j, i, str(count), ha="center", va="center", fontsize=7,
                          color="white" if fractions[i, j] > 0.5 else "black")
    figure.colorbar(shown, ax=axes, label="fraction of the true class's images")
    scope = "all classes" if len(chosen) == int((tally.rows > 0).sum()) else f"the {len(chosen)} most confused classes"
    axes.set_title(f"Confusion matrix: {scope}")
    figure.tight_layout()
    return figure


def _scores_plot(plt, histogram: dict[str, list[int]]):
    figure, axes = plt.subplots(figsize=(8, 3.5))
    edges = np.linspace(0, 1, len(histogram["correct"]) + 1)
    bottom = np.zeros(len(edges) - 1)
    for key, colour in (("correct", "tab:green"), ("wrong", "tab:red"), ("unlabelled", "tab:gray")):
        counts = np.asarray(histogram[key])
        if counts.any():
            axes.bar(edges[:-1], counts, np.diff(edges), bottom=bottom, align="edge", color=colour, label=key)
            bottom += counts
    axes.set_xlabel("top-1 probability, softmax(100 \u00b7 cos)")
    axes.set_ylabel("images")
    axes.set_title("Zero-shot score distribution")
    axes.legend()
    figure.tight_layout()
    return figure


def _fewshot_plot(plt, curve: list[dict[str, Any]], zero_acc1: float | None, probe_acc1: float | None):
    figure, axes = plt.subplots(figsize=(7, 4))
    shots = [e["shots"] for e in curve]
    axes.errorbar(shots, [e["acc1_mean"] for e in curve], yerr=[e["acc1_std"] for e in curve], marker="o",
                  capsize=3, label="few-shot linear probe (mean \u00b1 sd over seeds)")
    for value, label, style in ((zero_acc1, "zero-shot", "--"), (probe_acc1, "linear probe, all rows", ":")):
        if value is not None:
            axes.axhline(value, linestyle=style, color="gray" if style == "--" else "black", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(shots, [str(s) for s in shots])
    axes.set_xlabel("training images per class")
    axes.set_ylabel("top-1 accuracy")
    axes.set_title("Few-shot curve")
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


# ---- JSON results -----------------------------------------------------------------------------------
def _results(store: Store, split: str, zero: dict, probed: Tally | None, curve) -> dict[str, dict[str, Any]]:
    """CLIP_benchmark's layout, one record per file: dataset, model, pretrained, task, metrics."""
    identity = store.manifest.model
    base = {"dataset": store.split_info(split).source or split, "model": identity.get("architecture"),
            "pretrained": identity.get("spec"), "language": "en",
            "featstore": {"store": store.root, "split": split, "model": identity}}
    results = {"results.json": {**base, "task": "zeroshot_classification",
                                "metrics": {k: zero[k] for k in ("acc1", "acc5", "mean_per_class_recall")}}}
    if probed:
        metrics = probed.metrics()
        results["results-linear_probe.json"] = {**base, "task": "linear_probe", "metrics": {
            f"lp_{k}": metrics[k] for k in ("acc1", "acc5", "mean_per_class_recall")}}
    for entry in curve or []:
        results[f"results-fewshot-{entry['shots']}.json"] = {**base, "task": "linear_probe",
                                                              "fewshot_k": entry["shots"], "seeds": entry.get("seeds"),
                                                              "metrics": {"lp_acc1": entry["acc1_mean"],
                                                                          "lp_acc1_std": entry["acc1_std"],
                                                                          "lp_acc1_per_seed": entry.get("acc1_per_seed")}}
    return results


# ---- the page ---------------------------------------------------------------------------------------
STYLE = """body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:0.2em 0.6em;text-align:left}
td.n{text-align:right}img{max-width:100%;display:block;margin:0.5em 0 1.5em}
.warn{background:#fde2e1;border:1px solid #d33;padding:0.6em 1em}.note{color:#666;font-size:0.9em}"""


def _percent(x) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.2f}%"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value) -> str:
        kind = ' class="n"' if isinstance(value, (int, float)) or str(value).endswith("%") else ""
        return f"<td{kind}>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(cell(v) for v in row)}</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(store: Store, split: str, identity: dict, zero, probed: Tally | None, curve, images: list[str],
          probe_path: str | None, result_files: list[str]) -> str:
    e = html.escape
    tally, names, summary = zero.tally, zero.names, zero.summary
    parts = [f"<h1>featstore report: split {e(split)}</h1>",
             f"<p>Store <code>{e(store.root)}</code><br>Model <code>{e(describe(identity))}</code></p>"]
    if identity.get("random_weights"):
        parts.append('<p class="warn"><b>RANDOM WEIGHTS.</b> This store was encoded with a randomly initialised '
                     "model: every score below is meaningless beyond checking that the pipeline runs.</p>")
    metrics = [["zero-shot", summary["rows"], summary["n"], _percent(summary["acc1"]), _percent(summary["acc5"]),
                _percent(summary["mean_per_class_recall"])]]
    if probed:
        m = probed.metrics()
        metrics.append([f"linear probe ({os.path.basename(probe_path)})", summary["rows"], m["n"],
                        _percent(m["acc1"]), _percent(m["acc5"]), _percent(m["mean_per_class_recall"])])
    parts += ["<h2>Summary</h2>",
              _table(["", "images", "labelled", "acc1", "acc5", "mean per-class recall"], metrics)]
    captions = {"per_class.png": "Per-class accuracy", "confusions.png": "Most confused pairs",
                "confusion_matrix.png": "Confusion matrix", "fewshot.png": "Few-shot curve",
                "scores.png": "Score distribution"}
    for name in images:
        parts.append(f"<h2>{captions[name]}</h2><img src=\"{name}\" alt=\"{captions[name]}\">")
        if name == "per_class.png":
            parts.append(_worst_table(tally, probed, names))
        elif name == "confusions.png":
            rows = [[names[t], names[p], count, _percent(count / tally.rows[t])] for t, p, count in tally.confusions(TOP)]
            parts.append(_table(["true", "predicted as", "images", "of the true class"], rows))
            if not tally.exact:
                parts.append('<p class="note">More distinct confused pairs occurred than are kept: counts are lower '
                             "bounds.</p>")
        elif name == "fewshot.png":
            rows = [[entry["shots"], entry.get("seeds", "-"), _percent(entry["acc1_mean"]), _percent(entry["acc1_std"]),
                     ", ".join(_percent(a) for a in entry.get("acc1_per_seed") or [])] for entry in curve]
            parts.append(_table(["shots per class", "seeds", "acc1 mean", "sd", "per seed"], rows))
    if "confusions.png" not in images:
        parts.append("<p>No labelled image was confused with another class.</p>")
    parts.append('<p class="note">Metrics as JSON in CLIP_benchmark\'s layout: '
                 + ", ".join(f'<a href="{e(n)}">{e(n)}</a>' for n in result_files)
                 + ".</p>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>featstore report: {e(split)}"
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _worst_table(zero: Tally, probed: Tally | None, names: list[str]) -> str:
    accuracy = _accuracy(zero)
    worst = [c for c in np.argsort(np.where(zero.rows > 0, accuracy, np.inf), kind="stable")[:TOP] if zero.rows[c]]
    header = ["class", "images", "zero-shot acc1"] + (["probe acc1"] if probed else [])
    rows = [[names[c], int(zero.rows[c]), _percent(accuracy[c])] + ([_percent(_accuracy(probed)[c])] if probed else [])
            for c in worst]
    return f"<h3>Worst {len(rows)} classes (zero-shot)</h3>" + _table(header, rows)
