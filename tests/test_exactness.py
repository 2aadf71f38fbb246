"""featstore's embeddings, zero-shot scores and probe accuracy equal the seed notebook's code on the same
model and images (the reference below is the seed's loop: DataLoader batch 100, encode_image,
softmax(100·cos) top-5, LogisticRegression(random_state=0, C=0.316, max_iter=1000))."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import featstore
from test_store import store_rows

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip
    import torch
    from clip.clip import _transform
    from clip.model import build_model
    from sklearn.linear_model import LogisticRegression
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder


def seed_reference(checkpoint: str, root: str):
    """The seed notebook, with clip.load's CPU path for a state dict (build_model, then .float())."""
    model = build_model(torch.load(checkpoint, map_location="cpu", weights_only=True)).float().eval()
    preprocess = _transform(model.visual.input_resolution)
    train = ImageFolder(os.path.join(root, "train"), transform=preprocess)
    test = ImageFolder(os.path.join(root, "test"), transform=preprocess)

    def get_features(dataset):
        all_features, all_labels = [], []
        with torch.no_grad():
            for images, labels in DataLoader(dataset, batch_size=100):
                all_features.append(model.encode_image(images))
                all_labels.append(labels)
        return torch.cat(all_features).cpu().numpy(), torch.cat(all_labels).cpu().numpy()

    train_features, train_labels = get_features(train)
    test_features, test_labels = get_features(test)
    text_inputs = torch.cat([clip.tokenize(f"a photo of a {c}") for c in test.classes])
    with torch.no_grad():
        text_features = model.encode_text(text_inputs)
    image_features = torch.from_numpy(test_features)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    similarity = (100.0 * image_features @ text_features.T).softmax(dim=-1)
    values, indices = similarity.topk(5)
    classifier = LogisticRegression(random_state=0, C=0.316, max_iter=1000)
    classifier.fit(train_features, train_labels)
    accuracy = np.mean((test_labels == classifier.predict(test_features)).astype(float))
    ids = lambda ds: [os.path.relpath(p, ds.root).replace(os.sep, "/") for p, _ in ds.samples]  # noqa: E731
    return {
        "train_ids": ids(train), "test_ids": ids(test), "train_features": train_features,
        "test_features": test_features, "test_labels": test_labels, "classes": test.classes,
        "top5_scores": values.numpy(), "top5_indices": indices.numpy(), "probe_acc": accuracy,
    }


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("workers", ["0", "2"])
def test_featstore_equals_seed_reference(tmp_path, checkpoint, dataset, workers):
    ref = seed_reference(checkpoint, dataset)
    store = str(tmp_path / "store")
    for split in ("train", "test"):
        featstore("encode", os.path.join(dataset, split), "--store", store, "--split", split, "--model", checkpoint,
                  "--dtype", "float32", "--workers", workers, "--batch-size", "7", "--quiet")
    featstore("labels", store, "--template", "a photo of a {}")
    out = str(tmp_path / "top5.parquet")
    zero_shot = json.loads(featstore("query", store, "--split", "test", "--top-k", "5", "--out", out, "--json").stdout)
    probes = {solver: json.loads(featstore("probe", store, "--train-split", "train", "--test-split", "test",
                                           "--C", "0.316", "--solver", solver, "--json").stdout)
              for solver in ("torch", "sklearn")}

    # embeddings: raw encode_image outputs, matched by id
    for split in ("train", "test"):
        stored = store_rows(store, split)  # asserts no duplicate ids
        assert sorted(stored) == sorted(ref[f"{split}_ids"])
        mine = np.stack([stored[i] for i in ref[f"{split}_ids"]])
        assert cosine_rows(mine, ref[f"{split}_features"]).min() >= 0.9999
        np.testing.assert_allclose(mine, ref[f"{split}_features"], rtol=1e-4, atol=1e-5)

    # zero-shot: same top-5 labels and scores per image, same accuracy
    top = pq.read_table(out).to_pydict()
    order = {row_id: i for i, row_id in enumerate(top["id"])}
    for i, row_id in enumerate(ref["test_ids"]):
        j = order[row_id]
        assert top["labels"][j] == [ref["classes"][c] for c in ref["top5_indices"][i]]
        np.testing.assert_allclose(top["scores"][j], ref["top5_scores"][i], rtol=1e-4, atol=1e-6)
    ref_acc1 = float(np.mean(ref["top5_indices"][:, 0] == ref["test_labels"]))
    ref_acc5 = float(np.mean([y in row for y, row in zip(ref["test_labels"], ref["top5_indices"])]))
    assert zero_shot["n"] == len(ref["test_ids"])
    assert zero_shot["acc1"] == pytest.approx(ref_acc1)
    assert zero_shot["acc5"] == pytest.approx(ref_acc5)
    assert 0.0 <= zero_shot["mean_per_class_recall"] <= 1.0

    # linear probe on the stored shards, both solvers (torch L-BFGS and the seed's sklearn call): same accuracy
    for probe in probes.values():
        assert probe["C"] == 0.316
        assert (probe["n_train"], probe["n_test"]) == (len(ref["train_ids"]), len(ref["test_ids"]))
        assert probe["acc1"] == pytest.approx(ref["probe_acc"])
    assert ref["probe_acc"] > 1 / 6  # the probe learns something: the comparison is not between two chance levels


def test_bf16_stays_close_to_seed_reference(tmp_path, checkpoint, dataset):
    """--precision bf16 (CPU autocast) is not bit-exact, but its embeddings keep cosine >= 0.99 to the seed's
    fp32 features, the precision goal's bound, and are not fp32 in disguise."""
    ref = seed_reference(checkpoint, dataset)
    store = str(tmp_path / "store")
    featstore("encode", os.path.join(dataset, "test"), "--store", store, "--split", "test", "--model", checkpoint,
              "--precision", "bf16", "--dtype", "float32", "--workers", "0", "--quiet")
    stored = store_rows(store, "test")
    mine = np.stack([stored[i] for i in ref["test_ids"]])
    assert cosine_rows(mine, ref["test_features"]).min() >= 0.99
    assert not np.allclose(mine, ref["test_features"], rtol=1e-6, atol=0)
    with open(os.path.join(store, "featstore.json")) as f:
        assert json.load(f)["model"]["precision"] == "bf16"  # part of the model identity the store records
