"""``featstore labels``: class text embeddings (CLIP's prompt ensembling) and the FAISS label index."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featstore.data import named_or_file
from featstore.errors import FeatstoreError
from featstore.store.schema import CLASSES_NAME, INDEX_NAME
from featstore.models import load_recorded_model
from featstore.store import LABELS, LabelIndex, Store, atomic_write, sha256_file

DEFAULT_TEMPLATE = "a photo of a {}."


def read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise FeatstoreError(f"cannot read {what} file {path}: {e.strerror}") from None


def resolve_templates(templates: list[str] | None = None, templates_file: str | None = None) -> list[str]:
    """--template T..., --templates FILE or a shipped list's name (``paper80``); default ``a photo of a {}.``."""
    chosen = list(templates or [])
    if templates_file:
        chosen += read_lines(named_or_file(templates_file, "templates"), "templates")
    chosen = chosen or [DEFAULT_TEMPLATE]
    for template in chosen:
        if template.count("{}") != 1:
            raise FeatstoreError(f"template {template!r} must contain '{{}}' exactly once")
    return chosen


def resolve_display_names(classes: list[str], classes_file: str | None) -> list[str]:
    """Names that go into the prompts: the class names verbatim, or --classes FILE (or a shipped list's name,
    ``cifar100-display``), which holds either one name per line in the store's class order, or
    ``class<TAB>display`` lines."""
    if not classes_file:
        return list(classes)
    lines = read_lines(named_or_file(classes_file, "classes"), "classes")
    if all("\t" in line for line in lines):
        mapping = dict(line.split("\t", 1) for line in lines)
        return [mapping.get(name, name) for name in classes]
    if len(lines) != len(classes):
        raise FeatstoreError(f"{classes_file} has {len(lines)} names but the store has {len(classes)} classes")
    return lines


def class_embeddings(model, names: list[str], templates: list[str], batch: int = 256) -> np.ndarray:
    """Mean of the normalised template embeddings per class, renormalised (CLIP's prompt ensembling)."""
    out = np.empty((len(names), model.dim), dtype=np.float32)
    prompts = [t.replace("{}", name) for name in names for t in templates]
    features = np.concatenate([model.encode_texts(prompts[i:i + batch]) for i in range(0, len(prompts), batch)])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    for c in range(len(names)):
        mean = features[c * len(templates):(c + 1) * len(templates)].mean(axis=0)
        out[c] = mean / np.linalg.norm(mean)
    return out


def build_labels(store_dir: str, templates: list[str] | None = None, templates_file: str | None = None,
                 classes_file: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Embed the class prompts and replace the store's label index and class table in one commit.

    Both files are written under new names (``labels/index-HEX.faiss``, ``labels/classes-HEX.parquet``) and
    fsynced, then the manifest that names them is committed (the one atomic step), then the files it no longer
    names are removed: a kill at any moment leaves the old label set or the new one, never a mix."""
    import faiss

    store = Store.open(store_dir)
    store.check_unlocked()
    chosen = resolve_templates(templates, templates_file)
    if not store.classes:
        raise FeatstoreError(f"store {store.root} has no classes: encode a labelled source, or a folder of class folders")
    resolve_display_names(store.classes, classes_file)  # a bad --classes file is refused before the model loads
    folder = labels_folder(store)
    model = load_recorded_model(store.manifest.model, device)
    with store.lock("featstore labels"):
        classes = store.classes  # as committed now: taking the lock read the manifest again
        display = resolve_display_names(classes, classes_file)
        embeddings = class_embeddings(model, display, chosen)
        tag = uuid.uuid4().hex
        table_path = os.path.join(folder, f"classes-{tag}.parquet")
        index_path = os.path.join(folder, f"index-{tag}.faiss")
        table = pa.table({
            "class_id": pa.array(range(len(classes)), pa.int32()),
            "name": classes,
            "display": display,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), model.dim),
        })
        index = faiss.IndexFlatIP(model.dim)
        index.add(embeddings)
        atomic_write(table_path, lambda tmp: pq.write_table(table, tmp))
        atomic_write(index_path, lambda tmp: faiss.write_index(index, tmp))
        store.set_labels(LabelIndex(  # the commit
            classes=len(classes), templates=chosen, display_names=display,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            index_file=os.path.basename(index_path), index_sha256=sha256_file(index_path),
            classes_file=os.path.basename(table_path), classes_sha256=sha256_file(table_path)))
        remove_unnamed(folder, {os.path.basename(index_path), os.path.basename(table_path)})
    return {"store": store.root, "classes": len(classes), "templates": len(chosen),
            "index": os.path.relpath(index_path, store.root)}


def labels_folder(store: Store) -> str:
    """STORE/labels, created if missing; refused when it is a symbolic link (removing a replaced label file
    there would remove a file outside the store) or not a folder."""
    folder = os.path.join(store.root, LABELS)
    if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
        raise FeatstoreError(f"{folder} is a symbolic link or a file, not the store's labels folder: move it aside "
                             "and run again")
    os.makedirs(folder, exist_ok=True)
    return folder


def remove_unnamed(folder: str, named: set[str]) -> None:
    """Label files and their temp files in FOLDER that the manifest does not name (NAMED): the set just
    replaced, and any a killed run left. Other files are not featstore's and stay."""
    for name in os.listdir(folder):
        temp = name.startswith((".index", ".classes")) and name.endswith(".tmp")
        if name not in named and (temp or INDEX_NAME.match(name) or CLASSES_NAME.match(name)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))  # a symlink is removed, never followed


def load_label_index(store: Store):
    """The FAISS index and display names, checked against the store's current classes and against the
    index's recorded sha256 (a damaged index is refused, never searched)."""
    import faiss

    for attempt in range(2):
        labels = store.manifest.labels
        if not labels:
            raise FeatstoreError(f"store {store.root} has no label index: run featstore labels {store.root}")
        if labels.classes != len(store.classes):
            raise FeatstoreError(
                f"label index covers {labels.classes} classes but the store now has {len(store.classes)}: "
                f"run featstore labels {store.root} again"
            )
        path = store.label_paths()[0]
        if attempt or os.path.isfile(path):
            break
        store.reload()  # a labels run committed a new set (and removed this one) since the manifest was read
    again = f"run featstore labels {store.root} again"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FeatstoreError(f"cannot read label index {path} ({e.strerror}): {again}") from None
    if hashlib.sha256(data).hexdigest() != labels.index_sha256:
        raise FeatstoreError(f"label index {path} is damaged (checksum mismatch): {again}")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except Exception:
        raise FeatstoreError(f"cannot read label index {path}: {again}") from None
    if index.ntotal != labels.classes or index.d != store.dim:
        raise FeatstoreError(f"label index {path} holds {index.ntotal} x {index.d}, not {labels.classes} classes "
                             f"x {store.dim}: {again}")
    return index, labels.display_names
